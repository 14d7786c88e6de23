"""Varlen attention with sliding windows (flash-attn's ``window_size``): the Triton kernels (interpreter on CPU)
and the torch path against attention written out from the window's definition in float64 - outputs, LSE and
gradients; windows alone and with either causal alignment, cross-attention with Lq != Lk, GQA, tail rows; every
entry point that takes ``window_size``; flash-attn's rules (a side >= max_seqlen_k is unbounded); tiles outside
a window never read; bad values; opcheck and compile."""

import pytest
import torch

from fastsora import use_backend
from fastsora.ops.varlen_attention import (_attention, flash_attn_func, flash_attn_kvpacked_func,
                                           flash_attn_qkvpacked_func, flash_attn_varlen_func,
                                           flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func,
                                           memory_efficient_attention, varlen_attention)
from fastsora.testing import ATTENTION_GRAD_TOL as GRAD_TOL
from fastsora.testing import TOLERANCE, assert_close, attention_per_sequence, grads, relative_error, to_float64
from fastsora.testing import packed_offsets as offsets


def make(lq, lk, hq, hkv, d, dtype, device, extra_q=0):
    mk = lambda n, h: torch.randn(n, h, d).to(device, dtype).requires_grad_(True)  # noqa: E731
    return mk(sum(lq) + extra_q, hq), mk(sum(lk), hkv), mk(sum(lk), hkv), offsets(lq, device), offsets(lk, device)


def oracle(q, k, v, lq, lk, scale, mode, window):
    """float64 attention from the window's definition, its LSE and the gradients of q, k, v."""
    q64, k64, v64 = to_float64([q, k, v])
    out, lse = attention_per_sequence(q64, k64, v64, lq, lk, scale, mode, window)
    return out, lse, grads(out, [q64, k64, v64])


def check(q, k, v, lq, lk, mode, window, backend, scale=None, out_tol=None, grad_tol=None):
    cu_q, cu_k = offsets(lq, q.device), offsets(lk, q.device)
    with use_backend(backend):
        out, lse = _attention(q, k, v, cu_q, cu_k, 0.0, scale, mode, True, window)
        g = grads(out, [q, k, v])
    want, want_lse, want_g = oracle(q, k, v, lq, lk, q.shape[-1] ** -0.5 if scale is None else scale, mode, window)
    assert_close(out, want, q.dtype, "out", tol=out_tol or TOLERANCE[q.dtype] * 2)
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite), "rows without a key in their window must have LSE +inf"
    assert (lse.cpu()[~finite] == float("inf")).all()
    assert relative_error(lse.cpu()[finite], want_lse[finite]) < (1e-12 if q.dtype == torch.float64 else 1e-5)
    for name, a, b in zip("qkv", g, want_g):
        assert torch.isfinite(a).all(), f"d{name} has non-finite values"
        assert_close(a, b, q.dtype, f"d{name}", tol=grad_tol or GRAD_TOL[q.dtype])
    return out, lse


# (lengths q, lengths k (None: self), Hq, Hkv, D, causal mode, window, extra q rows)
CASES = {
    "self window (3, 2) multi-block d32": ([70, 1, 0, 33], None, 2, 1, 32, 0, (3, 2), 0),
    "self left-only (5, -1) d16": ([70, 9], None, 2, 2, 16, 0, (5, -1), 2),
    "self right-only (-1, 4) d16": ([70, 9], None, 2, 2, 16, 0, (-1, 4), 0),
    "self diagonal (0, 0) gqa d40": ([37, 66], None, 4, 2, 40, 0, (0, 0), 0),
    "self causal + (6, -1) d72": ([70, 3], None, 2, 2, 72, 1, (6, -1), 1),
    "self causal + (40, 7): right folded to 0 d24": ([90], None, 1, 1, 24, 1, (40, 7), 0),
    "cross Lq>Lk (2, 1) rows with no key d20": ([37, 6, 0], [5, 0, 3], 2, 2, 20, 0, (2, 1), 3),
    "cross Lq<Lk causal-br (17, -1) mqa d48": ([9, 34], [80, 5], 3, 1, 48, 1, (17, -1), 0),
    "cross top-left causal (4, -1) d32": ([40, 20], [70, 9], 2, 2, 32, 2, (4, -1), 0),
    "cross top-left (-1, 3) no causal d16": ([40], [33], 2, 1, 16, 2, (-1, 3), 0),
    "wide window (200, 200) = no mask d128": ([70, 5], [66, 8], 2, 2, 128, 0, (200, 200), 0),
    "self (1, 0): band edges one past a tile d16": ([100], None, 1, 1, 16, 0, (1, 0), 0),
    "self (33, 1) d16": ([100, 65], None, 1, 1, 16, 0, (33, 1), 0),
}


