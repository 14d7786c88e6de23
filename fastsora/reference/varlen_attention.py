"""Plain-PyTorch varlen (packed) attention: one exact softmax attention per sequence.

This is fastsora's torch backend for :func:`fastsora.ops.varlen_attention` and, run in float64, the oracle of
the tests. It reads the offsets on the host (one synchronisation), then loops over the sequences.

Shapes: q (total_q, Hq, D), k and v (total_k, Hkv, D) with Hq % Hkv == 0; ``cu_seqlens_q``/``cu_seqlens_k``
int32 (batch + 1,) prefix sums. Sequence b owns query rows ``cu_q[b]:cu_q[b+1]`` and key rows
``cu_k[b]:cu_k[b+1]``.

``causal_mode``: 0 no mask, 1 causal aligned bottom-right (flash-attn 2: query i sees key j <= i + Lk - Lq),
2 causal aligned top-left (xformers' ``BlockDiagonalCausalMask``: key j <= i).
``window`` (left, right), -1 for an unbounded side (flash-attn's ``window_size``): query i also sees only keys
i + diag - left <= j <= i + diag + right, aligned as the causal mask (diag = Lk - Lq, or 0 for mode 2).

A query row that sees no key (an empty key sequence, or a causal row above the diagonal) outputs 0 and has
LSE +inf (flash-attn's convention, so that exp(s - lse) is 0 in a backward pass). Rows past
``cu_seqlens_q[-1]`` belong to no sequence: they output 0 and have LSE +inf.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

CAUSAL_NONE, CAUSAL_BOTTOM_RIGHT, CAUSAL_TOP_LEFT = 0, 1, 2
NO_WINDOW = (-1, -1)


def visible_mask(lq: int, lk: int, causal_mode: int, device, window: Tuple[int, int] = NO_WINDOW) -> torch.Tensor:
    """(lq, lk) bool: True where query i may attend key j."""
    diag = 0 if causal_mode == CAUSAL_TOP_LEFT else lk - lq
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    mask = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if causal_mode != CAUSAL_NONE:
        mask &= j <= i + diag
    left, right = window
    if left >= 0:
        mask &= j >= i + diag - left
    if right >= 0:
        mask &= j <= i + diag + right
    return mask


def attention_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  causal_mode: int, window: Tuple[int, int] = NO_WINDOW) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of one sequence. q (Lq, Hq, D), k/v (Lk, Hkv, D) -> out (Lq, Hq, D), lse (Hq, Lq)."""
    lq, hq, _ = q.shape
    lk, hkv, _ = k.shape
    group = hq // hkv
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = q.to(compute), k.to(compute), v.to(compute)
    s = torch.einsum("ihd,jhd->hij", qf, kf) * scale
    mask = visible_mask(lq, lk, causal_mode, q.device, window)
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True) if lk > 0 else s.new_full((hq, lq, 1), float("-inf"))
    # only a row with no finite logit (m = -inf: no visible key) is shifted by 0; a +inf or NaN logit keeps its
    # max, so the row's output and LSE are NaN as the kernels' (never an LSE of +inf, "no visible key")
    m_safe = torch.where(m == float("-inf"), torch.zeros_like(m), m).detach()
    e = torch.exp(s - m_safe)
    l = e.sum(dim=-1, keepdim=True)
    empty = l == 0
    p = e / torch.where(empty, torch.ones_like(l), l)
    out = torch.einsum("hij,jhd->ihd", p, vf)
    lse = torch.where(empty, torch.full_like(l, float("inf")), m_safe + torch.log(torch.where(empty, torch.ones_like(l), l)))
    return out.to(q.dtype), lse.squeeze(-1).float() if q.dtype != torch.float64 else lse.squeeze(-1)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, softmax_scale: float, causal_mode: int = CAUSAL_NONE,
                     window: Tuple[int, int] = NO_WINDOW) -> Tuple[torch.Tensor, torch.Tensor]:
    """Packed attention, sequence by sequence. Returns out (total_q, Hq, D) in q's dtype and
    lse (Hq, total_q) in float32 (float64 for float64 inputs). Differentiable with autograd."""
    cq: List[int] = [int(x) for x in cu_seqlens_q.tolist()]
    ck: List[int] = [int(x) for x in cu_seqlens_k.tolist()]
    total_q, hq, _ = q.shape
    outs, lses = [], []
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    for b in range(len(cq) - 1):
        o, l = attention_one(q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]], softmax_scale, causal_mode,
                             window)
        outs.append(o)
        lses.append(l.to(lse_dtype))
    tail = total_q - (cq[-1] if cq else 0)
    # rows past cu_seqlens_q[-1] belong to no sequence: zero output (and zero gradient)
    outs.append(q.new_zeros((tail,) + tuple(q.shape[1:])))
    lses.append(torch.full((hq, tail), float("inf"), dtype=lse_dtype, device=q.device))
    return torch.cat(outs, 0), torch.cat(lses, 1)


def varlen_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor,
                              cu_seqlens_k: torch.Tensor, softmax_scale: float, causal_mode: int = CAUSAL_NONE,
                              dlse: "torch.Tensor | None" = None, window: Tuple[int, int] = NO_WINDOW
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`varlen_attention` from its saved output and LSE (the flash-attention backward
    written sequence by sequence): P = exp(S - lse), dV = Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP − Δ) with
    Δ = rowsum(dO ∘ O) − dLSE, dQ = scale · dS K, dK = scale · dSᵀ Q (summed over each GQA group)."""
    cq = [int(x) for x in cu_seqlens_q.tolist()]
    ck = [int(x) for x in cu_seqlens_k.tolist()]
    hq, hkv = q.shape[1], k.shape[1]
    group = hq // hkv
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.zeros(q.shape, dtype=compute, device=q.device)
    dk = torch.zeros(k.shape, dtype=compute, device=q.device)
    dv = torch.zeros(v.shape, dtype=compute, device=q.device)
    delta = (dout.to(compute) * out.to(compute)).sum(-1).transpose(0, 1)  # (Hq, total_q)
    if dlse is not None:
        delta = delta - torch.where(torch.isfinite(lse), dlse.to(compute), torch.zeros_like(delta))
    for b in range(len(cq) - 1):
        a0, a1, b0, b1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if a1 == a0 or b1 == b0:
            continue
        qb, dob = q[a0:a1].to(compute), dout[a0:a1].to(compute)
        kb = k[b0:b1].to(compute).repeat_interleave(group, dim=1)
        vb = v[b0:b1].to(compute).repeat_interleave(group, dim=1)
        s = torch.einsum("ihd,jhd->hij", qb, kb) * softmax_scale
        mask = visible_mask(a1 - a0, b1 - b0, causal_mode, q.device, window)
        p = torch.where(mask, torch.exp(s - lse[:, a0:a1, None].to(compute)), torch.zeros_like(s))
        dvb = torch.einsum("hij,ihd->jhd", p, dob)
        dp = torch.einsum("ihd,jhd->hij", dob, vb)
        ds = p * (dp - delta[:, a0:a1, None])
        dq[a0:a1] = torch.einsum("hij,jhd->ihd", ds, kb) * softmax_scale
        dkb = torch.einsum("hij,ihd->jhd", ds, qb) * softmax_scale
        dk[b0:b1] = dkb.view(b1 - b0, hkv, group, -1).sum(2)
        dv[b0:b1] = dvb.view(b1 - b0, hkv, group, -1).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
