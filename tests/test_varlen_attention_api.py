"""Varlen attention entry points: argument errors, flash-attn and xformers drop-ins (duck-typed mask objects),
torch.compile(fullgraph=True), the packed attention nn.Module, and CUDA checks (flash-attn's error rule)."""
import copy
import functools
import importlib
import math
import re
from dataclasses import dataclass
from typing import List

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fastsora.ops
from fastsora import BackendError, use_backend
from fastsora.ops.varlen_attention import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                                           flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                                           flash_attn_varlen_qkvpacked_func, memory_efficient_attention,
                                           varlen_attention)
from fastsora.reference.varlen_attention import varlen_attention as ref_attention
from fastsora.testing import (TOLERANCE, assert_close, assert_flash_rule, assert_module_parity, attention_per_sequence,
                              doc_examples, grads, to_float64, varlen_attention_module_definition)
from fastsora.testing import packed_offsets as offsets


def rand(*shape, dtype=torch.float32, device="cpu", seed=0, grad=False):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_(grad)


def ref_out(q, k, v, cu_q, cu_k, mode, scale=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return ref_attention(*to_float64([q, k, v]), cu_q.cpu(), cu_k.cpu(), scale, mode)[0]


# --------------------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------------------


def _inputs():
    q, k, v = rand(10, 4, 16), rand(12, 2, 16, seed=1), rand(12, 2, 16, seed=2)
    return q, k, v, offsets([4, 6]), offsets([5, 7])


@pytest.mark.parametrize("cu_q, err, match", [
    ([0, 6, 4], ValueError, r"cu_seqlens_q must be non-decreasing; cu_seqlens_q\[2\] = 4 < cu_seqlens_q\[1\] = 6"),
    ([0, 4, 11], ValueError, r"cu_seqlens_q\[-1\] = 11 is past the number of tokens \(10\)"),
    ([1, 4, 10], ValueError, r"cu_seqlens_q\[0\] must be 0"),
])
def test_bad_offset_values(cu_q, err, match):
    q, k, v, _, cu_k = _inputs()
    with pytest.raises(err, match=match):
        varlen_attention(q, k, v, torch.tensor(cu_q, dtype=torch.int32), cu_k)


def test_max_seqlen_types():
    """max_seqlen_q/k as flash-attn's ``int`` arguments take them: int, numpy integer, 0-d integer tensor (the
    usual ``(cu[1:] - cu[:-1]).max()``) or None; the value is not needed, so it is never read. Floats, bools and
    1-d tensors are refused by name, by both entry points."""
    np = pytest.importorskip("numpy")
    q, k, v, cu_q, cu_k = _inputs()
    want = varlen_attention(q, k, v, cu_q, cu_k)
    for fn in (varlen_attention, flash_attn_varlen_func):
        for m in (6, np.int64(6), np.int32(7), (cu_q[1:] - cu_q[:-1]).max(), None):
            assert torch.equal(fn(q, k, v, cu_q, cu_k, m, m), want), (fn.__name__, type(m))
        for bad in (6.0, True, torch.tensor([6]), torch.tensor(6.0), "6"):
            with pytest.raises(TypeError, match="max_seqlen_k must be an integer"):
                fn(q, k, v, cu_q, cu_k, 6, bad)
            with pytest.raises(TypeError, match="max_seqlen_q must be an integer"):
                fn(q, k, v, cu_q, cu_k, bad, 6)


def test_bad_offsets_type_device_shape():
    q, k, v, cu_q, cu_k = _inputs()
    with pytest.raises(TypeError, match="cu_seqlens_q must have dtype torch.int32.*got torch.int64"):
        varlen_attention(q, k, v, cu_q.long(), cu_k)
    with pytest.raises(ValueError, match="cu_seqlens_k must be on the same device as q"):
        varlen_attention(q, k, v, cu_q, cu_k.to("meta"))
    with pytest.raises(ValueError, match="same length"):
        varlen_attention(q, k, v, cu_q, offsets([5, 7, 0]))
    with pytest.raises(ValueError, match="cu_seqlens_q must be 1-D"):
        varlen_attention(q, k, v, cu_q[None], cu_k)
    with pytest.raises(TypeError, match="cu_seqlens_q must be an int32 tensor"):
        varlen_attention(q, k, v, [0, 4, 10], cu_k)
    with pytest.raises(ValueError, match=r"cu_seqlens_k\[-1\] = 12 is past the number of tokens \(11\)"):
        varlen_attention(q, k[:11], v[:11], cu_q, cu_k)


def test_bad_tensors():
    q, k, v, cu_q, cu_k = _inputs()
    with pytest.raises(ValueError, match="head dims differ: q 16, k 8, v 16"):
        varlen_attention(q, k[..., :8], v, cu_q, cu_k)
    with pytest.raises(ValueError, match=r"number of query heads \(4\) must be a positive multiple of the number of "
                                         r"key/value heads \(3\)"):
        varlen_attention(q, rand(12, 3, 16), rand(12, 3, 16), cu_q, cu_k)
    with pytest.raises(TypeError, match="share one dtype"):
        varlen_attention(q, k.half(), v, cu_q, cu_k)
    with pytest.raises(ValueError, match=r"q must be 3-D \(total_tokens, heads, head_dim\)"):
        varlen_attention(q[None], k, v, cu_q, cu_k)
    with pytest.raises(ValueError, match="k and v must have the same"):
        varlen_attention(q, k, v[:11], cu_q, cu_k)
    with pytest.raises(NotImplementedError, match="dropout_p=0.1.*no dropout"):
        varlen_attention(q, k, v, cu_q, cu_k, dropout_p=0.1)
    with pytest.raises(ValueError, match=r"head dim must be at least 1; got q of shape \(10, 4, 0\)"):
        varlen_attention(q[..., :0], k[..., :0], v[..., :0], cu_q, cu_k)
    with pytest.raises(ValueError, match=r"number of query heads \(0\) must be a positive multiple"):
        varlen_attention(q[:, :0], k, v, cu_q, cu_k)


@pytest.mark.interpreter
def test_triton_refusals_say_why():
    q, k, v, cu_q, cu_k = _inputs()
    with use_backend("triton"), pytest.raises(BackendError, match="float64 inputs"):
        varlen_attention(q.double(), k.double(), v.double(), cu_q, cu_k)
    big = rand(4, 1, 300)
    with use_backend("triton"), pytest.raises(BackendError, match="head dim 300 > 256"):
        varlen_attention(big, big, big, offsets([4]), offsets([4]))
    wide = rand(1, 32768, 256)   # 2^23 elements per token: past the int32 tile offsets
    with use_backend("triton"), pytest.raises(BackendError, match=r"heads x head dim = 32768 x 256 elements per "
                                                                    r"token \(the kernels take fewer than 8388608"):
        varlen_attention(wide, wide[:, :1], wide[:, :1], offsets([1]), offsets([1]))
    # a packed input's gradient is one buffer of all its heads: 3 x 400000 heads refused (q's alone would pass)
    qkv = torch.empty(0, 3, 400000, 1, requires_grad=True)
    with use_backend("triton"), pytest.raises(BackendError, match=r"heads x head dim = 1200000 x 8 elements"):
        flash_attn_varlen_qkvpacked_func(qkv, offsets([0]))
    # the torch backend takes both
    with use_backend("torch"):
        out = varlen_attention(big, big, big, offsets([4]), offsets([4]))
    assert_close(out, ref_out(big, big, big, offsets([4]), offsets([4]), 0), torch.float32)


def test_flash_attn_varlen_func_refuses_unsupported_options():
    q, k, v, cu_q, cu_k = _inputs()
    qkv, kv = torch.stack([q, q, q], 1), torch.stack([k, v], 1)
    forms = (lambda *a, **kw: flash_attn_varlen_func(q, k, v, cu_q, cu_k, *a, **kw),
             lambda *a, **kw: flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, *a, **kw),
             lambda *a, **kw: flash_attn_varlen_qkvpacked_func(qkv, cu_q, *a[1:], **kw))  # one max_seqlen
    for call in forms:
        with pytest.raises(ValueError, match=r"window_size left must be -1 \(unbounded\) or a number of keys"):
            call(6, 7, window_size=(-4, 0))   # windows are supported (test_varlen_attention_window.py)
        with pytest.raises(NotImplementedError, match="softcap=30.0"):
            call(6, 7, softcap=30.0)
        with pytest.raises(NotImplementedError, match="alibi"):
            call(6, 7, alibi_slopes=torch.ones(4))
        with pytest.raises(NotImplementedError, match="dropout"):
            call(6, 7, 0.5)
    with pytest.raises(ValueError, match=r"qkv must be \(total, 3, nheads, headdim\); got \(10, 2, 4, 16\)"):
        flash_attn_varlen_qkvpacked_func(qkv[:, :2], cu_q)
    with pytest.raises(ValueError, match=r"kv must be \(total_k, 2, nheads_k, headdim\); got \(12, 2, 16\)"):
        flash_attn_varlen_kvpacked_func(q, k, cu_q, cu_k)
    with pytest.raises(TypeError, match="q must be a tensor; got NoneType"):
        flash_attn_varlen_kvpacked_func(None, kv, cu_q, cu_k)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_packed_forms(causal, device, dtype, poison):
    """flash_attn_varlen_qkvpacked_func (self-attention, one cu_seqlens) and flash_attn_varlen_kvpacked_func (GQA
    cross-attention) in flash-attn's positional order: values, LSE and the gradient of the packed tensor against
    the independent oracle (the packed gradient is dq, dk, dv stacked in the packed layout)."""
    lens, lens_k = [5, 1, 0, 9], [3, 6, 2, 8]
    qkv = rand(sum(lens), 3, 4, 24, dtype=dtype, device=device, grad=True)
    q = rand(sum(lens), 4, 24, dtype=dtype, device=device, seed=1, grad=True)
    kv = rand(sum(lens_k), 2, 2, 24, dtype=dtype, device=device, seed=2, grad=True)
    cu, cu_k = offsets(lens, device), offsets(lens_k, device)
    with use_backend("triton"):
        # (qkv, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal)
        out, lse, probs = flash_attn_varlen_qkvpacked_func(qkv, cu, 9, 0.0, 0.3, causal, return_attn_probs=True)
        got = grads(out, [qkv])[0]
        # (q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal)
        cross = flash_attn_varlen_kvpacked_func(q, kv, cu, cu_k, 9, 8, 0.0, 0.3, causal)
        got_cross = grads(cross, [q, kv])
    assert probs is None and out.shape == (sum(lens), 4, 24) and cross.shape == q.shape
    mode = 1 if causal else 0
    qkv64, q64, kv64 = to_float64([qkv, q, kv])
    ref, ref_lse = attention_per_sequence(*qkv64.unbind(1), lens, lens, 0.3, mode)
    assert_close(out, ref, dtype, tol=2 * TOLERANCE[dtype])
    nonempty = torch.isfinite(ref_lse)
    assert_close(lse.float()[nonempty.to(lse.device)], ref_lse[nonempty], dtype, "lse", tol=2 * TOLERANCE[dtype])
    assert_close(got, grads(ref, [qkv64])[0], dtype, "dqkv", tol=3 * TOLERANCE[dtype])
    ref_cross = attention_per_sequence(q64, *kv64.unbind(1), lens, lens_k, 0.3, mode)[0]
    assert_close(cross, ref_cross, dtype, tol=2 * TOLERANCE[dtype])
    assert_close(got_cross, grads(ref_cross, [q64, kv64]), dtype, "grads", tol=3 * TOLERANCE[dtype])
    assert fastsora.ops.flash_attn_varlen_qkvpacked_func is flash_attn_varlen_qkvpacked_func
    assert fastsora.ops.flash_attn_varlen_kvpacked_func is flash_attn_varlen_kvpacked_func