@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_triton_window_matches_float64_attention(case, dtype, device, poison):
    lq, lk, hq, hkv, d, mode, window, extra = CASES[case]
    lk = lq if lk is None else lk
    q, k, v, _, _ = make(lq, lk, hq, hkv, d, dtype, device, extra)
    check(q, k, v, lq, lk, mode, window, "triton")


@pytest.mark.parametrize("seed", range(6))
def test_random_windows_match_float64_attention(seed, device, poison):
    """Random packs, windows (each side -1 or 0..70), causal modes and GQA: band edges fall on every offset
    against the tiles (an off-by-one in a tile range shows only where an edge meets a tile boundary)."""
    gen = torch.Generator().manual_seed(seed)
    randint = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))  # noqa: E731
    lq = [randint(0, 110) for _ in range(randint(1, 4))]
    lk = lq if randint(0, 1) else [randint(0, 110) for _ in lq]
    window = tuple(-1 if randint(0, 3) == 0 else randint(0, 70) for _ in range(2))
    hkv = randint(1, 2)
    q, k, v, _, _ = make(lq, lk, 2 * hkv, hkv, 16, torch.float32, device, randint(0, 3))
    check(q, k, v, lq, lk, randint(0, 2), window, "triton")


@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_torch_backend_window_matches_float64_attention(case):
    lq, lk, hq, hkv, d, mode, window, extra = CASES[case]
    lk = lq if lk is None else lk
    q, k, v, _, _ = make(lq, lk, hq, hkv, d, torch.float64, "cpu", extra)
    check(q, k, v, lq, lk, mode, window, "torch", out_tol=1e-12, grad_tol=1e-12)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_window_that_is_a_causal_mask_gives_the_causal_result(backend, device):
    """window (-1, 0) without causal is flash-attn's causal mask; (-1, -1) is no window at all."""
    lq = lk = [70, 0, 33]
    q, k, v, cu, _ = make(lq, lk, 2, 1, 32, torch.float32, device)
    with use_backend(backend):
        causal = varlen_attention(q, k, v, cu, cu, causal=True, return_lse=True)
        window = varlen_attention(q, k, v, cu, cu, window_size=(-1, 0), return_lse=True)
        plain = varlen_attention(q, k, v, cu, cu, return_lse=True)
        unbounded = varlen_attention(q, k, v, cu, cu, window_size=(-1, -1), return_lse=True)
    for a, b in zip(window, causal):
        assert relative_error(a, b) < 1e-6
    assert all(torch.equal(a, b) for a, b in zip(plain, unbounded))


def test_tiles_outside_every_window_are_never_read(device):
    """The Triton kernels never load keys and queries far from a block's window: NaN in the first and last 200
    rows stays out of every output and gradient of rows and keys 400..599, whose windows (widened to any tile of
    up to 128 rows) lie between, in the forward, the dQ and the dK/dV kernels. Loading more tiles than the band's
    (then masking them) would let the NaN reach them through 0 * NaN. (The torch backend computes each sequence
    densely.)"""
    n = 1000
    cu = offsets([n], device)
    q, k, v = (torch.randn(n, 1, 16, device=device) for _ in range(3))
    for t in (q, k, v):
        t[:200], t[800:] = float("nan"), float("nan")
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    with use_backend("triton"):
        out = varlen_attention(q, k, v, cu, cu, window_size=(0, 0))
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(t[400:600]).all(), name
    assert torch.isnan(out[:200]).all() and torch.isnan(out[800:]).all()   # the poison is really there
    # window (0, 0): each row attends only to its own key
    assert relative_error(out[400:600], v[400:600]) < 1e-6


