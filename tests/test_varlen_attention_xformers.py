"""fastsora's ``memory_efficient_attention`` driven by xformers' own ``attn_bias`` objects, not fastsora's
look-alikes: the drop-in claim of an Open-Sora-style call site whose only change is the import.

The oracle is independent of fastsora: each mask's own ``materialize()`` (xformers' definition of what it hides)
added to float64 scores, softmax, product with V; a row that sees no key gives 0 (fastsora's and flash-attn's
rule). Values and gradients of q, k and v, on both backends.

xformers' ``attn_bias`` module is plain Python: it imports without a GPU and without xformers' compiled
extension (which is built for one CUDA torch; xformers then warns that it cannot load it). scripts/setup_env.sh
installs ``xformers==0.0.35`` with ``--no-deps`` (so it never replaces torch), best effort; without it this file
is skipped, naming why.
"""
import pytest
import torch

from fastsora import use_backend
from fastsora.ops import memory_efficient_attention
from fastsora.testing import (ATTENTION_GRAD_TOL, TOLERANCE, assert_close, attention_per_sequence, grads, randn,
                              to_float64)

try:
    from xformers.ops.fmha import attn_bias as xab
except Exception as exc:  # ImportError, or an xformers whose Python code needs a newer torch
    pytest.skip(f"xformers' attn_bias module does not import here ({type(exc).__name__}: {exc}); "
                "pip install --no-deps xformers==0.0.35", allow_module_level=True)


def dense_oracle(q, k, v, bias, scale):
    """q [B, Mq, H, K], k and v [B, Mk, H, K] float64; ``bias`` the xformers mask object. Rows that see no key
    give 0 (the -inf row is replaced before the softmax, so the oracle's own gradients stay finite)."""
    mq, mk = q.shape[1], k.shape[1]
    additive = bias.materialize((mq, mk), dtype=torch.float64, device=q.device)
    seen = additive.isfinite().any(-1, keepdim=True)
    additive = torch.where(seen, additive, torch.zeros_like(additive))
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale + additive
    return torch.einsum("bhij,bjhd->bihd", torch.softmax(scores, -1) * seen, v)


def _block_diagonal(lq, lk):
    return xab.BlockDiagonalMask.from_seqlens(lq, lk)


# (name, B, builder of the mask). Block lengths: an empty key block (its queries see nothing), an empty query
# block, blocks longer on either side. xformers itself checks that the bottom-right forms' key blocks are at least
# as long as their query blocks and that a local window reaches a key from the last query of a block.
RAGGED_Q, RAGGED_K = [7, 1, 0, 30, 4], [12, 4, 3, 21, 0]
EVEN_Q, EVEN_K = [7, 1, 0, 12, 3], [9, 4, 3, 17, 3]
LOCAL_Q, LOCAL_K = [7, 1, 0, 12, 3], [9, 4, 3, 10, 0]
MASKS = [
    ("BlockDiagonalMask", 1, lambda: _block_diagonal(RAGGED_Q, RAGGED_K)),
    ("BlockDiagonalCausalMask", 1, lambda: _block_diagonal(RAGGED_Q, RAGGED_K).make_causal()),
    ("BlockDiagonalCausalFromBottomRightMask", 1,
     lambda: _block_diagonal(EVEN_Q, EVEN_K).make_causal_from_bottomright()),
    ("BlockDiagonalCausalLocalAttentionMask", 1, lambda: _block_diagonal(LOCAL_Q, LOCAL_K).make_local_attention(5)),
    ("BlockDiagonalCausalLocalAttentionFromBottomRightMask", 1,
     lambda: _block_diagonal(EVEN_Q, EVEN_K).make_local_attention_from_bottomright(4)),
    ("LowerTriangularMask", 2, lambda: xab.LowerTriangularMask()),
    ("LowerTriangularFromBottomRightMask", 2, lambda: xab.LowerTriangularFromBottomRightMask()),
    ("LowerTriangularFromBottomRightLocalAttentionMask", 2,
     lambda: xab.LowerTriangularFromBottomRightLocalAttentionMask(3)),
    ("LocalAttentionFromBottomRightMask", 2, lambda: xab.LocalAttentionFromBottomRightMask(2, 3)),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name, batch, make", MASKS, ids=[m[0] for m in MASKS])
def test_xformers_masks_against_their_materialize(name, batch, make, backend, device, dtype, poison):
    if backend == "torch" and dtype != torch.float32:
        pytest.skip("the mask reading is backend-independent; one dtype is enough on the torch backend")
    bias = make()
    assert type(bias).__name__ == name and type(bias).__module__.startswith("xformers")
    if batch == 1:
        mq, mk = bias.q_seqinfo.seqstart_py[-1], bias.k_seqinfo.seqstart_py[-1]
    else:
        mq, mk = 9, 13
    h, d = 2, 32
    q = randn(batch, mq, h, d, dtype=dtype, device=device, requires_grad=True)
    k, v = (randn(batch, mk, h, d, dtype=dtype, device=device, requires_grad=True) for _ in range(2))
    with use_backend(backend):
        out = memory_efficient_attention(q, k, v, attn_bias=bias)
        got = grads(out, [q, k, v])
    q64, k64, v64 = to_float64([q, k, v])
    ref = dense_oracle(q64, k64, v64, bias, d ** -0.5)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, ref, dtype, f"out ({name})", tol=2 * TOLERANCE[dtype])
    assert_close(got, grads(ref, [q64, k64, v64]), dtype, f"grads ({name})", tol=ATTENTION_GRAD_TOL[dtype])


