"""causal_conv3d: Triton kernels (interpreter on CPU) against a float64 F.pad + F.conv3d reference.

Forward over kernel sizes, strides, dilations, pad modes, bias, layouts, the short-clip fallback and the fused
epilogue; gradients for input, weight, bias and residual; NaN-poisoned outputs throughout.
"""
import contextlib
import importlib

import pytest
import torch
import torch.nn.functional as F

import fastsora
from fastsora.ops.causal_conv3d import causal_conv3d
from fastsora.reference import causal_conv3d as ref
from fastsora.testing import (TOLERANCE, assert_close, assert_flash_rule, causal_conv3d_definition, channels_last,
                              deterministic_algorithms, grads, noncontiguous, randn, relative_error,
                              spread_past_int32, to_float64)


def _inputs(b, ci, co, t, h, w, k, dtype, device, bias=True, residual=False, stride=1, requires_grad=False):
    x = randn(b, ci, t, h, w, dtype=dtype, device=device, requires_grad=requires_grad)
    fan_in = ci * k[0] * k[1] * k[2]
    wt = randn(co, ci, *k, dtype=dtype, device=device, scale=fan_in ** -0.5, requires_grad=requires_grad)
    bs = randn(co, dtype=dtype, device=device, requires_grad=requires_grad) if bias else None
    rs = randn(b, co, t // stride, h, w, dtype=dtype, device=device, requires_grad=requires_grad) \
        if residual else None
    return x, wt, bs, rs


def _assert_silu_grads_close(got, want, torch_got, dtype, names):
    """Gradients through the fused SiLU: each within TOLERANCE[dtype] of float64, or past it only as far as the
    torch backend at the same precision is (flash-attn's rule, 2x its error). In fp16 both store the
    pre-activation and its gradient rounded to fp16 (magvit2-pytorch's conv then SiLU do too), so a gradient
    summed over positions with cancellation (bias, weight) can stray past the tolerance on rare inputs."""
    for name, g, r, t in zip(names, got, want, torch_got, strict=True):
        if relative_error(g, r) > TOLERANCE[dtype]:
            assert_flash_rule(g, r, t, name=f"grad {name}")


FWD_CASES = [
    # (k, stride, dilation, pad_mode, bias, shape (b, ci, co, t, h, w))
    ((1, 1, 1), 1, 1, "constant", True, (2, 5, 6, 3, 5, 6)),
    ((3, 3, 3), 1, 1, "constant", True, (1, 5, 7, 4, 6, 5)),
    ((3, 3, 3), 1, 1, "replicate", False, (2, 3, 4, 4, 5, 7)),
    ((5, 5, 5), 1, 1, "replicate", True, (1, 4, 5, 6, 7, 6)),
    ((7, 7, 7), 1, 1, "constant", True, (1, 3, 6, 3, 7, 7)),
    ((3, 1, 1), 1, 1, "replicate", True, (1, 20, 9, 5, 5, 6)),
    ((3, 3, 3), 2, 1, "constant", True, (1, 6, 5, 6, 5, 5)),
    ((3, 3, 3), 2, 1, "replicate", True, (2, 4, 5, 5, 6, 5)),  # odd T with stride 2
    ((3, 3, 3), 1, 2, "replicate", True, (1, 4, 6, 6, 5, 6)),
    ((1, 3, 3), 2, 1, "replicate", True, (1, 4, 4, 4, 5, 5)),  # time_pad = -1: crops a frame
    ((2, 3, 5), 1, 3, "constant", False, (1, 3, 4, 5, 6, 7)),  # even kt
]


@pytest.mark.parametrize("k,stride,dilation,pad_mode,bias,shape", FWD_CASES,
                         ids=[f"k{c[0]}-s{c[1]}-d{c[2]}-{c[3]}-{'bias' if c[4] else 'nobias'}" for c in FWD_CASES])
def test_forward_parity(k, stride, dilation, pad_mode, bias, shape, dtype, device, poison):
    b, ci, co, t, h, w = shape
    x, wt, bs, _ = _inputs(b, ci, co, t, h, w, k, dtype, device, bias=bias)
    with fastsora.use_backend("triton"):
        y = causal_conv3d(x, wt, bs, stride=stride, dilation=dilation, pad_mode=pad_mode)
    assert y.shape == (b, co, t // stride, h, w) and y.dtype == dtype
    assert_close(y, causal_conv3d_definition(x, wt, bs, stride=stride, dilation=dilation, pad_mode=pad_mode), dtype)


def test_reference_matches_oracle():
    """The torch backend (fastsora.reference) is the same computation as the independent oracle."""
    for k, s, d, mode, bias, (b, ci, co, t, h, w) in FWD_CASES:
        x, wt, bs, _ = _inputs(b, ci, co, t, h, w, k, torch.float64, "cpu", bias=bias)
        got = ref.causal_conv3d(x, wt, bs, stride=s, dilation=d, pad_mode=mode)
        assert_close(got, causal_conv3d_definition(x, wt, bs, stride=s, dilation=d, pad_mode=mode), torch.float64)


GRAD_CASES = [
    ((3, 3, 3), 1, 1, "constant", (1, 5, 6, 4, 5, 6)),
    ((3, 3, 3), 1, 1, "replicate", (2, 10, 5, 4, 6, 5)),  # C_in > 8: per-tap kernels; <= 8: flattened
    ((3, 5, 3), 2, 1, "replicate", (1, 3, 4, 6, 7, 5)),
    ((3, 3, 3), 1, 2, "replicate", (1, 9, 4, 5, 5, 5)),
    ((3, 1, 1), 2, 2, "constant", (1, 17, 18, 6, 5, 5)),
    ((3, 1, 3), 1, 1, "replicate", (1, 40, 40, 3, 3, 4)),  # 40 channels: two interpreter channel tiles of 32
]


@pytest.mark.parametrize("k,stride,dilation,pad_mode,shape", GRAD_CASES,
                         ids=[f"k{c[0]}-s{c[1]}-d{c[2]}-{c[3]}" for c in GRAD_CASES])
def test_torch_backend_gradients_match_oracle(k, stride, dilation, pad_mode, shape):
    """The torch backend's hand-written backward (fastsora.reference) in float64 against autograd through the
    independent oracle: plain, with silu + residual, and (stride 1) with a cache of the frames before x."""
    b, ci, co, t, h, w = shape
    x, wt, bs, rs = _inputs(b, ci, co, t, h, w, k, torch.float64, "cpu", residual=True, stride=stride,
                            requires_grad=True)
    kw = dict(stride=stride, dilation=dilation, pad_mode=pad_mode)
    with fastsora.use_backend("torch"):
        got = grads(causal_conv3d(x, wt, bs, **kw), [x, wt, bs])
        got_epilogue = grads(causal_conv3d(x, wt, bs, activation="silu", residual=rs, **kw), [x, wt, bs, rs])
    assert_close(got, grads(causal_conv3d_definition(x, wt, bs, **kw), [x, wt, bs]), torch.float64, name="grads")
    assert_close(got_epilogue, grads(causal_conv3d_definition(x, wt, bs, rs, activation="silu", **kw), [x, wt, bs, rs]),
                 torch.float64, name="epilogue grads")
    if stride == 1:
        n_cache = dilation * (k[0] - 1)
        cache = randn(b, ci, n_cache, h, w, dtype=torch.float64)
        with fastsora.use_backend("torch"):
            got_cached = grads(causal_conv3d(x, wt, bs, cache=cache, **kw), [x, wt, bs])
        y64 = causal_conv3d_definition(torch.cat([cache, x], 2), wt, bs, **kw)[:, :, n_cache:]
        assert_close(got_cached, grads(y64, [x, wt, bs]), torch.float64, name="cached grads")


@pytest.mark.parametrize("k,stride,dilation,pad_mode,shape", GRAD_CASES,
                         ids=[f"k{c[0]}-s{c[1]}-d{c[2]}-{c[3]}" for c in GRAD_CASES])
def test_gradients(k, stride, dilation, pad_mode, shape, dtype, device, poison):
    b, ci, co, t, h, w = shape
    x, wt, bs, _ = _inputs(b, ci, co, t, h, w, k, dtype, device, requires_grad=True)
    kw = dict(stride=stride, dilation=dilation, pad_mode=pad_mode)
    with fastsora.use_backend("triton"):
        y = causal_conv3d(x, wt, bs, **kw)
        got = grads(y, [x, wt, bs])
    x64, w64, b64 = to_float64((x, wt, bs))
    y64 = causal_conv3d_definition(x64, w64, b64, **kw)
    want = grads(y64, [x64, w64, b64])
    for name, g, r in zip(("x", "weight", "bias"), got, want):
        assert g.dtype == dtype
        assert_close(g, r, dtype, name=f"grad {name}")


@pytest.mark.parametrize("pad_mode", ["constant", "replicate"])
def test_offsets_past_2_31_elements(pad_mode, dtype, device, poison):
    """x, the residual and the output's gradient are views whose last batch lies past 2^31 elements of their
    storage (read in place, no copy): forward and every gradient must match the oracle there. With int32
    offsets the third batch's loads wrap (wrong values, or a fault in the interpreter)."""
    x, wt, bs, rs = _inputs(3, 3, 4, 3, 4, 5, (3, 3, 3), dtype, device, residual=True)
    x, rs = spread_past_int32(x).requires_grad_(), spread_past_int32(rs).requires_grad_()
    wt.requires_grad_()
    bs.requires_grad_()
    with fastsora.use_backend("triton"):
        y = causal_conv3d(x, wt, bs, pad_mode=pad_mode, residual=rs)
        got = grads(y, [x, wt, bs, rs], spread=True)
    x64, w64, b64, r64 = to_float64((x, wt, bs, rs))
    y64 = causal_conv3d_definition(x64, w64, b64, r64, pad_mode=pad_mode)
    assert_close(y, y64, dtype)
    for name, g, r in zip(("x", "weight", "bias", "residual"), got, grads(y64, [x64, w64, b64, r64])):
        assert_close(g, r, dtype, name=f"grad {name}")


@pytest.mark.parametrize("pad_mode", ["constant", "replicate"])
@pytest.mark.parametrize("with_cache", [False, True])
def test_batch_split_past_launch_positions(pad_mode, with_cache, monkeypatch, dtype, device, poison):
    """A batch with more positions (B*T*H*W) than one launch may index runs as one launch per chunk of
    samples on views (no copy): the launch limit is lowered so that 5 samples run as chunks of 2, 2 and 1.
    Output (silu + residual epilogue, cache read in place) and every gradient must match the oracle, and the
    kernels must be launched once per chunk."""
    import fastsora.kernels.causal_conv3d as K
    ops = importlib.import_module("fastsora.ops.causal_conv3d")  # the attribute is the function of that name

    b, t, h, w = 5, 4, 3, 5
    monkeypatch.setattr(ops, "MAX_LAUNCH_POSITIONS", 2 * t * h * w + 7)
    launches = []
    real_launch = K._launch
    monkeypatch.setattr(K, "_launch", lambda kind, *a, **kw: (launches.append(kind), real_launch(kind, *a, **kw)))
    x, wt, bs, rs = _inputs(b, 3, 4, t, h, w, (3, 3, 3), dtype, device, residual=True, requires_grad=True)
    cache = randn(b, 3, 2, h, w, dtype=dtype, device=device) if with_cache else None
    with fastsora.use_backend("triton"):
        y = causal_conv3d(x, wt, bs, pad_mode=pad_mode, activation="silu", residual=rs, cache=cache)
        got = grads(y, [x, wt, bs, rs])
    assert launches.count("fwd") == 3 and launches.count("bwd_weight") == 3
    with fastsora.use_backend("torch"):
        torch_got = grads(causal_conv3d(x, wt, bs, pad_mode=pad_mode, activation="silu", residual=rs, cache=cache),
                          [x, wt, bs, rs])
    x64, w64, b64, r64 = to_float64((x, wt, bs, rs))
    if with_cache:  # the cache is the frames before x: the oracle sees the whole video and drops them
        full = torch.cat([to_float64(cache), x64], dim=2)
        y64 = F.silu(causal_conv3d_definition(full, w64, b64, pad_mode=pad_mode)[:, :, 2:]) + r64
    else:
        y64 = causal_conv3d_definition(x64, w64, b64, r64, pad_mode=pad_mode, activation="silu")
    assert_close(y, y64, dtype)
    _assert_silu_grads_close(got, grads(y64, [x64, w64, b64, r64]), torch_got, dtype,
                             ("x", "weight", "bias", "residual"))


@pytest.mark.interpreter
def test_one_sample_past_launch_positions_is_refused(monkeypatch):
    """Positions are split between samples only: a sample with more positions than one launch indexes is
    refused by the Triton backend with the reason (shape-only check: a stride-0 view, no memory)."""
    ops = importlib.import_module("fastsora.ops.causal_conv3d")  # the attribute is the function of that name
    from fastsora.backend import BackendError

    x = torch.randn(1, 2, 1, 1, 1).expand(3, 2, 1024, 1024, 1025)
    wt = torch.randn(4, 2, 3, 3, 3)
    with fastsora.use_backend("triton"), pytest.raises(BackendError, match=r"1074790400 positions in one sample"):
        causal_conv3d(x, wt)
    monkeypatch.setattr(ops, "MAX_LAUNCH_POSITIONS", 59)
    with fastsora.use_backend("triton"), pytest.raises(BackendError, match=r"= 60 positions in one sample > 59"):
        causal_conv3d(torch.randn(2, 2, 3, 4, 5), wt)


@pytest.mark.interpreter
def test_weight_of_2_31_elements_is_refused():
    """The kernels index weight elements in int32: a weight of 2^31 elements or more is refused by the Triton
    backend with the count (stride-0 views: no memory); 2^31 - 1 elements are not refused for their size."""
    ops = importlib.import_module("fastsora.ops.causal_conv3d")  # the attribute is the function of that name
    from fastsora.backend import BackendError

    x = torch.randn(1, 1, 2, 1, 1)
    wt = torch.randn(1, 1, 1, 1, 1).expand(2 ** 32, 1, 1, 1, 1)
    with fastsora.use_backend("triton"), pytest.raises(BackendError, match=r"a weight of 4294967296 elements >= 2\^31"):
        causal_conv3d(x, wt)
    assert ops._triton_unsupported(x, wt[:2 ** 31]) == "a weight of 2147483648 elements >= 2^31"
    assert ops._triton_unsupported(x, wt[:2 ** 31 - 1]) is None


def test_replicate_border_gradient_accumulates(device, poison):
    """With replicate padding the border pixels collect the gradient of every padded position that copies
    them: a 1x1 image (every tap reads the same pixel) and frame 0 (every time tap reads it) show it."""
    x, wt, bs, _ = _inputs(1, 3, 4, 3, 1, 1, (3, 3, 3), torch.float32, device, requires_grad=True)
    with fastsora.use_backend("triton"):
        y = causal_conv3d(x, wt, bs, pad_mode="replicate")
        gx, = torch.autograd.grad(y.sum(), [x])
    # y[:, o, t] = sum_c x[c, clamp(t + i - 2)] * sum_{j,k} w[o, c, i, j, k]: d y.sum() / d x[c, t]
    wsum = wt.detach().sum(dim=(3, 4)).sum(0)  # (c, kt)
    want = torch.zeros(3, 3, device=device)
    for t in range(3):
        for i in range(3):
            want[:, max(t + i - 2, 0)] += wsum[:, i]
    assert_close(gx[0, :, :, 0, 0], want, torch.float32)


@pytest.mark.parametrize("grouped", [False, True])
def test_replicate_border_groups(grouped, monkeypatch, device, poison):
    """The replicate grad-input border pass, as one launch (small clips) or one launch per border group
    (edge rows, edge columns, corners; frame 0 apart): both give the float64 gradient."""
    import fastsora.kernels.causal_conv3d as K

    monkeypatch.setattr(K, "GROUP_MIN_ROWS", 0 if grouped else 10 ** 9)
    x, wt, bs, _ = _inputs(1, 10, 4, 3, 5, 6, (2, 3, 5), torch.float32, device, requires_grad=True)
    with fastsora.use_backend("triton"):
        gx, = grads(causal_conv3d(x, wt, bs, pad_mode="replicate"), [x])
    x64, w64, b64 = to_float64((x, wt, bs))
    assert_close(gx, grads(causal_conv3d_definition(x64, w64.detach(), b64.detach(), pad_mode="replicate"), [x64])[0],
                 torch.float32)


@pytest.mark.parametrize("layout", ["channels_last", "noncontiguous", "permuted"])
def test_layouts(layout, dtype, device, poison):
    """channels_last_3d, strided and permuted inputs are read through their strides, forward and backward
    (grad input in the input's layout), in every dtype; all three gradients match float64."""
    x, wt, bs, _ = _inputs(1, 6, 5, 4, 5, 6, (3, 3, 3), dtype, device, requires_grad=True)
    if layout == "channels_last":
        xin = channels_last(x)
    elif layout == "noncontiguous":
        xin = noncontiguous(x, dim=3)
    else:  # a transposed view: (b, c, t, w, h) storage read as (b, c, t, h, w)
        xin = x.detach().transpose(3, 4).contiguous().transpose(3, 4).requires_grad_(True)
    assert not xin.is_contiguous()
    with fastsora.use_backend("triton"):
        y = causal_conv3d(xin, wt, bs, pad_mode="replicate")
        gx, gw, gb = grads(y, [xin, wt, bs])
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last_3d), "output keeps channels_last_3d"
        assert gx.is_contiguous(memory_format=torch.channels_last_3d)
    else:
        assert y.is_contiguous()
    x64, w64, b64 = to_float64((x, wt, bs))
    y64 = causal_conv3d_definition(x64, w64, b64, pad_mode="replicate")
    gx64, gw64, gb64 = grads(y64, [x64, w64, b64])
    assert_close([y, gx, gw, gb], [y64, gx64, gw64, gb64], dtype)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_one_channel_input_dense_in_both_layouts_gives_ncdhw_like_conv3d(backend, device, poison):
    """A one-channel input is dense as NCDHW and as channels_last_3d at once: the output (and grad input) is NCDHW,
    the layout F.conv3d picks for it, and the values match float64."""
    x, wt, bs, _ = _inputs(2, 1, 4, 4, 5, 3, (3, 3, 1), torch.float32, device, requires_grad=True)
    xin = x.detach().contiguous(memory_format=torch.channels_last_3d).requires_grad_(True)
    assert xin.is_contiguous() and xin.is_contiguous(memory_format=torch.channels_last_3d)
    with fastsora.use_backend(backend):
        y = causal_conv3d(xin, wt, bs)
        gx = grads(y, [xin])[0]
    assert F.conv3d(xin.detach(), wt.detach(), padding=(1, 1, 0)).is_contiguous()  # torch's choice for it
    assert y.is_contiguous() and gx.is_contiguous()
    x64, w64, b64 = to_float64((x, wt, bs))
    y64 = causal_conv3d_definition(x64, w64.detach(), b64.detach())
    assert_close([y, gx], [y64, grads(y64, [x64])[0]], torch.float32)


def test_channels_last_weight_and_noncontiguous_residual(device, poison):
    x, wt, bs, rs = _inputs(1, 4, 6, 4, 5, 5, (3, 3, 3), torch.float32, device, residual=True)
    w_cl = channels_last(wt)
    r_nc = noncontiguous(rs, dim=2)
    with fastsora.use_backend("triton"):
        y = causal_conv3d(x, w_cl, bs, residual=r_nc)
    assert_close(y, causal_conv3d_definition(x, wt, bs, rs), torch.float32)


@pytest.mark.parametrize("pad_mode", ["constant", "replicate"])
def test_short_clip_fallback(pad_mode, device, poison):
    """time_pad >= T: magvit2-pytorch pads with zeros even in replicate mode (whole-clip calls)."""
    k = (5, 3, 3)  # time_pad = 4
    for t in (3, 4, 5):
        x, wt, bs, _ = _inputs(1, 3, 4, t, 5, 5, k, torch.float32, device)
        with fastsora.use_backend("triton"):
            y = causal_conv3d(x, wt, bs, pad_mode=pad_mode)
        want = causal_conv3d_definition(x, wt, bs, pad_mode=pad_mode)
        assert_close(y, want, torch.float32)
        if pad_mode == "replicate":
            const = causal_conv3d_definition(x, wt, bs, pad_mode="constant")
            same = torch.allclose(want, const)
            assert same == (t <= 4), "fallback applies exactly when time_pad >= T"


@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_epilogue(with_residual, dtype, device, poison):
    """y = silu(conv(x) + bias) + residual; gradients of every input including the residual. The bias is a
    strided view (a slice of a longer parameter): the kernel once read it with unit stride."""
    x, wt, bs, rs = _inputs(1, 5, 6, 4, 5, 6, (3, 3, 3), dtype, device, residual=with_residual, stride=1,
                            requires_grad=True)
    bs = noncontiguous(bs)
    leaves = [x, wt, bs] + ([rs] if with_residual else [])
    with fastsora.use_backend("triton"):
        y = causal_conv3d(x, wt, bs, activation="silu", residual=rs, pad_mode="replicate")
        got = grads(y, leaves)
    with fastsora.use_backend("torch"):
        torch_got = grads(causal_conv3d(x, wt, bs, activation="silu", residual=rs, pad_mode="replicate"), leaves)
    l64 = to_float64(leaves)
    y64 = causal_conv3d_definition(l64[0], l64[1], l64[2], l64[3] if with_residual else None, activation="silu",
                  pad_mode="replicate")
    want = grads(y64, l64)
    assert_close(y, y64, dtype)
    _assert_silu_grads_close(got, want, torch_got, dtype, ("x", "weight", "bias", "residual")[:len(leaves)])
    # the order is act(conv + bias) + residual, not act(conv + bias + residual)
    if with_residual:
        other = F.silu(causal_conv3d_definition(l64[0], l64[1], l64[2], l64[3]))
        assert (y.detach().double().cpu() - other).abs().max() > 10 * TOLERANCE[dtype]


def test_residual_only_epilogue(device, poison):
    x, wt, bs, rs = _inputs(2, 4, 4, 4, 5, 5, (3, 3, 3), torch.float32, device, residual=True, stride=2)
    with fastsora.use_backend("triton"):
        y = causal_conv3d(x, wt, None, stride=2, residual=rs)
    assert_close(y, causal_conv3d_definition(x, wt, None, rs, stride=2), torch.float32)


def test_weight_only_and_input_only_gradients(device, poison):
    x, wt, bs, _ = _inputs(1, 4, 5, 4, 5, 5, (3, 3, 3), torch.float32, device)
    wt.requires_grad_(True)
    with fastsora.use_backend("triton"):
        gw, = grads(causal_conv3d(x, wt, bs, pad_mode="replicate"), [wt])
    x64, w64, b64 = to_float64((x, wt, bs))
    assert_close(gw, grads(causal_conv3d_definition(x64, w64, b64, pad_mode="replicate"), [w64])[0], torch.float32)
    x.requires_grad_(True)
    wt.requires_grad_(False)
    with fastsora.use_backend("triton"):
        gx, = grads(causal_conv3d(x, wt, bs), [x])
    x64 = to_float64(x)
    assert_close(gx, grads(causal_conv3d_definition(x64, w64.detach(), b64), [x64])[0], torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("pad_mode", ["constant", "replicate"])
def test_gpu_bf16_realistic_flash_rule(pad_mode):
    """bf16 at a MAGVIT-v2 shape: error vs float64 <= 2x the error of torch's own bf16 conv (grads 3x)."""
    from fastsora.testing import assert_flash_rule

    dev = torch.device("cuda")
    x, wt, bs, _ = _inputs(2, 128, 128, 10, 64, 64, (3, 3, 3), torch.bfloat16, dev, requires_grad=True)
    x = channels_last(x)
    with fastsora.use_backend("triton"):
        y = causal_conv3d(x, wt, bs, pad_mode=pad_mode)
        gx, gw, gb = grads(y, [x, wt, bs])
    with fastsora.use_backend("torch"):
        yt = causal_conv3d(x, wt, bs, pad_mode=pad_mode)
        gxt, gwt, gbt = grads(yt, [x, wt, bs])
    x32, w32, b32 = [t.detach().float().requires_grad_(True) for t in (x, wt, bs)]
    tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
    try:
        y32 = ref.causal_conv3d(x32, w32, b32, pad_mode=pad_mode)
        g32 = grads(y32, [x32, w32, b32])
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert_flash_rule(y, y32, yt)
    for name, g, gt, gr in zip("xwb", (gx, gw, gb), (gxt, gwt, gbt), g32):
        assert_flash_rule(g, gr, gt, factor=3.0, name=f"grad {name}")


@pytest.mark.gpu
def test_gpu_deterministic_algorithms_are_bitwise_reproducible(dtype):
    """On CUDA grad weight is split over positions with fp32 atomics, and autotuning times configs; under
    torch.use_deterministic_algorithms(True) grad weight runs unsplit and every launcher takes its first config
    untimed: two runs give the same bits, within tolerance of float64. (At this shape the split would be ~10.)"""
    x, wt, bs, _ = _inputs(2, 16, 16, 5, 32, 32, (3, 3, 3), dtype, "cuda", requires_grad=True)
    runs = []
    with deterministic_algorithms(), fastsora.use_backend("triton"):
        for _ in range(2):
            y = causal_conv3d(x, wt, bs)
            runs.append((y.detach(),) + grads(y, [x, wt, bs]))
    for name, a, b in zip(["y", "grad x", "grad w", "grad b"], *runs):
        assert torch.equal(a, b), f"{name} differs between two deterministic runs"
    l64 = to_float64((x, wt, bs))
    y64 = causal_conv3d_definition(*l64)
    assert_close(runs[0][0], y64, dtype)
    assert_close(runs[0][1:], grads(y64, list(l64)), dtype, name="grads")


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_int64_offsets():
    """A tensor over 2^31 elements: the last frames must be right (int32 offsets would wrap)."""
    dev = torch.device("cuda")
    x = torch.randn(1, 8, 4, 8192, 8200, device=dev, dtype=torch.float16)  # 2.1e9 elements
    wt = torch.randn(8, 8, 3, 3, 3, device=dev, dtype=torch.float16) * 0.1
    with fastsora.use_backend("triton"):
        y = causal_conv3d(x, wt, None)
    tail = x[:, :, :, -16:].float()
    want = ref.causal_conv3d(tail, wt.float(), None)
    # the last image rows see the same inputs in the crop except the top border of the crop
    assert_close(y[:, :, :, -15:].float(), want[:, :, :, -15:], torch.float16)


from hypothesis import given, settings, strategies as st  # noqa: E402


_CONFIGS = dict(kt=st.integers(1, 3), kh=st.sampled_from([1, 3]), kw=st.sampled_from([1, 3, 5]),
                stride=st.integers(1, 2), dilation=st.integers(1, 2),
                pad_mode=st.sampled_from(["constant", "replicate"]), ci=st.integers(1, 12),
                co=st.integers(1, 9), t=st.integers(2, 5), h=st.integers(1, 6), w=st.integers(1, 6),
                bias=st.booleans(), cl=st.booleans())


@settings(max_examples=40, deadline=None, derandomize=True)
@given(**_CONFIGS)
def test_random_configs_forward(kt, kh, kw, stride, dilation, pad_mode, ci, co, t, h, w, bias, cl):
    """Random small configurations (1-pixel images, 1 channel, even kt, both layouts) against the oracle."""
    x, wt, bs, _ = _inputs(1, ci, co, t, h, w, (kt, kh, kw), torch.float32, "cpu" if not torch.cuda.is_available()
                           else "cuda", bias=bias)
    if cl:
        x = channels_last(x)
    with fastsora.use_backend("triton"):
        y = causal_conv3d(x, wt, bs, stride=stride, dilation=dilation, pad_mode=pad_mode)
    assert_close(y, causal_conv3d_definition(x, wt, bs, stride=stride, dilation=dilation, pad_mode=pad_mode),
                 torch.float32)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(**_CONFIGS)
def test_random_configs_gradients(kt, kh, kw, stride, dilation, pad_mode, ci, co, t, h, w, bias, cl):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, wt, bs, _ = _inputs(1, ci, co, t, h, w, (kt, kh, kw), torch.float32, dev, bias=bias, requires_grad=True)
    if cl:
        x = channels_last(x)
    leaves = [x, wt] + ([bs] if bias else [])
    kw_ = dict(stride=stride, dilation=dilation, pad_mode=pad_mode)
    with fastsora.use_backend("triton"):
        got = grads(causal_conv3d(x, wt, bs, **kw_), leaves)
    l64 = to_float64(leaves)
    want = grads(causal_conv3d_definition(l64[0], l64[1], l64[2] if bias else None, **kw_), l64)
    assert_close(got, want, torch.float32, name="grads")


@pytest.mark.gpu
@pytest.mark.parametrize("pad_mode", ["constant", "replicate"])
def test_gpu_streaming_bf16_channels_last(pad_mode):
    """CogVideoX-like chunks (1 + 8 + 8 frames) in bf16 channels_last_3d: the one-call slices (the autotuner may
    pick another tile for cached chunks, so equality is up to the fp32 accumulation's rounding to bf16)."""
    from fastsora.nn import CausalConv3d

    dev = torch.device("cuda")
    m = CausalConv3d(128, 128, 3, pad_mode=pad_mode).to(dev, torch.bfloat16)
    x = channels_last(randn(1, 128, 17, 60, 90, dtype=torch.bfloat16, device=dev))
    with torch.no_grad(), fastsora.use_backend("triton"):
        full = m(x)
        y1, c = m(x[:, :, :1], return_cache=True)
        y2, c = m(x[:, :, 1:9], cache=c, return_cache=True)
        y3, c = m(x[:, :, 9:], cache=c, return_cache=True)
    stream = torch.cat([y1, y2, y3], 2)
    assert (stream.float() - full.float()).abs().max().item() <= 2 ** -7 * full.float().abs().max().item()
    assert_close(full, causal_conv3d_definition(x, m.conv.weight, m.conv.bias, pad_mode=pad_mode), torch.bfloat16)


@pytest.fixture
def fake_cuda_launchers(monkeypatch):
    """The causal_conv3d module with its CUDA launchers switched on in the interpreter: one-config tables for a
    pretend sm_90 with 132 SMs (no GPU timer is needed: one config is never timed)."""
    if torch.cuda.is_available():
        pytest.skip("exercised for real on CUDA")
    import types

    import fastsora.kernels.causal_conv3d as K

    tile = (256, 32, 32, 4, 1)
    monkeypatch.setattr(K, "KERNELS_INTERPRETED", False)
    monkeypatch.setattr(K, "_CONFIGS", {"sm_90": {key: [tile] for key in K._TABLE}})
    monkeypatch.setattr(K, "_arch", lambda device: "sm_90")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(
        multi_processor_count=132))
    K._tuned.cache_clear()
    yield K
    K._tuned.cache_clear()


def test_cuda_launch_path_with_split_weight_gradient(fake_cuda_launchers, poison):
    """The CUDA launchers (autotuner objects, META grids, per-variant config tables, the grad weight split
    over M with fp32 atomics: 4x16x17 positions split in two, the second part short) run here in the interpreter
    with one-config tables and a fake SM count."""
    for ci, mode in ((10, "replicate"), (3, "constant")):  # per-tap and flattened kernels
        x, wt, bs, _ = _inputs(1, ci, 6, 4, 16, 17, (3, 3, 3), torch.float32, "cpu", requires_grad=True)
        with fastsora.use_backend("triton"):
            y = causal_conv3d(x, wt, bs, pad_mode=mode)
            got = grads(y, [x, wt, bs])
        l64 = to_float64((x, wt, bs))
        y64 = causal_conv3d_definition(*l64, pad_mode=mode)
        assert_close([y, *got], [y64, *grads(y64, list(l64))], torch.float32)


def _record_weight_splits(K, monkeypatch, block_m):
    """The programs along M (the grid's third axis) of each grad-weight launch, appended as it is launched."""
    splits = []
    real_launch = K._launch

    def spy(kind, kernel, grid, *rest, **kw):
        if kind == "bwd_weight":
            splits.append(grid({"BLOCK_M": block_m, "BLOCK_N": 32, "BLOCK_K": 32})[2])
        return real_launch(kind, kernel, grid, *rest, **kw)

    monkeypatch.setattr(K, "_launch", spy)
    return splits


def test_deterministic_algorithms_run_grad_weight_unsplit(fake_cuda_launchers, monkeypatch):
    """On CUDA grad weight is split over positions with fp32 atomics (not bit-reproducible); under
    torch.use_deterministic_algorithms(True) it runs unsplit (one writer per element). Checked here through the
    CUDA launcher with a fake SM count; the gradients match the reference either way."""
    splits = _record_weight_splits(fake_cuda_launchers, monkeypatch, 256)
    for deterministic in (False, True):
        with deterministic_algorithms() if deterministic else contextlib.nullcontext():
            x, wt, bs, _ = _inputs(1, 8, 6, 4, 16, 17, (3, 3, 3), torch.float32, "cpu", requires_grad=True)
            with fastsora.use_backend("triton"):
                got = grads(causal_conv3d(x, wt, bs), [x, wt, bs])
        l64 = to_float64((x, wt, bs))
        assert_close(got, grads(causal_conv3d_definition(*l64), list(l64)), torch.float32)
    assert splits[0] > 1 and splits[1] == 1, splits


@pytest.mark.parametrize("deterministic", [False, True])
def test_grad_weight_rows_advance_across_rows_frames_and_batches(fake_cuda_launchers, monkeypatch, deterministic):
    """The grad-weight kernel decodes its rows' positions once and then steps them by BLOCK_M with carries
    (no division in the loop): with 16-row tiles over 3 batches of 2 frames of 9x5 images every step carries
    into rows, frames and batches, for the per-tap and the flattened kernel, split over two programs (the
    second starting mid-image at row 256; split parts lowered to 128 rows) or, deterministic, not split."""
    K = fake_cuda_launchers
    monkeypatch.setattr(K, "_CONFIGS", {"sm_90": {key: [(16, 32, 32, 4, 1)] for key in K._TABLE}})
    monkeypatch.setattr(K, "SPLIT_MIN_ROWS", 128)
    K._tuned.cache_clear()
    splits = _record_weight_splits(K, monkeypatch, 16)
    for ci, mode in ((10, "replicate"), (3, "constant")):  # per-tap (C_in > FLAT_MAX_C_IN) and flattened
        assert (ci > K.FLAT_MAX_C_IN) == (mode == "replicate")
        x, wt, bs, _ = _inputs(3, ci, 4, 2, 9, 5, (3, 1, 3), torch.float32, "cpu", requires_grad=True)
        x = x.detach()  # no grad input: the grad-weight kernel alone (9 taps: the interpreter's time)
        with deterministic_algorithms() if deterministic else contextlib.nullcontext():
            with fastsora.use_backend("triton"):
                got = grads(causal_conv3d(x, wt, bs, pad_mode=mode), [wt, bs])
        l64 = to_float64((x, wt, bs))
        assert_close(got, grads(causal_conv3d_definition(*l64, pad_mode=mode), list(l64[1:])), torch.float32)
    assert splits == ([1, 1] if deterministic else [2, 2]), splits


def test_grad_weight_channels_last_table(fake_cuda_launchers, monkeypatch, poison):
    """Channels_last_3d input and gradient with 16·k channels take the grad weight's '_cl' candidates (compiled
    with unit channel strides and 16-divisible strides, as the JIT specialises that launch); other layouts and
    channel counts keep the general table. The gradients match the reference either way."""
    K = fake_cuda_launchers
    variants = []
    real_tuned = K._tuned

    def spy(kind, variant, arch, klass):
        if kind == "bwd_weight":
            variants.append(variant)
        return real_tuned(kind, variant, arch, klass)

    spy.cache_clear = real_tuned.cache_clear
    monkeypatch.setattr(K, "_tuned", spy)
    for ci, co, layout, want in ((16, 32, "cl", "plain_cl"), (16, 32, "ncdhw", "plain"), (12, 32, "cl", "plain")):
        x, wt, bs, _ = _inputs(1, ci, co, 3, 4, 5, (3, 3, 3), torch.float16, "cpu", requires_grad=True)
        cot = randn(1, co, 3, 4, 5, dtype=torch.float16)
        if layout == "cl":
            x, cot = channels_last(x.detach()).requires_grad_(), channels_last(cot)
        with fastsora.use_backend("triton"):
            got = torch.autograd.grad(causal_conv3d(x, wt, bs), [x, wt, bs], cot)
        assert variants[-1] == want, (ci, layout, variants)
        l64 = to_float64((x, wt, bs))
        want_g = torch.autograd.grad(causal_conv3d_definition(*l64), list(l64), cot.double())
        for name, a, b in zip(("x", "weight", "bias"), got, want_g):
            assert_close(a, b, torch.float16, name=f"grad {name}")


def test_silu_past_the_fp16_range_keeps_finite_gradients(device, poison):
    """fp16 with activation='silu': the kernel activates in fp32, so a pre-activation below -65504 gives
    silu = -0, while the pre-activation it saves for the backward is -inf in fp16. silu' there is its limit 0,
    not 0 · inf = NaN: output and gradients finite and equal to a float64 computation (channel 0 is pushed past
    the range by its bias, channel 1 is ordinary)."""
    x = randn(1, 3, 4, 5, 6, dtype=torch.float16, device=device, requires_grad=True, scale=30.0)
    w = randn(2, 3, 3, 3, 3, dtype=torch.float16, device=device, requires_grad=True, scale=30.0)
    b = torch.tensor([-60000.0, 0.5], dtype=torch.float16, device=device).requires_grad_()
    with fastsora.use_backend("triton"):
        y = causal_conv3d(x, w, b, activation="silu")
        g = grads(y, [x, w, b])
    x64, w64, b64 = to_float64([x, w, b])
    y64 = ref.causal_conv3d(x64, w64, b64, activation="silu")
    pre = ref.causal_conv3d(x64, w64, b64)
    assert (pre[:, 0] < -65504).any(), "the test must push some pre-activations past the fp16 range"
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in g)
    assert_close(y, y64, torch.float16, "y")
    g64 = grads(y64, [x64, w64, b64])
    assert_close(g[:2], g64[:2], torch.float16, "gradients of x and w")
    # db sums 120 fp16-rounded dz of both signs: a small sum by cancellation has a larger relative error
    assert_close(g[2], g64[2], torch.float16, "gradient of b", tol=2e-2)
