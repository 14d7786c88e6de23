"""Plain-PyTorch lookup-free quantization (LFQ) with exact entropies: the CPU path and the float64 oracle.

Shapes: ``x`` is (T, C, D): T tokens, C codebooks, D = log2(codebook size) bits per codebook. Codes are
``±code_value`` per bit, indices are MSB first (bit 0 of the feature vector is the most significant bit).

The codebook is the full product set {-v, +v}^D, so the softmax over all 2^D codes (logits
2·τ·<x, c>) factorises per bit: p(bit_i = 1) = σ(z_i) with z = logit_scale·x, logit_scale = 4·τ·v.

* per-sample entropy = Σ_i h(σ(z_i)), h the binary entropy: O(T·D);
* codebook entropy: split the bits into hi (the first ⌊D/2⌋) and lo (the rest). With P_hi[t, j] the
  probability of the hi bits spelling j (MSB first), likewise P_lo, the weighted code distribution is
  S / N with S = (w·P_hi)ᵀ P_lo (one GEMM) and N = Σ w. Memory O(T·2^(D/2)); S (2^D numbers per codebook)
  is formed once, never per token.

The functions ending in ``_backward`` are the explicit vector-Jacobian products the custom ops register.
``brute_force_entropies`` enumerates all 2^D codes (small D only): the test oracle.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor


def split_bits(d: int) -> Tuple[int, int]:
    """(hi, lo) bit counts of the code split: hi = the first ⌊d/2⌋ (most significant) bits."""
    return d // 2, d - d // 2


def prob_dtype(dtype: torch.dtype) -> torch.dtype:
    """Probabilities and losses are float32 (float64 for float64 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _weights(weight: Optional[Tensor], t: int, like: Tensor) -> Tensor:
    if weight is None:
        return torch.ones(t, dtype=like.dtype, device=like.device)
    return weight.to(like.dtype)


def weighted(w: Tensor, term: Tensor) -> Tensor:
    """w · term with a token of weight 0 contributing exactly 0, whatever its term (NaN or inf from a padding
    token's garbage): a masked-out token is left out, as the anchor's selection leaves it out. ``w`` broadcasts
    against ``term``."""
    return torch.where(w != 0, w * term, torch.zeros((), dtype=term.dtype, device=term.device))


def mean_cotangent(grad: Tensor, total: Tensor) -> Tensor:
    """grad / total: the cotangent of a weighted mean's terms (total = weight sum × elements averaged). With no
    token selected (total 0) the mean is NaN but has no terms, so the cotangent is 0, as the anchor's gradient of
    an empty selection, whatever grad is (a NaN loss, or autograd's zeros for a loss left out of the graph)."""
    return torch.where(total == 0, torch.zeros_like(grad), grad / total)


def safe_count(count: Tensor) -> Tensor:
    """count, with 0 (no token weighted) replaced by 1: every token then has weight 0, so dividing by 1 gives
    the empty selection's zero gradient where dividing by 0 would give 0·inf = NaN."""
    return torch.where(count > 0, count, torch.ones_like(count))


def _stable_bits(z: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """σ(z), σ(-z) and the binary entropy h(σ(z)), each accurate to relative rounding for any z."""
    a = z.abs()
    e = torch.exp(-a)
    big = 1.0 / (1.0 + e)          # probability of the likely bit
    small = e * big                # probability of the unlikely bit
    pos = torch.where(z >= 0, big, small)
    neg = torch.where(z >= 0, small, big)
    h = torch.log1p(e) + a * small
    return pos, neg, h


def quantize(x: Tensor, code_value: float, logit_scale: float, straight_through: bool, with_entropy: bool,
             entropy_weight: Optional[Tensor], commit_weight: Optional[Tensor]
             ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Sign quantization of ``x`` (T, C, D) plus the per-bit statistics.

    Returns ``out`` (T, C, D, x.dtype): x + (q - x) when ``straight_through`` else q, q = ±code_value;
    ``indices`` (T, C) int64, MSB first; ``prob_pos``/``prob_neg`` (T, C, D) float32 (float64 for float64
    x): σ(±logit_scale·x), empty (0,) when ``with_entropy`` is False; ``per_sample_entropy`` (0-d): the
    entropy_weight-weighted mean over tokens and codebooks of Σ_i h(prob_pos_i) (0 without entropy);
    ``commitment`` (0-d): the commit_weight-weighted mean over tokens of mean_{c,d} (x - q)².
    """
    t, c, d = x.shape
    pdt = prob_dtype(x.dtype)
    q = torch.where(x > 0, code_value, -code_value).to(x.dtype)
    bit_weights = 2 ** torch.arange(d - 1, -1, -1, device=x.device, dtype=torch.int64)
    indices = ((q > 0).to(torch.int64) * bit_weights).sum(-1)
    out = x + (q - x).detach() if straight_through else q
    xf = x.to(pdt)
    qf = q.to(pdt)
    cw = _weights(commit_weight, t, xf)
    commitment = weighted(cw[:, None, None], (xf - qf) ** 2).sum() / (cw.sum() * c * d)
    if not with_entropy:
        empty = x.new_empty((0,), dtype=pdt)
        return out, indices, empty, empty.clone(), xf.new_zeros(()), commitment
    pos, neg, h = _stable_bits(xf * logit_scale)
    ew = _weights(entropy_weight, t, xf)
    per_sample = weighted(ew[:, None, None], h).sum() / (ew.sum() * c)
    return out, indices, pos, neg, per_sample, commitment


def quantize_backward(x: Tensor, grad_out: Optional[Tensor], grad_pos: Optional[Tensor],
                      grad_neg: Optional[Tensor], grad_per_sample: Tensor, grad_commit: Tensor,
                      entropy_weight: Optional[Tensor], commit_weight: Optional[Tensor], code_value: float,
                      logit_scale: float, straight_through: bool) -> Tensor:
    """d(loss)/dx for :func:`quantize` (out passes its gradient straight through; q carries none)."""
    t, c, d = x.shape
    pdt = prob_dtype(x.dtype)
    xf = x.to(pdt)
    z = xf * logit_scale
    pos, neg, _ = _stable_bits(z)
    dz = torch.zeros_like(xf)
    if grad_pos is not None and grad_pos.numel():
        # a zero cotangent (a masked-out token's, from the code sums) contributes 0, also where pos·neg is NaN
        dz = dz + weighted(grad_pos.to(pdt) - grad_neg.to(pdt), pos * neg)
    ew = _weights(entropy_weight, t, xf)
    coef = mean_cotangent(grad_per_sample.to(pdt), ew.sum() * c)
    dz = dz + weighted(ew[:, None, None], coef * (-z * pos * neg))
    dx = dz * logit_scale
    q = torch.where(x > 0, code_value, -code_value).to(x.dtype).to(pdt)
    cw = _weights(commit_weight, t, xf)
    dx = dx + weighted(cw[:, None, None], 2 * mean_cotangent(grad_commit.to(pdt), cw.sum() * c * d) * (xf - q))
    if straight_through and grad_out is not None:
        dx = dx + grad_out.to(pdt)
    return dx.to(x.dtype)


#: Per-bit probabilities and code probabilities below this count as zero in the code tables, so CPU
#: arithmetic never meets subnormal floats (100x slower). What is dropped changes an entropy by
#: < 2^D·1e-19·45 and a gradient (scaled by σ'(z) <= the flushed probability) by as little.
_FLUSH = {torch.float32: 1e-19, torch.float64: 1e-150}
_BIG_NEG = -1e4   # log of a flushed probability (finite: it meets zeros in a matmul)


def _bit_matrix(count: int, like: Tensor) -> Tensor:
    """(2·count, 2^count): rows 0..count-1 = bit k of code j is 1, rows count.. = bit k is 0 (MSB first)."""
    codes = torch.arange(2 ** count, device=like.device)
    bits = ((codes[None, :] >> torch.arange(count - 1, -1, -1, device=like.device)[:, None]) & 1).to(like.dtype)
    return torch.cat((bits, 1 - bits), 0)


def _table(pos: Tensor, neg: Tensor, first: int, count: int) -> Tensor:
    """P (C, T, 2^count): probability that bits first..first+count-1 spell j (MSB first), as one matmul in the
    log domain: log P = [log pos, log neg] @ bit matrix, entries below the flush floor set to 0."""
    floor = _FLUSH.get(pos.dtype, 0.0)
    p = torch.cat((pos[..., first:first + count], neg[..., first:first + count]), -1)
    logs = torch.where(p < floor, _BIG_NEG, p.clamp_min(floor).log()) if floor else p.log()
    log_table = logs @ _bit_matrix(count, pos)
    if floor:
        log_table.masked_fill_(log_table < math.log(floor), -math.inf)
    return log_table.exp_()


def _table_backward(pos: Tensor, neg: Tensor, first: int, count: int, table: Tensor, grad: Tensor,
                    dpos: Tensor, dneg: Tensor) -> None:
    """Accumulate into dpos/dneg (C, T, D) the gradients of <table, grad> (division by the kept
    probabilities only: a flushed bit gets no gradient)."""
    floor = _FLUSH.get(pos.dtype, 0.0)
    d_logs = (grad * table) @ _bit_matrix(count, pos).t()       # d/d log p: (C, T, 2·count)
    for out, p, d in ((dpos, pos[..., first:first + count], d_logs[..., :count]),
                      (dneg, neg[..., first:first + count], d_logs[..., count:])):
        out[..., first:first + count] = torch.where(p < max(floor, 1e-300), 0.0, d / p.clamp_min(max(floor, 1e-300)))


def code_sums(prob_pos: Tensor, prob_neg: Tensor, entropy_weight: Optional[Tensor]) -> Tensor:
    """S (C, 2^hi, 2^lo) = Σ_t w_t P_hi[t]ᵀ P_lo[t]: the weighted sum of the code distributions."""
    t, c, d = prob_pos.shape
    hi, lo = split_bits(d)
    pos, neg = prob_pos.transpose(0, 1), prob_neg.transpose(0, 1)
    w = _weights(entropy_weight, t, prob_pos)
    p_hi = _table(pos, neg, 0, hi) * w[None, :, None]
    p_lo = _table(pos, neg, hi, lo)
    return p_hi.transpose(1, 2) @ p_lo


def _tables(prob_pos: Tensor, prob_neg: Tensor, entropy_weight: Optional[Tensor]):
    t, c, d = prob_pos.shape
    hi, lo = split_bits(d)
    pos, neg = prob_pos.transpose(0, 1), prob_neg.transpose(0, 1)
    w = _weights(entropy_weight, t, prob_pos)
    return hi, pos, neg, w, _table(pos, neg, 0, hi), _table(pos, neg, hi, pos.shape[-1] - hi)


def _sums_backward(hi: int, pos: Tensor, neg: Tensor, w: Tensor, p_hi: Tensor, p_lo: Tensor, grad: Tensor):
    grad = grad.to(pos.dtype)
    d_hi = (p_lo @ grad.transpose(1, 2)) * w[None, :, None]   # (C, T, 2^hi)
    d_lo = (p_hi @ grad) * w[None, :, None]                   # (C, T, 2^lo)
    dpos = torch.zeros_like(pos)
    dneg = torch.zeros_like(neg)
    _table_backward(pos, neg, 0, hi, p_hi, d_hi, dpos, dneg)
    _table_backward(pos, neg, hi, pos.shape[-1] - hi, p_lo, d_lo, dpos, dneg)
    return dpos.transpose(0, 1).contiguous(), dneg.transpose(0, 1).contiguous()


def code_sums_backward(prob_pos: Tensor, prob_neg: Tensor, entropy_weight: Optional[Tensor], grad: Tensor
                       ) -> Tuple[Tensor, Tensor]:
    """Gradients w.r.t. prob_pos/prob_neg of <code_sums(...), grad>."""
    hi, pos, neg, w, ps_hi, ps_lo = _tables(prob_pos, prob_neg, entropy_weight)
    return _sums_backward(hi, pos, neg, w, ps_hi, ps_lo, grad)


def entropy_of_sums(sums: Tensor, count: Tensor, clamp: Optional[float] = None) -> Tensor:
    """Entropy (per leading index) of the distribution sums / count over the last dims.

    ``clamp=None``: exact, -Σ a·log a. ``clamp=1e-5``: vector-quantize-pytorch's -Σ a·log(max(a, 1e-5)).
    """
    count = torch.as_tensor(count, dtype=sums.dtype, device=sums.device)
    a = (sums / safe_count(count)).flatten(1)
    floor = torch.finfo(a.dtype).tiny if clamp is None else clamp
    h = -(a * a.clamp_min(floor).log()).sum(-1)
    return torch.where(count > 0, h, torch.nan)  # no token weighted: 0/0 (the anchor's NaN), with zero gradient


def codebook_entropy(prob_pos: Tensor, prob_neg: Tensor, entropy_weight: Optional[Tensor]) -> Tensor:
    """Exact entropy (C,) of each codebook's weighted-mean code distribution."""
    t = prob_pos.shape[0]
    w = _weights(entropy_weight, t, prob_pos)
    return entropy_of_sums(code_sums(prob_pos, prob_neg, entropy_weight), w.sum())


def codebook_entropy_backward(prob_pos: Tensor, prob_neg: Tensor, entropy_weight: Optional[Tensor],
                              grad: Tensor, entropy: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Gradients w.r.t. prob_pos/prob_neg of <codebook_entropy(...), grad> (grad: (C,)). With ``entropy`` (the
    forward's H, (C,)), both are shifted by the same amount per token and bit (the code-sum cotangent centred on
    its a-weighted mean): d/dprob_pos - d/dprob_neg is unchanged and keeps its precision near uniform codes."""
    hi, pos, neg, w, ps_hi, ps_lo = _tables(prob_pos, prob_neg, entropy_weight)
    n = safe_count(w.sum())
    a = ((ps_hi * w[None, :, None]).transpose(1, 2) @ ps_lo) / n
    shift = 1 if entropy is None else entropy.to(a.dtype).nan_to_num(1.0)[:, None, None]  # -(log a + 1 or H)
    g = a.clamp_min_(torch.finfo(a.dtype).tiny).log_().add_(shift).mul_(-grad.to(a.dtype)[:, None, None] / n)
    return _sums_backward(hi, pos, neg, w, ps_hi, ps_lo, g)


def brute_force_entropies(x: Tensor, code_value: float, inv_temperature: float,
                          entropy_weight: Optional[Tensor] = None, clamp: Optional[float] = None
                          ) -> Tuple[Tensor, Tensor]:
    """Oracle: softmax over all 2^D codes (T×2^D memory; small D only). Returns (per-sample entropy (0-d),
    codebook entropies (C,)), differentiable w.r.t. x. ``clamp=1e-5`` reproduces the anchor's clamped logs."""
    t, c, d = x.shape
    if d > 16:
        raise ValueError(f"brute_force_entropies enumerates 2^D codes; D={d} is too large (max 16)")
    codes = torch.arange(2 ** d, device=x.device)
    bits = (codes[:, None] >> torch.arange(d - 1, -1, -1, device=x.device)) & 1
    book = (bits.to(x.dtype) * 2 - 1) * code_value
    prob = (2 * inv_temperature * torch.einsum("tcd,jd->tcj", x, book)).softmax(-1)

    def ent(p):
        # p = 0 contributes 0 (and a finite gradient): log clamped at the smallest positive double
        return -(p * p.clamp_min(1e-300 if clamp is None else clamp).log()).sum(-1)

    w = _weights(entropy_weight, t, x)
    per_sample = (w[:, None] * ent(prob)).sum() / (w.sum() * c)
    avg = (w[:, None, None] * prob).sum(0) / w.sum()
    return per_sample, ent(avg)
