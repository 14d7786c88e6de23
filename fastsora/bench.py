"""``fastsora bench``: reference vs fastsora (and third-party baselines) per op, case, dtype and mode.

Times are medians: ``triton.testing.do_bench`` on CUDA, wall clock on CPU. On CPU the 'fastsora' impl runs
fastsora's torch backend (its CPU path); the Triton kernels there run only in the interpreter, which is a
correctness tool and is never timed. Peak memory is the extra memory one iteration allocates beyond its
inputs (CUDA: the caching allocator's peak; CPU: the profiler's allocation timeline).
"""
from __future__ import annotations

import contextlib
import datetime
import importlib
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from fastsora.backend import use_backend
from fastsora.registry import Case, OpSpec, select_ops

#: FLOPs of a backward pass relative to the forward (flash-attn counts 2.5 for attention; cases override
#: through ``Case.meta['bwd_flops_factor']``).
BWD_FLOPS_FACTOR = 2.0
MODE_FLOPS = {"fwd": lambda f, k: f, "bwd": lambda f, k: f * k, "fwd+bwd": lambda f, k: f * (1 + k)}
_OOM = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), MemoryError)


def _installed_version(dist: str, module: Optional[str] = None) -> Optional[str]:
    """The installed version of distribution ``dist`` (or of its import ``module``, for builds installed under
    another distribution name), or None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return getattr(importlib.import_module(module or dist), "__version__", None)
    except ImportError:
        return None


def versions() -> Dict[str, Optional[str]]:
    """Versions a result depends on (numpy: Triton's interpreter does, see backend.interpreter_incompatibility)."""
    return {"python": platform.python_version(), "torch": torch.__version__,
            "triton": _installed_version("triton"), "numpy": _installed_version("numpy"),
            "cuda": torch.version.cuda,
            "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None,
            "xformers": _installed_version("xformers"), "flash-attn": _installed_version("flash-attn", "flash_attn"),
            "vector-quantize-pytorch": _installed_version("vector-quantize-pytorch", "vector_quantize_pytorch")}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU ({os.cpu_count()} cores)"


def git_commit() -> Optional[str]:
    """HEAD of the checkout fastsora runs from, or ``$FASTSORA_GIT_COMMIT`` (a copy without .git, e.g. a lent
    GPU machine's working tree: pass the commit in the command)."""
    if os.environ.get("FASTSORA_GIT_COMMIT"):
        return os.environ["FASTSORA_GIT_COMMIT"].strip()
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def median_ms(fn: Callable[[], Any], device: torch.device, min_runs: int = 3, budget_s: float = 2.0) -> float:
    """Median time of ``fn`` in ms: do_bench on CUDA, wall clock (after one warm-up) on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, return_mode="median"))
    fn()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Bytes one call of ``fn`` allocates at its peak beyond what was allocated before it.

    ``fn`` runs once first, so one-time costs (autotuning, thread pools, lazy library set-up) are not
    counted."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    # the profiler's memory timeline sees every tensor created and destroyed, also inside custom ops
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                                  with_stack=True) as prof:
        fn()
    current = peak = 0
    for _, action, (key, _version), size in prof._memory_profile().timeline:
        if key.device.type != "cpu":
            continue
        if action == Action.CREATE:
            current += size
        elif action == Action.DESTROY:
            current -= size
        peak = max(peak, current)
    return int(peak)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ side prints a line at every start and stop)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def measured_peaks(device: torch.device, dtype: torch.dtype) -> Dict[str, float]:
    """Measured peak matmul TFLOP/s (in ``dtype``) and copy GB/s on this device, for % of peak."""
    n = 8192 if device.type == "cuda" else 1024
    mm_dtype = dtype if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=mm_dtype)
    b = torch.randn(n, n, device=device, dtype=mm_dtype)
    tflops = 2 * n**3 / (median_ms(lambda: a @ b, device) * 1e-3) / 1e12
    x = torch.empty(64 * 2**20 if device.type == "cuda" else 8 * 2**20, device=device, dtype=torch.float32)
    y = torch.empty_like(x)
    gbps = 2 * x.numel() * 4 / (median_ms(lambda: y.copy_(x), device) * 1e-3) / 1e9
    return {"tflops": tflops, "gbps": gbps}


def _impls(spec: OpSpec, device: torch.device) -> Dict[str, Callable]:
    """The impls to time here; on CPU 'fastsora' is fastsora's torch backend (labelled so). An op's impls
    named 'fastsora' and 'fastsora[VARIANT]' (e.g. another input layout) run on that backend and are labelled
    'fastsora[BACKEND]' and 'fastsora[BACKEND,VARIANT]'."""
    impls = {}
    for name, make in spec.bench_impls.items():
        if name == "fastsora" or name.startswith("fastsora["):
            backend = "triton" if device.type == "cuda" else "torch"
            variant = name[len("fastsora["):-1] if name != "fastsora" else ""

            def make_fast(args, mode, _make=make, _backend=backend):
                with use_backend(_backend):  # set-up work (a forward to differentiate) on the timed backend too
                    thunk = _make(args, mode)
                if thunk is None:
                    return None

                def run():
                    with use_backend(_backend):
                        return thunk()
                return run
            impls[f"fastsora[{backend},{variant}]" if variant else f"fastsora[{backend}]"] = make_fast
        else:
            impls[name] = make
    return impls


def _row(item: "BenchItem") -> Dict[str, Any]:
    """A result row of ``item`` with nothing measured yet."""
    return {"op": item.spec.name, "case": item.case.label, "dtype": str(item.dtype).removeprefix("torch."),
            "mode": item.mode, "impl": item.impl, "status": "ok", "median_ms": None, "tflops": None, "gbps": None,
            "pct_peak_flops": None, "pct_peak_bw": None, "peak_mem_bytes": None}


def bench_item(item: "BenchItem", device: torch.device, peaks: Dict[str, float]) -> Dict[str, Any]:
    """Time one point and measure its peak memory; out-of-memory, n/a and failing points are rows too (a
    failure's traceback goes to stderr; the run goes on with the next point)."""
    case = item.case
    row = _row(item)
    try:
        thunk = item.thunk(device)
        if thunk is None:
            row["status"] = "n/a"
            return row
        row["peak_mem_bytes"] = peak_memory_bytes(thunk, device)
        ms = median_ms(thunk, device)
    except _OOM as exc:
        row["status"] = f"out of memory: {str(exc).splitlines()[0][:120]}"
        return row
    except Exception as exc:  # noqa: BLE001 - one failing impl (a baseline's own limits) must not end the run
        traceback.print_exc(file=sys.stderr)
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        row["status"] = f"error: {type(exc).__name__}: {first}"
        return row
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row["median_ms"] = ms
    factor = case.meta.get("bwd_flops_factor", BWD_FLOPS_FACTOR)
    mode = item.mode
    if case.flops:
        row["tflops"] = MODE_FLOPS[mode](case.flops, factor) / (ms * 1e-3) / 1e12
        row["pct_peak_flops"] = 100 * row["tflops"] / peaks["tflops"]
    if case.bytes:
        row["gbps"] = MODE_FLOPS[mode](case.bytes, factor) / (ms * 1e-3) / 1e9
        row["pct_peak_bw"] = 100 * row["gbps"] / peaks["gbps"]
    return row


@dataclass
class BenchItem:
    """One timed point: an impl of an op on one case, dtype and mode."""

    spec: OpSpec
    case: Case
    dtype: torch.dtype
    mode: str
    impl: str
    make: Callable

    def __str__(self) -> str:
        return f"{self.spec.name}-{self.case.label}-{str(self.dtype).removeprefix('torch.')}-{self.mode}-{self.impl}"

    def thunk(self, device: torch.device) -> Optional[Callable[[], Any]]:
        """Fresh inputs and the zero-argument callable that runs one iteration (None: not applicable)."""
        return self.make(self.case.make(device, self.dtype), self.mode)


def bench_plan(device: torch.device, ops: Optional[Sequence[str]] = None,
               dtypes: Optional[Sequence[torch.dtype]] = None,
               modes: Optional[Sequence[str]] = None, cases: Optional[str] = None,
               impls: Optional[Sequence[str]] = None) -> List[BenchItem]:
    """Every (op, case, dtype, mode, impl) point registered for ``device`` (default dtype: bf16 on CUDA,
    fp32 on CPU), in registration order. ``cases``: a regular expression searched in each case's label
    (``re.search``); ``impls``: impl names to keep (``fastsora`` matches ``fastsora[triton]`` and
    ``fastsora[torch]``). Shared by ``fastsora bench`` and the pytest-benchmark suites in benchmarks/."""
    pattern = re.compile(cases) if cases else None
    plan = []
    for spec in select_ops(ops, "fastsora bench"):
        op_dtypes = dtypes or ((torch.bfloat16,) if device.type == "cuda" else (torch.float32,))
        for case in spec.bench_cases(device):
            if pattern is not None and not pattern.search(case.label):
                continue
            for dtype in op_dtypes:
                for mode in (m for m in spec.bench_modes if not modes or m in modes):
                    for impl, make in _impls(spec, device).items():
                        if impls and impl not in impls and impl.split("[")[0] not in impls:
                            continue
                        plan.append(BenchItem(spec, case, dtype, mode, impl, make))
    return plan


@contextlib.contextmanager
def _cudnn_benchmark(on: bool):
    """``torch.backends.cudnn.benchmark`` on for the block when ``on``, then back to what it was."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = before or on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def run_bench(device: torch.device, ops: Optional[Sequence[str]] = None,
              dtypes: Optional[Sequence[torch.dtype]] = None, modes: Optional[Sequence[str]] = None,
              progress: Callable[[int, int, str], None] = lambda i, n, s: None, cases: Optional[str] = None,
              impls: Optional[Sequence[str]] = None, budget_s: Optional[float] = None,
              on_report: Callable[[Dict[str, Any]], None] = lambda report: None) -> Dict[str, Any]:
    """Run every plan point; ``progress(done, total, line)`` is called after each and ``on_report(report)``
    with the report so far (``partial`` true until the last point), so a run cut short still leaves its
    rows. With ``budget_s``, no point starts after that many seconds: the rest are rows with status
    'skipped: time budget'."""
    from fastsora.kernels.utils import autotune_picks  # after the CLI decided on the interpreter

    start = time.perf_counter()
    # the cuDNN baselines pick their algorithm by timing (at the untimed first call), as tuned training does;
    # the caller's setting is restored after the run
    with _cudnn_benchmark(device.type == "cuda"):
        plan = bench_plan(device, ops, dtypes, modes, cases, impls)
        peaks = {str(d).removeprefix("torch."): measured_peaks(device, d) for d in {p.dtype for p in plan}}
        report = {
            "device": device_name(device), "device_type": device.type, "versions": versions(),
            "git_commit": git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "interpreter_note": None if device.type == "cuda" else "CPU: fastsora is timed on its torch backend; "
            "Triton kernels run only in the interpreter here and are not timed",
            "selection": {"ops": list(ops) if ops else None, "cases": cases, "impls": list(impls) if impls else None,
                          "budget_s": budget_s},
            "measured_peaks": peaks, "results": [], "partial": True,
            # on CUDA: the config each Triton autotuner chose per key, to trim the candidate tables
            "autotune_picks": {},
        }
        for i, item in enumerate(plan, 1):
            if budget_s is not None and time.perf_counter() - start > budget_s:
                row = _row(item)
                row["status"] = "skipped: time budget"
            else:
                row = bench_item(item, device, peaks[str(item.dtype).removeprefix("torch.")])
            report["results"].append(row)
            report["autotune_picks"] = autotune_picks()
            report["partial"] = i < len(plan)
            timing = f"{row['median_ms']:.3f} ms" if row["median_ms"] is not None else row["status"]
            progress(i, len(plan), f"{item}: {timing}")
            on_report(report)
        report["partial"] = False
        report["autotune_picks"] = autotune_picks()
        return report


def results_base(report: Dict[str, Any], out_dir: str) -> str:
    """``out_dir/bench-<device>-<date>``: the path of a report's files without extension."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    tag = "".join(c if c.isalnum() else "-" for c in report["device"]).strip("-").lower()[:40]
    return os.path.join(out_dir, f"bench-{tag}-{stamp}")


def write_json(report: Dict[str, Any], path: str) -> None:
    """Write the report as JSON atomically (a run killed mid-write leaves the previous complete file)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(path + ".tmp", path)


def write_results(report: Dict[str, Any], out_dir: str, base: Optional[str] = None) -> List[str]:
    """Write the JSON (and a PNG plot when matplotlib is installed) to ``base`` (default
    :func:`results_base`); returns the paths written."""
    base = base or results_base(report, out_dir)
    write_json(report, base + ".json")
    paths = [base + ".json"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install fastsora[bench]): no plot written", file=sys.stderr)
        return paths
    rows = [r for r in report["results"] if r["median_ms"] is not None]
    groups = sorted({(r["op"], r["mode"]) for r in rows})
    if not groups:
        return paths
    fig, axes = plt.subplots(len(groups), 1, figsize=(11, 3.2 * len(groups)), squeeze=False)
    for ax, (op, mode) in zip(axes[:, 0], groups):
        sel = [r for r in rows if r["op"] == op and r["mode"] == mode]
        cases = list(dict.fromkeys(f"{r['case']} {r['dtype']}" for r in sel))
        impls = list(dict.fromkeys(r["impl"] for r in sel))
        width = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            xs, ys = [], []
            for i, c in enumerate(cases):
                for r in sel:
                    if r["impl"] == impl and f"{r['case']} {r['dtype']}" == c:
                        xs.append(i + j * width)
                        ys.append(r["median_ms"])
            ax.bar(xs, ys, width, label=impl)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], cases, rotation=20, fontsize=7, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("median ms")
        ax.set_title(f"{op} {mode} on {report['device']}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(base + ".png", dpi=110)
    plt.close(fig)
    paths.append(base + ".png")
    return paths


def pytest_benchmark(benchmark, item: BenchItem, device: torch.device) -> None:
    """Run one plan point under pytest-benchmark (the suites in benchmarks/ call this)."""
    import pytest

    try:
        thunk = item.thunk(device)
    except _OOM as exc:
        pytest.skip(f"out of memory: {exc}")
    if thunk is None:
        pytest.skip(f"{item.impl} does not apply here")
    if device.type == "cuda":
        def run():
            thunk()
            torch.cuda.synchronize(device)
        benchmark(run)
    else:
        benchmark(thunk)
    benchmark.extra_info.update({"device": device_name(device), **versions()})
