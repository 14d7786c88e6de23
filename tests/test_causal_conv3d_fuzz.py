"""Fuzz suite for the CausalConv3d family: ``fastsora.ops.causal_conv3d`` and ``fastsora.nn.CausalConv3d`` on the
Triton backend against an independent float64 oracle (``fastsora.testing.causal_conv3d_definition``), over random
configurations.

Each case draws batch, channels (odd ones and C_in <= 8, the flattened (tap, channel) kernels, too), frames,
height, width, kernel sizes (kt any of 1..5; kh, kw odd as magvit2-pytorch demands), time stride and dilation
(negative time padding included: a crop), pad mode, bias, fused epilogue (SiLU, residual), the input's layout
(NCDHW, channels_last_3d, a strided view; for the op also a channels_last_3d weight), the entry point (op or
module), and sometimes a stream (the time axis cut into random chunks fed with the frame cache: the module's
``return_cache``, or the op's ``cache=`` with a cache built here). It checks the output (shape, dtype, memory
format, values) and the gradients of input, weight, bias and residual against float64, and a stream against
the one-call output and against float64.

Slow (CI deselects it): ``FASTSORA_FUZZ_CASES`` cases per dtype (default 16), ``FASTSORA_FUZZ_SEED`` drawn per run
(pytest's header shows it). A failure names its seed and case:
``FASTSORA_FUZZ_SEED=<seed> pytest -m slow tests/test_causal_conv3d_fuzz.py -k 'case<N>]'``.
"""
import numpy as np
import pytest
import torch

import fastsora
from fastsora.nn import CausalConv3d
from fastsora.ops import causal_conv3d
from fastsora.testing import (TOLERANCE, assert_close, assert_flash_rule, causal_conv3d_definition, channels_last,
                              fuzz_cases, fuzz_random, grads, noncontiguous, randn, relative_error, to_float64)

pytestmark = pytest.mark.slow