def _autograd_nodes(t: torch.Tensor) -> set:
    """Names of the autograd nodes reachable from t's grad_fn."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(n for n, _ in node.next_functions)
    return names


_GRADIENT_COPIES = {"UnbindBackward0", "StackBackward0", "CatBackward0", "SliceBackward0", "SelectBackward0",
                    "SplitBackward0", "SplitWithSizesBackward0"}


def _packed_case(form, device, d, dtype):
    """(run(packed, q) -> out, the same attention on unpacked views, packed input, separate q or None). The varlen
    packs end with rows past the offsets (zero gradient, written by the kernels too)."""
    cu, cu_k = offsets([5, 0, 4], device), offsets([3, 2, 6], device)
    new = functools.partial(rand, device=device, dtype=dtype, grad=True)
    if form == "varlen_qkv":
        return (lambda p, q: flash_attn_varlen_qkvpacked_func(p, cu, None, 0.0, 0.3, True),
                lambda p, q: varlen_attention(*p.unbind(1), cu, cu, softmax_scale=0.3, causal=True),
                new(11, 3, 2, d), None)
    if form == "varlen_kv":
        return (lambda p, q: flash_attn_varlen_kvpacked_func(q, p, cu, cu_k, causal=True),
                lambda p, q: varlen_attention(q, *p.unbind(1), cu, cu_k, causal=True),
                new(13, 2, 1, d), new(10, 3, d, seed=1))
    if form == "batch_qkv":
        return (lambda p, q: flash_attn_qkvpacked_func(p, causal=True),
                lambda p, q: flash_attn_func(*p.unbind(2), causal=True),
                new(2, 5, 3, 2, d), None)
    return (lambda p, q: flash_attn_kvpacked_func(q, p, causal=True),  # batch_kv
            lambda p, q: flash_attn_func(q, *p.unbind(2), causal=True),
            new(2, 7, 2, 2, d), new(2, 4, 4, d, seed=1))


@pytest.mark.parametrize("form", ["varlen_qkv", "varlen_kv", "batch_qkv", "batch_kv"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_forms_write_one_gradient(form, backend, device, dtype, poison):
    """flash-attn's packed functions exist so that the backward writes the packed gradient as one tensor instead
    of stacking dq, dk, dv (a second gradient-sized buffer and a copy): no unbind / stack / slice node lies
    between the output and the packed input, and values and gradients equal the unpacked call's exactly, in
    every dtype (head dim 20 also covers the kernels' padded gradient buffer)."""
    for d in (16, 20):
        run, unpacked, packed, q = _packed_case(form, device, d, dtype)
        inputs = [packed] if q is None else [packed, q]
        with use_backend(backend):
            out = run(packed, q)
            want = unpacked(packed, q)
            assert not _autograd_nodes(out) & _GRADIENT_COPIES, _autograd_nodes(out)
            assert _autograd_nodes(want) & _GRADIENT_COPIES  # the check sees the copies the unpacked call makes
            got_grads, want_grads = grads(out, inputs), grads(want, inputs)  # the same seeded cotangent
        assert torch.equal(out, want)
        for name, a, b in zip(("packed", "q"), got_grads, want_grads):
            assert not a.isnan().any() and torch.equal(a, b), f"{form} d{name}, head dim {d}"


def test_packed_gradient_buffers_are_checked():
    """The launcher's ``grads`` buffers: a buffer the kernels cannot write through is refused by name."""
    kern = importlib.import_module("fastsora.kernels.varlen_attention")
    q, k, v = rand(6, 2, 16), rand(6, 2, 16, seed=1), rand(6, 2, 16, seed=2)
    cu = offsets([6])
    with use_backend("triton"):
        out, lse = fastsora.ops.varlen_attention(q, k, v, cu, cu, return_lse=True)
    args = (torch.randn_like(out), q, k, v, out, lse, cu, cu, 0.25, 0)
    good = kern.new_grad_buffer((6, 6, 16), torch.float32, q.device)
    with pytest.raises(ValueError, match=r"grads: the dk buffer must be \(6, 2, 16\) torch.float32"):
        kern.backward(*args, grads=(None, good[:, 2:3], good[:, 4:]))
    with pytest.raises(ValueError, match=r"grads: the dv buffer .* multiples of 8 .*strides \(96, 1, 6\)"):
        kern.backward(*args, grads=(None, good[:, 2:4], torch.randn(6, 16, 6).transpose(1, 2)))
    dq, dk, dv = kern.backward(*args, grads=(good[:, :2], good[:, 2:4], None))
    assert dq.data_ptr() == good.data_ptr() and dk.data_ptr() == good[:, 2:4].data_ptr()
    want = kern.backward(*args)
    assert all(torch.equal(a, b) for a, b in zip((dq, dk, dv), want))


def test_flash_attn_varlen_func_positional_order_and_outputs(device):
    q, k, v = rand(10, 4, 16, device=device), rand(12, 2, 16, seed=1, device=device), rand(12, 2, 16, seed=2,
                                                                                           device=device)
    cu_q, cu_k = offsets([4, 6], device), offsets([5, 7], device)
    with use_backend("triton"):
        # (q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal)
        out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 6, 7, 0.0, 0.5, True, deterministic=True)
        out2, lse, probs = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 6, 7, 0.0, 0.5, True, return_attn_probs=True)
    assert probs is None and lse.shape == (4, 10)
    torch.testing.assert_close(out, out2)
    assert_close(out, ref_out(q, k, v, cu_q, cu_k, 1, 0.5), torch.float32, tol=4e-5)
    assert fastsora.ops.flash_attn_varlen_func is flash_attn_varlen_func
    assert fastsora.ops.varlen_attention is varlen_attention


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_batch_forms(causal, device, dtype, poison):
    """flash_attn_func (GQA, seqlen_q != seqlen_k: causal from the bottom right) and its qkv- / kv-packed forms on
    (batch, seqlen, [3 | 2,] nheads, headdim), in flash-attn's positional order: values, the LSE in flash-attn's
    (batch, nheads, seqlen_q) layout, and gradients of every input against the independent oracle."""
    b, sq, sk = 3, 6, 9
    q = rand(b, sq, 4, 40, dtype=dtype, device=device, grad=True)
    k, v = (rand(b, sk, 2, 40, dtype=dtype, device=device, seed=s, grad=True) for s in (1, 2))
    qkv = rand(b, sq, 3, 4, 40, dtype=dtype, device=device, seed=3, grad=True)
    kv = rand(b, sk, 2, 2, 40, dtype=dtype, device=device, seed=4, grad=True)
    with use_backend("triton"):
        # (q, k, v, dropout_p, softmax_scale, causal)
        out, lse, probs = flash_attn_func(q, k, v, 0.0, 0.2, causal, return_attn_probs=True)
        got = grads(out, [q, k, v])
        self_out = flash_attn_qkvpacked_func(qkv, 0.0, 0.2, causal)
        got_self = grads(self_out, [qkv])
        cross = flash_attn_kvpacked_func(q, kv, 0.0, 0.2, causal)
        got_cross = grads(cross, [q, kv])
    assert probs is None and out.shape == self_out.shape == cross.shape == q.shape and lse.shape == (b, 4, sq)
    assert lse.is_contiguous(), "flash-attn returns a contiguous LSE"
    mode = 1 if causal else 0
    q64, k64, v64, qkv64, kv64 = to_float64([q, k, v, qkv, kv])

    def oracle(q_, k_, v_):  # batch elements packed one after another, LSE back to (batch, nheads, seqlen_q)
        o, l = attention_per_sequence(q_.flatten(0, 1), k_.flatten(0, 1), v_.flatten(0, 1), [q_.shape[1]] * b,
                                      [k_.shape[1]] * b, 0.2, mode)
        return o.view(q_.shape), l.view(q_.shape[2], b, q_.shape[1]).transpose(0, 1)

    ref, ref_lse = oracle(q64, k64, v64)
    assert_close(out, ref, dtype, tol=2 * TOLERANCE[dtype])
    assert_close(lse, ref_lse, dtype, "lse", tol=2 * TOLERANCE[dtype])
    assert_close(got, grads(ref, [q64, k64, v64]), dtype, "grads", tol=3 * TOLERANCE[dtype])
    ref_self = oracle(*qkv64.unbind(2))[0]
    assert_close(self_out, ref_self, dtype, tol=2 * TOLERANCE[dtype])
    assert_close(got_self, grads(ref_self, [qkv64]), dtype, "dqkv", tol=3 * TOLERANCE[dtype])
    ref_cross = oracle(q64, *kv64.unbind(2))[0]
    assert_close(cross, ref_cross, dtype, tol=2 * TOLERANCE[dtype])
    assert_close(got_cross, grads(ref_cross, [q64, kv64]), dtype, "grads", tol=3 * TOLERANCE[dtype])
    for name in ("flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func"):
        assert getattr(fastsora.ops, name) is globals()[name]