def test_xformers_masks_hide_what_materialize_hides(device):
    """The property itself, free of tolerances: changing the keys and values a query's materialized row hides
    leaves its output bitwise unchanged, and changing one it sees changes it (Triton backend)."""
    bias = _block_diagonal(LOCAL_Q, LOCAL_K).make_local_attention(5)
    mq, mk = bias.q_seqinfo.seqstart_py[-1], bias.k_seqinfo.seqstart_py[-1]
    hidden = ~bias.materialize((mq, mk)).isfinite()
    q, k, v = randn(1, mq, 1, 16, device=device), randn(1, mk, 1, 16, device=device), randn(1, mk, 1, 16, device=device)
    with use_backend("triton"):
        base = memory_efficient_attention(q, k, v, attn_bias=bias)
        for i in (0, 8, 15, mq - 4):
            cols = hidden[i].nonzero()[:, 0]
            k2, v2 = k.clone(), v.clone()
            k2[0, cols], v2[0, cols] = randn(len(cols), 1, 16, device=device), randn(len(cols), 1, 16, device=device)
            assert torch.equal(memory_efficient_attention(q, k2, v2, attn_bias=bias)[0, i], base[0, i]), i
            seen = (~hidden[i]).nonzero()[:, 0]
            v2 = v.clone()
            v2[0, seen[-1]] += 1.0
            assert not torch.equal(memory_efficient_attention(q, k, v2, attn_bias=bias)[0, i], base[0, i]), i


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_open_sora_cross_attention_call_site(backend, device, dtype, poison):
    """Open-Sora's MultiHeadCrossAttention: the B videos' N tokens each packed as one [1, B*N, H, K] query, the
    B captions of different lengths packed as keys and values, ``BlockDiagonalMask.from_seqlens([N] * B,
    caption_lengths)``. Each video must attend to its own caption only: against per-video float64 attention
    (fastsora.testing.attention_per_sequence, written out per sequence, independent of the op)."""
    if backend == "torch" and dtype != torch.float32:
        pytest.skip("one dtype is enough on the torch backend")
    b, n, h, d = 3, 20, 4, 72  # 72: Open-Sora's and DiT-XL's head dim
    caption_lengths = [5, 17, 1]
    q = randn(1, b * n, h, d, dtype=dtype, device=device, requires_grad=True)
    kv = randn(1, sum(caption_lengths), 2, h, d, dtype=dtype, device=device, requires_grad=True)
    k, v = kv.unbind(2)
    attn_bias = xab.BlockDiagonalMask.from_seqlens([n] * b, caption_lengths)
    with use_backend(backend):
        out = memory_efficient_attention(q, k, v, p=0.0, attn_bias=attn_bias)
        got = grads(out, [q, kv])
    q64, kv64 = to_float64([q, kv])
    k64, v64 = kv64.unbind(2)
    ref = attention_per_sequence(q64[0], k64[0], v64[0], [n] * b, caption_lengths, d ** -0.5, 0)[0][None]
    assert_close(out, ref, dtype, "out", tol=2 * TOLERANCE[dtype])
    assert_close(got, grads(ref, [q64, kv64]), dtype, "grads", tol=ATTENTION_GRAD_TOL[dtype])