def _entry_point_runs(window, max_seqlen, device):
    """The same packed self-attention through every flash-attn entry point with ``window_size``."""
    b, s, h, d = 2, 40, 2, 16
    qkv = torch.randn(b, s, 3, h, d, device=device, requires_grad=True)
    cu = offsets([s] * b, device)
    flat = qkv.flatten(0, 1)
    q, k, v = flat.unbind(1)
    kw = dict(causal=False, window_size=window)
    return {
        "varlen_attention": varlen_attention(q, k, v, cu, cu, max_seqlen, max_seqlen, **kw),
        "flash_attn_varlen_func": flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, **kw),
        "flash_attn_varlen_qkvpacked_func": flash_attn_varlen_qkvpacked_func(flat, cu, max_seqlen, **kw),
        "flash_attn_varlen_kvpacked_func": flash_attn_varlen_kvpacked_func(q, flat[:, 1:], cu, cu, max_seqlen,
                                                                           max_seqlen, **kw),
        "flash_attn_func": flash_attn_func(*qkv.unbind(2), **kw).flatten(0, 1),
        "flash_attn_qkvpacked_func": flash_attn_qkvpacked_func(qkv, **kw).flatten(0, 1),
        "flash_attn_kvpacked_func": flash_attn_kvpacked_func(qkv[:, :, 0], qkv[:, :, 1:], **kw).flatten(0, 1),
    }, qkv


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_every_flash_attn_entry_point_takes_window_size(backend, device):
    """Values and the gradient of the one qkv tensor behind every form (the packed forms' own backward)."""
    with use_backend(backend):
        runs, qkv = _entry_point_runs((5, 2), 40, device)
    qkv64 = qkv.detach().double().requires_grad_(True)
    want = attention_per_sequence(*(t.flatten(0, 1) for t in qkv64.unbind(2)), [40, 40], [40, 40], 0.25, 0, (5, 2))[0]
    (want_grad,) = grads(want, [qkv64])
    for name, out in runs.items():
        assert relative_error(out, want) < 1e-5, name
        assert relative_error(grads(out, [qkv])[0], want_grad) < 2e-5, name


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_side_at_least_max_seqlen_k_is_unbounded(backend, device):
    """flash-attn resets a window side >= max_seqlen_k to -1. It matters where queries outnumber keys: with
    Lq = 10, Lk = 2 and window (-1, 2), query 0 would see keys j <= 0 + 2 - 10 + 2 < 0 (none); as flash-attn
    reads it (max_seqlen_k = 2), every query sees both keys. A max_seqlen_k tensor (never read) or None keeps
    the window as given."""
    q, k, v, cu_q, cu_k = make([10], [2], 2, 2, 16, torch.float32, device)
    lens = ([10], [2])
    with use_backend(backend):
        reset = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 10, 2, window_size=(-1, 2))
        kept = flash_attn_varlen_func(q, k, v, cu_q, cu_k, None, None, window_size=(-1, 2))
        kept_tensor = flash_attn_varlen_func(q, k, v, cu_q, cu_k, torch.tensor(10), torch.tensor(2),
                                             window_size=(-1, 2))
        batched = flash_attn_func(q[None], k[None], v[None], window_size=(-1, 2))[0]
    assert relative_error(reset, oracle(q, k, v, *lens, 0.25, 0, (-1, -1))[0]) < 1e-5
    assert relative_error(batched, reset) < 1e-6   # seqlen_k is flash_attn_func's max_seqlen_k
    want = oracle(q, k, v, *lens, 0.25, 0, (-1, 2))[0]
    assert (want[:6] == 0).all() and (want[6:] != 0).all()
    assert relative_error(kept, want) < 1e-5 and torch.equal(kept, kept_tensor)