def test_flash_attn_batch_forms_refuse_bad_input():
    q, k = rand(2, 5, 4, 16), rand(2, 7, 2, 16, seed=1)
    for call in (lambda **kw: flash_attn_func(q, k, k, **kw),
                 lambda **kw: flash_attn_kvpacked_func(q, torch.stack([k, k], 2), **kw),
                 lambda **kw: flash_attn_qkvpacked_func(torch.stack([q, q, q], 2), **kw)):
        with pytest.raises(TypeError, match=r"window_size must be a pair \(left, right\) of ints; got 8"):
            call(window_size=8)
        with pytest.raises(NotImplementedError, match="softcap"):
            call(softcap=5.0)
        with pytest.raises(NotImplementedError, match="alibi"):
            call(alibi_slopes=torch.ones(4))
        with pytest.raises(NotImplementedError, match=r"^dropout_p=0.1: "):
            call(dropout_p=0.1)
    shapes = r"must share batch and headdim >= 1, k and v also seqlen_k and nheads_k, with nheads_k dividing nheads; "
    with pytest.raises(ValueError, match=shapes + r"got \(2, 5, 4, 16\), \(3, 7, 2, 16\) and \(3, 7, 2, 16\)"):
        flash_attn_func(q, rand(3, 7, 2, 16), rand(3, 7, 2, 16))
    for bad_k, bad_v in ((k, k[:, :6]), (k, k[:, :, :1]), (k[..., :8], k[..., :8]), (k[:, :, :0], k[:, :, :0]),
                         (rand(2, 7, 3, 16), rand(2, 7, 3, 16))):
        with pytest.raises(ValueError, match=shapes + re.escape(f"got (2, 5, 4, 16), {tuple(bad_k.shape)}")):
            flash_attn_func(q, bad_k, bad_v)
    with pytest.raises(ValueError, match=shapes + r"got \(2, 5, 4, 0\)"):
        flash_attn_func(q[..., :0], k[..., :0], k[..., :0])
    with pytest.raises(ValueError, match=r"q must be 4-D \(batch, seqlen, nheads, headdim\); got \(10, 4, 16\)"):
        flash_attn_func(q.flatten(0, 1), k, k)
    with pytest.raises(ValueError, match=r"qkv must be \(batch, seqlen, 3, nheads, headdim\); got \(2, 5, 4, 16\)"):
        flash_attn_qkvpacked_func(q)
    with pytest.raises(ValueError, match=r"kv must be \(batch, seqlen_k, 2, nheads_k, headdim\)"):
        flash_attn_kvpacked_func(q, torch.stack([k, k, k], 2))


