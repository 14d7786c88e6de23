"""flash-attn's bert_padding helpers (unpad_input, pad_input, unpad_input_for_concatenated_sequences,
index_first_axis, index_first_axis_residual, index_put_first_axis) against loop-built oracles, their gradients,
bad input, and the padded batch -> varlen attention -> padded batch pattern of video DiT code (FastVideo's
flash_attn_no_pad)."""
import pytest
import torch

import fastsora.ops
from fastsora import use_backend
from fastsora.ops import (flash_attn_varlen_qkvpacked_func, index_first_axis, index_first_axis_residual,
                          index_put_first_axis, pad_input, unpad_input, unpad_input_for_concatenated_sequences)
from fastsora.testing import TOLERANCE, assert_close, attention_per_sequence, grads, to_float64


def random_mask(batch, seqlen, seed):
    """A (batch, seqlen) int mask with an empty row, a full row and rows with holes (not only right padding)."""
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(batch, seqlen, generator=gen) < 0.6).long()
    mask[0] = 0
    mask[1] = 1
    return mask


def oracle_unpad(x, kept):
    """Kept positions row by row with plain Python loops."""
    rows, index, lengths = [], [], []
    for b in range(x.shape[0]):
        positions = [s for s in range(x.shape[1]) if kept[b, s]]
        rows += [x[b, s] for s in positions]
        index += [b * x.shape[1] + s for s in positions]
        lengths.append(len(positions))
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.stack(rows), torch.tensor(index), torch.tensor(cu, dtype=torch.int32), max(lengths)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.int32])
def test_unpad_pad_round_trip_and_gradients(mask_dtype):
    x = torch.randn(5, 9, 3, 4, requires_grad=True)
    mask = random_mask(5, 9, seed=1).to(mask_dtype)
    packed, indices, cu, max_seqlen, used = unpad_input(x, mask)
    want, want_idx, want_cu, want_max = oracle_unpad(x.detach(), mask.bool())
    assert torch.equal(packed, want) and torch.equal(indices, want_idx) and indices.dtype == torch.int64
    assert torch.equal(cu, want_cu) and cu.dtype == torch.int32 and max_seqlen == want_max
    assert isinstance(max_seqlen, int) and torch.equal(used, torch.diff(want_cu)) and used.dtype == torch.int32
    back = pad_input(packed, indices, 5, 9)
    assert torch.equal(back, x * mask.bool()[..., None, None])
    # gradients: unpad scatters the cotangent back to the kept positions (zeros elsewhere); pad gathers it
    (gx,) = grads(packed, [x])
    cot = torch.randn(packed.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    scattered = torch.zeros(45, 3, 4)
    scattered[want_idx] = cot
    assert torch.equal(gx, scattered.view_as(x))
    p = packed.detach().requires_grad_()
    (gp,) = grads(pad_input(p, indices, 5, 9), [p])
    cot = torch.randn((5, 9, 3, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    assert torch.equal(gp, cot.flatten(0, 1)[want_idx])


def test_unused_mask_keeps_slots_without_counting_them():
    x = torch.randn(3, 6, 2)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    unused = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    packed, indices, cu, max_seqlen, used = unpad_input(x, mask, unused)
    want, want_idx, want_cu, want_max = oracle_unpad(x, mask.bool() | unused)
    assert torch.equal(packed, want) and torch.equal(indices, want_idx) and torch.equal(cu, want_cu)
    assert max_seqlen == want_max == 6 and used.tolist() == [2, 3, 6]
    with pytest.raises(ValueError, match="unused_mask overlaps attention_mask"):
        unpad_input(x, mask, mask)


def test_concatenated_sequences():
    """Rows holding several sequences back to back: one cu_seqlens entry per sequence, in row order."""
    x = torch.randn(3, 6, 5, requires_grad=True)
    lengths = torch.tensor([[2, 3, 0, 0, 0, 0], [3, 2, 0, 0, 0, 0], [6, 0, 0, 0, 0, 0]])
    packed, indices, cu, max_seqlen = unpad_input_for_concatenated_sequences(x, lengths)
    kept = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0], [1] * 6], dtype=torch.bool)
    want, want_idx, _, _ = oracle_unpad(x.detach(), kept)
    assert torch.equal(packed, want) and torch.equal(indices, want_idx)
    assert cu.tolist() == [0, 2, 5, 8, 10, 16] and cu.dtype == torch.int32 and max_seqlen == 6
    for bad, err, match in ((lengths.float(), TypeError, "must be integer"),
                            (-lengths, ValueError, "lengths >= 0"),
                            (lengths + 1, ValueError, r"more than seqlen \(6\)")):
        with pytest.raises(err, match=match):
            unpad_input_for_concatenated_sequences(x, bad)