@pytest.mark.parametrize("window, err, match", [
    ((-2, 0), ValueError, r"window_size left must be -1 \(unbounded\) or a number of keys >= 0; got -2"),
    ((3, -5), ValueError, r"window_size right must be -1 \(unbounded\) or a number of keys >= 0; got -5"),
    ((1.5, 2), TypeError, r"window_size left must be an int; got float"),
    ((1, True), TypeError, r"window_size right must be an int; got bool"),
    ((4,), TypeError, r"window_size must be a pair \(left, right\) of ints; got \(4,\)"),
    (3, TypeError, r"window_size must be a pair \(left, right\) of ints; got 3"),
])
def test_bad_window_sizes_are_refused_by_name(window, err, match):
    q, k, v, cu, _ = make([5, 4], [5, 4], 2, 2, 16, torch.float32, "cpu")
    for call in (lambda: varlen_attention(q, k, v, cu, cu, window_size=window),
                 lambda: flash_attn_varlen_func(q, k, v, cu, cu, 5, 5, window_size=window),
                 lambda: flash_attn_func(q[None], k[None], v[None], window_size=window)):
        with pytest.raises(err, match=match):
            call()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_window_ops_pass_opcheck(backend, device):
    ops = torch.ops.fastsora
    cu, cu_k = offsets([3, 0, 40], device), offsets([2, 3, 38], device)
    qkv = torch.randn(43, 4 + 2 * 2, 20, device=device, requires_grad=True)
    q = torch.randn(43, 4, 20, device=device, requires_grad=True)
    kv = torch.randn(43, 2 * 2, 20, device=device, requires_grad=True)
    with use_backend(backend):
        out, lse = ops.varlen_attention_fwd(qkv[:, :4], qkv[:, 4:6], qkv[:, 6:], cu, cu, 0.3, 0, backend, 3, 1)
        dout = torch.randn_like(out)
        torch.library.opcheck(ops.varlen_attention_fwd.default,
                              (qkv[:, :4], qkv[:, 4:6], qkv[:, 6:], cu, cu, 0.3, 0, backend, 3, 1))
        torch.library.opcheck(ops.varlen_attention_bwd.default, (dout, *(t.detach() for t in (
            qkv[:, :4], qkv[:, 4:6], qkv[:, 6:], out, lse)), cu, cu, 0.3, 0, None, backend, 3, 1))
        torch.library.opcheck(ops.varlen_attention_packed_fwd.default, (None, qkv, 4, cu, cu, 0.3, 1, backend, 5))
        torch.library.opcheck(ops.varlen_attention_packed_fwd.default, (q, kv, 0, cu, cu_k, 0.3, 2, backend, 4, -1))
        torch.library.opcheck(ops.varlen_attention_packed_bwd.default, (dout, None, qkv.detach(), 4, out.detach(),
                                                                         lse.detach(), cu, cu, 0.3, 0, None,
                                                                         backend, 3, 1))


def test_window_compiles_fullgraph_with_backward(device):
    lq = [37, 20]
    q, k, v, cu, _ = make(lq, lq, 2, 2, 16, torch.float32, device)

    def f(q, k, v):
        return flash_attn_varlen_func(q, k, v, cu, cu, 37, 37, causal=True, window_size=(4, -1))

    torch._dynamo.reset()
    with use_backend("triton"):
        out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
        g = grads(out, [q, k, v])
        eager = f(q, k, v)
        g_eager = grads(eager, [q, k, v])
    assert torch.equal(out, eager)
    assert all(torch.equal(a, b) for a, b in zip(g, g_eager))
    want = oracle(q, k, v, lq, lq, 0.25, 1, (4, -1))[0]
    assert relative_error(out, want) < 1e-5


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_module_window_matches_float64_attention(qk_norm, backend, device):
    """VarlenAttention(window_size=...) in self- and cross-attention (GQA) against its projections, the
    float64 windowed attention and its output projection; both paths (packed projection, and QK norms)."""
    from fastsora.nn import VarlenAttention

    torch.manual_seed(0)
    lq, lk = [40, 3, 0, 25], [33, 5, 2, 25]
    cu_q, cu_k = offsets(lq, device), offsets(lk, device)
    x, ctx = torch.randn(sum(lq), 64, device=device), torch.randn(sum(lk), 48, device=device)
    for cross in (False, True):
        m = VarlenAttention(64, 4, num_kv_heads=2, qk_norm=qk_norm, cross_attention_dim=48 if cross else None,
                            causal=not cross, window_size=(5, 2)).to(device)
        with use_backend(backend):
            y = m(x, cu_q, ctx, cu_k) if cross else m(x, cu_q)
        m64 = m.double()
        x64, c64 = x.double(), ctx.double()
        if cross:
            q, (k, v) = m64.q(x64).view(-1, 4, 16), m64.kv(c64).view(-1, 4, 16).split([2, 2], 1)
        else:
            q, k, v = m64.qkv(x64).view(-1, 8, 16).split([4, 2, 2], 1)
        lens_k = lk if cross else lq
        att = attention_per_sequence(m64.q_norm(q), m64.k_norm(k), v, lq, lens_k, 0.25, 0 if cross else 1,
                                     (5, 2))[0]
        want = m64.proj(att.reshape(-1, 64))
        assert relative_error(y, want) < 1e-5, ("cross" if cross else "self")
        m.float()


