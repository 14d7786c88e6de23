"""Triton kernels of lookup-free quantization (LFQ) with exact entropies, and their host launchers.

* ``_lfq_quantize_fwd_kernel``: one pass over x (T, C, D) producing the straight-through output, the
  indices (MSB first), the per-bit probabilities σ(±z) (z = logit_scale·x) and per-program partial sums of
  the (weighted) per-sample entropy Σ_i h(σ(z_i)) and of the (weighted) squared commitment error.
* ``_lfq_quantize_bwd_kernel``: the elementwise gradient of all of the above w.r.t. x.
* ``_lfq_code_table_kernel``: the per-token probability tables of one side of the hi/lo bit split,
  P[t, j] = Π_i p_i(bit i of j) over that side's bits (the hi table weighted by w): O(T·2^(D/2)) floats,
  the same memory as the torch path.
* ``_lfq_code_pair_kernel``: one (hi-code tile × lo-code tile) block of S = Σ_t P_hi[t]ᵀ P_lo[t] over all
  tokens, with an epilogue that either reduces the tile to its share of the entropy -Σ a·log a (a = S/N,
  MODE 0: the 2^D distribution is never stored), writes dH/dS = -g·(log a + 1)/N (MODE 1, backward) or
  writes S itself (MODE 2).
* ``_lfq_code_pair_bwd_kernel``: the gradient of <S, G> w.r.t. one side's table, dP_A = (w·) P_B·G_ABᵀ.
* ``_lfq_code_table_bwd_kernel``: from dP_A through the table's products to that side's per-bit
  probabilities.

The code GEMMs run on tensor cores as three tf32 products (``_dot_f32``, "3xtf32"), accurate to about fp32.
Tiles over codes are at least 16 wide (``tl.dot`` needs M, N, K >= 16); codes beyond 2^bits are masked, so
small codebooks (D = 1..8) use the same kernels.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from fastsora.kernels import KERNELS_INTERPRETED
from fastsora.kernels.utils import LAUNCH_OPTIONS, autotuned, launch_tuned, new_output, on_input_device
from fastsora.registry import KernelConfig, register_kernel

_TL_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


# tl.sum is a @jit library function: under TRITON_INTERPRET=1 it is an interpreter object that AOT
# compilation cannot call through ``tl.``; as a module global, fastsora.aot swaps it for its JITFunction.
_sum = tl.sum


@triton.jit
def _bit_stats(z):
    """σ(z), σ(-z), h(σ(z)) and σ(z)σ(-z), accurate for any z (log1p via Goldberg's u=1+e trick)."""
    a = tl.abs(z)
    e = tl.exp(-a)
    u = 1.0 + e
    big = 1.0 / u
    small = e * big
    um1 = u - 1.0
    log1p_e = tl.where(um1 == 0.0, e, tl.log(u) * (e / tl.where(um1 == 0.0, 1.0, um1)))
    h = log1p_e + a * small
    pos = tl.where(z >= 0, big, small)
    neg = tl.where(z >= 0, small, big)
    return pos, neg, h, big * small


@triton.jit
def _lfq_quantize_fwd_kernel(x_ptr, out_ptr, idx_ptr, pos_ptr, neg_ptr, ew_ptr, cw_ptr, part_ptr,
                             T, C, D, stride_xt, stride_xc, stride_xd, code_value, logit_scale,
                             straight_through, with_entropy, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_t = offs_t < T
    mask_d = offs_d < D
    m2 = mask_t[:, None] & mask_d[None, :]
    shift = tl.where(mask_d, D - 1 - offs_d, 0).to(tl.int64)
    bit_value = tl.full([BLOCK_D], 1, tl.int64) << shift
    ew = tl.load(ew_ptr + offs_t, mask=mask_t, other=0.0).to(tl.float32)
    cw = tl.load(cw_ptr + offs_t, mask=mask_t, other=0.0).to(tl.float32)
    ent_acc = tl.full([BLOCK_T], 0.0, tl.float32)
    com_acc = tl.full([BLOCK_T], 0.0, tl.float32)
    x_row = x_ptr + offs_t[:, None] * stride_xt + offs_d[None, :].to(tl.int64) * stride_xd
    o_row = offs_t[:, None] * C * D + offs_d[None, :]
    for c in range(0, C):
        x = tl.load(x_row, mask=m2, other=0.0)
        x_row += stride_xc  # pointer steps: an int32 c * stride_xc would wrap past 2^31 elements
        xf = x.to(tl.float32)
        qf = tl.where(xf > 0, code_value, -code_value)
        q = qf.to(x.dtype)
        st_out = x + (q - x)
        out = tl.where(straight_through != 0, st_out, q)
        o_offs = o_row + c * D
        tl.store(out_ptr + o_offs, out, mask=m2)
        bits = (q.to(tl.float32) > 0) & m2
        idx = _sum(tl.where(bits, bit_value[None, :], 0), axis=1)
        tl.store(idx_ptr + offs_t * C + c, idx, mask=mask_t)
        diff = tl.where(m2, xf - q.to(tl.float32), 0.0)
        # a token of weight 0 adds exactly 0, whatever its values (a masked-out padding token's NaN or inf)
        com_acc += tl.where(cw != 0, cw * _sum(diff * diff, axis=1), 0.0)
        if with_entropy != 0:
            pos, neg, h, _ = _bit_stats(xf * logit_scale)
            tl.store(pos_ptr + o_offs, pos, mask=m2)
            tl.store(neg_ptr + o_offs, neg, mask=m2)
            ent_acc += tl.where(ew != 0, ew * _sum(tl.where(m2, h, 0.0), axis=1), 0.0)
    tl.store(part_ptr + pid * 2, _sum(ent_acc, axis=0))
    tl.store(part_ptr + pid * 2 + 1, _sum(com_acc, axis=0))


@triton.jit
def _lfq_quantize_bwd_kernel(x_ptr, gout_ptr, gpos_ptr, gneg_ptr, ew_ptr, cw_ptr, coef_ptr, dx_ptr,
                             T, C, D, stride_xt, stride_xc, stride_xd, stride_gt, stride_gc, stride_gd,
                             code_value, logit_scale, has_gout, has_gp, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_t = offs_t < T
    mask_d = offs_d < D
    m2 = mask_t[:, None] & mask_d[None, :]
    ew = tl.load(ew_ptr + offs_t, mask=mask_t, other=0.0).to(tl.float32)
    cw = tl.load(cw_ptr + offs_t, mask=mask_t, other=0.0).to(tl.float32)
    coef_ent = tl.load(coef_ptr)        # dL/d(per-sample entropy) / (N_entropy · C)
    coef_com = tl.load(coef_ptr + 1)    # 2 · dL/d(commitment) / (N_commit · C · D)
    d64 = offs_d[None, :].to(tl.int64)
    x_row = x_ptr + offs_t[:, None] * stride_xt + d64 * stride_xd
    g_row = gout_ptr + offs_t[:, None] * stride_gt + d64 * stride_gd
    o_row = offs_t[:, None] * C * D + offs_d[None, :]
    for c in range(0, C):
        x = tl.load(x_row, mask=m2, other=0.0)
        x_row += stride_xc  # pointer steps (see the forward)
        xf = x.to(tl.float32)
        z = xf * logit_scale
        pos, neg, h, pn = _bit_stats(z)
        dz = tl.where(ew[:, None] != 0, ew[:, None] * coef_ent * (-z * pn), 0.0)   # weight 0: exactly 0
        o_offs = o_row + c * D
        if has_gp != 0:
            gp = tl.load(gpos_ptr + o_offs, mask=m2, other=0.0)
            gn = tl.load(gneg_ptr + o_offs, mask=m2, other=0.0)
            dg = gp - gn   # 0 for a masked-out token (from the code sums): it adds 0 even where pn is NaN
            dz += tl.where(dg != 0, dg * pn, 0.0)
        qf = tl.where(xf > 0, code_value, -code_value).to(x.dtype).to(tl.float32)
        dx = dz * logit_scale + tl.where(cw[:, None] != 0, cw[:, None] * coef_com * (xf - qf), 0.0)
        if has_gout != 0:
            dx += tl.load(g_row, mask=m2, other=0.0).to(tl.float32)
        g_row += stride_gc
        tl.store(dx_ptr + o_offs, dx.to(x.dtype), mask=m2)


@triton.jit
def _tf32_round(x):
    """x rounded to the nearest value with a 10-bit mantissa (exactly representable in tf32)."""
    return ((x.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _dot_f32(a, b, acc, PRECISION: tl.constexpr):
    """acc + a·b for fp32 tiles. PRECISION "3xtf32": three tensor-core tf32 products of the operands split as
    x = big + small (both rounded to tf32 here, so the hardware's tf32 conversion is exact and the interpreter's
    fp32 matmul reproduces the result): a·b ≈ a_big·b_big + a_big·b_small + a_small·b_big, relative error per
    product about 2^-21. Anything else is passed to tl.dot as its input_precision ("ieee": exact fp32 FMAs)."""
    if PRECISION == "3xtf32":
        a_big = _tf32_round(a)
        b_big = _tf32_round(b)
        a_small = _tf32_round(a - a_big)
        b_small = _tf32_round(b - b_big)
        acc = tl.dot(a_small, b_big, acc, input_precision="tf32")
        acc = tl.dot(a_big, b_small, acc, input_precision="tf32")
        return tl.dot(a_big, b_big, acc, input_precision="tf32")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _bit_factor(pos_ptr, neg_ptr, offs, mask, code_bit):
    """The probability of each token's bit at ``offs`` taking the value ``code_bit`` (0 or 1, broadcast)."""
    p1 = tl.load(pos_ptr + offs, mask=mask, other=0.0)
    p0 = tl.load(neg_ptr + offs, mask=mask, other=0.0)
    return tl.where(code_bit == 1, p1, p0)


@triton.jit
def _tile_bit_factors(pos_ptr, neg_ptr, base, mask_t, i):
    """(p_i(0), p_i(1)) per token for bit i of side A; i < 0 is a virtual bit above the side's bits (tiles wider
    than the side's codebook): factors (1, 0), so only codes with that bit 0 - the real ones - contribute."""
    real = (tl.zeros_like(base) + i) >= 0
    f1 = tl.load(pos_ptr + base + i, mask=mask_t & real, other=0.0)
    f0 = tl.load(neg_ptr + base + i, mask=mask_t & real, other=0.0)
    return tl.where(real, f0, 1.0), f1


@triton.jit
def _tile_table(pos_ptr, neg_ptr, base, mask_t, first, P, N: tl.constexpr):
    """P (BLOCK_T, 1) times the table of N tile positions, position m being side bit first + m (MSB first):
    (BLOCK_T, 2^N), built one position at a time by joining the halves where it is 0 and 1."""
    for m in tl.static_range(0, N):
        f0, f1 = _tile_bit_factors(pos_ptr, neg_ptr, base, mask_t, first + m)
        P = tl.reshape(tl.join(P * f0[:, None], P * f1[:, None]), [P.shape[0], 2 << m])
    return P


@triton.jit
def _lfq_code_table_kernel(pos_ptr, neg_ptr, w_ptr, tab_ptr, T, C, D, OFF, NB, n_fix, stride_tc, stride_tt,
                           weighted, BLOCK_T: tl.constexpr, LOG_J: tl.constexpr):
    """One [BLOCK_T tokens × 2^LOG_J codes] block of codebook c's table over the NB bits OFF..OFF+NB-1:
    tab[c, t, j] = (w_t if weighted) · Π_i p_{OFF+i}(bit i of j, MSB first). The block's codes share their
    first n_fix = NB - LOG_J bits (at least 0): their factors are one per token; the other bits are joined in
    one at a time (_tile_table)."""
    pid_t = tl.program_id(0).to(tl.int64)
    pid_j = tl.program_id(1)
    c = tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    mask_t = offs_t < T
    j0 = pid_j << LOG_J
    j = j0 + tl.arange(0, 1 << LOG_J)
    w = tl.load(w_ptr + offs_t, mask=mask_t, other=0.0).to(tl.float32)
    row = tl.where(weighted != 0, w, tl.where(mask_t, 1.0, 0.0))
    base = (offs_t * C + c) * D + OFF
    for i in range(0, n_fix):
        row *= _bit_factor(pos_ptr, neg_ptr, base + i, mask_t, (j0 >> (NB - 1 - i)) & 1)
    P = _tile_table(pos_ptr, neg_ptr, base, mask_t, NB - LOG_J, row[:, None], LOG_J)
    offs = c.to(tl.int64) * stride_tc + offs_t[:, None] * stride_tt + j[None, :]
    tl.store(tab_ptr + offs, P, mask=mask_t[:, None] & (j < (1 << NB))[None, :])


@triton.jit
def _lfq_code_pair_kernel(hi_ptr, lo_ptr, n_ptr, g_ptr, out_ptr, T, NH, NL, stride_hc, stride_ht, stride_lc,
                          stride_lt, stride_oc, stride_oh, stride_ol,
                          MODE: tl.constexpr, BLOCK_T: tl.constexpr,
                          BLOCK_H: tl.constexpr, BLOCK_L: tl.constexpr, PRECISION: tl.constexpr):
    """One (hi-code tile × lo-code tile) block of S = Σ_t hi[c, t, :]ᵀ lo[c, t, :] over all tokens (the tables
    of _lfq_code_table_kernel, hi weighted), then the epilogue chosen by MODE."""
    c = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_l = tl.program_id(2)
    jh = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    jl = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    valid_h = jh < (1 << NH)
    valid_l = jl < (1 << NL)
    # a scalar 64-bit pointer per table advances over the token blocks; offsets inside a block fit in int32
    rows = tl.arange(0, BLOCK_T)
    hi_block = hi_ptr + c.to(tl.int64) * stride_hc
    lo_block = lo_ptr + c.to(tl.int64) * stride_lc
    hi_offs = rows[:, None] * stride_ht + jh[None, :]
    lo_offs = rows[:, None] * stride_lt + jl[None, :]
    acc = tl.full([BLOCK_H, BLOCK_L], 0.0, tl.float32)
    for t0 in range(0, T, BLOCK_T):
        mask_t = (t0 + rows) < T
        p_hi = tl.load(hi_block + hi_offs, mask=mask_t[:, None] & valid_h[None, :], other=0.0)
        p_lo = tl.load(lo_block + lo_offs, mask=mask_t[:, None] & valid_l[None, :], other=0.0)
        acc = _dot_f32(tl.trans(p_hi), p_lo, acc, PRECISION)
        hi_block += BLOCK_T * stride_ht
        lo_block += BLOCK_T * stride_lt
    valid = valid_h[:, None] & valid_l[None, :]
    o_offs = c.to(tl.int64) * stride_oc + jh[:, None].to(tl.int64) * stride_oh + jl[None, :] * stride_ol
    if MODE == 2:
        tl.store(out_ptr + o_offs, acc, mask=valid)
    else:
        n = tl.load(n_ptr)
        a = acc / n
        # a NaN stays NaN (maximum(NaN, tiny) and `a > 0` would both turn it into a plausible 0 entropy)
        log_a = tl.log(tl.where(a < 1.1754943508222875e-38, 1.1754943508222875e-38, a))
        if MODE == 0:
            ent = tl.where(valid, tl.where(a <= 0, 0.0, -a * log_a), 0.0)
            part = _sum(_sum(ent, axis=1), axis=0)
            # codebook c's partials start at its row of the output; tiles of any size index within it
            tl.store(out_ptr + c.to(tl.int64) * stride_oc + pid_h * tl.num_programs(2) + pid_l, part)
        else:
            g = tl.load(g_ptr + c).to(tl.float32)
            tl.store(out_ptr + o_offs, -g * (log_a + 1.0) / n, mask=valid)


@triton.jit
def _lfq_code_pair_bwd_kernel(tabb_ptr, w_ptr, g_ptr, dtab_ptr, T, NA, NB, stride_bc, stride_bt, stride_gc,
                              stride_ga, stride_gb, stride_dc, stride_dt, weighted,
                              BLOCK_T: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                              PRECISION: tl.constexpr):
    """One [BLOCK_T tokens × BLOCK_A codes] block of the gradient of <S, G> w.r.t. side A's table:
    dtab[c, t, ja] = (w_t if weighted) · Σ_jb tab_B[c, t, jb] · G_AB[c, ja, jb]. tab_B is side B's table
    (_lfq_code_table_kernel); G_AB is G or Gᵀ through the strides; ``weighted`` multiplies by w when tab_B does
    not carry it (side A = hi)."""
    pid_t = tl.program_id(0).to(tl.int64)
    pid_a = tl.program_id(1)
    c = tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    mask_t = offs_t < T
    ja = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    valid_a = ja < (1 << NA)
    b_rows = tabb_ptr + c.to(tl.int64) * stride_bc + offs_t[:, None] * stride_bt
    g_rows = g_ptr + c.to(tl.int64) * stride_gc + ja[:, None].to(tl.int64) * stride_ga
    acc = tl.full([BLOCK_T, BLOCK_A], 0.0, tl.float32)
    for b0 in range(0, 1 << NB, BLOCK_B):
        jb = b0 + tl.arange(0, BLOCK_B)
        valid_b = jb < (1 << NB)
        p_b = tl.load(b_rows + jb[None, :], mask=mask_t[:, None] & valid_b[None, :], other=0.0)
        g = tl.load(g_rows + jb[None, :].to(tl.int64) * stride_gb, mask=valid_a[:, None] & valid_b[None, :],
                    other=0.0).to(tl.float32)
        acc = _dot_f32(p_b, tl.trans(g), acc, PRECISION)
    w = tl.load(w_ptr + offs_t, mask=mask_t, other=0.0).to(tl.float32)
    acc = acc * tl.where(weighted != 0, w, 1.0)[:, None]
    offs = c.to(tl.int64) * stride_dc + offs_t[:, None] * stride_dt + ja[None, :]
    tl.store(dtab_ptr + offs, acc, mask=mask_t[:, None] & valid_a[None, :])


@triton.jit
def _lfq_code_table_bwd_kernel(dtab_ptr, pos_ptr, neg_ptr, dpos_ptr, dneg_ptr, T, C, D, OFF_A, NA, n_fix,
                               stride_dc, stride_dt, BLOCK_T: tl.constexpr, LOG_A: tl.constexpr,
                               BLOCK_BITS: tl.constexpr):
    """Gradients w.r.t. the per-bit probabilities of bits OFF_A..OFF_A+NA-1 for one token block, from the
    gradient dtab (C, T, 2^NA) of their unweighted table P_A[t, j] = Π_i p_i(bit i of j): dp_k(b)[t] =
    Σ_{j: bit k of j = b} dtab[t, j] · Π_{i≠k} p_i(bit i of j). Codes go in tiles of 2^LOG_A that share their
    first n_fix = NA - LOG_A bits (at least 0). Within a tile, bit k's sum contracts the bits after k one at a
    time (halving the tile each step) and meets the table of the bits before k: O(2^LOG_A) work per bit. The
    shared bits get one row sum per tile."""
    pid_t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    mask_t = offs_t < T
    base = (offs_t * C + c) * D + OFF_A
    cols = tl.arange(0, BLOCK_BITS)
    acc_pos = tl.full([BLOCK_T, BLOCK_BITS], 0.0, tl.float32)
    acc_neg = tl.full([BLOCK_T, BLOCK_BITS], 0.0, tl.float32)
    d_rows = dtab_ptr + c.to(tl.int64) * stride_dc + offs_t[:, None] * stride_dt
    first = NA - LOG_A   # side A's bit at tile position 0 (negative: virtual bits, see _tile_bit_factors)
    for a0 in range(0, 1 << NA, 1 << LOG_A):
        ja = a0 + tl.arange(0, 1 << LOG_A)
        d_pa = tl.load(d_rows + ja[None, :], mask=mask_t[:, None] & (ja < (1 << NA))[None, :], other=0.0)
        fix_prod = tl.where(mask_t, 1.0, 0.0)
        for i in range(0, n_fix):
            fix_prod *= _bit_factor(pos_ptr, neg_ptr, base + i, mask_t, (a0 >> (NA - 1 - i)) & 1)
        # tile positions from the last: R is d_pa contracted over the positions after p, P the table of the
        # positions before p; their split halves give bit (first + p)'s two sums
        R = d_pa
        for p in tl.static_range(LOG_A - 1, -1, -1):
            r0, r1 = tl.split(tl.reshape(R, [BLOCK_T, 1 << p, 2]))
            P = _tile_table(pos_ptr, neg_ptr, base, mask_t, first, tl.full([BLOCK_T, 1], 1.0, tl.float32), p)
            hit = cols[None, :] == first + p
            acc_neg += tl.where(hit, (fix_prod * _sum(r0 * P, axis=1))[:, None], 0.0)
            acc_pos += tl.where(hit, (fix_prod * _sum(r1 * P, axis=1))[:, None], 0.0)
            f0, f1 = _tile_bit_factors(pos_ptr, neg_ptr, base, mask_t, first + p)
            R = r0 * f0[:, None] + r1 * f1[:, None]
        # R is now the tile's row sum weighted by all its own positions' factors; a shared bit k takes it with
        # the other shared bits' factors
        row = _sum(R, axis=1)
        for k in range(0, n_fix):
            e = row
            for i in range(0, n_fix):
                f = _bit_factor(pos_ptr, neg_ptr, base + i, mask_t, (a0 >> (NA - 1 - i)) & 1)
                e = e * tl.where(i == k, 1.0, f)
            hit = cols[None, :] == k
            bit_k = (a0 >> (NA - 1 - k)) & 1
            acc_pos += tl.where(hit & (bit_k == 1), e[:, None], 0.0)
            acc_neg += tl.where(hit & (bit_k == 0), e[:, None], 0.0)
    offs = base[:, None] + cols[None, :]
    m2 = mask_t[:, None] & (cols[None, :] < NA)
    tl.store(dpos_ptr + offs, acc_pos, mask=m2)
    tl.store(dneg_ptr + offs, acc_neg, mask=m2)


# ---------------------------------------------------------------------------------------------- configs
#: Largest codebook dim the kernels take (indices are int64; each side of the split has <= 16 bits).
MAX_BITS = 32
#: Products in the code GEMMs (see _dot_f32): "3xtf32" runs them on tensor cores at about fp32 accuracy (the
#: entropies and gradients stay within 1e-5 of float64, tested); "ieee" is exact fp32 on the FMA units.
PRECISION = "3xtf32"
_CUDA_QUANT = dict(ELEMENTS=512, num_warps=4, num_stages=1)   # BLOCK_T = ELEMENTS // BLOCK_D
#: Launch settings on CUDA. Each compiles with no spill and no stack frame for every code tile it is used with,
#: on sm_80 and sm_90, under triton 3.4, 3.6 and 3.9 (ptxas leaves small stack frames in some combinations
#: even far below the register limit, and which ones differs between releases, hence the per-tile table).
_CUDA_TABLE = dict(BLOCK_T=32, num_warps=4, num_stages=1)
_CUDA_PAIR = dict(BLOCK_T=32, num_warps=4, num_stages=2)
_CUDA_PAIR_BWD = dict(BLOCK_T=64, num_warps=4, num_stages=2)
_CUDA_TABLE_BWD = dict(BLOCK_T=64, num_warps=8, num_stages=1)
#: Code-tile limits where register pressure demands them (no spills on sm_80/sm_90): the contracted side of
#: the pair backward, and the table backward (its tile lives in registers while the bits are contracted).
_PAIR_BWD_B_WIDEST = 32
_TABLE_BWD_WIDEST = 64
#: BLOCK_A -> settings of the table backward where the default above spills
_CUDA_TABLE_BWD_BY_TILE = {16: dict(BLOCK_T=64, num_warps=4, num_stages=1)}
#: (BLOCK_A, BLOCK_B) -> settings of the pair backward where the default above spills
_CUDA_PAIR_BWD_BY_TILE = {(64, 32): dict(BLOCK_T=64, num_warps=8, num_stages=2)}
#: (BLOCK_A, BLOCK_BITS) -> releases under which the table backward keeps a small stack frame (8-56 B) only in
#: the build Triton's JIT makes when every integer argument is a multiple of 16 (`fastsora compile
#: --divisible-ints`; the plain builds are clean). Its launches never specialise all of them: C = 1 becomes a
#: constant and D (the code bits, e.g. 18) is rarely a multiple of 16. The 16-code tile serves sides of at most
#: 4 bits (d <= 9); d = 18 (64-code tile, 16 bits) is clean on sm_90 under every release.
_TABLE_BWD_STACK_WITH_DIVISIBLE_INTS = {(16, 2): ("3.4", "3.5", "3.6", "3.7", "3.8"),
                                        (16, 4): ("3.4", "3.5", "3.6", "3.7", "3.9"),
                                        (64, 8): ("3.5", "3.6"), (64, 16): ("3.5", "3.6")}
#: (kind, dtype, BLOCK_D) -> the same for the quantize kernels: the fp32 forward's 8-bit tile on sm_90 under 3.8
_QUANT_STACK_WITH_DIVISIBLE_INTS = {("fwd", "fp32", 8): ("3.8",)}
#: (BLOCK_A, BLOCK_B) -> releases under which the pair backward keeps a small stack frame (8 B, sm_80): under 3.8
#: only (the pin of torch 2.14; not 3.4 to 3.7 or 3.9). BLOCK_T = 32, or one stage, is clean there (255 -> 138 or
#: 248 registers), but this tile serves the d = 18 target on sm_90 too: it stays until a GPU run times both
_PAIR_BWD_STACK_IN_PLAIN_BUILD = {(64, 32): ("3.8",)}
#: (MODE, BLOCK_H, BLOCK_L) -> settings of the pair forward where the default above spills
_CUDA_PAIR_BY_TILE = {(mode, 64, 64): dict(BLOCK_T=32, num_warps=8, num_stages=2) for mode in (0, 1, 2)}


def _pair_settings(mode: int, block_h: int, block_l: int) -> dict:
    return _CUDA_PAIR_BY_TILE.get((mode, block_h, block_l), _CUDA_PAIR)


def _pair_tiles(nh: int, nl: int) -> List[Tuple[int, int]]:
    """Code tiles (BLOCK_H, BLOCK_L) the code-pair GEMM's autotuner tries for sides of nh and nl bits: the
    widest tile (few programs: 64 at d = 18, under half an H100's SMs) and narrower ones (2x, 4x the programs)."""
    bh, bl = _code_block(nh), _code_block(nl)
    tiles = [(bh, bl), (bh, max(16, bl // 2)), (max(16, bh // 2), max(16, bl // 2))]
    return list(dict.fromkeys(tiles))


@functools.lru_cache(maxsize=None)
def _pair_tuned(mode: int, nh: int, nl: int):
    """The code-pair kernel autotuned over :func:`_pair_tiles` (CUDA). Mode 0 writes one entropy partial per
    tile, so the number written depends on the tile: the autotuner zeroes the output around its trials, and
    the launcher allocates it zeroed for the narrowest tile."""
    configs = []
    for bh, bl in _pair_tiles(nh, nl):
        cfg = _pair_settings(mode, bh, bl)
        configs.append(triton.Config({"BLOCK_H": bh, "BLOCK_L": bl, "BLOCK_T": cfg["BLOCK_T"]},
                                     num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    return autotuned(f"lfq code_pair mode={mode} bits={nh}+{nl}", _lfq_code_pair_kernel, configs, ["NH", "NL"],
                     reset_to_zero=["out_ptr"] if mode == 0 else [])


def _pair_bwd_settings(block_a: int, block_b: int) -> dict:
    return _CUDA_PAIR_BWD_BY_TILE.get((block_a, block_b), _CUDA_PAIR_BWD)


def _table_block_j(bits: int) -> int:
    """Codes per program of the table kernel: the whole row up to 64 codes (at least 16, masked)."""
    return max(16, min(64, 1 << bits))


def _block_d(d: int) -> int:
    """Bit-tile width of the elementwise kernels: 8, 32 or 64 (few compiled variants; lanes masked)."""
    return 8 if d <= 8 else (32 if d <= 32 else 64)


def _quant_block_t(block_d: int) -> int:
    return _CUDA_QUANT["ELEMENTS"] // block_d


def _block_bits(n: int) -> int:
    return max(2, triton.next_power_of_2(n))


def _code_block(bits: int, widest: int = 64) -> int:
    """Code-tile width: at least 16 (tl.dot needs 16), at most ``widest``; codes beyond 2^bits are masked."""
    return max(16, min(widest, 1 << bits))


def _block_t(n: int, cuda_value: int, interp_max: int) -> int:
    if KERNELS_INTERPRETED:   # few, large tiles: the interpreter pays per executed iteration
        return max(16, min(interp_max, triton.next_power_of_2(max(n, 1))))
    return cuda_value


def _sig(names, types):
    return dict(zip(names, types))


def _quantize_configs(kind, names, types_of):
    """The CUDA configs of one quantize kernel ('fwd' or 'bwd'): every input dtype x every BLOCK_D the
    launcher picks; ``types_of(ty)`` gives the signature types for input dtype ``ty``."""
    return [KernelConfig(f"quantize {kind} {ty} BLOCK_D={bd}", _sig(names, types_of(ty)),
                         dict(BLOCK_T=_quant_block_t(bd), BLOCK_D=bd),
                         num_warps=_CUDA_QUANT["num_warps"], num_stages=_CUDA_QUANT["num_stages"],
                         known_stack_with_divisible_ints=_QUANT_STACK_WITH_DIVISIBLE_INTS.get((kind, ty, bd), ()))
            for ty in _TL_DTYPE.values() for bd in sorted({_block_d(d) for d in range(1, MAX_BITS + 1)})]


def _quantize_fwd_configs():
    names = ["x_ptr", "out_ptr", "idx_ptr", "pos_ptr", "neg_ptr", "ew_ptr", "cw_ptr", "part_ptr", "T", "C", "D",
             "stride_xt", "stride_xc", "stride_xd", "code_value", "logit_scale", "straight_through",
             "with_entropy", "BLOCK_T", "BLOCK_D"]
    return _quantize_configs("fwd", names, lambda ty: [
        f"*{ty}", f"*{ty}", "*i64", "*fp32", "*fp32", "*fp32", "*fp32", "*fp32", "i32", "i32", "i32",
        "i64", "i64", "i64", "fp32", "fp32", "i32", "i32"] + ["constexpr"] * 2)


def _quantize_bwd_configs():
    names = ["x_ptr", "gout_ptr", "gpos_ptr", "gneg_ptr", "ew_ptr", "cw_ptr", "coef_ptr", "dx_ptr", "T", "C", "D",
             "stride_xt", "stride_xc", "stride_xd", "stride_gt", "stride_gc", "stride_gd", "code_value",
             "logit_scale", "has_gout", "has_gp", "BLOCK_T", "BLOCK_D"]
    return _quantize_configs("bwd", names, lambda ty: [
        f"*{ty}", f"*{ty}", "*fp32", "*fp32", "*fp32", "*fp32", "*fp32", f"*{ty}", "i32", "i32", "i32",
        "i64", "i64", "i64", "i64", "i64", "i64", "fp32", "fp32", "i32", "i32"] + ["constexpr"] * 2)


def _pair_blocks():
    """Every (BLOCK_H, BLOCK_L) the launcher may pick for D = 1..MAX_BITS."""
    return sorted({tile for d in range(1, MAX_BITS + 1) for tile in _pair_tiles(d // 2, d - d // 2)})


def _pair_bwd_blocks():
    """Every (BLOCK_A, BLOCK_B) of the pair backward and (BLOCK_A, BLOCK_BITS) of the table backward the
    launcher picks for both sides, D = 1..MAX_BITS."""
    pair, table = set(), set()
    for d in range(1, MAX_BITS + 1):
        nh, nl = d // 2, d - d // 2
        for na, nb in ((nh, nl), (nl, nh)):
            if na:
                pair.add((_code_block(na), _code_block(nb, _PAIR_BWD_B_WIDEST)))
                table.add((_code_block(na, _TABLE_BWD_WIDEST), _block_bits(na)))
    return sorted(pair), sorted(table)


def _table_configs():
    names = ["pos_ptr", "neg_ptr", "w_ptr", "tab_ptr", "T", "C", "D", "OFF", "NB", "n_fix", "stride_tc",
             "stride_tt", "weighted", "BLOCK_T", "LOG_J"]
    types = ["*fp32"] * 4 + ["i32"] * 6 + ["i64", "i32", "i32"] + ["constexpr"] * 2
    return [KernelConfig(f"code table BLOCK_J={bj}", _sig(names, types),
                         dict(BLOCK_T=_CUDA_TABLE["BLOCK_T"], LOG_J=bj.bit_length() - 1), num_warps=_CUDA_TABLE["num_warps"],
                         num_stages=_CUDA_TABLE["num_stages"])
            for bj in sorted({_table_block_j(b) for b in range(0, MAX_BITS // 2 + 1)})]


def _pair_configs():
    names = ["hi_ptr", "lo_ptr", "n_ptr", "g_ptr", "out_ptr", "T", "NH", "NL", "stride_hc", "stride_ht",
             "stride_lc", "stride_lt", "stride_oc", "stride_oh", "stride_ol", "MODE", "BLOCK_T", "BLOCK_H",
             "BLOCK_L", "PRECISION"]
    types = ["*fp32"] * 5 + ["i32"] * 3 + ["i64", "i32", "i64", "i32"] + ["i64"] * 3 + ["constexpr"] * 5
    configs = []
    for mode in (0, 1, 2):
        for bh, bl in _pair_blocks():
            cfg = _pair_settings(mode, bh, bl)
            configs.append(KernelConfig(f"code pair mode={mode} BLOCK_H={bh} BLOCK_L={bl} T={cfg['BLOCK_T']}",
                                        _sig(names, types), dict(MODE=mode, BLOCK_T=cfg["BLOCK_T"], BLOCK_H=bh,
                                                                 BLOCK_L=bl, PRECISION=PRECISION),
                                        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    return configs


def _pair_bwd_configs():
    names = ["tabb_ptr", "w_ptr", "g_ptr", "dtab_ptr", "T", "NA", "NB", "stride_bc", "stride_bt", "stride_gc",
             "stride_ga", "stride_gb", "stride_dc", "stride_dt", "weighted", "BLOCK_T", "BLOCK_A", "BLOCK_B",
             "PRECISION"]
    types = ["*fp32"] * 4 + ["i32"] * 3 + ["i64", "i32"] + ["i64"] * 3 + ["i64", "i32", "i32"] + ["constexpr"] * 4
    configs = []
    for ba, bb in _pair_bwd_blocks()[0]:
        cfg = _pair_bwd_settings(ba, bb)
        configs.append(KernelConfig(f"code pair bwd BLOCK_A={ba} BLOCK_B={bb} T={cfg['BLOCK_T']}",
                                    _sig(names, types), dict(BLOCK_T=cfg["BLOCK_T"], BLOCK_A=ba, BLOCK_B=bb,
                                                             PRECISION=PRECISION),
                                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                                    known_stack_under=_PAIR_BWD_STACK_IN_PLAIN_BUILD.get((ba, bb), ())))
    return configs


def _table_bwd_configs():
    names = ["dtab_ptr", "pos_ptr", "neg_ptr", "dpos_ptr", "dneg_ptr", "T", "C", "D", "OFF_A", "NA", "n_fix",
             "stride_dc", "stride_dt", "BLOCK_T", "LOG_A", "BLOCK_BITS"]
    types = ["*fp32"] * 5 + ["i32"] * 6 + ["i64", "i32"] + ["constexpr"] * 3
    configs = []
    for ba, bits in _pair_bwd_blocks()[1]:
        cfg = _CUDA_TABLE_BWD_BY_TILE.get(ba, _CUDA_TABLE_BWD)
        configs.append(KernelConfig(f"code table bwd BLOCK_A={ba} BITS={bits} T={cfg['BLOCK_T']}",
                                    _sig(names, types), dict(BLOCK_T=cfg["BLOCK_T"], LOG_A=ba.bit_length() - 1,
                                                             BLOCK_BITS=bits),
                                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                                    known_stack_with_divisible_ints=_TABLE_BWD_STACK_WITH_DIVISIBLE_INTS.get(
                                        (ba, bits), ())))
    return configs


register_kernel("lfq", _lfq_quantize_fwd_kernel, _quantize_fwd_configs())
register_kernel("lfq", _lfq_quantize_bwd_kernel, _quantize_bwd_configs())
register_kernel("lfq", _lfq_code_table_kernel, _table_configs())
register_kernel("lfq", _lfq_code_pair_kernel, _pair_configs())
register_kernel("lfq", _lfq_code_pair_bwd_kernel, _pair_bwd_configs())
register_kernel("lfq", _lfq_code_table_bwd_kernel, _table_bwd_configs())


# --------------------------------------------------------------------------------------------- launchers
def unsupported_reason(x: torch.Tensor) -> Optional[str]:
    """Why the Triton kernels cannot take ``x`` (T, C, D), or None."""
    if x.dtype not in _TL_DTYPE:
        return f"{str(x.dtype).removeprefix('torch.')} inputs (float16, bfloat16 and float32 only)"
    if x.shape[-1] > MAX_BITS:
        return f"codebook dim {x.shape[-1]} > {MAX_BITS}"
    return None


def _weights(w: Optional[torch.Tensor], t: int, device) -> torch.Tensor:
    if w is None:
        return torch.ones(t, dtype=torch.float32, device=device)
    return w.to(torch.float32).contiguous()


@on_input_device
def quantize_fwd(x: torch.Tensor, code_value: float, logit_scale: float, straight_through: bool,
                 with_entropy: bool, entropy_weight: Optional[torch.Tensor], commit_weight: Optional[torch.Tensor]):
    """Launch the fused quantize kernel on x (T, C, D) (any strides). Returns out (T,C,D) x.dtype, indices
    (T,C) int64, pos/neg (T,C,D) fp32 (empty (0,) without entropy) and per-program partial sums
    (programs, 2) fp32: [Σ w_e·Σ h, Σ w_c·Σ (x-q)²]."""
    t, c, d = x.shape
    dev = x.device
    block_t = _block_t(t, _quant_block_t(_block_d(d)), 1024)
    grid = (triton.cdiv(t, block_t),)
    out = new_output((t, c, d), x.dtype, dev)
    idx = new_output((t, c), torch.int64, dev)
    if with_entropy:
        pos = new_output((t, c, d), torch.float32, dev)
        neg = new_output((t, c, d), torch.float32, dev)
    else:
        pos = torch.empty((0,), dtype=torch.float32, device=dev)
        neg = torch.empty((0,), dtype=torch.float32, device=dev)
    part = new_output((grid[0], 2), torch.float32, dev)
    if t * c * d == 0:
        return out, idx, pos, neg, part.zero_()
    _lfq_quantize_fwd_kernel[grid](
        x, out, idx, pos if with_entropy else part, neg if with_entropy else part,
        _weights(entropy_weight, t, dev), _weights(commit_weight, t, dev), part, t, c, d,
        x.stride(0), x.stride(1), x.stride(2), float(code_value), float(logit_scale),
        int(bool(straight_through)), int(bool(with_entropy)), BLOCK_T=block_t, BLOCK_D=_block_d(d), num_warps=_CUDA_QUANT["num_warps"],
        num_stages=_CUDA_QUANT["num_stages"], **LAUNCH_OPTIONS)
    return out, idx, pos, neg, part


@on_input_device
def quantize_bwd(x: torch.Tensor, grad_out: Optional[torch.Tensor], grad_pos: Optional[torch.Tensor],
                 grad_neg: Optional[torch.Tensor], coef: torch.Tensor, entropy_weight: Optional[torch.Tensor],
                 commit_weight: Optional[torch.Tensor], code_value: float, logit_scale: float) -> torch.Tensor:
    """dx (T, C, D) in x.dtype. ``coef`` (2,) fp32 = [dL/d(per-sample entropy)/(N_e·C),
    2·dL/d(commitment)/(N_c·C·D)]; grad_out None: out carries no gradient (eval)."""
    t, c, d = x.shape
    dev = x.device
    dx = new_output((t, c, d), x.dtype, dev)
    if t * c * d == 0:
        return dx
    block_t = _block_t(t, _quant_block_t(_block_d(d)), 1024)
    coef = coef.to(torch.float32).contiguous()
    has_gp = grad_pos is not None and grad_pos.numel() > 0
    gp = grad_pos.to(torch.float32).contiguous() if has_gp else coef
    gn = grad_neg.to(torch.float32).contiguous() if has_gp else coef
    g = grad_out if grad_out is not None else x
    _lfq_quantize_bwd_kernel[(triton.cdiv(t, block_t),)](
        x, g, gp, gn, _weights(entropy_weight, t, dev), _weights(commit_weight, t, dev), coef, dx, t, c, d,
        x.stride(0), x.stride(1), x.stride(2), g.stride(0), g.stride(1), g.stride(2),
        float(code_value), float(logit_scale), int(grad_out is not None), int(has_gp), BLOCK_T=block_t, BLOCK_D=_block_d(d), num_warps=_CUDA_QUANT["num_warps"],
        num_stages=_CUDA_QUANT["num_stages"], **LAUNCH_OPTIONS)
    return dx


@on_input_device
def code_tables(pos: torch.Tensor, neg: torch.Tensor, weight: Optional[torch.Tensor]
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The per-token code probability tables of both halves of the split, (C, T, 2^hi) weighted by w and
    (C, T, 2^lo) unweighted, fp32: O(T·2^(D/2)) memory, as the torch path's. ``pos``/``neg`` (T, C, D) fp32
    contiguous; ``weight`` (T,) or None."""
    t, c, d = pos.shape
    w = _weights(weight, t, pos.device)
    tables = []
    for off, bits, weighted in ((0, d // 2, 1), (d // 2, d - d // 2, 0)):
        tab = new_output((c, t, 1 << bits), torch.float32, pos.device)
        if tab.numel():
            block_t = _block_t(t, _CUDA_TABLE["BLOCK_T"], 256)
            block_j = _table_block_j(bits)
            _lfq_code_table_kernel[(triton.cdiv(t, block_t), triton.cdiv(1 << bits, block_j), c)](
                pos, neg, w, tab, t, c, d, off, bits, max(bits - block_j.bit_length() + 1, 0), tab.stride(0),
                tab.stride(1), weighted,
                BLOCK_T=block_t, LOG_J=block_j.bit_length() - 1, num_warps=_CUDA_TABLE["num_warps"],
                num_stages=_CUDA_TABLE["num_stages"], **LAUNCH_OPTIONS)
        tables.append(tab)
    return tables[0], tables[1]


@on_input_device
def code_pair(pos: torch.Tensor, neg: torch.Tensor, weight: Optional[torch.Tensor], count: torch.Tensor,
              mode: int, grad: Optional[torch.Tensor] = None,
              tables: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """The hi/lo code GEMM S = (w·P_hi)ᵀ P_lo per codebook, with an epilogue chosen by ``mode``:
    0: per-tile entropy partials (C, tiles_h, tiles_l) of a = S/count (S never stored);
    1: dH/dS = -grad[c]·(log a + 1)/count, (C, 2^hi, 2^lo); 2: S itself, (C, 2^hi, 2^lo).
    ``pos``/``neg`` (T, C, D) fp32 contiguous; ``count`` 0-d; ``grad`` (C,) for mode 1; ``tables`` the
    result of :func:`code_tables` for these arguments (built here when None)."""
    t, c, d = pos.shape
    nh, nl = d // 2, d - d // 2
    tiles = _pair_tiles(nh, nl)
    if mode == 0:   # partials of the narrowest tile fit; fewer are written for wider tiles, the rest stay 0
        out = torch.zeros((c, triton.cdiv(1 << nh, min(bh for bh, _ in tiles)),
                           triton.cdiv(1 << nl, min(bl for _, bl in tiles))), dtype=torch.float32, device=pos.device)
    else:
        out = new_output((c, 1 << nh, 1 << nl), torch.float32, pos.device)
    if c == 0:
        return out
    hi, lo = tables if tables is not None else code_tables(pos, neg, weight)
    n = count.to(torch.float32).reshape(1).contiguous()
    g = grad.to(torch.float32).contiguous() if grad is not None else n
    so = (out.stride(0), 0, 0) if mode == 0 else out.stride()
    args = (hi, lo, n, g, out, t, nh, nl, hi.stride(0), hi.stride(1), lo.stride(0), lo.stride(1), so[0], so[1], so[2])

    def grid(meta):
        return (c, triton.cdiv(1 << nh, meta["BLOCK_H"]), triton.cdiv(1 << nl, meta["BLOCK_L"]))
    if KERNELS_INTERPRETED:   # one tile (the widest), few large token steps
        bh, bl = tiles[0]
        meta = dict(BLOCK_H=bh, BLOCK_L=bl, BLOCK_T=_block_t(t, _CUDA_PAIR["BLOCK_T"], 512))
        _lfq_code_pair_kernel[grid(meta)](*args, MODE=mode, PRECISION=PRECISION, **meta, **LAUNCH_OPTIONS)
    else:
        launch_tuned(_pair_tuned(mode, nh, nl), grid, *args, MODE=mode, PRECISION=PRECISION)
    return out


@on_input_device
def code_pair_bwd(pos: torch.Tensor, neg: torch.Tensor, weight: Optional[torch.Tensor], grad_sums: torch.Tensor,
                  tables: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients (T, C, D) fp32 w.r.t. pos/neg of <S, grad_sums>, grad_sums (C, 2^hi, 2^lo) any strides;
    ``tables`` as in :func:`code_pair`. Per side of the split: the gradient of its table (a GEMM with the other
    side's table), then through the table's products to its bits."""
    t, c, d = pos.shape
    nh, nl = d // 2, d - d // 2
    dev = pos.device
    dpos = new_output((t, c, d), torch.float32, dev)
    dneg = new_output((t, c, d), torch.float32, dev)
    if t * c * d == 0:
        return dpos, dneg
    hi, lo = tables if tables is not None else code_tables(pos, neg, weight)
    w = _weights(weight, t, dev)
    g = grad_sums.to(torch.float32)
    # side A receives its bits' gradients, side B (its table) is contracted; G_AB is G or Gᵀ through the
    # strides. The hi table carries w, so only side A = hi multiplies by it.
    for off_a, na, tab_b, nb, sa, sb, weighted in ((0, nh, lo, nl, g.stride(1), g.stride(2), 1),
                                                   (nh, nl, hi, nh, g.stride(2), g.stride(1), 0)):
        if na == 0:
            continue
        dtab = new_output((c, t, 1 << na), torch.float32, dev)
        block_a, block_b = _code_block(na), _code_block(nb, _PAIR_BWD_B_WIDEST)
        cfg = _pair_bwd_settings(block_a, block_b)
        block_t = _block_t(t, cfg["BLOCK_T"], 512)
        _lfq_code_pair_bwd_kernel[(triton.cdiv(t, block_t), triton.cdiv(1 << na, block_a), c)](
            tab_b, w, g, dtab, t, na, nb, tab_b.stride(0), tab_b.stride(1), g.stride(0), sa, sb,
            dtab.stride(0), dtab.stride(1), weighted, BLOCK_T=block_t, BLOCK_A=block_a, BLOCK_B=block_b,
            PRECISION=PRECISION, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **LAUNCH_OPTIONS)
        block_a, bits = _code_block(na, _TABLE_BWD_WIDEST), _block_bits(na)
        cfg = _CUDA_TABLE_BWD_BY_TILE.get(block_a, _CUDA_TABLE_BWD)
        block_t = _block_t(t, cfg["BLOCK_T"], 512)
        _lfq_code_table_bwd_kernel[(triton.cdiv(t, block_t), c)](
            # n_fix = max(NA - LOG_A, 0) is passed although the kernel could derive it: deriving it in-kernel
            # left the 64-code tile with an 8 B stack frame on sm_80 under triton 3.6 and 3.9
            dtab, pos, neg, dpos, dneg, t, c, d, off_a, na, max(na - block_a.bit_length() + 1, 0),
            dtab.stride(0), dtab.stride(1), BLOCK_T=block_t, LOG_A=block_a.bit_length() - 1, BLOCK_BITS=bits,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **LAUNCH_OPTIONS)
    return dpos, dneg