# --------------------------------------------------------------------------------------------------------------
# xformers drop-in with duck-typed mask objects (same class names and attributes as xformers')
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _SeqLenInfo:
    seqstart: torch.Tensor
    max_seqlen: int
    min_seqlen: int
    seqstart_py: List[int]

    @classmethod
    def from_seqlens(cls, seqlens):
        starts = [0]
        for n in seqlens:
            starts.append(starts[-1] + n)
        return cls(torch.tensor(starts, dtype=torch.int32), max(seqlens), min(seqlens), starts)


def _mask_class(name):
    def from_seqlens(cls, q_seqlen, kv_seqlen=None):
        return cls(_SeqLenInfo.from_seqlens(q_seqlen), _SeqLenInfo.from_seqlens(kv_seqlen or q_seqlen))
    return type(name, (), {"__init__": lambda self, q, k: (setattr(self, "q_seqinfo", q),
                                                           setattr(self, "k_seqinfo", k), None)[-1],
                           "from_seqlens": classmethod(from_seqlens)})


BlockDiagonalMask = _mask_class("BlockDiagonalMask")
BlockDiagonalCausalMask = _mask_class("BlockDiagonalCausalMask")
BlockDiagonalCausalFromBottomRightMask = _mask_class("BlockDiagonalCausalFromBottomRightMask")
LowerTriangularMask = type("LowerTriangularMask", (), {})
LowerTriangularFromBottomRightMask = type("LowerTriangularFromBottomRightMask", (), {})
BlockDiagonalPaddedKeysMask = _mask_class("BlockDiagonalPaddedKeysMask")


@pytest.mark.parametrize("cls, mode", [(BlockDiagonalMask, 0), (BlockDiagonalCausalMask, 2),
                                       (BlockDiagonalCausalFromBottomRightMask, 1)], ids=lambda x: getattr(x, "__name__", x))
def test_memory_efficient_attention_block_diagonal(cls, mode, device, dtype):
    lq, lk = [7, 1, 0, 30], [12, 4, 3, 21]
    q = rand(1, sum(lq), 2, 32, dtype=dtype, device=device, grad=True)
    k = rand(1, sum(lk), 2, 32, dtype=dtype, device=device, seed=1, grad=True)
    v = rand(1, sum(lk), 2, 32, dtype=dtype, device=device, seed=2, grad=True)
    bias = cls.from_seqlens(lq, lk)
    with use_backend("triton"):
        out = memory_efficient_attention(q, k, v, attn_bias=bias)
        g = grads(out, [q, k, v])
    assert out.shape == q.shape
    cu_q, cu_k = offsets(lq), offsets(lk)
    q64, k64, v64 = to_float64([q, k, v])
    ref = ref_attention(q64[0], k64[0], v64[0], cu_q, cu_k, 32 ** -0.5, mode)[0][None]
    assert_close(out, ref, dtype, tol=2 * TOLERANCE[dtype])  # bf16 too: the dtype fixture adds it on CUDA
    for a, b in zip(g, grads(ref, [q64, k64, v64])):
        assert_close(a, b, dtype, tol=2 * TOLERANCE[dtype])


def test_xformers_causal_alignments_differ():
    """BlockDiagonalCausalMask is causal from the top-left: with Lq < Lk the last query does not see the last
    keys; the FromBottomRight form does (flash-attn's causal)."""
    lq, lk = [3], [8]
    q, k, v = rand(1, 3, 1, 16), rand(1, 8, 1, 16, seed=1), rand(1, 8, 1, 16, seed=2)
    with use_backend("torch"):
        top = memory_efficient_attention(q, k, v, BlockDiagonalCausalMask.from_seqlens(lq, lk))
        bottom = memory_efficient_attention(q, k, v, BlockDiagonalCausalFromBottomRightMask.from_seqlens(lq, lk))
        flash = varlen_attention(q[0], k[0], v[0], offsets(lq), offsets(lk), causal=True)
    # top-left: query 0 sees key 0 only -> its output is v[0]
    torch.testing.assert_close(top[0, 0], v[0, 0])
    torch.testing.assert_close(bottom[0], flash)
    assert not torch.allclose(top, bottom)