def test_module_refuses_bad_window_at_construction():
    from fastsora.nn import VarlenAttention

    with pytest.raises(ValueError, match=r"window_size left must be -1 \(unbounded\) or a number of keys >= 0"):
        VarlenAttention(64, 4, window_size=(-3, 0))


# --------------------------------------------------------------------------------------------------------------
# xformers' local masks: fastsora's classes and duck-typed xformers objects
# --------------------------------------------------------------------------------------------------------------

class _XformersSeqInfo:
    """xformers' _SeqLenInfo, as memory_efficient_attention reads it (seqstart, seqstart_py)."""

    def __init__(self, lengths):
        self.seqstart_py = [0]
        for n in lengths:
            self.seqstart_py.append(self.seqstart_py[-1] + n)
        self.seqstart = torch.tensor(self.seqstart_py, dtype=torch.int32)


def _xformers_object(name, lq, lk, **attributes):
    """An object of xformers' class ``name`` (only its name and attributes are read), blocks of lq / lk."""
    obj = type(name, (), {})()
    if lq is not None:
        obj.q_seqinfo, obj.k_seqinfo = _XformersSeqInfo(lq), _XformersSeqInfo(lk)
    for key, value in attributes.items():
        setattr(obj, key, value)
    return obj


def _local_masks(lq, lk, source):
    """(attn_bias, block diagonal?, causal mode, window) for each local mask, built by fastsora's classes or as
    duck-typed xformers objects."""
    import fastsora.ops as fo

    if source == "fastsora":
        diag = fo.BlockDiagonalMask.from_seqlens(lq, lk)
        return [(diag.make_local_attention(3), True, 2, (2, -1)),
                (diag.make_local_attention_from_bottomright(5), True, 1, (4, -1)),
                (fo.LowerTriangularFromBottomRightLocalAttentionMask(4), False, 1, (3, -1)),
                (fo.LocalAttentionFromBottomRightMask(2, 1), False, 0, (2, 1))]
    return [(_xformers_object("BlockDiagonalCausalLocalAttentionMask", lq, lk, _window_size=3), True, 2, (2, -1)),
            (_xformers_object("BlockDiagonalCausalLocalAttentionFromBottomRightMask", lq, lk, _window_size=5), True,
             1, (4, -1)),
            (_xformers_object("LowerTriangularFromBottomRightLocalAttentionMask", None, None, _window_size=4), False,
             1, (3, -1)),
            (_xformers_object("LocalAttentionFromBottomRightMask", None, None, window_left=2, window_right=1), False,
             0, (2, 1))]


@pytest.mark.parametrize("source", ["fastsora", "xformers"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_memory_efficient_attention_local_masks(source, backend, device):
    """Each local mask of xformers against the float64 windowed attention, values and gradients: block-diagonal
    ones over a pack (B = 1), per-batch ones over B = 2 equal-length elements with Mq != Mk."""
    lq, lk = [40, 3, 0, 25], [45, 5, 2, 25]
    for bias, block_diag, mode, window in _local_masks(lq, lk, source):
        if block_diag:
            q, k, v = (torch.randn(1, sum(n), 2, 16, device=device, requires_grad=True) for n in (lq, lk, lk))
            lens_q, lens_k = lq, lk
        else:
            q = torch.randn(2, 37, 2, 16, device=device, requires_grad=True)
            k, v = (torch.randn(2, 41, 2, 16, device=device, requires_grad=True) for _ in range(2))
            lens_q, lens_k = [37, 37], [41, 41]
        with use_backend(backend):
            out = memory_efficient_attention(q, k, v, attn_bias=bias)
            g = grads(out, [q, k, v])
        q64, k64, v64 = to_float64([q, k, v])
        want = attention_per_sequence(q64.flatten(0, 1), k64.flatten(0, 1), v64.flatten(0, 1), lens_q, lens_k, 0.25,
                                      mode, window)[0].view(q.shape)
        name = type(bias).__name__
        assert relative_error(out, want) < 1e-5, name
        for a, b in zip(g, grads(want, [q64, k64, v64])):
            assert relative_error(a, b) < 2e-5, name


def test_local_mask_classes_materialize_as_xformers_documents():
    """fastsora's local masks written out: xformers' documented LocalAttentionFromBottomRightMask(1, 2) examples,
    and the causal local blocks from their definitions; make_local_attention* keep the blocks, `to` the window."""
    import fastsora.ops as fo

    seen = fo.LocalAttentionFromBottomRightMask(window_left=1, window_right=2).materialize((4, 4)).exp()
    assert torch.equal(seen, torch.tensor([[1., 1, 1, 0], [1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]]))
    seen = fo.LocalAttentionFromBottomRightMask(window_left=1, window_right=2).materialize((4, 5)).exp()
    assert torch.equal(seen, torch.tensor([[1., 1, 1, 1, 0], [0, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 1, 1]]))
    diag = fo.BlockDiagonalMask.from_seqlens([4, 2], [3, 5])
    top = diag.make_local_attention(2)
    assert type(top) is fo.BlockDiagonalCausalLocalAttentionMask and top._window_size == 2
    i, j = torch.arange(4)[:, None], torch.arange(3)[None, :]
    assert torch.equal(top.materialize((6, 8))[:4, :3] == 0, (j <= i) & (j > i - 2))
    bottom = diag.make_local_attention_from_bottomright(3)
    assert type(bottom) is fo.BlockDiagonalCausalLocalAttentionFromBottomRightMask
    i, j = torch.arange(2)[:, None], torch.arange(5)[None, :]
    assert torch.equal(bottom.materialize((6, 8))[4:, 3:] == 0, (j <= i + 3) & (j > i + 3 - 3))
    assert not (bottom.materialize((6, 8))[4:, :3] == 0).any()   # other blocks stay hidden
    per_batch = fo.LowerTriangularFromBottomRightLocalAttentionMask(2).materialize((3, 4)) == 0
    assert torch.equal(per_batch, torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]).bool())
    moved = bottom.to("cpu")
    assert type(moved) is type(bottom) and moved._window_size == 3


