"""Varlen attention: Triton kernels (interpreter on CPU) and the torch path against a float64 per-sequence
reference - outputs, LSE and gradients of q, k, v; ragged packs, zero-length and one-token sequences, tail rows
past cu_seqlens[-1], GQA/MQA, causal alignments, head dims, custom scales, layouts, determinism."""
import importlib
import math

import pytest
import torch

import fastsora.kernels.varlen_attention as kern
from fastsora import use_backend
from fastsora.ops.varlen_attention import _attention, varlen_attention
from fastsora.reference.varlen_attention import varlen_attention as ref_attention
from fastsora.testing import ATTENTION_GRAD_TOL as GRAD_TOL
from fastsora.testing import (TOLERANCE, assert_close, attention_per_sequence, deterministic_algorithms, grads,
                              relative_error, spread_past_int32, to_float64)
from fastsora.testing import packed_offsets as offsets

ops_mod = importlib.import_module("fastsora.ops.varlen_attention")


def make(lq, lk, hq, hkv, d, dtype, device, extra_q=0, extra_k=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tq, tk = sum(lq) + extra_q, sum(lk) + extra_k
    mk = lambda n, h: torch.randn(n, h, d, generator=gen).to(device, dtype).requires_grad_(True)
    return mk(tq, hq), mk(tk, hkv), mk(tk, hkv), offsets(lq, device), offsets(lk, device)


def reference(q, k, v, cu_q, cu_k, scale, mode):
    q64, k64, v64 = to_float64([q, k, v])
    out, lse = ref_attention(q64, k64, v64, cu_q.cpu(), cu_k.cpu(), scale, mode)
    return out, lse, grads(out, [q64, k64, v64])


def check_against_reference(q, k, v, cu_q, cu_k, mode, scale=None, backend="triton", spread_cotangent=False):
    scale_v = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    with use_backend(backend):
        out, lse = _attention(q, k, v, cu_q, cu_k, 0.0, scale, mode, True)
        g = grads(out, [q, k, v], spread=spread_cotangent)
    ref_out, ref_lse, ref_g = reference(q, k, v, cu_q, cu_k, scale_v, mode)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == torch.float32
    assert_close(out, ref_out, q.dtype, "out", tol=TOLERANCE[q.dtype] * 2)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite), "rows without visible keys must have LSE +inf"
    assert (lse.cpu()[~finite] == float("inf")).all()
    assert relative_error(lse.cpu()[finite], ref_lse[finite]) < 1e-5
    for name, a, b in zip("qkv", g, ref_g):
        assert torch.isfinite(a).all(), f"d{name} has non-finite values"
        assert_close(a, b, q.dtype, f"d{name}", tol=GRAD_TOL[q.dtype])
    return out, lse, g


# (lengths q, lengths k, Hq, Hkv, D, causal mode, extra q rows, extra k rows, scale)
CASES = {
    "self tiny [1,0,5,17] d16": ([1, 0, 5, 17], None, 2, 2, 16, 0, 0, 0, None),
    "self causal d32 multi-block": ([70, 1, 0, 33], None, 2, 1, 32, 1, 0, 0, None),
    "cross causal-br gqa d72 tail": ([3, 0, 40, 17], [7, 2, 33, 1], 4, 2, 72, 1, 3, 2, None),
    "cross Lq>Lk causal-br (empty rows) d40": ([37, 6], [5, 0], 2, 2, 40, 1, 0, 0, None),
    "cross top-left mqa d24 scale": ([9, 34], [40, 5], 3, 1, 24, 2, 0, 0, 0.37),
    "noncausal cross d96": ([20, 3], [45, 1], 2, 2, 96, 0, 0, 4, 1.3),
    "self causal d20 (D not a multiple of 8: padded copy)": ([9, 20], None, 2, 2, 20, 1, 0, 0, None),
    "cross causal-br gqa d128": ([33, 0, 5], [20, 3, 40], 2, 1, 128, 1, 0, 0, None),
    "self causal d160 (padded to 256)": ([17, 2], None, 1, 1, 160, 1, 0, 0, None),
    "noncausal cross d256": ([17, 2], [9, 30], 2, 2, 256, 0, 0, 0, None),
}


@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_triton_matches_float64_reference(case, dtype, device, poison):
    lq, lk, hq, hkv, d, mode, eq, ek, scale = CASES[case]
    lk = lq if lk is None else lk
    q, k, v, cu_q, cu_k = make(lq, lk, hq, hkv, d, dtype, device, eq, ek)
    check_against_reference(q, k, v, cu_q, cu_k, mode, scale)