def _rows_exact() -> bool:
    """Whether the interpreter's tl.dot (numpy's float32 matmul) gives a row the same bits wherever the row sits
    in the tile (as in tests/test_causal_conv3d_module.py): then a stream equals the one call bitwise on CPU."""
    a = np.random.default_rng(0).standard_normal((256, 96)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((96, 32)).astype(np.float32)
    full = a @ b
    return all(np.array_equal(np.roll(np.roll(a, s, 0) @ b, -s, 0), full) for s in (1, 7, 16, 100))


_ROWS_EXACT = _rows_exact()


# ---------------------------------------------------------------------------------------------------------
# drawing a case
# ---------------------------------------------------------------------------------------------------------

#: upper bound on a case's estimated interpreter time in seconds (:func:`_cost`; one core, fp32 and fp16 alike)
COST_BUDGET = 4.0


def _cost(cfg) -> float:
    """About how long the case takes in the interpreter, from the tile steps (256 x 32 x 32 dots) of its
    launches: forward, grad weight and grad input over every position (~12 ms a step, measured), and in replicate
    mode the grad input's extra passes over frame 0 and the border pixels, which loop over every padded position
    that clamps to a pixel (~5-10 ms a step)."""
    def cdiv(a, b_):
        return -(-a // b_)
    b, ci, co, t, h, w, s, d = (cfg[n] for n in ("b", "ci", "co", "t", "h", "w", "stride", "dilation"))
    kt, kh, kw = cfg["k"]
    taps = kt * kh * kw
    k_steps = cdiv(taps * ci, 32) if ci <= 8 else taps * cdiv(ci, 32)
    fwd = cdiv(b * (t // s) * h * w, 256) * cdiv(co, 32) * k_steps
    bwd_input = cdiv(b * t * h * w, 256) * cdiv(ci, 32) * taps * cdiv(co, 32)
    main = 2 * fwd + bwd_input
    border = 0
    tp = d * (kt - 1) + 1 - s
    if cfg["pad_mode"] == "replicate" and tp < t:
        nt = max(tp, 0) + 1
        nh = 1 + (kh // 2) * (1 if h > 1 else 2)
        nw = 1 + (kw // 2) * (1 if w > 1 else 2)
        per_row = cdiv(ci, 32) * taps * cdiv(co, 32)
        if tp > 0:
            border += cdiv(b * h * w, 256) * per_row * nt
        if kh > 1 or kw > 1:
            border += cdiv(b * t * h * w, 256) * per_row * nt * nh * nw
    if cfg["stream"]:
        main += fwd + len(cfg["chunks"]) * fwd
    return 0.012 * main + 0.008 * border


def _draw(rng):
    """One random configuration (a dict of plain values: it is printed with every failure). The structure
    (kernel, stride, dilation, modes, layout, entry point, stream) is drawn first, then sizes until the case fits
    :data:`COST_BUDGET` (a structure no sizes fit, e.g. a 5x5x5 replicate kernel, is drawn again)."""
    while True:
        stride = rng.choice([1, 1, 1, 2, 2, 3])
        cfg = dict(
            k=(rng.randint(1, 5), rng.choice([1, 3, 5]), rng.choice([1, 3, 5])),   # kh, kw odd (magvit2)
            stride=stride,
            dilation=rng.choice([1, 1, 2, 3]),
            pad_mode=rng.choice(["constant", "replicate"]),
            bias=rng.random() < 0.7,
            activation=rng.choice([None, None, None, "silu"]),
            residual=rng.random() < 0.25,
            layout=rng.choice(["ncdhw", "channels_last", "noncontiguous"]),
            api=rng.choice(["op", "module"]),
            stream=rng.random() < 0.35,
        )
        if cfg["layout"] == "noncontiguous":
            cfg["nc_dim"] = rng.randrange(5)
        if cfg["api"] == "op":
            cfg["weight_channels_last"] = rng.random() < 0.25
        for _ in range(20):
            cfg.update(b=rng.randint(1, 2),
                       ci=rng.randint(1, 8) if rng.random() < 0.5 else rng.randint(9, 24),  # <= 8: flattened
                       co=rng.randint(1, 24), t=rng.randint(stride, 9), h=rng.randint(1, 9), w=rng.randint(1, 9))
            if cfg["stream"]:
                units = cfg["t"] // stride          # chunk lengths are multiples of the stride
                cfg["t"] = units * stride
                cuts = sorted(rng.sample(range(1, units), rng.randint(0, min(units - 1, 3)))) if units > 1 else []
                cfg["chunks"] = [(hi - lo) * stride for lo, hi in zip([0] + cuts, cuts + [units])]
            if _cost(cfg) <= COST_BUDGET:
                cfg["seed"] = rng.randrange(2 ** 31)
                return cfg


def _layout(t: torch.Tensor, cfg) -> torch.Tensor:
    if cfg["layout"] == "channels_last":
        return channels_last(t)
    if cfg["layout"] == "noncontiguous":
        return noncontiguous(t, dim=cfg["nc_dim"])
    return t


def _expected_format(x: torch.Tensor) -> torch.memory_format:
    """The documented output format: x's, i.e. channels_last_3d when x is dense in it and not NCDHW-contiguous."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


# ---------------------------------------------------------------------------------------------------------
# the test
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", fuzz_cases(), ids=lambda c: f"case{c}")
def test_fuzz(case, dtype, device, poison):
    rng, repro = fuzz_random(case)
    cfg = _draw(rng)
    where = f"[{repro}, {dtype}; {cfg}]"

    def close(got, want, name, tol=None):
        try:
            assert_close(got, want, dtype, name=name, tol=tol)
        except AssertionError as e:
            raise AssertionError(f"{e} {where}") from None

    gen = torch.Generator().manual_seed(cfg["seed"])
    b, ci, co, t, h, w = (cfg[n] for n in ("b", "ci", "co", "t", "h", "w"))
    k, s, d = cfg["k"], cfg["stride"], cfg["dilation"]
    kw = dict(stride=s, dilation=d, pad_mode=cfg["pad_mode"])
    fan_in = ci * k[0] * k[1] * k[2]
    x = _layout(randn(b, ci, t, h, w, generator=gen).to(device, dtype), cfg).requires_grad_()
    wt = (randn(co, ci, *k, generator=gen, scale=fan_in ** -0.5)).to(device, dtype)
    bs = randn(co, generator=gen).to(device, dtype) if cfg["bias"] else None
    rs = randn(b, co, t // s, h, w, generator=gen).to(device, dtype).requires_grad_() if cfg["residual"] else None
    if cfg["api"] == "module":
        m = CausalConv3d(ci, co, k, bias=cfg["bias"], **kw).to(device, dtype)
        with torch.no_grad():
            m.conv.weight.copy_(wt)
            if bs is not None:
                m.conv.bias.copy_(bs)
        wt, bs = m.conv.weight, m.conv.bias

        def run(x_, **extra):
            return m(x_, activation=cfg["activation"], **extra)
    else:
        if cfg["weight_channels_last"]:
            wt = channels_last(wt)
        wt.requires_grad_()
        if bs is not None:
            bs.requires_grad_()

        def run(x_, **extra):
            return causal_conv3d(x_, wt, bs, activation=cfg["activation"], **kw, **extra)

    leaves = [x, wt] + ([bs] if bs is not None else []) + ([rs] if rs is not None else [])
    names = ["x", "weight"] + (["bias"] if bs is not None else []) + (["residual"] if rs is not None else [])

    # ---- one call: output and gradients
    with fastsora.use_backend("triton"):
        y = run(x, residual=rs)
        got = grads(y, leaves, seed=cfg["seed"])
    assert y.shape == (b, co, t // s, h, w) and y.dtype == dtype, f"output {tuple(y.shape)} {y.dtype} {where}"
    fmt = _expected_format(x)
    assert y.is_contiguous(memory_format=fmt), f"output strides {y.stride()} are not in {fmt} {where}"
    for name, g, leaf in zip(names, got, leaves):
        assert g.shape == leaf.shape and g.dtype == dtype, f"grad {name}: {tuple(g.shape)} {g.dtype} {where}"

    l64 = to_float64(leaves)
    x64, w64 = l64[0], l64[1]
    b64 = l64[2] if bs is not None else None
    r64 = l64[-1] if rs is not None else None
    y64 = causal_conv3d_definition(x64, w64, b64, r64, activation=cfg["activation"], **kw)
    close(y, y64, "output")
    # the reference's cotangent is drawn in the kernel's dtype (grads draws it in float64 and casts it to the
    # output's dtype; cast back exactly by autograd), so both differentiate <y, R> for the same R: the fp16
    # rounding of R is an input of the computation, not an error of the kernel
    want = grads(y64.to(dtype), l64, seed=cfg["seed"])
    torch_got = None
    for name, g, r in zip(names, got, want):
        if cfg["activation"] == "silu" and dtype != torch.float32 and relative_error(g, r) > TOLERANCE[dtype]:
            # the house rule for gradients through the fused SiLU (tests/test_causal_conv3d.py): the kernel, like
            # torch at this precision, stores the pre-activation and its gradient rounded to 16 bits, so a sum over
            # positions with cancellation may stray past the tolerance; then at most 2x torch's own error
            if torch_got is None:
                with fastsora.use_backend("torch"):
                    torch_got = dict(zip(names, grads(run(x, residual=rs), leaves, seed=cfg["seed"])))
            try:
                assert_flash_rule(g, r, torch_got[name], name=f"grad {name}")
            except AssertionError as e:
                raise AssertionError(f"{e} {where}") from None
        else:
            close(g, r, f"grad {name}")

    if case % 2 == 0:
        # every other case: the custom ops' fake implementations give the real outputs' shapes, strides and
        # dtypes (torch.library.opcheck's fake-tensor check; torch.compile relies on them), forward and backward
        ops, act = torch.ops.fastsora, cfg["activation"] or ""
        args = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in (x, wt, bs, rs))
        fwd = args + (None, s, d, cfg["pad_mode"], act, False, bool(act), "triton")
        with fastsora.use_backend("triton"):
            try:
                torch.library.opcheck(ops.causal_conv3d.default, fwd, test_utils="test_faketensor")
                y_op, pre = ops.causal_conv3d.default(*fwd)
                dy = torch.empty_like(y_op).copy_(randn(*y_op.shape, generator=gen))
                torch.library.opcheck(ops.causal_conv3d_backward.default,
                                      (dy, args[0], args[1], args[2], pre, None, s, d, cfg["pad_mode"], act, False,
                                       True, True, "triton"), test_utils="test_faketensor")
            except Exception as e:
                raise AssertionError(f"opcheck: {e} {where}") from None

    if not cfg["stream"]:
        return

    # ---- a stream: the chunks in order, with the cache, give the one-call output's slices
    tp = d * (k[0] - 1) + 1 - s
    n_cache = max(tp, 0)
    with torch.no_grad(), fastsora.use_backend("triton"):
        full = run(x, residual=rs)
        outs, cache, t0 = [], None, 0
        history = None     # the op's cache, built here: the padded video's frames so far
        if cfg["api"] == "op" and n_cache:
            first = x[:, :, :1]
            history = first.expand(-1, -1, n_cache, -1, -1) if cfg["pad_mode"] == "replicate" \
                else torch.zeros_like(first).expand(-1, -1, n_cache, -1, -1)
        for i, n in enumerate(cfg["chunks"]):
            chunk = x[:, :, t0:t0 + n]
            res = rs[:, :, t0 // s:(t0 + n) // s] if rs is not None else None
            if cfg["api"] == "module":
                yc, cache = m(chunk, cache=cache, return_cache=True, activation=cfg["activation"], residual=res)
                assert cache.shape == (b, ci, n_cache, h, w), f"chunk {i}: cache {tuple(cache.shape)} {where}"
            else:
                op_cache = None if i == 0 else (history[:, :, history.shape[2] - n_cache:].contiguous()
                                                if n_cache else x.new_empty(b, ci, 0, h, w))
                yc = run(chunk, residual=res, cache=op_cache, streaming=True)
                if n_cache:
                    history = torch.cat([history, chunk], 2)
            assert yc.shape == (b, co, n // s, h, w), f"chunk {i}: output {tuple(yc.shape)} {where}"
            assert yc.is_contiguous(memory_format=_expected_format(chunk)), \
                f"chunk {i}: output strides {yc.stride()} for a chunk of strides {chunk.stride()} {where}"
            outs.append(yc)
            t0 += n
    stream = torch.cat(outs, 2)
    close(stream, causal_conv3d_definition(x64, w64, b64, r64, activation=cfg["activation"], whole_clip=False, **kw),
          "streamed output")
    if cfg["pad_mode"] == "constant" or tp < t:   # the short-clip fallback applies to whole-clip calls only
        if device.type == "cpu" and _ROWS_EXACT:
            same = torch.equal(stream, full)
            assert same, f"stream differs from the one-call output: max |diff| " \
                         f"{(stream.double() - full.double()).abs().max().item():.3e} {where}"
        else:
            # numpy's matmul sums a row in another order at another place in the tile, and the cached chunk's
            # rows sit elsewhere: a few units in the last place, summed over the taps' K-steps (seen: 4 ulps of
            # the element, 3 eps x max, for 45 taps x 24 channels, where the house rule, 2 eps relative + 2 eps x
            # max, held with 1.3x to spare); a wrong cache frame or offset is off by O(1)
            eps = torch.finfo(dtype).eps
            diff = (stream.double() - full.double()).abs()
            allowed = 3 * eps * (full.double().abs().max() + full.double().abs())
            assert (diff <= allowed).all(), f"stream differs from the one-call output by {diff.max().item():.3e} " \
                f"(allowed there {allowed.flatten()[diff.argmax()].item():.3e}) {where}"