@pytest.mark.parametrize("make, match", [
    (lambda fo: fo.BlockDiagonalMask.from_seqlens([2]).make_local_attention(0),
     r"BlockDiagonalCausalLocalAttentionMask: _window_size must be an int >= 1; got 0"),
    (lambda fo: fo.LowerTriangularFromBottomRightLocalAttentionMask(-1),
     r"LowerTriangularFromBottomRightLocalAttentionMask: _window_size must be an int >= 1; got -1"),
    (lambda fo: fo.LocalAttentionFromBottomRightMask(2, -1),
     r"LocalAttentionFromBottomRightMask: window_right must be an int >= 0; got -1"),
    (lambda fo: memory_efficient_attention(*(torch.randn(1, 4, 1, 8),) * 3, _xformers_object(
        "BlockDiagonalCausalLocalAttentionMask", [4], [4])),
     r"attn_bias \(BlockDiagonalCausalLocalAttentionMask\) must have an int _window_size >= 1; got None"),
    (lambda fo: memory_efficient_attention(*(torch.randn(1, 4, 1, 8),) * 3, _xformers_object(
        "LocalAttentionFromBottomRightMask", None, None, window_left=1.0, window_right=0)),
     r"attn_bias \(LocalAttentionFromBottomRightMask\) must have an int window_left >= 0; got 1.0"),
])
def test_bad_local_masks_are_refused_by_name(make, match):
    import fastsora.ops as fo

    with pytest.raises(ValueError, match=match):
        make(fo)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_xformers_local_masks_keep_a_side_wider_than_the_keys(backend, device):
    """flash-attn's reset of a side >= max_seqlen_k does not apply to xformers' masks: with Mq = 10, Mk = 2 and
    LocalAttentionFromBottomRightMask(0, 2), query i sees keys i - 8 <= j <= i - 6, so rows 0..5 see none (0)."""
    import fastsora.ops as fo

    q = torch.randn(2, 10, 2, 16, device=device)
    k, v = torch.randn(2, 2, 2, 16, device=device), torch.randn(2, 2, 2, 16, device=device)
    with use_backend(backend):
        out = memory_efficient_attention(q, k, v, attn_bias=fo.LocalAttentionFromBottomRightMask(0, 2))
    q64, k64, v64 = to_float64([q, k, v])
    want = attention_per_sequence(q64.flatten(0, 1), k64.flatten(0, 1), v64.flatten(0, 1), [10, 10], [2, 2], 0.25,
                                  0, (0, 2))[0].view(q.shape)
    assert (want[:, :6] == 0).all() and (want[:, 6:] != 0).all()
    assert relative_error(out, want) < 1e-5