@pytest.mark.parametrize("case", ["self causal d32 multi-block", "cross causal-br gqa d72 tail"])
def test_torch_backend_matches_float64_reference(case, dtype):
    lq, lk, hq, hkv, d, mode, eq, ek, scale = CASES[case]
    lk = lq if lk is None else lk
    q, k, v, cu_q, cu_k = make(lq, lk, hq, hkv, d, dtype, "cpu", eq, ek)
    check_against_reference(q, k, v, cu_q, cu_k, mode, scale, backend="torch")


@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_torch_backend_matches_independent_float64_attention(case):
    """The torch backend (the reference's forward and its analytic backward) in float64 against attention
    written out per sequence from the masks' definitions: every other test's oracle is that reference."""
    lq, lk, hq, hkv, d, mode, eq, ek, scale = CASES[case]
    lk = lq if lk is None else lk
    q, k, v, cu_q, cu_k = make(lq, lk, hq, hkv, d, torch.float64, "cpu", eq, ek)
    with use_backend("torch"):
        out, lse = _attention(q, k, v, cu_q, cu_k, 0.0, scale, mode, True)
        g = grads(out, [q, k, v])
    want, want_lse = attention_per_sequence(q, k, v, lq, lk, d ** -0.5 if scale is None else scale, mode)
    assert relative_error(out, want) < 1e-12
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    assert relative_error(lse[torch.isfinite(lse)], want_lse[torch.isfinite(want_lse)]) < 1e-12
    for name, a, b in zip("qkv", g, grads(want, [q, k, v])):
        assert relative_error(a, b) < 1e-12, name


