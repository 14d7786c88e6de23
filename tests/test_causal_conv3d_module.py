"""fastsora.nn.CausalConv3d: magvit2-pytorch compatibility (state_dict both ways), streaming with a frame cache,
bad inputs, backend dispatch (no ATen convolution or padded copy on the Triton path), torch.compile."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastsora
from fastsora.backend import BackendError
from fastsora.nn import CausalConv3d
from fastsora.ops import causal_conv3d
from fastsora.testing import assert_close, channels_last, doc_examples, randn, to_float64


class MagvitCausalConv3d(nn.Module):
    """magvit2-pytorch 0.5.1's CausalConv3d, written out for the test (F.pad, then the Conv3d in .conv)."""

    def __init__(self, chan_in, chan_out, kernel_size, pad_mode="constant", **kwargs):
        super().__init__()
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        dilation = kwargs.pop("dilation", 1)
        stride = kwargs.pop("stride", 1)
        self.pad_mode = pad_mode
        self.time_pad = dilation * (kt - 1) + (1 - stride)
        self.time_causal_padding = (kw // 2, kw // 2, kh // 2, kh // 2, self.time_pad, 0)
        self.conv = nn.Conv3d(chan_in, chan_out, (kt, kh, kw), stride=(stride, 1, 1), dilation=(dilation, 1, 1),
                              **kwargs)

    def forward(self, x):
        pad_mode = self.pad_mode if self.time_pad < x.shape[2] else "constant"
        return self.conv(F.pad(x, self.time_causal_padding, mode=pad_mode))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("pad_mode", ["constant", "replicate"])
def test_state_dict_round_trip_with_magvit_module(backend, pad_mode, device, poison):
    torch.manual_seed(0)
    theirs = MagvitCausalConv3d(4, 6, (3, 3, 5), pad_mode=pad_mode, stride=2, dilation=1).to(device)
    ours = CausalConv3d(4, 6, (3, 3, 5), pad_mode=pad_mode, stride=2, dilation=1).to(device)
    assert set(ours.state_dict()) == set(theirs.state_dict()) == {"conv.weight", "conv.bias"}
    assert ours.time_pad == theirs.time_pad and ours.time_causal_padding == theirs.time_causal_padding
    ours.load_state_dict(theirs.state_dict())
    x = randn(2, 4, 6, 5, 7, device=device)
    with fastsora.use_backend(backend):
        assert_close(ours(x), theirs(x), torch.float32)
    # and back: our weights into their module
    ours2 = CausalConv3d(4, 6, (3, 3, 5), pad_mode=pad_mode, stride=2).to(device)
    theirs2 = MagvitCausalConv3d(4, 6, (3, 3, 5), pad_mode=pad_mode, stride=2).to(device)
    theirs2.load_state_dict(ours2.state_dict())
    with fastsora.use_backend(backend):
        assert_close(ours2(x), theirs2(x), torch.float32)



@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_docs_examples_run_as_documented(backend, device, poison):
    """docs/causal_conv3d.md's two examples, run as written: the swap (against magvit2-pytorch's module in
    float64 with the same weights) and the streaming loop (its last chunk equals the one-call output's last
    frames, which needs every earlier chunk's cache)."""
    swap, stream = doc_examples("docs/causal_conv3d.md")
    x = randn(2, 128, 5, 6, 7, device=device)
    ns = {"x": x}
    with fastsora.use_backend(backend), torch.no_grad(), torch.device(device):
        exec(swap, ns)
        theirs = MagvitCausalConv3d(128, 128, 3, pad_mode="replicate").double().cpu()
        theirs.load_state_dict(ns["conv"].state_dict())
        ref = theirs(x.cpu().double())
        assert_close(ns["y"], ref, torch.float32, "y")
        streamed = {"conv": ns["conv"], "chunks": x.split([1, 2, 2], dim=2)}
        exec(stream, streamed)
    assert_close(streamed["y"], ref[:, :, 3:], torch.float32, "the last streamed chunk")


def test_module_without_bias_and_dtype_kwargs():
    m = CausalConv3d(3, 5, 3, bias=False, dtype=torch.float16)
    assert m.conv.bias is None and m.conv.weight.dtype == torch.float16
    assert set(m.state_dict()) == {"conv.weight"}
    assert m.conv.stride == (1, 1, 1) and m.conv.padding == (0, 0, 0)


def _rows_exact() -> bool:
    """Whether the interpreter's tl.dot (numpy's float32 matmul) gives a row the same bits wherever the row sits
    in the tile. OpenBLAS's kernels for some CPUs (e.g. its Haswell kernel on AMD EPYC) sum the tail rows of a
    tile in another order, and a streamed chunk puts a frame's positions at other rows than the one call does."""
    import numpy as np
    a = np.random.default_rng(0).standard_normal((256, 96)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((96, 32)).astype(np.float32)
    full = a @ b
    return all(np.array_equal(np.roll(np.roll(a, s, 0) @ b, -s, 0), full) for s in (1, 7, 16, 100))


_ROWS_EXACT = _rows_exact()

STREAMS = [
    # (kernel, stride, dilation, chunk lengths, input channels: <= 8 takes the flattened-(tap, channel) kernels)
    ((3, 3, 3), 1, 1, [1, 4, 4], 10),
    ((3, 3, 3), 1, 1, [1, 4, 4], 4),
    ((3, 3, 3), 2, 1, [2, 4, 2], 10),
    ((3, 3, 3), 1, 2, [1, 1, 3, 2], 4),
    ((5, 3, 3), 1, 1, [2, 1, 3], 12),
    ((1, 3, 3), 2, 1, [2, 4], 4),  # no cache frames (time_pad = -1)
]


@pytest.mark.parametrize("pad_mode", ["constant", "replicate"])
@pytest.mark.parametrize("k,stride,dilation,chunks,ci", STREAMS,
                         ids=[f"k{s[0][0]}-s{s[1]}-d{s[2]}-{'+'.join(map(str, s[3]))}-c{s[4]}" for s in STREAMS])
def test_streaming_matches_one_call(k, stride, dilation, chunks, ci, pad_mode, dtype, device, poison):
    torch.manual_seed(1)
    m = CausalConv3d(ci, 5, k, pad_mode=pad_mode, stride=stride, dilation=dilation).to(device, dtype)
    x = randn(1, ci, sum(chunks), 5, 6, dtype=dtype, device=device)
    n_cache = max(dilation * (k[0] - 1) + 1 - stride, 0)
    with fastsora.use_backend("triton"), torch.no_grad():
        full = m(x)
        outs, cache, t0 = [], None, 0
        for n in chunks:
            y, cache = m(x[:, :, t0:t0 + n], cache=cache, return_cache=True)
            assert cache.shape == (1, ci, n_cache, 5, 6), "the cache keeps only the frames the next chunk needs"
            outs.append(y)
            t0 += n
    # the slices of the one-call output: same kernel, same accumulation order, so bitwise where a row's dot
    # product does not depend on the row's place in the tile (see _ROWS_EXACT); else within a unit or two in the
    # last place (a wrong cache frame or offset is off by O(1))
    if device.type == "cpu" and _ROWS_EXACT:
        torch.testing.assert_close(torch.cat(outs, 2), full, rtol=0, atol=0)
    else:
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(torch.cat(outs, 2), full, rtol=2 * eps, atol=2 * eps * full.abs().max().item())
    from fastsora.reference.causal_conv3d import causal_conv3d as ref_conv

    expect = ref_conv(to_float64(x), to_float64(m.conv.weight), to_float64(m.conv.bias), stride=stride,
                      dilation=dilation,
                      pad_mode=pad_mode, streaming=True)
    assert_close(full, expect, dtype)


def test_streaming_torch_backend_and_channels_last(device):
    torch.manual_seed(2)
    m = CausalConv3d(3, 4, 3, pad_mode="replicate").to(device)
    x = channels_last(randn(1, 3, 7, 5, 5, device=device))
    outs = {}
    for backend in ("torch", "triton"):
        with fastsora.use_backend(backend), torch.no_grad():
            full = m(x)
            y1, c = m(x[:, :, :1], return_cache=True)
            y2, c = m(x[:, :, 1:7], cache=c, return_cache=True)
        stream = torch.cat([y1, y2], 2)
        assert_close(stream, full, torch.float32)
        assert y2.is_contiguous(memory_format=torch.channels_last_3d)
        outs[backend] = full
    assert_close(outs["triton"], outs["torch"], torch.float32)


def test_streaming_reads_cache_in_place(monkeypatch, device):
    """The Triton path never concatenates the cache with the chunk: no aten.cat on the chunk's size."""
    m = CausalConv3d(3, 4, 3).to(device)
    x = randn(1, 3, 4, 5, 5, device=device)
    with torch.no_grad():
        _, cache = m(x[:, :, :1], return_cache=True)
        seen = _record_ops(lambda: m(x[:, :, 1:], cache=cache))
    assert not [op for op in seen if _forbidden(op)], seen


def test_stream_errors():
    m = CausalConv3d(3, 4, 3, stride=2)
    x = randn(1, 3, 4, 5, 5)
    with pytest.raises(ValueError, match="multiple of stride=2"):
        m(x[:, :, :3], return_cache=True)
    with pytest.raises(ValueError, match="cache must have shape"):
        m(x, cache=randn(1, 3, 3, 5, 5))
    # the op: a cache implies streaming, so an odd chunk is refused there too (its last frame would be dropped)
    for backend in ("torch", "triton"):
        with fastsora.use_backend(backend), pytest.raises(ValueError, match="multiple of stride=2"):
            causal_conv3d(x[:, :, :3], m.conv.weight, stride=2, cache=randn(1, 3, 1, 5, 5))


# ---------------------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------------------

def test_bad_inputs():
    x = randn(1, 4, 4, 5, 5)
    w = randn(6, 4, 3, 3, 3)
    with pytest.raises(ValueError, match="x has 3 channels but weight expects C_in=4"):
        causal_conv3d(randn(1, 3, 4, 5, 5), w)
    with pytest.raises(ValueError, match="spatial kernel sizes must be odd"):
        causal_conv3d(x, randn(6, 4, 3, 2, 3))
    with pytest.raises(ValueError, match="height and width kernel sizes must be odd"):
        CausalConv3d(4, 6, (3, 4, 3))
    with pytest.raises(ValueError, match="x must be 5-D"):
        causal_conv3d(randn(1, 4, 5, 5), w)
    with pytest.raises(TypeError, match="weight has dtype torch.float16 but x has torch.float32"):
        causal_conv3d(x, w.half())
    with pytest.raises(TypeError, match="bias has dtype"):
        causal_conv3d(x, w, torch.randn(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        causal_conv3d(x, w.to("meta"))
    with pytest.raises(ValueError, match="pad_mode must be 'constant' or 'replicate'"):
        causal_conv3d(x, w, pad_mode="reflect")
    with pytest.raises(ValueError, match="activation must be None or 'silu'"):
        causal_conv3d(x, w, activation="gelu")
    with pytest.raises(TypeError, match="stride must be an int"):
        causal_conv3d(x, w, stride=(2, 1, 1))
    with pytest.raises(ValueError, match="fewer than the time stride"):
        causal_conv3d(randn(1, 4, 1, 5, 5), w, stride=2)
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        causal_conv3d(x, w, residual=randn(1, 6, 3, 5, 5))
    with pytest.raises(ValueError, match="bias must have shape"):
        causal_conv3d(x, w, randn(5))
    with pytest.raises(ValueError, match="'padding' is not accepted"):
        CausalConv3d(4, 6, 3, padding=1)
    with pytest.raises(ValueError, match="'padding_mode' is not accepted"):
        CausalConv3d(4, 6, 3, padding_mode="reflect")
    with pytest.raises(ValueError, match="pad_mode must be 'constant' or 'replicate'"):
        CausalConv3d(4, 6, 3, pad_mode="reflect")
    for padding in (0, (0, 0, 0), [0, 0, 0], "valid"):  # nn.Conv3d's spellings of the defaults are accepted
        conv = CausalConv3d(4, 6, 3, padding=padding, padding_mode="zeros")
        assert conv.conv.padding == (0, 0, 0) and conv.conv.padding_mode == "zeros"
    conv = CausalConv3d(4, 6, 3, padding=(np.int64(0),) * 3)   # numpy zeros, as nn.Conv3d takes them
    for padding in ((0, 1, 0), [0, 0], "same", True, ("valid",) * 3):
        with pytest.raises(ValueError, match="'padding' is not accepted"):
            CausalConv3d(4, 6, 3, padding=padding)
    with pytest.raises(ValueError, match="groups=2 is not supported"):
        CausalConv3d(4, 6, 3, groups=2)
    with pytest.raises(ValueError, match=r"kernel_size must be a positive int or 3 positive ints.*got \(0, 3, 3\)"):
        CausalConv3d(4, 6, (0, 3, 3))
    with pytest.raises(ValueError, match=r"kernel_size must be a positive int.*got \(-1, -1, -1\)"):
        CausalConv3d(4, 6, -1)
    for shape in ((1, 4, 4, 0, 5), (1, 4, 4, 5, 0)):   # both backends: the same clear error
        for backend in ("torch", "triton"):
            with fastsora.use_backend(backend), pytest.raises(ValueError, match=r"x must have H >= 1 and W >= 1"):
                causal_conv3d(randn(*shape), w)
    with pytest.raises(ValueError, match=r"weight shape \(6, 0, 3, 3, 3\) has an empty dimension"):
        causal_conv3d(randn(1, 0, 4, 5, 5), randn(6, 0, 3, 3, 3))


@pytest.mark.interpreter
def test_triton_refuses_with_a_reason():
    x = randn(1, 4, 4, 5, 5, dtype=torch.float64)
    w = randn(6, 4, 3, 3, 3, dtype=torch.float64)
    with fastsora.use_backend("triton"), pytest.raises(BackendError, match="float64 inputs"):
        causal_conv3d(x, w)
    with fastsora.use_backend("triton"), pytest.raises(BackendError, match="bfloat16 inputs on CPU"):
        causal_conv3d(x.bfloat16(), w.bfloat16())
    with fastsora.use_backend("torch"):  # the torch backend takes float64
        assert causal_conv3d(x, w).dtype == torch.float64


# ---------------------------------------------------------------------------------------------------------
# dispatch: the Triton path really runs the kernels and never ATen's convolution or a padded copy
# ---------------------------------------------------------------------------------------------------------

class _Recorder(TorchDispatchMode):
    """Records every op, including the ATen ops a fastsora op runs inside (torch pops the mode while it
    dispatches an op: a fastsora op is redispatched to its device kernel with the mode pushed again)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        if str(func).startswith("fastsora."):
            cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
            keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA if cuda else torch._C.DispatchKey.CPU)
            with self:
                return func.redispatch(keys, *args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


_FORBIDDEN = {"cat", "constant_pad_nd", "replication_pad3d", "reflection_pad3d", "pad", "convolution",
              "convolution_backward", "cudnn_convolution", "conv3d", "slow_conv3d_forward", "_convolution"}


def _forbidden(op: str) -> bool:
    """aten.cat.default -> 'cat': a convolution, a pad or a concatenation."""
    parts = op.split(".")
    return len(parts) > 1 and parts[1] in _FORBIDDEN


def _record_ops(fn):
    rec = _Recorder()
    with rec, fastsora.use_backend("triton"):
        fn()
    return rec.ops


def test_interpreter_is_on_for_cpu():
    from fastsora.backend import interpreter_active

    if not torch.cuda.is_available():
        assert interpreter_active()


def test_triton_path_uses_kernels_not_aten_conv(monkeypatch, device):
    import fastsora.kernels.causal_conv3d as K

    calls = []
    for name in ("causal_conv3d_fwd", "causal_conv3d_bwd", "silu_backward"):
        orig = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _o=orig, _n=name, **k: (calls.append(_n), _o(*a, **k))[1])
    x = randn(1, 4, 4, 5, 5, requires_grad=True, device=device)
    w = randn(6, 4, 3, 3, 3, requires_grad=True, device=device)
    b = randn(6, requires_grad=True, device=device)

    def step():
        y = causal_conv3d(x, w, b, pad_mode="replicate", activation="silu")
        torch.autograd.grad(y.sum(), [x, w, b])
    seen = _record_ops(step)
    assert calls == ["causal_conv3d_fwd", "silu_backward", "causal_conv3d_bwd"]
    bad = [op for op in seen if _forbidden(op)]
    assert not bad, f"the Triton path called {bad}"
    calls.clear()
    rec = _Recorder()
    with rec, fastsora.use_backend("torch"):
        causal_conv3d(x, w, b, pad_mode="replicate")
    assert calls == []
    # the recorder sees inside a fastsora op: the torch backend's pad and convolution are recorded
    assert any(_forbidden(op) and "pad" in op for op in rec.ops) and any("conv" in op for op in rec.ops), rec.ops


# ---------------------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph_training(backend, device):
    torch._dynamo.reset()
    m = CausalConv3d(4, 5, 3, pad_mode="replicate").to(device)
    x = randn(1, 4, 4, 5, 5, requires_grad=True, device=device)
    r = randn(1, 5, 4, 5, 5, device=device)

    def f(x):
        return m(x, activation="silu", residual=r)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with fastsora.use_backend(backend):
        y = compiled(x)
        gx, gw = torch.autograd.grad(y.square().sum(), [x, m.conv.weight])
        y_e = f(x)
        gx_e, gw_e = torch.autograd.grad(y_e.square().sum(), [x, m.conv.weight])
    assert_close([y, gx, gw], [y_e, gx_e, gw_e], torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("x_layout,w_layout", [("channels_last", "contiguous"), ("contiguous", "channels_last"),
                                               ("channels_last", "channels_last")])
def test_op_fakes_match_outputs_in_every_layout(backend, x_layout, w_layout, device):
    """The fake implementations give each output the layout the backend returns (torch.library.opcheck), for
    the forward and the backward op: ATen's grad weight follows x's layout, ours follows the weight's (a
    mismatch fails inductor's stride asserts in a compiled training step). The forward op replicates in one
    layout pair (its backward's border pass writes grad input in place; the slowest case in the interpreter)
    and pads with zeros in the others."""
    fmt = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last_3d}
    pad_mode = "replicate" if x_layout == w_layout else "constant"
    x = randn(2, 3, 4, 3, 3, device=device).contiguous(memory_format=fmt[x_layout]).requires_grad_()
    w = randn(2, 3, 3, 3, 3, device=device).contiguous(memory_format=fmt[w_layout]).requires_grad_()
    b = randn(2, device=device, requires_grad=True)
    dy = randn(2, 2, 4, 3, 3, device=device).contiguous(memory_format=fmt[x_layout])
    ops = torch.ops.fastsora
    with fastsora.use_backend(backend):
        torch.library.opcheck(ops.causal_conv3d.default,
                              (x, w, b, None, None, 1, 1, pad_mode, "silu", False, True, backend))
        torch.library.opcheck(ops.causal_conv3d_backward.default,
                              (dy, x.detach(), w.detach(), b.detach(), x.new_empty(0), None, 1, 1, "constant", "",
                               False, True, True, backend))


def test_torch_compile_streaming():
    """A compiled streaming step (cache in, cache out) gives the eager chunks."""
    torch._dynamo.reset()
    m = CausalConv3d(3, 4, 3, pad_mode="replicate")
    x = randn(1, 3, 5, 5, 5)

    def step(chunk, cache):
        return m(chunk, cache=cache, return_cache=True)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with torch.no_grad(), fastsora.use_backend("torch"):
        y1, c1 = m(x[:, :, :1], return_cache=True)
        y2, c2 = step(x[:, :, 1:], c1)
        y2c, c2c = compiled(x[:, :, 1:], c1)
    assert_close([y2c, c2c], [y2, c2], torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_dynamic_shapes_compile_once(backend, device):
    """Clips of new lengths and sizes, and a stream of chunks of new lengths, compiled with ``dynamic=True``:
    one graph for whole clips and one for streaming steps with a cache, none recompiled for a new length,
    height or width (a guard on a size would recompile every clip); outputs, gradients and caches equal eager's
    bitwise, and the streamed chunks give the one-call output. The first shape of each graph has sizes distinct
    from each other and from the channels, so dynamo's duck sizing ties none of them."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    m = CausalConv3d(3, 5, 3, pad_mode="replicate").to(device)
    params = [m.conv.weight, m.conv.bias]

    def clip(x):
        return m(x, activation="silu")

    def step(chunk, cache):
        return m(chunk, cache=cache, return_cache=True)

    counter = CompileCounterWithBackend("aot_eager")
    compiled_clip = torch.compile(clip, fullgraph=True, dynamic=True, backend=counter)
    compiled_step = torch.compile(step, fullgraph=True, dynamic=True, backend=counter)
    frames = []  # graphs compiled so far, after each clip
    with fastsora.use_backend(backend):
        for t, h, w in [(6, 7, 9), (4, 5, 11), (9, 8, 6)]:
            x = randn(2, 3, t, h, w, device=device, requires_grad=True)
            got, want = compiled_clip(x), clip(x)
            g_got = torch.autograd.grad(got.square().sum(), [x] + params)
            g_want = torch.autograd.grad(want.square().sum(), [x] + params)
            for a, b in zip([got, *g_got], [want, *g_want]):
                assert torch.equal(a, b), ((t, h, w), (a - b).abs().max())
            frames.append(counter.frame_count)
        assert frames == frames[:1] * len(frames), f"recompiled for a new clip shape (graphs after each: {frames})"
        with torch.no_grad():
            video = randn(2, 3, 16, 7, 9, device=device)
            y_whole = m(video)
            y0, cache = m(video[:, :, :1], return_cache=True)
            ys, start, frames = [y0], 1, []
            for t in [6, 4, 5]:  # not 1: dynamo specialises sizes 0 and 1
                y, next_cache = compiled_step(video[:, :, start:start + t], cache)
                y_e, cache_e = step(video[:, :, start:start + t], cache)
                assert torch.equal(y, y_e) and torch.equal(next_cache, cache_e), t
                ys.append(y)
                start, cache = start + t, next_cache
                frames.append(counter.frame_count)
        assert frames == frames[:1] * len(frames), f"recompiled for a new chunk length (graphs after each: {frames})"
    assert_close(torch.cat(ys, 2), y_whole, torch.float32)  # equal up to rounding (docs/causal_conv3d.md)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_export_save_load_round_trip(backend, device, tmp_path):
    """torch.export of a streaming encoder step (two chunks, the cache carried between them; stride 2,
    replicate padding, channels_last_3d input), saved and loaded: the loaded program gives the eager outputs
    exactly, in the same memory format (the serving path of a causal video tokenizer)."""
    class TwoChunks(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = CausalConv3d(4, 6, 3, pad_mode="replicate", stride=2)

        def forward(self, first, second):
            y1, cache = self.conv(first, return_cache=True)
            y2, cache = self.conv(second, cache=cache, return_cache=True)
            return y1, y2, cache

    m = TwoChunks().to(device).eval()
    video = channels_last(randn(1, 4, 8, 5, 6, device=device))
    chunks = (video[:, :, :4], video[:, :, 4:])
    with torch.no_grad(), fastsora.use_backend(backend):
        ep = torch.export.export(m, chunks)
        torch.export.save(ep, str(tmp_path / "conv.pt2"))
        got = torch.export.load(str(tmp_path / "conv.pt2")).module()(*chunks)
        want = m(*chunks)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert got[0].is_contiguous(memory_format=torch.channels_last_3d) and got[1].shape == (1, 6, 2, 5, 6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_casts_like_nn_conv3d(backend, device):
    """Under torch.autocast the conv runs in the autocast dtype, as magvit2-pytorch's nn.Conv3d does: float32
    inputs and parameters give a float16 output equal to the conv of their float16 casts, a float16 activation
    from an earlier autocast layer meets float32 parameters without a dtype error, and the gradients reach the
    float32 parameters in float32."""
    m = CausalConv3d(3, 4, 3, pad_mode="replicate").to(device)
    x = randn(1, 3, 4, 5, 5, device=device, requires_grad=True)
    with fastsora.use_backend(backend):
        want = causal_conv3d(x.half(), m.conv.weight.half(), m.conv.bias.half(), pad_mode="replicate")
        with torch.autocast(device.type, dtype=torch.float16):
            got = m(x)
            got_half_input = m(x.half())
        gx, gw = torch.autograd.grad(got.float().square().sum(), [x, m.conv.weight])
    assert got.dtype == torch.float16 and torch.equal(got, want) and torch.equal(got_half_input, want)
    assert gx.dtype == torch.float32 and gw.dtype == torch.float32 and gw.abs().sum() > 0
    # the fused residual: an fp32 residual stream is added after the kernel, promoted as conv(x) + r would be;
    # an fp16 one is fused (one rounding where the unfused sum rounds twice)
    r = randn(1, 4, 4, 5, 5, device=device, requires_grad=True)
    with fastsora.use_backend(backend):
        for res in (r.half(), r):
            with torch.autocast(device.type, dtype=torch.float16):
                fused, unfused = m(x, activation="silu", residual=res), m(x, activation="silu") + res
            assert fused.dtype == unfused.dtype == res.dtype
            assert_close(fused, unfused, torch.float16)
        assert torch.equal(fused, unfused)   # the fp32 residual: the same addition
        gr, = torch.autograd.grad(fused.float().sum(), r)
        assert gr.dtype == torch.float32 and torch.equal(gr, torch.ones_like(r))
        with torch.autocast(device.type, dtype=torch.float16), pytest.raises(ValueError, match="residual must have"):
            m(x, residual=r[:, :, :2])