def test_from_tensor_list_and_split(device):
    """xformers' other packing idiom: ``BlockDiagonalMask.from_tensor_list`` packs [1, L_i, H, K] tensors and
    returns the mask; ``mask.split`` unpacks the output. Each piece equals that sequence attended alone."""
    parts = [randn(1, length, 2, 16, device=device) for length in (3, 11, 1, 6)]
    mask, packed = xab.BlockDiagonalMask.from_tensor_list(parts)
    with use_backend("triton"):
        pieces = mask.split(memory_efficient_attention(packed, packed, packed, attn_bias=mask))
        alone = [memory_efficient_attention(p, p, p) for p in parts]
    assert [p.shape for p in pieces] == [p.shape for p in parts]
    for piece, single in zip(pieces, alone, strict=True):
        torch.testing.assert_close(piece, single, rtol=1e-5, atol=1e-6)


def test_xformers_masks_refused_or_checked():
    """The mask classes fastsora does not run raise NotImplementedError naming the class; a block-diagonal mask
    with B > 1, or whose blocks do not cover the tokens, raises ValueError naming the problem."""
    q = randn(1, 6, 2, 16)
    padded = xab.BlockDiagonalPaddedKeysMask.from_seqlens([2, 4], 8, [3, 5])
    gappy = xab.BlockDiagonalGappyKeysMask.from_seqlens([2, 4], [0, 8, 16], [3, 5])
    tensor_bias = xab.LowerTriangularMask().add_bias(randn(1, 2, 6, 6))
    for bias in (padded, gappy, tensor_bias):
        with pytest.raises(NotImplementedError, match=f"attn_bias of type {type(bias).__name__} is not supported"):
            memory_efficient_attention(q, randn(1, 16, 2, 16), randn(1, 16, 2, 16), attn_bias=bias)
    with pytest.raises(ValueError, match="batch size must be 1"):
        memory_efficient_attention(q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1),
                                   attn_bias=_block_diagonal([2, 4], [2, 4]))
    with pytest.raises(ValueError, match=r"attn_bias\.q_seqinfo\.seqstart"):
        memory_efficient_attention(q, q, q, attn_bias=_block_diagonal([2, 5], [2, 4]))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph_with_xformers_mask(backend, device):
    """An xformers mask object passed into a ``torch.compile(fullgraph=True)`` region: no graph break, forward and
    gradients bitwise the eager call's."""
    bias = _block_diagonal([5, 3, 8], [4, 9, 2]).make_causal()
    q = randn(1, 16, 2, 32, device=device, requires_grad=True)
    k, v = (randn(1, 15, 2, 32, device=device, requires_grad=True) for _ in range(2))

    def step(q, k, v, bias):
        return memory_efficient_attention(q, k, v, attn_bias=bias)

    with use_backend(backend):
        eager = step(q, k, v, bias)
        want = grads(eager, [q, k, v])
        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, bias)
        got = grads(compiled, [q, k, v])
    assert torch.equal(compiled, eager)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