def test_bench_and_check_cases_carry_the_window():
    """The cases of `fastsora check` / `fastsora bench` (fastsora/cases/varlen_attention.py) pass the window to
    every implementation: their FLOP count (visible pairs) and the dense-SDPA baseline's mask agree with the
    op's mask, and the baseline's output with the op's."""
    import random

    from fastsora.cases import varlen_attention as cases
    from fastsora.reference.varlen_attention import visible_mask

    rng = random.Random(0)
    for _ in range(60):
        lq = [rng.randint(0, 30) for _ in range(rng.randint(1, 3))]
        lk = [rng.randint(0, 30) for _ in lq]
        mode, window = rng.randint(0, 2), tuple(-1 if rng.random() < 0.3 else rng.randint(0, 20) for _ in range(2))
        masks = [visible_mask(a, b, mode, "cpu", window) for a, b in zip(lq, lk)]
        assert cases.visible_pairs(lq, lk, mode, window) == sum(int(m.sum()) for m in masks)
        dense = cases._dense_mask(offsets(lq), offsets(lk), sum(lq), sum(lk), mode, window)
        assert torch.equal(dense, torch.block_diag(*masks) if masks else dense), (lq, lk, mode, window)
    case = next(c for c in cases.check_cases(torch.device("cpu")) if "window" in c.label)
    args = case.make(torch.device("cpu"), torch.float32)
    assert args[-1] != (-1, -1)
    pairs = sum(int(visible_mask(a, b, args[5], "cpu", args[-1]).sum()) for a, b in zip(case.meta["lq"],
                                                                                         case.meta["lk"]))
    assert case.flops == 4.0 * pairs * case.meta["hq"] * case.meta["d"]
    with use_backend("torch"):
        ours = cases._fastsora(args, "fwd")()
    assert relative_error(cases._sdpa_dense(args, "fwd")(), ours) < 1e-5


def test_window_token_limit_is_refused_by_the_triton_path():
    """The window kernels' int32 band bounds hold below MAX_WINDOW_TOKENS query and key tokens together; more
    is a BackendError naming the counts (checked from the shapes: stride-0 views, nothing is read)."""
    import fastsora.kernels.varlen_attention as kern
    from fastsora import BackendError

    from fastsora.backend import select_backend
    from fastsora.ops.varlen_attention import _unsupported

    n = kern.MAX_WINDOW_TOKENS // 2
    q = torch.randn(1, 1, 16).expand(n, 1, 16)
    # (the refusal is read from the shapes; the op is not called: without the refusal it would run 2^28 rows)
    reason = _unsupported(q, 0, n, (4, 4))
    with pytest.raises(BackendError, match=rf"a sliding window over {n} query and {n} key tokens \(the window "
                                           r"kernels take fewer than"):
        select_backend("varlen_attention", q.device, reason, "triton")
    assert _unsupported(q, 0, n, (-1, -1)) is None and _unsupported(q, 0, n - 1, (4, 4)) is None


def test_every_window_op_checks_the_token_limit(monkeypatch):
    """The separate and packed forward and backward ops all pass the window and the key count to the check:
    with the limit lowered to 100 tokens, 60 queries and 60 keys are refused, 40 + 40 are not."""
    import fastsora.kernels.varlen_attention as kern
    from fastsora import BackendError

    qkv = torch.randn(60, 3, 2, 16, requires_grad=True)
    cu = offsets([60])
    with use_backend("triton"):
        outs = [varlen_attention(*qkv.unbind(1), cu, cu, window_size=(3, 3)),
                flash_attn_varlen_qkvpacked_func(qkv, cu, 60, window_size=(3, 3))]
        monkeypatch.setattr(kern, "MAX_WINDOW_TOKENS", 100)
        for out in outs:   # the backward ops
            with pytest.raises(BackendError, match="a sliding window over 60 query and 60 key tokens"):
                out.sum().backward()
        for call in (lambda: varlen_attention(*qkv.unbind(1), cu, cu, window_size=(3, 3)),
                     lambda: flash_attn_varlen_qkvpacked_func(qkv, cu, 60, window_size=(3, 3))):
            with pytest.raises(BackendError, match="a sliding window over 60 query and 60 key tokens"):
                call()
        small = qkv[:40].detach()
        varlen_attention(*small.unbind(1), offsets([40]), offsets([40]), window_size=(3, 3))