def test_index_helpers():
    x = torch.randn(7, 2, 3, requires_grad=True)
    idx = torch.tensor([5, 0, 3])
    assert torch.equal(index_first_axis(x, idx), x.detach()[idx])
    assert torch.equal(index_first_axis(x, idx.int()), x.detach()[idx])
    put = index_put_first_axis(x[:3], idx, 9)
    want = torch.zeros(9, 2, 3)
    want[idx] = x.detach()[:3]
    assert torch.equal(put, want)
    (g,) = grads(put, [x])
    cot = torch.randn((9, 2, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    assert torch.equal(g[:3], cot[idx]) and not g[3:].any()
    for name in ("index_first_axis", "index_first_axis_residual", "index_put_first_axis", "unpad_input",
                 "unpad_input_for_concatenated_sequences", "pad_input"):
        assert getattr(fastsora.ops, name).__module__ == "fastsora.ops.varlen_attention_padding"


def test_index_first_axis_residual():
    """The rows and a view of the whole input, strides kept (a channels-last-like input stays so); the two
    gradients add up in input: the rows' scattered back, summed where an index repeats, plus the residual's."""
    x = torch.randn(8, 5, 3).transpose(1, 2).requires_grad_()   # (8, 3, 5), not contiguous
    idx = torch.tensor([6, 1, 6, 0, 7])                          # a repeated row
    rows, residual = index_first_axis_residual(x, idx)
    assert torch.equal(rows, x.detach()[idx]) and rows.shape == (5, 3, 5)
    assert torch.equal(residual, x.detach()) and residual.stride() == x.stride()
    assert residual.data_ptr() == x.data_ptr() and residual is not x
    gen = torch.Generator().manual_seed(2)
    cot_rows, cot_res = (torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (rows, residual))
    want = cot_res.clone()
    for i, j in enumerate(idx.tolist()):   # loop oracle of the scatter-add
        want[j] += cot_rows[i]
    g = torch.autograd.grad((rows, residual), x, (cot_rows.float(), cot_res.float()))[0]
    assert torch.allclose(g.double(), want, atol=1e-6)
    rows, residual = index_first_axis_residual(x, idx.int())   # one output used: the other adds nothing
    (g_rows,) = torch.autograd.grad(rows, x, cot_rows.float())
    assert torch.allclose(g_rows.double(), want - cot_res, atol=1e-6)
    (g_res,) = torch.autograd.grad(index_first_axis_residual(x, idx)[1], x, cot_res.float())
    assert torch.equal(g_res.double(), cot_res.float().double())
    with pytest.raises(IndexError, match=r"indices must lie in \[0, input.shape\[0\] = 8\); got values from 0 to 8"):
        index_first_axis_residual(x, torch.tensor([0, 8]))
    with pytest.raises(ValueError, match=r"input must be \(first_axis_dim, \.\.\.\) with at least one trailing dim"):
        index_first_axis_residual(x[:, 0, 0], idx)


def test_bad_input():
    x = torch.randn(2, 4, 3)
    mask = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"attention_mask must be a \(batch, seqlen\) = \(2, 4\) tensor; got \(2, 5\)"):
        unpad_input(x, torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"unused_mask must be a \(batch, seqlen\) = \(2, 4\) tensor; got \(4,\)"):
        unpad_input(x, mask, torch.ones(4))
    with pytest.raises(ValueError, match=r"hidden_states must be \(batch, seqlen, \.\.\.\)"):
        unpad_input(x[0], mask)
    with pytest.raises(TypeError, match=r"attention_mask must be real \(bool, integer or floating; nonzero = kept\)"):
        unpad_input(x, torch.ones(2, 4, dtype=torch.complex64))
    packed, indices, *_ = unpad_input(x, mask)
    with pytest.raises(IndexError, match=r"indices must lie in \[0, batch \* seqlen = 6\); got values from 0 to 7"):
        pad_input(packed, indices, 2, 3)
    with pytest.raises(IndexError, match=r"indices must lie in \[0, input.shape\[0\] = 8\); got values from -1 to 1"):
        index_first_axis(x.flatten(0, 1), torch.tensor([-1, 1]))
    with pytest.raises(TypeError, match=r"indices must be a 1-D int64 \(or int32\) tensor .* torch.float32"):
        pad_input(packed, indices.float(), 2, 4)
    with pytest.raises(ValueError, match=r"indices \(3 entries\) and hidden_states \(8 rows\) must have one entry"):
        pad_input(packed, indices[:3], 2, 4)
    with pytest.raises(ValueError, match=r"hidden_states must be \(total, \.\.\.\)"):
        pad_input(packed[:, 0], indices, 2, 4)
    with pytest.raises(TypeError, match=r"batch must be an int >= 0; got 2.9"):
        pad_input(packed, indices, 2.9, 4)
    with pytest.raises(TypeError, match=r"seqlen must be an int >= 0; got -4"):
        pad_input(packed, indices, 2, -4)
    with pytest.raises(TypeError, match=r"first_axis_dim must be an int >= 0; got -1"):
        index_put_first_axis(packed, indices, -1)
    with pytest.raises(ValueError, match=r"indices \(3 entries\) and values \(8 rows\) must have one entry"):
        index_put_first_axis(packed, indices[:3], 9)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_padded_batch_through_varlen_attention(backend, device, dtype, poison):
    """The padded-video pattern (FastVideo's flash_attn_no_pad): qkv (batch, seqlen, 3, nheads, headdim) and a
    key-padding mask -> unpad_input -> flash_attn_varlen_qkvpacked_func -> pad_input. Each row's kept tokens
    attend only to each other (the float64 oracle, row by row); padded positions are 0 with zero gradient."""
    if backend == "torch" and dtype != torch.float32:
        pytest.skip("fp16 on the torch backend is covered by the attention suites")
    batch, seqlen, heads, d = 4, 11, 2, 16
    mask = random_mask(batch, seqlen, seed=3)
    gen = torch.Generator().manual_seed(4)
    qkv = torch.randn(batch, seqlen, 3, heads, d, generator=gen).to(device, dtype).requires_grad_()
    with use_backend(backend):
        x, indices, cu, max_s, _ = unpad_input(qkv.flatten(2), mask.to(device))
        out = flash_attn_varlen_qkvpacked_func(x.unflatten(1, (3, heads, d)), cu, max_s, 0.0, None, True)
        padded = pad_input(out.flatten(1), indices, batch, seqlen).unflatten(2, (heads, d))
        (got,) = grads(padded, [qkv])
    qkv64 = to_float64(qkv)
    kept = qkv64.flatten(0, 1)[mask.flatten().nonzero().flatten()]
    lens = mask.sum(1).tolist()
    ref, _ = attention_per_sequence(*kept.unbind(1), lens, lens, d ** -0.5, 1)
    ref_padded = torch.zeros(batch * seqlen, heads, d, dtype=torch.float64)
    ref_padded[mask.flatten().nonzero().flatten()] = ref
    ref_padded = ref_padded.view(batch, seqlen, heads, d)
    assert_close(padded, ref_padded, dtype, tol=2 * TOLERANCE[dtype])
    (want,) = grads(ref_padded, [qkv64])
    assert_close(got, want, dtype, "dqkv", tol=3 * TOLERANCE[dtype])
    dropped = ~mask.bool().to(device)
    assert not padded[dropped].any() and not got[dropped].any()


def test_masks_and_indices_on_another_device(device):
    """Masks and indices are moved to the hidden states' device (flash-attn's indexing accepts CPU indices)."""
    x = torch.randn(3, 5, 2, device=device)
    mask, unused = random_mask(3, 5, seed=5), torch.zeros(3, 5, dtype=torch.bool)
    unused[0, 0] = True
    packed, indices, cu, _, used = unpad_input(x, mask, unused)
    want, want_idx, want_cu, _ = oracle_unpad(x.cpu(), mask.bool() | unused)
    assert torch.equal(packed.cpu(), want) and torch.equal(indices.cpu(), want_idx) and cu.device == x.device
    assert torch.equal(pad_input(packed, indices.cpu(), 3, 5), pad_input(packed, indices, 3, 5))


# nonzero's shape and the longest length read on the host: traced by default in torch 2.11 and 2.13, not 2.8
@torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True)
def test_compile_fullgraph():
    """All six trace whole under torch.compile (the host-side value checks are skipped there) and give the
    eager results."""
    torch._dynamo.reset()
    x = torch.randn(3, 6, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1], [1, 0, 1, 0, 1, 1]])
    unused = torch.zeros(3, 6, dtype=torch.bool)
    unused[0, 4] = True
    lengths = torch.tensor([[2, 3, 0, 0, 0, 0], [3, 2, 0, 0, 0, 0], [6, 0, 0, 0, 0, 0]])
    packed, indices = unpad_input(x, mask)[:2]
    for fn, args in ((unpad_input, (x, mask, unused)), (unpad_input_for_concatenated_sequences, (x, lengths)),
                     (pad_input, (packed, indices, 3, 6)), (index_first_axis, (x.flatten(0, 1), indices)),
                     (index_first_axis_residual, (x.flatten(0, 1), indices)),
                     (index_put_first_axis, (packed, indices, 18))):
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
        want = fn(*args)
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, fn.__name__