def test_torch_backend_float64_keeps_float64_precision():
    """float64 inputs (the torch backend) keep their LSE in float64, so the analytic backward, which reads it,
    agrees with autograd through the float64 reference to float64 rounding (a float32 LSE: ~1e-7)."""
    q, k, v, cu_q, cu_k = make([7, 0, 30], [12, 4, 25], 4, 2, 24, torch.float64, "cpu", extra_q=2)
    with use_backend("torch"):
        out, lse = varlen_attention(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
        g = grads(out, [q, k, v])
    assert lse.dtype == torch.float64
    ref_out, _, ref_g = reference(q, k, v, cu_q, cu_k, 24 ** -0.5, 1)
    assert relative_error(out, ref_out) < 1e-13
    for a, b in zip(g, ref_g):
        assert relative_error(a, b) < 1e-12


def test_kernels_are_interpreted_on_cpu():
    from fastsora.kernels import KERNELS_INTERPRETED

    assert KERNELS_INTERPRETED == (not torch.cuda.is_available())


def test_triton_backend_really_runs_the_kernels(monkeypatch, device):
    calls = []
    fwd, bwd = kern.forward, kern.backward
    monkeypatch.setattr(kern, "forward", lambda *a, **kw: calls.append("fwd") or fwd(*a, **kw))
    monkeypatch.setattr(kern, "backward", lambda *a, **kw: calls.append("bwd") or bwd(*a, **kw))
    q, k, v, cu_q, cu_k = make([5, 9], [5, 9], 2, 2, 16, torch.float32, device)
    with use_backend("triton"):
        out = varlen_attention(q, k, v, cu_q, cu_k)
        out.sum().backward()
    assert calls == ["fwd", "bwd"]
    calls.clear()
    with use_backend("torch"):
        varlen_attention(q, k, v, cu_q, cu_k).sum().backward()
    assert calls == []


def test_tail_rows_zero_output_zero_grad_no_nan(device, poison):
    """Rows past cu_seqlens[-1] (padding, even NaN-filled) get output 0 and zero gradient (torch #176793)."""
    q, k, v, cu_q, cu_k = make([4, 0, 11], [6, 3, 2], 2, 1, 16, torch.float32, device, extra_q=40, extra_k=37)
    with torch.no_grad():
        q[15:] = float("nan")
        k[11:] = float("nan")
        v[11:] = float("inf")
    for backend in ("triton", "torch"):
        for t in (q, k, v):
            t.grad = None
        with use_backend(backend):
            out, lse = varlen_attention(q, k, v, cu_q, cu_k, return_lse=True)
            (out.float() * torch.randn_like(out)).sum().backward()
        assert torch.isfinite(out).all(), backend
        assert (out[15:] == 0).all() and (lse[:, 15:] == float("inf")).all(), backend
        for name, t, n in (("q", q, 15), ("k", k, 11), ("v", v, 11)):
            assert torch.isfinite(t.grad).all(), f"{backend}: d{name} not finite"
            assert (t.grad[n:] == 0).all(), f"{backend}: d{name} past cu_seqlens[-1] not zero"
            assert t.grad[:n].abs().sum() > 0



def _special_logit_run(q, k, v, cu_q, cu_k, backend):
    for t in (q, k, v):
        t.grad = None
    with use_backend(backend):
        out, lse = varlen_attention(q, k, v, cu_q, cu_k, return_lse=True)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)).sum().backward()
    return out.detach().cpu(), lse.detach().cpu(), [t.grad.cpu() for t in (q, k, v)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_row_whose_logits_are_all_minus_inf_outputs_zero(dtype, device, poison):
    """A query row whose every logit is -inf from its data (a -inf in q, the keys positive there) is a row with
    no visible key, as in flash-attn and SDPA: output 0 and LSE +inf on both backends, for a key sequence
    longer than any key tile (the unmasked blocks must not compute -inf - (-inf))."""
    q, k, v, cu_q, cu_k = make([5, 3], [300, 7], 2, 1, 32, dtype, device)
    with torch.no_grad():
        k[:, :, 3] = k[:, :, 3].abs() + 0.5
        q[1, 0, 3] = q[6, 1, 3] = float("-inf")   # head 0 of sequence 0 (300 keys), head 1 of sequence 1
    results = {backend: _special_logit_run(q, k, v, cu_q, cu_k, backend) for backend in ("torch", "triton")}
    for backend, (out, lse, (dq, dk, dv)) in results.items():
        assert (out[1, 0] == 0).all() and (out[6, 1] == 0).all(), backend
        assert lse[0, 1] == float("inf") and lse[1, 6] == float("inf"), backend
        assert torch.isfinite(out).all() and torch.isfinite(dv).all(), backend
        assert torch.isfinite(lse[lse != float("inf")]).all(), backend
    (out_t, lse_t, g_t), (out_k, lse_k, g_k) = results["torch"], results["triton"]
    assert_close(out_k, out_t, dtype, "out", tol=TOLERANCE[dtype] * 2)
    finite = torch.isfinite(lse_t)
    assert torch.equal(torch.isfinite(lse_k), finite) and relative_error(lse_k[finite], lse_t[finite]) < 1e-5
    assert_close(g_k[2], g_t[2], dtype, "dv", tol=GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_plus_inf_logit_gives_nan_rows_on_both_backends(dtype, device, poison):
    """A +inf logit (an inf in k) makes exactly the rows that see it NaN, output and LSE, on both backends and
    as SDPA: never an LSE of +inf (which means "no visible key") and never a finite gradient silently dropping
    the NaN. Other sequences of the pack stay finite."""
    q, k, v, cu_q, cu_k = make([4, 6], [5, 40], 1, 1, 16, dtype, device)
    with torch.no_grad():
        q[:, :, 3] = q[:, :, 3].abs() + 0.5
        k[2, 0, 3] = float("inf")   # sequence 0's key 2: every query of sequence 0 sees it
    results = {backend: _special_logit_run(q, k, v, cu_q, cu_k, backend) for backend in ("torch", "triton")}
    for backend, (out, lse, (dq, dk, dv)) in results.items():
        assert out[:4].isnan().all() and lse[0, :4].isnan().all(), backend
        assert torch.isfinite(out[4:]).all() and torch.isfinite(lse[0, 4:]).all(), backend
        assert dv[:5].isnan().all() and torch.isfinite(dv[5:]).all(), backend
    assert_close(results["triton"][0][4:], results["torch"][0][4:], dtype, "out", tol=TOLERANCE[dtype] * 2)


def test_zero_length_and_empty_pack(device, poison):
    # every sequence empty: output is all zeros (no token belongs to a sequence)
    q, k, v, cu_q, cu_k = make([0, 0], [0, 0], 2, 2, 16, torch.float32, device, extra_q=3, extra_k=1)
    with use_backend("triton"):
        out = varlen_attention(q, k, v, cu_q, cu_k)
    assert (out == 0).all()
    # batch of zero sequences, zero tokens
    q, k, v, cu_q, cu_k = make([], [], 2, 2, 16, torch.float32, device)
    with use_backend("triton"):
        out = varlen_attention(q, k, v, cu_q, cu_k)
        out.sum().backward()
    assert out.shape == (0, 2, 16) and q.grad.shape == q.shape


def test_one_token_sequences_equal_v(device):
    """A sequence of one query and one key outputs that key's value row exactly (softmax of one logit)."""
    q, k, v, cu_q, cu_k = make([1, 1, 1], [1, 1, 1], 2, 2, 32, torch.float32, device)
    with use_backend("triton"):
        out = varlen_attention(q, k, v, cu_q, cu_k, causal=True)
    torch.testing.assert_close(out, v.detach(), rtol=1e-6, atol=1e-6)


def test_gqa_equals_repeated_kv(device):
    q, k, v, cu_q, cu_k = make([19, 40], [33, 8], 4, 1, 32, torch.float32, device)
    with use_backend("triton"):
        out = varlen_attention(q, k, v, cu_q, cu_k, causal=True)
        gk, gv = torch.autograd.grad(out, [k, v], torch.ones_like(out))
        k4, v4 = (t.detach().repeat_interleave(4, 1).requires_grad_(True) for t in (k, v))
        out4 = varlen_attention(q, k4, v4, cu_q, cu_k, causal=True)
        gk4, gv4 = torch.autograd.grad(out4, [k4, v4], torch.ones_like(out4))
    torch.testing.assert_close(out, out4, rtol=1e-6, atol=1e-6)
    # dK/dV of a shared head is the sum over its query heads
    torch.testing.assert_close(gk, gk4.sum(1, keepdim=True), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gv, gv4.sum(1, keepdim=True), rtol=1e-5, atol=1e-5)


def test_backward_is_deterministic(device):
    """Two backward runs give bit-equal gradients (no atomics: dK/dV and dQ each have one writer per row). Only
    on CUDA can this fail: the interpreter runs programs one after another, so any order is fixed there."""
    q, k, v, cu_q, cu_k = make([50, 7], [50, 7], 4, 2, 32, torch.float16, device)
    runs = []
    for _ in range(2):
        with use_backend("triton"):
            out = varlen_attention(q, k, v, cu_q, cu_k, causal=True)
            runs.append(grads(out, [q, k, v]))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_noncontiguous_and_packed_qkv_views(device):
    """q/k/v as views of a packed qkv projection (token stride 3*H*D) and a head-dim-strided copy."""
    lens = [13, 0, 21]
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(sum(lens), 3, 2, 32, generator=gen).to(device).requires_grad_(True)
    q, k, v = qkv.unbind(1)
    assert not q.is_contiguous()
    cu = offsets(lens, device)
    with use_backend("triton"):
        out = varlen_attention(q, k, v, cu, cu)
        g = grads(out, [qkv])[0]
    ref_out, _, _ = reference(q, k, v, cu, cu, 32 ** -0.5, 0)
    assert_close(out, ref_out, torch.float32, "out", tol=4e-5)
    qkv64 = qkv.detach().double().requires_grad_(True)
    o64, _ = ref_attention(*qkv64.unbind(1), cu, cu, 32 ** -0.5, 0)
    assert_close(g, grads(o64, [qkv64])[0], torch.float32, "dqkv", tol=4e-5)
    # a head dim with stride 2 (copied to unit stride inside the launcher)
    q2 = torch.randn(sum(lens), 2, 64, generator=gen)[..., ::2].to(device)
    with use_backend("triton"):
        out2 = varlen_attention(q2, k.detach(), v.detach(), cu, cu)
    ref2, _ = ref_attention(*to_float64([q2, k, v]), cu, cu, 32 ** -0.5, 0)
    assert_close(out2, ref2, torch.float32, "out strided-d", tol=4e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lse_is_differentiable(backend, device):
    """A loss through the LSE output as well as the output: both backends' backwards take the LSE's gradient."""
    q, k, v, cu_q, cu_k = make([6, 30], [12, 30], 2, 2, 16, torch.float32, device)
    gen = torch.Generator().manual_seed(1)
    w_o = torch.randn(q.shape, generator=gen).to(device)
    w_l = torch.randn(q.shape[1], q.shape[0], generator=gen).to(device)
    with use_backend(backend):
        out, lse = varlen_attention(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
        g = torch.autograd.grad((out * w_o).sum() + (lse * w_l).sum(), [q, k, v])
    q64, k64, v64 = to_float64([q, k, v])
    o64, l64 = ref_attention(q64, k64, v64, cu_q, cu_k, 0.25, 1)
    g64 = torch.autograd.grad((o64 * w_o.cpu().double()).sum() + (l64 * w_l.cpu().double()).sum(), [q64, k64, v64])
    for a, b in zip(g, g64):
        assert relative_error(a, b) < 2e-5


def test_skewed_pack_grid_is_bounded_by_tokens(monkeypatch, device):
    """The launch grid is total // BLOCK + batch + 1 programs (a shape function: no host sync, no
    max_seqlen x batch grid); a long sequence among many tiny ones still computes every block."""
    grids = []
    real = kern._grid_items
    monkeypatch.setattr(kern, "_grid_items", lambda *a: grids.append(a) or real(*a))
    lens = [100] + [1] * 12 + [0, 2]
    q, k, v, cu_q, cu_k = make(lens, lens, 2, 2, 16, torch.float32, device)
    with use_backend("triton"):
        out = varlen_attention(q, k, v, cu_q, cu_k)
    total, batch, block = grids[0]
    assert (total, batch) == (sum(lens), len(lens))
    assert real(total, batch, block) == sum(lens) // block + len(lens) + 1
    assert real(total, batch, block) < math.ceil(max(lens) / block) * len(lens)
    ref_out, _, _ = reference(q, k, v, cu_q, cu_k, 0.25, 0)
    assert_close(out, ref_out, torch.float32, "out", tol=4e-5)


def test_block_d_padding_rule():
    assert [kern.block_d_for(d) for d in (8, 16, 32, 40, 64, 72, 96, 128, 160, 256)] == \
        [16, 16, 32, 64, 64, 128, 128, 128, 256, 256]


def test_validate_false_skips_host_checks(device, monkeypatch):
    q, k, v, cu_q, cu_k = make([3, 4], [3, 4], 2, 2, 16, torch.float32, device)
    called = []
    monkeypatch.setattr(ops_mod, "_check_values", lambda *a: called.append(a))
    with use_backend("torch"):
        varlen_attention(q, k, v, cu_q, cu_k, validate=False)
    assert called == []
    with use_backend("torch"):
        varlen_attention(q, k, v, cu_q, cu_k)
    assert len(called) == 2
    cu_q, cu_k = cu_q.clone(), cu_k.clone()   # tensors not checked yet
    with use_backend("torch"):
        ops_mod.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 4, validate=False)
    assert len(called) == 2, "flash_attn_varlen_func(validate=False) must not check (no host synchronisation)"
    with use_backend("torch"):
        ops_mod.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 4)
    assert len(called) == 4


def test_offsets_are_checked_once_until_they_change(monkeypatch):
    """Every layer gets the same cu_seqlens: their values are read (one host synchronisation) at the first call
    only; an in-place change or another token count checks them again, and bad values then raise."""
    q, k, v, cu_q, cu_k = make([3, 4], [5, 2], 2, 2, 16, torch.float32, "cpu")
    checked = []
    real = ops_mod._check_values
    monkeypatch.setattr(ops_mod, "_check_values", lambda name, *a: checked.append(name[11]) or real(name, *a))
    with use_backend("torch"):
        for _ in range(3):
            varlen_attention(q, k, v, cu_q, cu_k)
        assert checked == ["q", "k"], "checked at the first call only"
        varlen_attention(q[:6], k, v, offsets([3, 3]), cu_k)
        assert checked[2:] == ["q"], "a new cu_seqlens_q is checked, the known cu_seqlens_k is not"
        cu_k[1] = 6   # in place: [0, 6, 7] is still valid
        varlen_attention(q, k, v, cu_q, cu_k)
        assert checked[3:] == ["k"]
        cu_k[1] = 8   # [0, 8, 7]: no longer monotone
        with pytest.raises(ValueError, match="cu_seqlens_k must be non-decreasing"):
            varlen_attention(q, k, v, cu_q, cu_k)
        with pytest.raises(ValueError, match=r"cu_seqlens_q\[-1\] = 7 is past the number of tokens \(6\)"):
            varlen_attention(q[:6], k, v, cu_q, offsets([5, 2]))
        cu_k[1] = 6
        varlen_attention(q, k, v, cu_q, cu_k)   # valid again, and remembered as checked
        cu_k.data = offsets([9, 2])   # new storage, version counter untouched: [0, 9, 11] is past 7 keys
        with pytest.raises(ValueError, match=r"cu_seqlens_k\[-1\] = 11 is past the number of tokens \(7\)"):
            varlen_attention(q, k, v, cu_q, cu_k)
        with torch.inference_mode():   # inference tensors have no version counter: checked at every call
            cu_i = offsets([3, 4])
            del checked[:]
            for _ in range(2):
                varlen_attention(q.detach(), k.detach(), v.detach(), cu_i, cu_i.clone())
        assert checked == ["q", "k", "q", "k"]


def test_strided_offsets_are_read_by_value(device, poison):
    """cu_seqlens views with a non-unit stride (every other entry of a longer tensor) give the result of their
    values: the kernels index the offsets with unit stride, so the op makes them contiguous first."""
    q, k, v, cu_q, cu_k = make([6, 0, 37], [9, 3, 30], 2, 1, 16, torch.float32, device)
    spread = lambda cu: torch.stack([cu, torch.full_like(cu, 99)], 1).reshape(-1)[::2]  # noqa: E731
    sq, sk = spread(cu_q), spread(cu_k)
    assert sq.stride(0) == 2 and torch.equal(sq, cu_q)
    with use_backend("triton"):
        out = varlen_attention(q, k, v, sq, sk, causal=True)
        want = varlen_attention(q, k, v, cu_q, cu_k, causal=True)
    assert torch.equal(out, want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lse_gradient_on_rows_without_keys_is_ignored(backend, device, poison):
    """A loss through exp(lse) sends an infinite gradient to rows that see no key (LSE +inf); those rows have
    P = 0, so q, k and v take no gradient from them, on both backends - finite, matching float64."""
    q, k, v, cu_q, cu_k = make([4, 7], [2, 9], 2, 2, 16, torch.float32, device, extra_q=2)
    with use_backend(backend):
        out, lse = varlen_attention(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
        assert torch.isinf(lse).any(), "the case must have rows without a visible key"
        dlse = torch.where(torch.isinf(lse), float("inf"), 0.5)
        g = torch.autograd.grad([out, lse], [q, k, v], [torch.ones_like(out), dlse])
    q64, k64, v64 = to_float64([q, k, v])
    o64, l64 = ref_attention(q64, k64, v64, cu_q, cu_k, 0.25, 1)
    g64 = torch.autograd.grad([o64, l64], [q64, k64, v64], [torch.ones_like(o64), dlse.cpu().double()])
    for name, a, b in zip("qkv", g, g64):
        assert torch.isfinite(a).all(), f"d{name} has non-finite values"
        assert relative_error(a, b) < 2e-5, name


def test_causal_diagonal_at_every_offset_against_the_tiles(device, poison):
    """Bottom-right causal masks whose diagonal offset Lk - Lq takes every value from -16 to 15, so it meets the
    query and key tiles (32 in the interpreter) at every residue: a tile range off by one (which rows of a key
    block see all its keys, which keys a query block sees) shows only where the diagonal falls on a tile edge.
    Output, LSE and all three gradients against float64."""
    lq = [48] * 32
    lk = [48 + diag for diag in range(-16, 16)]
    q, k, v, cu_q, cu_k = make(lq, lk, 2, 1, 16, torch.float32, device, seed=5)
    check_against_reference(q, k, v, cu_q, cu_k, 1)


@pytest.mark.parametrize("seed", range(4))
def test_random_packs(seed, device, poison):
    """Random ragged packs (zero-length sequences, Lq != Lk, tails), heads, head dims and causal modes."""
    import random

    rng = random.Random(seed)
    batch = rng.randint(1, 5)
    lq = [rng.choice([0, 1, rng.randint(2, 45)]) for _ in range(batch)]
    lk = [rng.choice([0, 1, rng.randint(2, 45)]) for _ in range(batch)]
    hkv = rng.choice([1, 2])
    hq = hkv * rng.choice([1, 2])
    d = rng.choice([16, 24, 48, 64])
    mode = rng.choice([0, 1, 2])
    q, k, v, cu_q, cu_k = make(lq, lk, hq, hkv, d, torch.float32, device, rng.randint(0, 3), rng.randint(0, 3), seed)
    check_against_reference(q, k, v, cu_q, cu_k, mode, rng.choice([None, 0.2]))


def test_registered_configs_cover_every_cuda_launch():
    """`fastsora compile` builds exactly what the CUDA autotuners can pick: every candidate of every arch
    (tiles, warps, stages) in every variant (no mask, causal or window; padded D or not) and dtype."""
    from fastsora.registry import KERNELS

    names = {"fwd": "_fwd_kernel", "dkdv": "_bwd_dkdv_kernel", "dq": "_bwd_dq_kernel"}
    for kind, name in names.items():
        configs = KERNELS[f"varlen_attention.{name}"].configs
        seen = {(c.constexprs["BLOCK_D"], (c.constexprs["IS_CAUSAL"], c.constexprs["IS_LOCAL"]), c.constexprs["EVEN_D"],
                 c.constexprs["BLOCK_M"], c.constexprs["BLOCK_N"], c.num_warps, c.num_stages, c.signature["Q"])
                for c in configs}
        wanted = set()
        for dt, ptr in ((torch.float16, "*fp16"), (torch.bfloat16, "*bf16"), (torch.float32, "*fp32")):
            for block_d in kern.BLOCK_DS:
                for arch in ("sm_80", "sm_90"):
                    for mask in ((False, False), (True, False), (False, True)):
                        tiles = kern.cuda_candidates(arch, kind, dt, block_d, local=mask[1])
                        wanted |= {(block_d, mask, even, *tile, ptr) for tile in tiles for even in (False, True)}
                        tuner = kern._tuned(kind, arch, kern._klass(dt), block_d, mask[1])  # what a launch times
                        assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                                for c in tuner.configs] == tiles, (kind, arch, dt, block_d, mask)
        assert seen == wanted, (kind, sorted(wanted - seen)[:3], sorted(seen - wanted)[:3])
    # the window variant leaves out the tiles whose window build kept a stack frame
    assert (16, 32, 8, 1) in kern.cuda_candidates("sm_80", "dq", torch.float16, 256)
    assert (16, 32, 8, 1) not in kern.cuda_candidates("sm_80", "dq", torch.float16, 256, local=True)
    pre = KERNELS["varlen_attention._bwd_preprocess_kernel"].configs
    assert {(c.constexprs["BLOCK_D"], c.constexprs["BLOCK_M"]) for c in pre} == \
        {(d, kern._pre_block_m_cuda(d)) for d in kern.BLOCK_DS}


def test_cuda_launch_path_autotunes_over_candidates(monkeypatch, poison):
    """The CUDA launchers (autotuner objects over the arch's candidates, grids computed from the chosen
    tile) run here in the interpreter with two small candidates per slot; both tiles give the reference."""
    if torch.cuda.is_available():
        pytest.skip("exercised for real on CUDA")
    cands = {klass: {kind: {d: [(16, 32, 4, 1), (32, 16, 4, 1)] for d in kern.BLOCK_DS} for kind in kern._KINDS}
             for klass in ("16bit", "fp32")}
    monkeypatch.setattr(kern, "KERNELS_INTERPRETED", False)
    monkeypatch.setattr(kern, "_CANDIDATES", {"sm_90": cands})
    monkeypatch.setattr(kern, "_arch", lambda device: "sm_90")
    grids = []
    real = kern._grid_items
    monkeypatch.setattr(kern, "_grid_items", lambda *a: grids.append(a) or real(*a))
    kern._tuned.cache_clear()
    timed = []

    def fake_bench(kernel_call, quantiles):  # no GPU timer here: run the candidate, report the 2nd as fastest
        kernel_call()
        timed.append(1)
        return [2.0 + len(timed) % 2] * len(quantiles)

    try:
        tuned = [kern._tuned(kind, "sm_90", "fp32", 32, False) for kind in kern._KINDS]
        for t in tuned:
            t.do_bench = fake_bench
        q, k, v, cu_q, cu_k = make([37, 5, 0, 20], [11, 40, 3, 9], 4, 2, 24, torch.float32, "cpu", 3, 2)
        check_against_reference(q, k, v, cu_q, cu_k, 1)
        assert len(timed) == 6, "each kernel's two candidates are timed once"
        assert all(t.best_config.kwargs == {"BLOCK_M": 32, "BLOCK_N": 16} for t in tuned)
        assert {g[2] for g in grids} == {16, 32}, "grids follow the candidate being run"
        from fastsora.kernels.utils import autotune_picks
        picks = autotune_picks()
        for kind in kern._KINDS:
            chosen = list(picks[f"varlen_attention {kind} sm_90 fp32 D=32"].values())
            assert chosen == [str(tuned[kern._KINDS.index(kind)].best_config)], (kind, chosen)
        # deterministic mode: the first candidate of each slot, untimed (the same tile in every process)
        grids.clear()
        with deterministic_algorithms():
            check_against_reference(q, k, v, cu_q, cu_k, 1)
        assert len(timed) == 6, "nothing is timed under torch.use_deterministic_algorithms(True)"
        # fwd and dq block query rows by BLOCK_M, dkdv key rows by BLOCK_N: (16, 32) first, (32, 16) timed fastest
        assert [g[2] for g in grids] == [16, 32, 16], grids
        # a window launch uses the window variant's own autotuner, without the tiles _NOT_IN_WINDOW names: with
        # (32, 16) left out, the fastest tile of the plain autotuner above, it runs (16, 32)
        monkeypatch.setattr(kern, "_NOT_IN_WINDOW", {("sm_90", "fp32", kind, 32): ((32, 16, 4, 1),)
                                                     for kind in kern._KINDS})
        grids.clear()
        with use_backend("triton"):
            out, _ = _attention(q, k, v, cu_q, cu_k, 0.0, None, 0, True, (3, 2))
            grads(out, [q, k, v])
        assert [g[2] for g in grids] == [16, 32, 16], grids
        assert len(timed) == 6, "one candidate left: nothing to time"
    finally:
        kern._tuned.cache_clear()


def test_misaligned_views_are_copied_to_aligned_rows(device):
    """The kernels take strides in units of 8 elements and assume 16-byte aligned rows: a view whose strides
    are multiples of 8 but whose data pointer is not 16-byte aligned is copied, and the result is unchanged."""
    t, h, d = 37, 2, 16
    buf = torch.randn(t * h * d + 8, dtype=torch.float16, device=device)
    view = buf[4:4 + t * h * d].view(t, h, d)   # 8-byte offset for fp16
    assert view.stride() == (h * d, d, 1) and view.data_ptr() % 16 == 8
    fixed = kern._aligned(view)
    assert fixed.data_ptr() % 16 == 0 and torch.equal(fixed, view)
    aligned = buf[8:8 + t * h * d].view(t, h, d)
    assert kern._aligned(aligned).data_ptr() == aligned.data_ptr(), "aligned views pass through"
    cu = offsets([20, 17], device)
    with use_backend("triton"):
        out = varlen_attention(view, view, view, cu, cu)
        fresh = view.clone()  # a new, aligned allocation
        ref = varlen_attention(fresh, fresh, fresh, cu, cu)
    assert torch.equal(out, ref)


def test_offsets_past_2_31_elements(dtype, device, poison):
    """q, k, v and dO are views whose later tokens lie past 2^31 elements of their storages (read in place): the
    forward, LSE and every gradient must match the reference. With int32 row offsets those loads wrap. (Over
    256 tokens, so the token stride stays under kern.MAX_TOKEN_STRIDE and the views are read in place.)"""
    lens_q, lens_k = [5, 0, 17, 3] + [8] * 33, [9, 4, 11, 1] + [8] * 33
    q, k, v, cu_q, cu_k = make(lens_q, lens_k, 2, 1, 40, dtype, device, seed=11)
    q, k, v = (spread_past_int32(t) for t in (q, k, v))
    assert kern._aligned(q).data_ptr() == q.data_ptr(), "the launcher must read the view in place"
    check_against_reference(q, k, v, cu_q, cu_k, 1, spread_cotangent=True)   # dO read in place too


def test_offsets_inside_a_sequence_past_2_31_elements(dtype, device, poison):
    """One causal sequence of 400 tokens whose q, k, v and dO rows lie MAX_TOKEN_STRIDE - 8 elements apart (read
    in place): its last query and key blocks (tiles of up to 128 rows) start past 2^31 elements of their storages,
    so a block start formed in int32 (start * token stride) wraps there. Output, LSE and every gradient match
    float64."""
    n, d = 400, 16
    stride = kern.MAX_TOKEN_STRIDE - 8
    assert (n - 1) // 128 * 128 * stride >= 2 ** 31

    def spread(t):  # the storage is untouched except under the view (on CPU its other pages cost nothing)
        storage = torch.empty((n - 1) * stride + d, dtype=dtype, device=device)
        view = storage.as_strided(t.shape, (stride, d, 1))
        view.copy_(t.detach())
        return view.requires_grad_(t.requires_grad)

    q, k, v, cu, _ = make([n], [n], 1, 1, d, dtype, device, seed=5)
    q, k, v = (spread(t) for t in (q, k, v))
    gen = torch.Generator().manual_seed(6)
    dout = spread(torch.randn(n, 1, d, generator=gen).to(device, dtype))
    assert all(kern._aligned(t).data_ptr() == t.data_ptr() for t in (q, k, v, dout)), "read in place"
    with use_backend("triton"):
        out, lse = _attention(q, k, v, cu, cu, 0.0, None, 1, True)
        g = torch.autograd.grad(out, [q, k, v], dout)
    q64, k64, v64 = to_float64([q, k, v])
    ref_out, ref_lse = ref_attention(q64, k64, v64, cu.cpu(), cu.cpu(), d ** -0.5, 1)
    assert_close(out, ref_out, dtype, "out", tol=TOLERANCE[dtype] * 2)
    assert relative_error(lse.cpu(), ref_lse) < 1e-5
    for name, a, b in zip("qkv", g, torch.autograd.grad(ref_out, [q64, k64, v64], to_float64(dout))):
        assert_close(a, b, dtype, f"d{name}", tol=GRAD_TOL[dtype])


def test_token_strides_past_the_tile_bound_are_copied(device):
    """Inside a tile the kernels form row offsets and block steps in int32 (offs * stride, BLOCK * stride): a
    token stride of kern.MAX_TOKEN_STRIDE or more is copied to a compact buffer. 40 keys span two 32-row
    interpreter tiles, so the step 32 * (2^26 + 8) would wrap. The result is unchanged."""
    assert kern.MAX_TOKEN_STRIDE * kern.MAX_TILE <= 2 ** 31
    n, h, d, stride = 40, 2, 16, 2 ** 26 + 8
    storage = torch.empty((n - 1) * stride + h * d, dtype=torch.float16, device=device)
    view = storage.as_strided((n, h, d), (stride, d, 1))
    view.copy_(torch.randn(n, h, d, dtype=torch.float16))
    assert kern._aligned(view).stride(0) == h * d
    edge = storage.as_strided((n, h, d), (kern.MAX_TOKEN_STRIDE - 8, d, 1))
    assert kern._aligned(edge).data_ptr() == edge.data_ptr(), "strides under the bound are read in place"
    cu = offsets([n], device)
    with use_backend("triton"):
        out = varlen_attention(view, view, view, cu, cu)
        want = varlen_attention(view.clone(), view.clone(), view.clone(), cu, cu)
    assert torch.equal(out, want)


def test_tiles_stay_within_the_token_stride_bound():
    """Every tile the launcher may use (each arch's autotune candidates, the interpreter's) has at most MAX_TILE
    rows, the bound MAX_TOKEN_STRIDE is derived from."""
    tiles = [t[:2] for arch in kern._CANDIDATES.values() for klass in arch.values() for kind in klass.values()
             for cands in kind.values() for t in cands] + list(kern.INTERPRETER_TILES.values())
    assert max(max(t) for t in tiles) <= kern.MAX_TILE
    with pytest.raises(ValueError, match=r"heads x head dim = 32768 x 256 elements per token"):
        kern._padded_d(32768, 256)