def test_window_sides_past_int32_are_unbounded(device):
    """No sequence has 2^31 tokens: such a side is -1 (not an int64 kernel argument or a dispatcher error)."""
    q, k, v, cu, _ = make([40, 9], [40, 9], 2, 2, 16, torch.float32, device)
    import fastsora.ops as fo

    with use_backend("triton"):
        plain = varlen_attention(q, k, v, cu, cu)
        huge = varlen_attention(q, k, v, cu, cu, window_size=(2**31, 2**63))
        xf = memory_efficient_attention(q[None], k[None], v[None], _xformers_object(
            "BlockDiagonalCausalLocalAttentionFromBottomRightMask", [40, 9], [40, 9], _window_size=2**40))
        causal = varlen_attention(q, k, v, cu, cu, causal=True)
    assert torch.equal(huge, plain)
    assert torch.equal(xf[0], causal)
    assert fo.LowerTriangularFromBottomRightMask().make_local_attention(3)._window_size == 3


def test_window_minus_one_zero_runs_the_causal_kernels(monkeypatch, device):
    """window (-1, 0) without causal is flash-attn's causal mask: it runs the IS_CAUSAL variant (unmasked tiles
    below the diagonal), not the all-masked window one; (-1, 1) runs the window variant."""
    import fastsora.kernels.varlen_attention as kern

    seen = []
    real = kern._launch
    monkeypatch.setattr(kern, "_launch", lambda kind, *a: seen.append((kind, a[4])) or real(kind, *a))
    q, k, v, cu, _ = make([40], [40], 1, 1, 16, torch.float32, device)
    with use_backend("triton"):
        varlen_attention(q, k, v, cu, cu, window_size=(-1, 0))
        varlen_attention(q, k, v, cu, cu, window_size=(-1, 1))
    assert [(c["IS_CAUSAL"], c["IS_LOCAL"]) for _, c in seen] == [(True, False), (False, True)]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_window_minus_one_zero_is_the_bottom_right_causal_mask(backend, device, poison):
    """Where query and key lengths differ, window (-1, 0) is flash-attn's causal mask aligned bottom-right
    (query i sees keys j <= i + Lk - Lq), not xformers' top-left one: the same output and gradients as
    causal=True, and the float64 definition."""
    lens = ([37, 9], [21, 40])
    q, k, v, cu_q, cu_k = make(*lens, 2, 1, 16, torch.float32, device)
    with use_backend(backend):
        windowed = varlen_attention(q, k, v, cu_q, cu_k, window_size=(-1, 0))
        causal = varlen_attention(q, k, v, cu_q, cu_k, causal=True)
    got = grads(windowed, [q, k, v])
    assert torch.equal(windowed, causal)
    assert all(torch.equal(a, b) for a, b in zip(got, grads(causal, [q, k, v])))
    want, _, want_grads = oracle(q, k, v, *lens, 0.25, 0, (-1, 0))
    assert relative_error(windowed, want) < 1e-5
    for name, a, b in zip("qkv", got, want_grads):
        assert_close(a, b, q.dtype, f"d{name}", tol=GRAD_TOL[q.dtype])
    assert relative_error(windowed, oracle(q, k, v, *lens, 0.25, 2, (-1, -1))[0]) > 1e-2   # top-left differs


@pytest.mark.parametrize("tiles", [(16, 64), (64, 16)], ids=["16x64", "64x16"])
def test_non_square_tiles_match_float64_attention(tiles, monkeypatch, device):
    """The interpreter's tiles are square; the CUDA candidates mostly are not (128x64, 16x64, ...). With BLOCK_M
    != BLOCK_N a swapped tile size in a band's range would show: random windows against the oracle."""
    import fastsora.kernels.varlen_attention as kern

    if not kern.KERNELS_INTERPRETED:
        pytest.skip("the CUDA launches use the autotuned candidates")
    monkeypatch.setattr(kern, "INTERPRETER_TILES", {kind: tiles for kind in ("fwd", "dkdv", "dq")})
    gen = torch.Generator().manual_seed(7)
    randint = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))  # noqa: E731
    for _ in range(4):
        lq = [randint(0, 150) for _ in range(randint(1, 3))]
        lk = lq if randint(0, 1) else [randint(0, 150) for _ in lq]
        window = tuple(-1 if randint(0, 3) == 0 else randint(0, 90) for _ in range(2))
        q, k, v, _, _ = make(lq, lk, 2, 1, 16, torch.float32, device, randint(0, 3))
        check(q, k, v, lq, lk, randint(0, 2), window, "triton")
