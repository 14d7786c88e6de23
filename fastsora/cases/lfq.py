"""Check and benchmark cases of ``lfq`` (lookup-free quantization with exact entropies).

Check: the composed op (quantize + per-sample entropy + codebook entropy + commitment, and the gradient of a
random projection of all of them w.r.t. x) against the float64 oracle: brute force over all 2^D codes for
D <= 12, the exact hi/lo reference in float64 beyond.

Bench: ``fastsora.nn.LFQ`` vs vector-quantize-pytorch's ``LFQ`` (the anchor), training-mode forward and
forward+backward, at D = 10, 14, 18 and 1k-64k tokens on CUDA; on CPU a modest subset. The anchor builds
tokens × 2^D tensors: points it cannot fit raise MemoryError (recorded as out of memory by the runner).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence, Tuple

import torch

from fastsora.registry import Case, OpSpec, register_op
from fastsora.testing import grads

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
INV_TEMPERATURE = 100.0
#: bytes the anchor keeps per token and code (measured: 3.6 GB for 512 tokens at 2^18 ≈ 27 B)
ANCHOR_BYTES_PER_TOKEN_CODE = 28


def _check_case(label: str, t: int, c: int, d: int, masked: bool = False, layout: str = "contiguous",
                scale: float = 0.02) -> Case:
    def make(device, dtype):
        if layout == "noncontiguous":
            x = (torch.randn(t, c, 2 * d, device=device) * scale).to(dtype)[..., ::2]
        else:
            x = (torch.randn(t, c, d, device=device) * scale).to(dtype)
        x.requires_grad_(True)
        w = (torch.rand(t, device=device) > 0.35).float() if masked else None
        cw = (torch.rand(t, device=device) > 0.5).float() if masked else None
        return (x, w, cw)

    return Case(label, make, meta={"tokens": t, "codebooks": c, "dim": d})


def _outputs(res, x):
    outs = (res.out, res.per_sample_entropy, res.codebook_entropy, res.commitment)
    return (res.out, res.indices.double(), res.per_sample_entropy.reshape(1), res.codebook_entropy,
            res.commitment.reshape(1), *grads(outs, [x]))


def _run(x, w, cw) -> Tuple[torch.Tensor, ...]:
    from fastsora.ops.lfq import lfq

    return _outputs(lfq(x, 1.0, INV_TEMPERATURE, entropy_weight=w, commit_weight=cw), x)


def _reference(x, w, cw) -> Tuple[torch.Tensor, ...]:
    """float64 oracle: brute force over all 2^D codes for D <= 12, else the exact hi/lo reference."""
    from fastsora.ops.lfq import LFQOutput
    from fastsora.reference import lfq as ref

    d = x.shape[-1]
    out, idx, pos, neg, ps, cm = ref.quantize(x, 1.0, 4 * INV_TEMPERATURE, True, True, w, cw)
    if d <= 12:
        ps, cb = ref.brute_force_entropies(x, 1.0, INV_TEMPERATURE, w)
    else:
        from fastsora.backend import use_backend
        from fastsora.ops.lfq import lfq

        with use_backend("torch"):
            res = lfq(x, 1.0, INV_TEMPERATURE, entropy_weight=w, commit_weight=cw)
        return _outputs(res, x)
    return _outputs(LFQOutput(out, idx, ps, cb, cm), x)


def _check_cases(device) -> Sequence[Case]:
    if device.type == "cuda":
        return [
            _check_case("T=4096 C=1 D=18 masked", 4096, 1, 18, masked=True),
            _check_case("T=16384 C=1 D=14", 16384, 1, 14),
            _check_case("T=2048 C=2 D=10 noncontig", 2048, 2, 10, layout="noncontiguous"),
            _check_case("T=1000 C=4 D=3 masked", 1000, 4, 3, masked=True),
        ]
    return [
        _check_case("T=48 C=1 D=10 masked", 48, 1, 10, masked=True),
        _check_case("T=33 C=2 D=5 noncontig", 33, 2, 5, layout="noncontiguous"),
        _check_case("T=20 C=3 D=1", 20, 3, 1),
        _check_case("T=40 C=1 D=12", 40, 1, 12, scale=0.005),
    ]


# --------------------------------------------------------------------------------------------- benchmarks
def _bench_case(d: int, tokens: int, batch: int = 1) -> Case:
    n = tokens // batch

    def make(device, dtype):
        x = torch.randn(batch, n, d, device=device, dtype=torch.float32).mul_(0.1).to(dtype).requires_grad_(True)
        return (x, d)

    return Case(f"D={d} tokens={tokens}", make, meta={"dim": d, "tokens": tokens, "bwd_flops_factor": 2.0},
                flops=2.0 * tokens * 2 ** d)


def _bench_cases(device) -> Sequence[Case]:
    if device.type == "cuda":
        return [_bench_case(d, t) for d in (10, 14, 18) for t in (1024, 4096, 16384, 65536)]
    return [_bench_case(10, 4096), _bench_case(18, 512), _bench_case(18, 16384)]


def _memory_budget() -> float:
    """Memory a CPU run may use (0.6 x the free memory): running out of host memory kills the run rather than
    raising."""
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        avail = 8 * 2 ** 30
    return 0.6 * avail


def _thunk(module: torch.nn.Module, x: torch.Tensor, mode: str) -> Callable[[], Any]:
    module.train()
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return module(x)
        return run

    def run():
        ret = module(x)
        loss = ret.quantized.float().square().mean() + ret.entropy_aux_loss
        return torch.autograd.grad(loss, [x])
    return run


def _impl_fastsora(args, mode) -> Optional[Callable[[], Any]]:
    from fastsora.nn.lfq import LFQ

    x, d = args
    return _thunk(LFQ(codebook_size=2 ** d, dim=d).to(x.device), x, mode)


def _impl_anchor(args, mode) -> Optional[Callable[[], Any]]:
    try:
        from vector_quantize_pytorch import LFQ
    except ImportError:
        return None
    x, d = args
    tokens = x.shape[0] * x.shape[1]
    need = ANCHOR_BYTES_PER_TOKEN_CODE * tokens * 2 ** d + 20 * 2 ** d * d
    # on a GPU the anchor runs wherever it fits (a CUDA out-of-memory error is a row); on CPU it would not raise
    budget = _memory_budget() if x.device.type != "cuda" else None
    if budget is not None and need > budget:
        raise MemoryError(f"not run, predicted: the anchor needs ~{need / 2**30:.1f} GiB ({tokens} tokens x 2^{d} "
                          f"codes), the CPU budget is {budget / 2**30:.1f} GiB")
    return _thunk(LFQ(codebook_size=2 ** d, dim=d).to(x.device), x, mode)


register_op(OpSpec(
    name="lfq",
    family="lfq",
    run=_run,
    reference=_reference,
    check_cases=_check_cases,
    tolerance=TOL,
    bench_cases=_bench_cases,
    bench_impls={"fastsora": _impl_fastsora, "vector-quantize-pytorch": _impl_anchor},
    bench_modes=("fwd+bwd",),
    dtypes_cpu=(torch.float32, torch.float16),
    dtypes_cuda=(torch.float32, torch.float16, torch.bfloat16),
))


# ------------------------------------------------------------------ the CPU targets, one process each
def _point(impl: str, d: int, tokens: int, runs: int) -> dict:
    """Time (median of the measured run and ``runs`` more) and peak extra resident memory (VmHWM after
    resetting it, minus the RSS before) of one training fwd+bwd on CPU, torch backend for fastsora; one
    warm-up call first (lazy initialisation is not the op's memory)."""
    import statistics
    import time

    from fastsora.backend import use_backend

    torch.manual_seed(0)
    x, _ = _bench_case(d, tokens).make(torch.device("cpu"), torch.float32)
    make = _impl_fastsora if impl == "fastsora" else _impl_anchor
    thunk = make((x, d), "fwd+bwd")

    def rss_kb(field: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field))

    with use_backend("torch"):
        thunk()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")   # reset the peak RSS (VmHWM) to the current RSS
        before = rss_kb("VmRSS:")
        t0 = time.perf_counter()
        thunk()
        first = time.perf_counter() - t0
        peak = rss_kb("VmHWM:") - before
        times = [first]
        for _ in range(runs):
            t0 = time.perf_counter()
            thunk()
            times.append(time.perf_counter() - t0)
    timed = times
    return {"impl": impl, "d": d, "tokens": tokens, "median_s": statistics.median(timed),
            "peak_extra_mib": peak / 1024}


def measure_targets(points=(("vector-quantize-pytorch", 18, 512, 0), ("fastsora", 18, 512, 10),
                            ("fastsora", 18, 16384, 4))) -> list:
    """Run each point in a fresh Python process (clean peak-memory accounting); returns their dicts."""
    import json
    import subprocess
    import sys

    rows = []
    for impl, d, tokens, runs in points:
        code = ("import json, sys; from fastsora.cases.lfq import _point; "
                f"print(json.dumps(_point({impl!r}, {d}, {tokens}, {runs})))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


if __name__ == "__main__":
    import json

    for row in measure_targets():
        print(json.dumps(row))