def test_memory_efficient_attention_dense_and_lower_triangular(device):
    q, k, v = rand(2, 9, 2, 16, device=device), rand(2, 13, 2, 16, seed=1, device=device), \
        rand(2, 13, 2, 16, seed=2, device=device)
    with use_backend("triton"):
        dense = memory_efficient_attention(q, k, v, scale=0.3)
        causal = memory_efficient_attention(q, k, v, LowerTriangularMask())
        bottom_right = memory_efficient_attention(q, k, v, LowerTriangularFromBottomRightMask())
    ref_dense = torch.softmax(torch.einsum("bihd,bjhd->bhij", q, k) * 0.3, -1)
    ref_dense = torch.einsum("bhij,bjhd->bihd", ref_dense, v)
    torch.testing.assert_close(dense, ref_dense, rtol=1e-5, atol=1e-5)
    # top-left: query i sees keys j <= i; from the bottom right (9 queries, 13 keys): j <= i + 4
    for got, above in ((causal, 1), (bottom_right, 13 - 9 + 1)):
        s = torch.einsum("bihd,bjhd->bhij", q, k) / 4.0
        s = s.masked_fill(torch.ones(9, 13, dtype=torch.bool, device=device).triu(above), float("-inf"))
        torch.testing.assert_close(got, torch.einsum("bhij,bjhd->bihd", torch.softmax(s, -1), v), rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("mq, mk", [(0, 5), (4, 0), (0, 0)])
def test_memory_efficient_attention_empty_sequences(mq, mk, device, poison):
    """Mq = 0 gives an empty output; Mk = 0 (no key to see) gives zeros, as flash-attn's empty rows."""
    q, k, v = rand(2, mq, 2, 16, device=device), rand(2, mk, 2, 16, seed=1, device=device), \
        rand(2, mk, 2, 16, seed=2, device=device)
    for backend in ("torch", "triton"):
        with use_backend(backend):
            out = memory_efficient_attention(q, k, v)
        assert out.shape == (2, mq, 2, 16) and torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("kv_form", ["expanded", "one_head", "per_head"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_memory_efficient_attention_bmghk_layout(kv_form, backend, device, dtype, poison, monkeypatch):
    """xformers' GQA / MQA layout [B, M, G, H, K]: key and value expanded over H (stride 0, as xformers asks) or
    of size 1 there run as G key heads (read once per group: the kernel gets G heads); distinct keys per head run
    as G * H heads. Output in query's layout; values and gradients against the independent per-head oracle."""
    if backend == "torch" and dtype != torch.float32:
        pytest.skip("the layout handling is backend-independent; one dtype is enough on the torch backend")
    b, mq, mk, g, h, d = 2, 5, 7, 2, 3, 16
    q = rand(b, mq, g, h, d, dtype=dtype, device=device, grad=True)
    hk = h if kv_form == "per_head" else 1
    k = rand(b, mk, g, hk, d, dtype=dtype, device=device, seed=1, grad=True)
    v = rand(b, mk, g, hk, d, dtype=dtype, device=device, seed=2, grad=True)
    kx, vx = (t.expand(-1, -1, -1, h, -1) for t in (k, v)) if kv_form == "expanded" else (k, v)
    seen_heads = []
    module = importlib.import_module("fastsora.ops.varlen_attention")  # the attribute of fastsora.ops is the op
    real = module._attention
    monkeypatch.setattr(module, "_attention", lambda q3, k3, *a: seen_heads.append((q3.shape[1], k3.shape[1]))
                        or real(q3, k3, *a))
    with use_backend(backend):
        out = memory_efficient_attention(q, kx, vx, scale=0.3)
        got = grads(out, [q, k, v])
    assert out.shape == q.shape and seen_heads == [(g * h, g if kv_form != "per_head" else g * h)]
    q64, k64, v64 = to_float64([q, k, v])
    lens = [mq] * b
    ref = attention_per_sequence(q64.flatten(0, 1).flatten(1, 2), k64.flatten(0, 1).flatten(1, 2),
                                 v64.flatten(0, 1).flatten(1, 2), lens, [mk] * b, 0.3, 0)[0].view(q.shape)
    assert_close(out, ref, dtype, tol=2 * TOLERANCE[dtype])
    assert_close(got, grads(ref, [q64, k64, v64]), dtype, "grads", tol=3 * TOLERANCE[dtype])


def test_memory_efficient_attention_bmk_layout(device):
    """xformers' [B, M, K] is one head; the output keeps that layout."""
    q = rand(2, 5, 16, device=device)
    k, v = rand(2, 7, 16, seed=1, device=device), rand(2, 7, 16, seed=2, device=device)
    with use_backend("triton"):
        out = memory_efficient_attention(q, k, v, LowerTriangularFromBottomRightMask())
    ref = attention_per_sequence(*to_float64([q.flatten(0, 1)[:, None], k.flatten(0, 1)[:, None],
                                              v.flatten(0, 1)[:, None]]), [5, 5], [7, 7], 0.25, 1)[0]
    assert out.shape == (2, 5, 16)
    assert_close(out, ref.view(2, 5, 16), torch.float32)


@pytest.mark.parametrize("make, mode", [(lambda m: m, 0), (lambda m: m.make_causal(), 2),
                                        (lambda m: m.make_causal_from_bottomright(), 1)],
                         ids=["block_diagonal", "causal", "causal_from_bottom_right"])
def test_fastsora_masks_drive_memory_efficient_attention(make, mode, device, dtype, poison):
    """fastsora's own BlockDiagonalMask family (no xformers installed): from_seqlens, the make_causal forms, values
    and gradients against the independent oracle; the mask's seqstart stays on the CPU as xformers' default."""
    from fastsora.ops import BlockDiagonalMask

    lq, lk = [7, 1, 0, 12], [9, 4, 3, 5]
    mask = make(BlockDiagonalMask.from_seqlens(lq, lk))
    assert mask.q_seqinfo.seqstart.dtype == torch.int32 and mask.k_seqinfo.seqstart_py == [0, 9, 13, 16, 21]
    assert (mask.q_seqinfo.max_seqlen, mask.q_seqinfo.min_seqlen) == (12, 0)
    q = rand(1, sum(lq), 4, 16, dtype=dtype, device=device, grad=True)
    k, v = (rand(1, sum(lk), 2, 16, dtype=dtype, device=device, seed=s, grad=True) for s in (1, 2))
    with use_backend("triton"):
        out = memory_efficient_attention(q, k, v, attn_bias=mask)
        got = grads(out, [q, k, v])
    q64, k64, v64 = to_float64([q, k, v])
    ref = attention_per_sequence(q64[0], k64[0], v64[0], lq, lk, 16 ** -0.5, mode)[0][None]
    assert_close(out, ref, dtype, tol=2 * TOLERANCE[dtype])
    assert_close(got, grads(ref, [q64, k64, v64]), dtype, "grads", tol=3 * TOLERANCE[dtype])


def test_fastsora_masks_materialize_and_split():
    """materialize() writes the masks out (0 / -inf) by their definitions; from_tensor_list packs [B_i, M_i, *]
    tensors into one [1, sum, *] with one block per batch element, and split() gives them back."""
    from fastsora.ops import (BlockDiagonalCausalFromBottomRightMask, BlockDiagonalMask,
                              LowerTriangularFromBottomRightMask, LowerTriangularMask)

    seen = BlockDiagonalMask.from_seqlens([2, 1], [1, 3]).materialize((2, 3, 4)) == 0
    assert seen.shape == (2, 3, 4) and seen[0].tolist() == [[True, False, False, False], [True, False, False, False],
                                                            [False, True, True, True]]
    causal = BlockDiagonalMask.from_seqlens([2, 1], [3, 3]).make_causal().materialize((3, 6)) == 0
    assert causal.tolist() == [[True, False, False, False, False, False], [True, True, False, False, False, False],
                               [False, False, False, True, False, False]]
    bottom = BlockDiagonalCausalFromBottomRightMask.from_seqlens([2], [3]).materialize((2, 3)) == 0
    assert bottom.tolist() == [[True, True, False], [True, True, True]]
    assert (LowerTriangularMask().materialize((2, 3)) == 0).tolist() == [[True, False, False], [True, True, False]]
    assert (LowerTriangularFromBottomRightMask().materialize((3, 2)) == 0).tolist() == [[False, False], [True, False],
                                                                                       [True, True]]
    parts = [rand(2, 3, 4, 8), rand(1, 5, 4, 8, seed=1), rand(3, 1, 4, 8, seed=2)]
    mask, x = BlockDiagonalMask.from_tensor_list(parts)
    assert x.shape == (1, 14, 4, 8) and mask.q_seqinfo.seqstart_py == [0, 3, 6, 11, 12, 13, 14]
    back = mask.split(x)
    assert [tuple(b.shape) for b in back] == [(2, 3, 4, 8), (1, 5, 4, 8), (3, 1, 4, 8)]
    assert all(torch.equal(a, b) for a, b in zip(parts, back))
    empty_mask, packed = BlockDiagonalMask.from_tensor_list([parts[0][:, :0], parts[1]])  # zero-length sequences
    assert [tuple(b.shape) for b in empty_mask.split(packed)] == [(2, 0, 4, 8), (1, 5, 4, 8)]
    with pytest.raises(ValueError, match="2 query blocks but 3 key blocks"):
        BlockDiagonalMask.from_seqlens([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match=r"seqlens must be >= 0; got \[1, -2\]"):
        BlockDiagonalMask.from_seqlens([1, -2])
    with pytest.raises(ValueError, match=r"x must be \[1, 14, \.\.\.\] \(the packed blocks\); got \(1, 13, 4, 8\)"):
        mask.split(x[:, :13])
    with pytest.raises(ValueError, match=r"shape must end in \(3, 4\)"):
        BlockDiagonalMask.from_seqlens([2, 1], [1, 3]).materialize((3, 3))


def test_memory_efficient_attention_errors():
    q = rand(2, 6, 2, 16)
    bias = BlockDiagonalMask.from_seqlens([2, 4])
    with pytest.raises(ValueError, match="batch size must be 1"):
        memory_efficient_attention(q, q, q, bias)
    with pytest.raises(NotImplementedError, match="BlockDiagonalPaddedKeysMask is not supported"):
        memory_efficient_attention(q[:1], q[:1], q[:1], BlockDiagonalPaddedKeysMask.from_seqlens([2, 4]))
    with pytest.raises(NotImplementedError, match="attn_bias as a tensor"):
        memory_efficient_attention(q, q, q, torch.zeros(6, 6))
    with pytest.raises(ValueError, match=r"seqstart\[-1\] = 7 is past the number of tokens \(6\)"):
        memory_efficient_attention(q[:1], q[:1], q[:1], BlockDiagonalMask.from_seqlens([3, 4]))
    with pytest.raises(NotImplementedError, match=r"^p=0.1: .* no dropout; pass p=0.0"):
        memory_efficient_attention(q[:1], q[:1], q[:1], bias, p=0.1)
    with pytest.raises(ValueError, match=r"query must be a 4-D tensor \[B, M, H, K\] \(or xformers' \[B, M, K\] or "
                       r"\[B, M, G, H, K\]\); got \(12,\)"):
        memory_efficient_attention(q[0, :, 0, 0].repeat(2), q, q)
    with pytest.raises(ValueError, match=r"share one layout; got 4-D, 3-D and 4-D \(\[B, M, H, K\], \[B, M, K\], "):
        memory_efficient_attention(q, q[:, :, 0], q)
    q5 = rand(1, 6, 2, 3, 16)
    with pytest.raises(ValueError, match=r"value must be \[B, Mk, G, H, K\] or \[B, Mk, G, 1, K\] with query's G = 2 "
                       r"and H = 3; got \(1, 6, 2, 2, 16\)"):
        memory_efficient_attention(q5, q5, q5[:, :, :, :2])
    with pytest.raises(ValueError, match=r"key must be .* G = 2 and H = 3; got \(1, 6, 1, 3, 16\)"):
        memory_efficient_attention(q5, q5[:, :, :1], q5)
    with pytest.raises(ValueError, match=r"key and value must agree on B and M; got \(1, 4, 2, 3, 16\) and "
                       r"\(1, 6, 2, 3, 16\)"):
        memory_efficient_attention(q5, q5[:, :4], q5)
    # a mask-named object without xformers' seqinfo attributes: a TypeError naming what is missing
    BlockDiagonalMask_ = type("BlockDiagonalMask", (), {})
    with pytest.raises(TypeError, match="attn_bias has no 'q_seqinfo' attribute"):
        memory_efficient_attention(q[:1], q[:1], q[:1], BlockDiagonalMask_())


# --------------------------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["separate", "qkvpacked"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph_with_backward(backend, packed, device):
    torch._dynamo.reset()
    lens = [5, 0, 11]
    cu = offsets(lens, device)
    q, k, v = (rand(16, 2, 16, device=device, seed=s, grad=True) for s in range(3))

    def f(q, k, v, cu):
        if packed:  # the packed op (one gradient for the stacked tensor) traced as well
            out = flash_attn_varlen_qkvpacked_func(torch.stack([q, k, v], 1), cu, causal=True)
        else:
            out = varlen_attention(q, k, v, cu, cu, causal=True)
        return (out.float() ** 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if device.type == "cpu" else "inductor")
    with use_backend(backend):
        loss = compiled(q, k, v, cu)
        g = torch.autograd.grad(loss, [q, k, v])
        loss_e = f(q, k, v, cu)
        g_e = torch.autograd.grad(loss_e, [q, k, v])
    torch.testing.assert_close(loss, loss_e)
    for a, b in zip(g, g_e):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_dynamic_shapes_compile_once(backend, device):
    """A training loop over packs feeds a new token count and number of sequences every step. Compiled with
    ``dynamic=True``, the op, its backward, memory_efficient_attention with a new BlockDiagonalMask each step
    and the VarlenAttention module compile once for all of them (no guard on a size, on max_seqlen or on the
    mask's host list of block starts) and give the eager outputs and gradients bitwise. The first pack's sizes
    differ from the head counts and dims, so dynamo's duck sizing ties none of them."""
    from fastsora.nn.varlen_attention import VarlenAttention
    torch._dynamo.reset()
    module = VarlenAttention(32, 4, num_kv_heads=2, qk_norm=True).to(device)

    def f(q, k, v, x, cu, max_seqlen, mask):
        out = varlen_attention(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=True)
        return out, memory_efficient_attention(q[None], k[None], v[None], attn_bias=mask), module(x, cu)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend=counter)
    frames = []  # graphs compiled so far, after each pack
    for seed, lens in enumerate([[5, 12], [7, 0, 2], [3, 9, 4, 6], [13]]):
        cu, total = offsets(lens, device), sum(lens)
        mask = fastsora.ops.BlockDiagonalMask.from_seqlens(lens, device=device)
        q = rand(total, 4, 16, device=device, seed=seed, grad=True)
        x = rand(total, 32, device=device, seed=seed, grad=True)
        k, v = (rand(total, 2, 16, device=device, seed=10 * seed + s, grad=True) for s in (1, 2))
        inputs = [q, k, v, x] + list(module.parameters())
        with use_backend(backend):
            got = compiled(q, k, v, x, cu, max(lens), mask)
            g_got = torch.autograd.grad(sum((o.float() ** 2).sum() for o in got), inputs)
            want = f(q, k, v, x, cu, max(lens), mask)
            g_want = torch.autograd.grad(sum((o.float() ** 2).sum() for o in want), inputs)
        for a, b in zip(list(got) + list(g_got), list(want) + list(g_want)):
            assert torch.equal(a, b), (lens, (a - b).abs().max())
        frames.append(counter.frame_count)
    assert frames == frames[:1] * len(frames), f"recompiled for a new pack shape (graphs after each: {frames})"


def test_torch_compile_inductor_cpu_torch_backend():
    torch._dynamo.reset()
    cu = offsets([3, 6])
    q, k, v = (rand(9, 2, 16, seed=s) for s in range(3))
    f = torch.compile(lambda q, k, v: varlen_attention(q, k, v, cu, cu) * 2, fullgraph=True)
    with use_backend("torch"):
        torch.testing.assert_close(f(q, k, v), varlen_attention(q, k, v, cu, cu) * 2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_export_save_load_round_trip(backend, device, tmp_path):
    """torch.export of the self- and cross-attention modules (the packed op) and of the separate-q, k, v function
    with its LSE, saved and loaded: the loaded programs give the eager outputs exactly."""
    from fastsora.nn.varlen_attention import VarlenAttention

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = VarlenAttention(32, 4, num_kv_heads=2, causal=True)
            self.cross_attn = VarlenAttention(32, 4, cross_attention_dim=24)

        def forward(self, x, cu, context, cu_k):
            x = x + self.self_attn(x, cu)  # validates eagerly, skipped when traced
            x = x + self.cross_attn(x, cu, context, cu_k, validate=False)
            q = x.view(-1, 4, 8)
            return x, *flash_attn_varlen_func(q, q, q, cu, cu, causal=True, return_attn_probs=True, validate=False)

    torch.manual_seed(0)
    m = Block().to(device).eval()
    args = (torch.randn(10, 32, device=device), offsets([4, 0, 6], device), torch.randn(7, 24, device=device),
            offsets([3, 2, 2], device))
    with torch.no_grad(), use_backend(backend):
        ep = torch.export.export(m, args)
        torch.export.save(ep, str(tmp_path / "attn.pt2"))
        got = torch.export.load(str(tmp_path / "attn.pt2")).module()(*args)
        want = m(*args)
    assert want[-1] is None and got[-1] is None
    assert all(torch.equal(a, b) for a, b in zip(got[:-1], want[:-1], strict=True))
    other = "torch" if backend == "triton" else "triton"
    with use_backend(other), pytest.raises(BackendError, match=rf"carries the backend request '{backend}', but "
                                                             rf"'{other}' .* A torch.export program keeps the request"):
        torch.export.load(str(tmp_path / "attn.pt2")).module()(*args)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ops_pass_opcheck(backend, device):
    """torch.library.opcheck on the four varlen ops (schema, autograd registration, fake implementations against
    the backend's outputs, AOT dispatch): GQA views of a packed projection with head dim 20 (padded buffers),
    a zero-length sequence, the separate and the packed forms, q given apart or packed."""
    ops = torch.ops.fastsora
    cu, cu_k = offsets([3, 0, 4], device), offsets([2, 3, 2], device)
    qkv = rand(7, 4 + 2 * 2, 20, device=device, grad=True)  # heads [q | k | v]
    kv = rand(7, 2 * 2, 20, device=device, seed=1, grad=True)
    q = rand(7, 4, 20, device=device, seed=2, grad=True)
    with use_backend(backend):
        out, lse = ops.varlen_attention_packed_fwd(None, qkv, 4, cu, cu, 0.3, 1, backend)
        dout = torch.randn_like(out)
        torch.library.opcheck(ops.varlen_attention_fwd.default, (qkv[:, :4], qkv[:, 4:6], qkv[:, 6:], cu, cu, 0.3, 1,
                                                                  backend))
        torch.library.opcheck(ops.varlen_attention_bwd.default, (dout, *(t.detach() for t in (
            qkv[:, :4], qkv[:, 4:6], qkv[:, 6:], out, lse)), cu, cu, 0.3, 1, None, backend))
        torch.library.opcheck(ops.varlen_attention_packed_fwd.default, (None, qkv, 4, cu, cu, 0.3, 1, backend))
        torch.library.opcheck(ops.varlen_attention_packed_fwd.default, (q, kv, 0, cu, cu_k, 0.3, 0, backend))
        torch.library.opcheck(ops.varlen_attention_packed_bwd.default, (dout, None, qkv.detach(), 4, out.detach(),
                                                                         lse.detach(), cu, cu, 0.3, 1, None, backend))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = torch.empty(10, 4, 72), torch.empty(7, 2, 72), torch.empty(7, 2, 72)
        cu = torch.zeros(3, dtype=torch.int32)
        out, lse = torch.ops.fastsora.varlen_attention_fwd(q, k, v, cu, cu, 0.1, 1, "auto")
        assert out.shape == (10, 4, 72) and lse.shape == (4, 10) and lse.dtype == torch.float32
        qkv = torch.empty(10, 4 + 2 * 2, 72)  # heads [q | k | v], GQA
        out, lse = torch.ops.fastsora.varlen_attention_packed_fwd(None, qkv, 4, cu, cu, 0.1, 1, "auto")
        assert out.shape == (10, 4, 72) and lse.shape == (4, 10)
        dq, dqkv = torch.ops.fastsora.varlen_attention_packed_bwd(out, None, qkv, 4, out, lse, cu, cu, 0.1, 1, None,
                                                                  "auto")
        assert dq.numel() == 0 and dqkv.shape == qkv.shape
        out, lse = torch.ops.fastsora.varlen_attention_packed_fwd(q, qkv[:7, 4:], 0, cu, cu, 0.1, 0, "auto")
        assert out.shape == (10, 4, 72) and lse.shape == (4, 10)
        dq, dkv = torch.ops.fastsora.varlen_attention_packed_bwd(out, q, qkv[:7, 4:], 0, out, lse, cu, cu, 0.1, 0,
                                                                 None, "auto")
        assert dq.shape == q.shape and dkv.shape == (7, 4, 72)


# --------------------------------------------------------------------------------------------------------------
# nn module
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qk_norm", [True, False], ids=["qk_norm", "plain"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nn_self_attention_gqa(backend, qk_norm, device, dtype):
    """The module on either backend, on CPU (Triton in the interpreter) and compiled on CUDA, bf16 included.
    Without QK norms q, k and v stay head slices of the qkv projection, whose gradient the packed op writes as
    one tensor (no slice / unbind node to copy it)."""
    from fastsora.nn.varlen_attention import VarlenAttention

    if backend == "torch" and dtype != torch.float32:
        pytest.skip("the torch path at low precision is the yardstick of the triton rows (flash-attn's rule)")
    torch.manual_seed(0)
    m = VarlenAttention(64, 4, num_kv_heads=2, qk_norm=qk_norm, causal=True)
    with torch.no_grad():   # non-unit norm weights, so their gradients are not trivially shaped
        for p in (m.q_norm.weight, m.k_norm.weight) if qk_norm else ():
            p.copy_(torch.rand_like(p) + 0.5)
    m64 = copy.deepcopy(m).double()
    m = m.to(device, dtype)
    lens = [5, 12, 1]
    x = torch.randn(sum(lens), 64).to(device, dtype).requires_grad_()
    cu = offsets(lens, device)

    def run(name):
        with use_backend(name):
            y = m(x, cu)
            return y, grads(y, [x, *m.parameters()])
    y, got = run(backend)
    # with QK norms: one split of the projection (its backward one concatenation), not slices (each a full-size
    # zero-filled gradient, summed)
    assert _autograd_nodes(y) & _GRADIENT_COPIES == ({"SplitWithSizesBackward0"} if qk_norm else set())
    x64 = x.detach().cpu().double().requires_grad_()
    ref = varlen_attention_module_definition(m64, x64, lens)
    want = grads(ref, [x64, *m64.parameters()])
    names = ["x"] + [n for n, _ in m.named_parameters()]
    assert_module_parity(y, got, ref, want, names, dtype, lambda: run("torch"))


def test_nn_cross_attention(device, dtype):
    """Cross-attention (video tokens -> captions of other lengths) on the Triton path, CPU and CUDA."""
    from fastsora.nn.varlen_attention import VarlenAttention

    torch.manual_seed(0)
    m = VarlenAttention(32, 2, cross_attention_dim=24)
    m64 = copy.deepcopy(m).double()
    m = m.to(device, dtype)
    lq, lk = [6, 9], [4, 7]
    x = torch.randn(15, 32).to(device, dtype).requires_grad_()
    ctx = torch.randn(11, 24).to(device, dtype).requires_grad_()

    def run(name):
        with use_backend(name):
            y = m(x, offsets(lq, device), ctx, offsets(lk, device))
            return y, grads(y, [x, ctx, *m.parameters()])
    y, got = run("triton")
    assert not _autograd_nodes(y) & _GRADIENT_COPIES  # k and v: one gradient for the kv projection's output
    with torch.no_grad(), use_backend("triton"):  # a norm set after construction is applied (packed: no norms)
        plain = m(x, offsets(lq, device), ctx, offsets(lk, device))
        m.k_norm = torch.nn.RMSNorm(16).to(device, dtype)
        normed = m(x, offsets(lq, device), ctx, offsets(lk, device))
        m.k_norm = torch.nn.Identity()
    assert torch.equal(plain, y) and not torch.equal(normed, y)
    x64, ctx64 = (t.detach().cpu().double().requires_grad_() for t in (x, ctx))
    ref = varlen_attention_module_definition(m64, x64, lq, ctx64, lk)
    want = grads(ref, [x64, ctx64, *m64.parameters()])
    names = ["x", "context"] + [n for n, _ in m.named_parameters()]
    assert_module_parity(y, got, ref, want, names, dtype, lambda: run("torch"))


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_nn_rows_past_the_offsets_give_the_projection_bias(cross, device, poison):
    """Rows of x past cu_seqlens[-1] attend to nothing: their output is exactly the output projection's bias and
    their gradient exactly 0 (docs/varlen_attention.md); the rows before them are those of x without the tail.
    Kernel outputs start as NaN (poison), so an unwritten tail row would show."""
    from fastsora.nn.varlen_attention import VarlenAttention

    torch.manual_seed(0)
    m = VarlenAttention(32, 2, num_kv_heads=1, cross_attention_dim=24 if cross else None).to(device)
    lens, tail = [5, 0, 3], 3
    x = torch.randn(sum(lens) + tail, 32, device=device, requires_grad=True)
    cu = offsets(lens, device)
    ctx = (torch.randn(6, 24, device=device), offsets([2, 3, 1], device)) if cross else ()
    with use_backend("triton"):
        y = m(x, cu, *ctx)
        (dx,) = grads(y, [x])
        head = m(x[:-tail].detach(), cu, *ctx)
    assert torch.equal(y[-tail:], m.proj.bias.detach().expand(tail, -1))
    assert torch.equal(dx[-tail:], torch.zeros_like(dx[-tail:])) and dx[:-tail].abs().max() > 0
    torch.testing.assert_close(y[:-tail], head)  # (not bitwise: the projections' matmuls may block by row count)


def test_nn_varlen_attention_refusals():
    from fastsora.nn.varlen_attention import VarlenAttention

    m = VarlenAttention(32, 2, cross_attention_dim=24)
    lq = [6, 9]
    x, ctx = torch.randn(15, 32), torch.randn(11, 24)
    with pytest.raises(ValueError, match="cross-attention needs context"):
        m(x, offsets(lq))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        VarlenAttention(32, 4, num_kv_heads=3)
    # a self-attention module's keys are x's own tokens: context or cu_seqlens_k are refused, not ignored
    self_attn = VarlenAttention(32, 2)
    with pytest.raises(ValueError, match="context given to a self-attention module"):
        self_attn(x, offsets(lq), ctx)
    with pytest.raises(ValueError, match="cu_seqlens_k given to a self-attention module"):
        self_attn(x, offsets(lq), cu_seqlens_k=offsets([5, 10]))


# --------------------------------------------------------------------------------------------------------------
# CUDA: flash-attn's rule in bf16 at realistic shapes
# --------------------------------------------------------------------------------------------------------------


def _same_precision_torch(q, k, v, lens_q, lens_k, mode, scale):
    """Attention computed by torch in the inputs' precision (bf16 matmuls, softmax rounded to bf16)."""
    outs, a, b = [], 0, 0
    for lq, lk in zip(lens_q, lens_k):
        qq, kk, vv = q[a:a + lq], k[b:b + lk], v[b:b + lk]
        g = qq.shape[1] // kk.shape[1]
        kk, vv = kk.repeat_interleave(g, 1), vv.repeat_interleave(g, 1)
        s = torch.einsum("ihd,jhd->hij", qq, kk) * scale
        if mode:
            i = torch.arange(lq, device=q.device)[:, None]
            j = torch.arange(lk, device=q.device)[None, :]
            s = s.masked_fill(j > i + (lk - lq if mode == 1 else 0), float("-inf"))
        p = torch.softmax(s.float(), -1).nan_to_num(0.0).to(q.dtype)
        outs.append(torch.einsum("hij,jhd->ihd", p, vv))
        a, b = a + lq, b + lk
    return torch.cat(outs)


@pytest.mark.gpu
@pytest.mark.parametrize("lens_q, lens_k, hq, hkv, d, mode", [
    ([1024, 256, 1, 0, 777], None, 8, 8, 64, 0),
    ([2048, 1500], [120, 77], 16, 16, 72, 0),
    ([300, 1000, 7], [500, 900, 64], 8, 2, 128, 1),
    ([513, 200], [300, 100], 4, 4, 96, 2),
    ([1000, 129], None, 4, 1, 256, 1),
])
def test_cuda_flash_attn_rule_bf16(lens_q, lens_k, hq, hkv, d, mode):
    dev = torch.device("cuda")
    lens_k = lens_q if lens_k is None else lens_k
    q = rand(sum(lens_q), hq, d, device=dev, dtype=torch.bfloat16, grad=True)
    k = rand(sum(lens_k), hkv, d, device=dev, dtype=torch.bfloat16, seed=1, grad=True)
    v = rand(sum(lens_k), hkv, d, device=dev, dtype=torch.bfloat16, seed=2, grad=True)
    cu_q, cu_k = offsets(lens_q, dev), offsets(lens_k, dev)
    scale = d ** -0.5
    with use_backend("triton"):
        out, _ = fastsora.ops.varlen_attention(q, k, v, cu_q, cu_k, causal=mode == 1, return_lse=True) if mode != 2 \
            else (memory_efficient_attention(q[None], k[None], v[None], BlockDiagonalCausalMask.from_seqlens(
                lens_q, lens_k))[0], None)
    do = torch.randn_like(out)
    g = torch.autograd.grad(out, [q, k, v], do)
    qf, kf, vf = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    ref = _same_precision_torch(qf, kf, vf, lens_q, lens_k, mode, scale)
    g_ref = torch.autograd.grad(ref, [qf, kf, vf], do.float())
    qb, kb, vb = (t.detach().requires_grad_(True) for t in (q, k, v))
    same = _same_precision_torch(qb, kb, vb, lens_q, lens_k, mode, scale)
    g_same = torch.autograd.grad(same, [qb, kb, vb], do)
    assert_flash_rule(out, ref, same, 2.0, "out")
    for name, a, b, c in zip("qkv", g, g_ref, g_same):
        assert_flash_rule(a, b, c, 3.0, f"d{name}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_docs_examples_run_as_documented(backend, device, poison):
    """docs/varlen_attention.md's examples, run as written: the imports are our entry points, the sliding window
    gives the float64 windowed attention of each clip, and the packed images (BlockDiagonalMask) and the packed
    self- and cross-attention modules (head dim 72) give each sequence what it gets alone."""
    imports, modules, window, masks, padding = doc_examples("docs/varlen_attention.md")
    ns = {}
    exec(imports, ns)
    for name in ("flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func",
                 "flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func",
                 "memory_efficient_attention", "BlockDiagonalMask", "unpad_input", "pad_input"):
        assert ns[name] is getattr(fastsora.ops, name), name
    ns = {}
    with use_backend(backend), torch.device(device), torch.no_grad():
        exec(padding, ns)  # a padded batch: each clip's tokens get what the clip gets alone, zeros at the padding
        for b, n in enumerate((10, 6)):
            alone = flash_attn_func(*ns["qkv"][b:b + 1, :n].unbind(2))[0]
            assert_close(ns["out"][b, :n], alone, torch.float32, f"padded clip {b}")
            assert not ns["out"][b, n:].any()
    ns = {}
    with use_backend(backend), torch.device(device), torch.no_grad():
        exec(window, ns)  # a causal window of 64 keys in each of two clips
    q = ns["q"].double()
    want = attention_per_sequence(q, q, q, [200, 100], [200, 100], 64 ** -0.5, 1, (64, -1))[0]
    assert_close(ns["out"], want, torch.float32, "windowed clips")
    ns = {}
    with use_backend(backend), torch.device(device), torch.no_grad():
        exec(masks, ns)  # three images packed with a BlockDiagonalMask: each gets what it gets alone
        for image, out in zip(ns["images"], ns["per_image"], strict=True):
            assert_close(out, memory_efficient_attention(image, image, image), torch.float32, "packed image")
    lens_q, lens_k = [5, 0, 9], [3, 4, 2]
    cu_q = torch.tensor([0, 5, 5, 14], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 3, 7, 9], dtype=torch.int32, device=device)
    x, context = torch.randn(14, 1152, device=device), torch.randn(9, 4096, device=device)
    ns = {"x": x, "cu_seqlens": cu_q, "context": context, "cu_seqlens_k": cu_k}
    with use_backend(backend), torch.device(device), torch.no_grad():
        exec(modules, ns)
        assert ns["attn"].head_dim == 72 and ns["y"].shape == x.shape
        packed = {"self": ns["attn"](x, cu_q), "cross": ns["y"]}
        for i, (lq, lk) in enumerate(zip(lens_q, lens_k)):
            q0, k0 = int(cu_q[i]), int(cu_k[i])
            one_q = torch.tensor([0, lq], dtype=torch.int32, device=device)
            one_k = torch.tensor([0, lk], dtype=torch.int32, device=device)
            alone = {"self": ns["attn"](x[q0:q0 + lq], one_q),
                     "cross": ns["xattn"](x[q0:q0 + lq], one_q, context[k0:k0 + lk], one_k)}
            for kind, y in alone.items():
                assert_close(packed[kind][q0:q0 + lq], y, torch.float32, f"{kind}-attention, sequence {i}")
