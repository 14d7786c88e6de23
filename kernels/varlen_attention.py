"""Varlen (packed) flash attention in Triton: forward, and a deterministic backward without atomics.

Layout: q (total_q, Hq, D), k/v (total_k, Hkv, D), any strides; int32 offsets ``cu_seqlens`` (batch + 1,).
GQA/MQA when Hq % Hkv == 0. Head dims up to 256; D is padded to the next power of two (at least 16) inside
the kernels with masks. Softmax is fp32 in exp2 form; the LSE (Hq, total_q) fp32 is saved for backward.

Scheduling (no host synchronisation, no precomputed work list): the work items of a launch over row blocks of
size BLOCK are numbered so that sequence ``s`` owns items ``[cu[s] // BLOCK + s, cu[s+1] // BLOCK + s + 1)``
- at least ceil(L_s / BLOCK) items, at most one more. Sequence index ``batch`` is the pseudo-sequence of the
rows past ``cu[-1]`` (they belong to no sequence; their outputs and gradients are written as zeros). The grid
is therefore ``total // BLOCK + batch + 1`` programs along axis 0 - a function of tensor shapes only - and a
program finds its sequence by a binary search over ``cu`` (monotone keys ``cu[s] // BLOCK + s``). Programs
whose block starts past their sequence's end exit at once: at most one per sequence. Skewed packs (one long
video among many small images) waste no other programs.

Kernels:
* ``_fwd_kernel``: grid (items over query blocks, Hq). Online softmax, O and LSE.
* ``_bwd_preprocess_kernel``: Δ = rowsum(dO ∘ O) (minus dLSE when the LSE output has a gradient).
* ``_bwd_dkdv_kernel``: grid (items over key blocks, Hkv); loops over the query heads of its GQA group and
  the query blocks that see the key block; writes dK, dV once (no atomics).
* ``_bwd_dq_kernel``: grid (items over query blocks, Hq); loops over visible key blocks; writes dQ once.

Causal masking: ``IS_CAUSAL`` with a runtime ``bottom_right`` flag: query i sees key j iff
j <= i + bottom_right * (Lk - Lq) (flash-attn 2: bottom-right; xformers' BlockDiagonalCausalMask: top-left).
Sliding windows (flash-attn's ``window_size``): ``IS_LOCAL`` with runtime ``win_left`` / ``win_right`` (-1:
unbounded): query i sees key j iff i + diag - win_left <= j <= i + diag + win_right, diag = bottom_right *
(Lk - Lq); causal windows pass win_right = 0 and IS_CAUSAL off. Every tile of a window is masked.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from fastsora.kernels import KERNELS_INTERPRETED
from fastsora.kernels.utils import LAUNCH_OPTIONS, autotuned, launch_tuned, new_output, on_input_device
from fastsora.registry import KernelConfig, register_kernel

LOG2E = 1.4426950408889634

# --------------------------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _rows8(stride_t, stride_h):
    """Token and head strides arrive in units of 8 elements (the launcher guarantees multiples of 8): scaled
    here, the compiler knows every row start is 16-byte aligned and vectorises the loads, whatever the JIT
    specialised the integer arguments to."""
    return stride_t * 8, stride_h * 8


@triton.jit
def _find_seq(CU, pid, batch, BLOCK: tl.constexpr):
    """Largest s in [0, batch] with cu[s] // BLOCK + s <= pid (binary search over the offsets)."""
    lo = pid * 0
    hi = lo + batch
    while lo < hi:
        mid = (lo + hi + 1) // 2
        key = tl.load(CU + mid) // BLOCK + mid
        ok = key <= pid
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    return lo


@triton.jit
def _seq_range(CU, seq, batch, total):
    """[start, end) rows of sequence ``seq``; seq == batch is the tail (rows past cu[-1] up to total)."""
    start = tl.load(CU + seq)
    end = tl.load(CU + tl.minimum(seq + 1, batch))
    end = tl.where(seq < batch, end, total)
    return start, end


# --------------------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _program_block(CU, pid, batch, total, BLOCK: tl.constexpr):
    """Program ``pid``'s work item over the blocks of the rows packed by ``CU``: its sequence, its block index
    within the sequence, the sequence's start and length. Programs past the sequence's last block get
    blk * BLOCK >= length (they exit)."""
    seq = _find_seq(CU, pid, batch, BLOCK)
    start, end = _seq_range(CU, seq, batch, total)
    blk = pid - (start // BLOCK + seq)
    return seq, blk, start, end - start


@triton.jit
def _seq_extent(CU, seq, batch):
    """Start and length of sequence ``seq`` in offsets ``CU`` (length 0 for the past-the-end pseudo-sequence)."""
    start = tl.load(CU + seq)
    end = tl.load(CU + tl.minimum(seq + 1, batch))
    return start, tl.where(seq < batch, end - start, 0)


@triton.jit
def _query_block_key_range(blk, diag, seqlen_k, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr):
    """Key range of query block ``blk``: [0, full_end) needs no mask (whole BLOCK_N tiles every row of the
    block sees), [full_end, hi) is masked; causal rows i see keys j <= i + diag."""
    if IS_CAUSAL:
        # keys every row of this block sees: j <= blk*BLOCK_M + diag; any row: j < (blk+1)*BLOCK_M + diag
        full_end = tl.minimum(blk * BLOCK_M + diag + 1, seqlen_k)
        hi = tl.minimum((blk + 1) * BLOCK_M + diag, seqlen_k)
    else:
        full_end = seqlen_k
        hi = seqlen_k
    full_end = tl.maximum(full_end, 0) // BLOCK_N * BLOCK_N
    hi = tl.maximum(hi, 0)
    return full_end, hi


@triton.jit
def _window_bounds(diag, seqlen_q, seqlen_k, win_left, win_right):
    """Offsets (lo, hi) of the window's band: query i sees keys i + lo <= j <= i + hi. An unbounded side (-1)
    and a side wider than the sequences become max(Lq, Lk), which reaches every key from every row. Every bound
    the window kernels form from these stays in int32 while the launch's query and key tokens together number
    fewer than MAX_WINDOW_TOKENS (the op refuses more)."""
    cap = tl.maximum(seqlen_q, seqlen_k)
    left = tl.where(win_left < 0, cap, tl.minimum(win_left, cap))
    right = tl.where(win_right < 0, cap, tl.minimum(win_right, cap))
    return diag - left, diag + right


@triton.jit
def _query_block_key_band(blk, band_lo, band_hi, seqlen_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys [lo, hi) some row of query block ``blk`` sees in a window; lo is a multiple of BLOCK_N."""
    lo = tl.maximum(blk * BLOCK_M + band_lo, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum((blk + 1) * BLOCK_M + band_hi, seqlen_k)
    return lo, tl.maximum(hi, lo)


@triton.jit
def _window_key_tiles(blk, diag, seqlen_q, seqlen_k, win_left, win_right, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """A query block's window: the band's offsets (lo, hi) and the keys [first, end) some row of the block sees."""
    band_lo, band_hi = _window_bounds(diag, seqlen_q, seqlen_k, win_left, win_right)
    first, end = _query_block_key_band(blk, band_lo, band_hi, seqlen_k, BLOCK_M, BLOCK_N)
    return band_lo, band_hi, first, end


@triton.jit
def _in_window(rows, cols, band_lo, band_hi):
    """Key ``cols`` within the window of query ``rows`` (sequence positions, broadcast against each other)."""
    # one unsigned comparison: an offset below band_lo wraps past the band's width
    return (cols - rows - band_lo).to(tl.uint32) <= (band_hi - band_lo).to(tl.uint32)


@triton.jit
def _load_full_kv_tile(k_ptrs, v_ptrs, mask_d, EVEN_D: tl.constexpr):
    """K and V tiles whose key rows are all in range (only padded head-dim columns are masked)."""
    if EVEN_D:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=mask_d[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=mask_d[None, :], other=0.0)
    return k, v


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, CU_Q, CU_K,
                stride_qt, stride_qh, stride_kt, stride_kh,
                stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
                total_q, batch, group, head_dim, qk_scale, bottom_right, win_left, win_right,
                IS_CAUSAL: tl.constexpr, IS_LOCAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr):
    stride_qt, stride_qh = _rows8(stride_qt, stride_qh)
    stride_kt, stride_kh = _rows8(stride_kt, stride_kh)
    stride_vt, stride_vh = _rows8(stride_vt, stride_vh)
    stride_ot, stride_oh = _rows8(stride_ot, stride_oh)
    hq = tl.program_id(1)
    seq, blk, q_start, seqlen_q = _program_block(CU_Q, tl.program_id(0), batch, total_q, BLOCK_M)
    if blk * BLOCK_M >= seqlen_q:
        return
    k_start, seqlen_k = _seq_extent(CU_K, seq, batch)
    hk = hq // group

    offs_m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seqlen_q
    mask_d = offs_d < head_dim
    rows_q = (q_start + offs_m).to(tl.int64)
    q_ptrs = Q + rows_q[:, None] * stride_qt + hq.to(tl.int64) * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)

    k_base = K + k_start.to(tl.int64) * stride_kt + hk.to(tl.int64) * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + hk.to(tl.int64) * stride_vh
    k_off = offs_n[:, None] * stride_kt + offs_d[None, :]
    v_off = offs_n[:, None] * stride_vt + offs_d[None, :]

    # the running max starts at the lowest finite float, not -inf: a row whose logits are all -inf from its data
    # (a -inf in q) then never computes -inf - (-inf) in the unmasked blocks and ends as a row with no visible
    # key (output 0, LSE +inf), whatever the key length and tile; every finite scaled logit is >= it
    m_i = tl.full([BLOCK_M], -3.4028234663852886e38, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    diag = bottom_right * (seqlen_k - seqlen_q)
    if IS_LOCAL:  # a window: the masked loop covers all of [full_end, hi)
        band_lo, band_hi, full_end, hi = _window_key_tiles(blk, diag, seqlen_q, seqlen_k, win_left, win_right,
                                                           BLOCK_M, BLOCK_N)
        k_base += full_end.to(tl.int64) * stride_kt
        v_base += full_end.to(tl.int64) * stride_vt
    else:
        full_end, hi = _query_block_key_range(blk, diag, seqlen_k, IS_CAUSAL, BLOCK_M, BLOCK_N)

    # blocks with no masking (none in a window: not even compiled there)
    if not IS_LOCAL:
        for start_n in range(0, full_end, BLOCK_N):
            k, v = _load_full_kv_tile(k_base + k_off, v_base + v_off, mask_d, EVEN_D)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
            m_i = m_new
            k_base += BLOCK_N * stride_kt
            v_base += BLOCK_N * stride_vt
    # boundary blocks: key range end and causal diagonal
    for start_n in range(full_end, hi, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < seqlen_k
        k = tl.load(k_base + k_off, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        v = tl.load(v_base + v_off, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        visible = mask_n[None, :]
        if IS_CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None] + diag)
        if IS_LOCAL:
            visible = visible & _in_window(offs_m[:, None], cols[None, :], band_lo, band_hi)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # never -inf since m_i starts at -FLT_MAX, so m_safe == m_new; the select stays because removing it left
        # 16-bit D=16 tiles with a stack frame on sm_80 (ints/16 build, triton 3.9)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
        k_base += BLOCK_N * stride_kt
        v_base += BLOCK_N * stride_vt

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) / 1.4426950408889634)
    o_ptrs = O + rows_q[:, None] * stride_ot + hq.to(tl.int64) * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    tl.store(LSE + hq.to(tl.int64) * stride_lh + rows_q, lse, mask=mask_m)


# --------------------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _bwd_preprocess_kernel(O, DO, DELTA, stride_ot, stride_oh, stride_dot, stride_doh,
                           stride_delh, total_q, head_dim, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    stride_ot, stride_oh = _rows8(stride_ot, stride_oh)
    stride_dot, stride_doh = _rows8(stride_dot, stride_doh)
    pid = tl.program_id(0)
    h = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < total_q)[:, None] & (offs_d < head_dim)[None, :]
    r64 = rows.to(tl.int64)
    o = tl.load(O + r64[:, None] * stride_ot + h.to(tl.int64) * stride_oh + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + r64[:, None] * stride_dot + h.to(tl.int64) * stride_doh + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + h.to(tl.int64) * stride_delh + r64, tl.sum(o * do, 1), mask=rows < total_q)


@triton.jit
def _dkdv_query_block(it, n_blocks, first, hk, group, offs_m, seqlen_q, q_base, do_base, lse_base, delta_base,
                      q_off, do_off, mask_d, stride_qt, stride_qh, stride_dot, stride_doh, stride_lh,
                      MASK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Item ``it`` of a dK/dV program's flat loop over (query head of the GQA group, query block from
    ``first``): its rows, Q and dO tiles (head-dim columns masked when MASK_D), log2-scaled LSE and Δ."""
    g = it // n_blocks
    start_m = first + (it - g * n_blocks) * BLOCK_M
    hq = (hk * group + g).to(tl.int64)
    rows = start_m + offs_m
    mask_m = rows < seqlen_q
    q_ptr = q_base + hq * stride_qh + start_m.to(tl.int64) * stride_qt
    do_ptr = do_base + hq * stride_doh + start_m.to(tl.int64) * stride_dot
    if MASK_D:
        q = tl.load(q_ptr + q_off, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        do = tl.load(do_ptr + do_off, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    else:
        q = tl.load(q_ptr + q_off, mask=mask_m[:, None], other=0.0)
        do = tl.load(do_ptr + do_off, mask=mask_m[:, None], other=0.0)
    lse = tl.load(lse_base + hq * stride_lh + rows, mask=mask_m, other=float("inf")) * 1.4426950408889634
    delta = tl.load(delta_base + hq * stride_lh + rows, mask=mask_m, other=0.0)
    return rows, q, do, lse, delta


@triton.jit
def _dkdv_accumulate(pT, q, v, do, delta, dk, dv, DOT_PREC: tl.constexpr):
    """dV += Pᵀ dO and dK += dSᵀ Q for one query block (P already masked; dS = P ∘ (dP − Δ))."""
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    dsT = pT * (dpT - delta[None, :])
    dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K,
                     stride_qt, stride_qh, stride_kt, stride_kh,
                     stride_vt, stride_vh, stride_dot, stride_doh,
                     stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
                     total_k, batch, group, head_dim, qk_scale, sm_scale, bottom_right, win_left, win_right,
                     IS_CAUSAL: tl.constexpr, IS_LOCAL: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr):
    stride_qt, stride_qh = _rows8(stride_qt, stride_qh)
    stride_kt, stride_kh = _rows8(stride_kt, stride_kh)
    stride_vt, stride_vh = _rows8(stride_vt, stride_vh)
    stride_dot, stride_doh = _rows8(stride_dot, stride_doh)
    stride_dkt, stride_dkh = _rows8(stride_dkt, stride_dkh)
    stride_dvt, stride_dvh = _rows8(stride_dvt, stride_dvh)
    hk = tl.program_id(1)
    seq, blk, k_start, seqlen_k = _program_block(CU_K, tl.program_id(0), batch, total_k, BLOCK_N)
    if blk * BLOCK_N >= seqlen_k:
        return
    q_start, seqlen_q = _seq_extent(CU_Q, seq, batch)

    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < seqlen_k
    mask_d = offs_d < head_dim
    rows_k = (k_start + offs_n).to(tl.int64)
    mask_kd = mask_n[:, None] & mask_d[None, :]
    k = tl.load(K + rows_k[:, None] * stride_kt + hk.to(tl.int64) * stride_kh + offs_d[None, :],
                mask=mask_kd, other=0.0)
    v = tl.load(V + rows_k[:, None] * stride_vt + hk.to(tl.int64) * stride_vh + offs_d[None, :],
                mask=mask_kd, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    diag = bottom_right * (seqlen_k - seqlen_q)
    if IS_CAUSAL:
        # query rows that see some key of the block: i >= blk*BLOCK_N - diag; all keys: i >= (blk+1)*BLOCK_N-1-diag
        lo = tl.maximum(blk * BLOCK_N - diag, 0) // BLOCK_M * BLOCK_M
        full_start = tl.maximum((blk + 1) * BLOCK_N - 1 - diag, 0)
        full_start = tl.minimum((full_start + BLOCK_M - 1) // BLOCK_M * BLOCK_M, seqlen_q)
        full_start = tl.maximum(full_start, lo)
        q_end = seqlen_q
    elif IS_LOCAL:
        # query rows that see some key of the block: j - band_hi <= i <= j - band_lo; every block masked
        band_lo, band_hi = _window_bounds(diag, seqlen_q, seqlen_k, win_left, win_right)
        lo = tl.maximum(blk * BLOCK_N - band_hi, 0) // BLOCK_M * BLOCK_M
        full_start = tl.maximum(tl.minimum((blk + 1) * BLOCK_N - band_lo, seqlen_q), lo)
        q_end = full_start
    else:
        lo = seqlen_q * 0
        full_start = lo
        q_end = seqlen_q
    q_base = Q + q_start.to(tl.int64) * stride_qt
    do_base = DO + q_start.to(tl.int64) * stride_dot
    q_off = offs_m[:, None] * stride_qt + offs_d[None, :]
    do_off = offs_m[:, None] * stride_dot + offs_d[None, :]
    # Two flat loops over (query head of the GQA group, query block) pairs: nested loops made ptxas keep the
    # outer loop's state on the stack.
    lse_base = LSE + q_start.to(tl.int64)
    delta_base = DELTA + q_start.to(tl.int64)
    # diagonal blocks (causal; every block of a window): mask by position
    n_diag = (full_start - lo + BLOCK_M - 1) // BLOCK_M
    for it in range(0, group * n_diag):
        rows, q, do, lse, delta = _dkdv_query_block(
            it, n_diag, lo, hk, group, offs_m, seqlen_q, q_base, do_base, lse_base, delta_base, q_off, do_off,
            mask_d, stride_qt, stride_qh, stride_dot, stride_doh, stride_lh, True, BLOCK_M)
        sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
        pT = tl.math.exp2(sT - lse[None, :])
        if IS_CAUSAL:
            pT = tl.where((offs_n[:, None] <= rows[None, :] + diag) & mask_n[:, None], pT, 0.0)
        if IS_LOCAL:
            pT = tl.where(_in_window(rows[None, :], offs_n[:, None], band_lo, band_hi) & mask_n[:, None], pT, 0.0)
        dk, dv = _dkdv_accumulate(pT, q, v, do, delta, dk, dv, DOT_PREC)
    # blocks where every key of the block is visible (all of them when not causal, none in a window)
    n_full = (q_end - full_start + BLOCK_M - 1) // BLOCK_M
    for it in range(0, group * n_full):
        rows, q, do, lse, delta = _dkdv_query_block(
            it, n_full, full_start, hk, group, offs_m, seqlen_q, q_base, do_base, lse_base, delta_base, q_off,
            do_off, mask_d, stride_qt, stride_qh, stride_dot, stride_doh, stride_lh, not EVEN_D, BLOCK_M)
        sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
        pT = tl.math.exp2(sT - lse[None, :])
        pT = tl.where(mask_n[:, None], pT, 0.0)  # keys past the sequence end (their rows are not stored)
        dk, dv = _dkdv_accumulate(pT, q, v, do, delta, dk, dv, DOT_PREC)

    dk = dk * sm_scale
    tl.store(DK + rows_k[:, None] * stride_dkt + hk.to(tl.int64) * stride_dkh + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=mask_kd)
    tl.store(DV + rows_k[:, None] * stride_dvt + hk.to(tl.int64) * stride_dvh + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=mask_kd)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
                   stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_vt, stride_vh, stride_dot, stride_doh,
                   stride_dqt, stride_dqh, stride_lh,
                   total_q, batch, group, head_dim, qk_scale, sm_scale, bottom_right, win_left, win_right,
                   IS_CAUSAL: tl.constexpr, IS_LOCAL: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr):
    stride_qt, stride_qh = _rows8(stride_qt, stride_qh)
    stride_kt, stride_kh = _rows8(stride_kt, stride_kh)
    stride_vt, stride_vh = _rows8(stride_vt, stride_vh)
    stride_dot, stride_doh = _rows8(stride_dot, stride_doh)
    stride_dqt, stride_dqh = _rows8(stride_dqt, stride_dqh)
    hq = tl.program_id(1)
    seq, blk, q_start, seqlen_q = _program_block(CU_Q, tl.program_id(0), batch, total_q, BLOCK_M)
    if blk * BLOCK_M >= seqlen_q:
        return
    k_start, seqlen_k = _seq_extent(CU_K, seq, batch)
    hk = hq // group

    offs_m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seqlen_q
    mask_d = offs_d < head_dim
    mask_md = mask_m[:, None] & mask_d[None, :]
    rows_q = (q_start + offs_m).to(tl.int64)
    q = tl.load(Q + rows_q[:, None] * stride_qt + hq.to(tl.int64) * stride_qh + offs_d[None, :],
                mask=mask_md, other=0.0)
    do = tl.load(DO + rows_q[:, None] * stride_dot + hq.to(tl.int64) * stride_doh + offs_d[None, :],
                 mask=mask_md, other=0.0)
    lse = tl.load(LSE + hq.to(tl.int64) * stride_lh + rows_q, mask=mask_m, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + hq.to(tl.int64) * stride_lh + rows_q, mask=mask_m, other=0.0)

    k_base = K + k_start.to(tl.int64) * stride_kt + hk.to(tl.int64) * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + hk.to(tl.int64) * stride_vh
    k_off = offs_n[:, None] * stride_kt + offs_d[None, :]
    v_off = offs_n[:, None] * stride_vt + offs_d[None, :]
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    diag = bottom_right * (seqlen_k - seqlen_q)
    if IS_LOCAL:  # a window: the masked loop covers all of [full_end, hi)
        band_lo, band_hi, full_end, hi = _window_key_tiles(blk, diag, seqlen_q, seqlen_k, win_left, win_right,
                                                           BLOCK_M, BLOCK_N)
        k_base += full_end.to(tl.int64) * stride_kt
        v_base += full_end.to(tl.int64) * stride_vt
    else:
        full_end, hi = _query_block_key_range(blk, diag, seqlen_k, IS_CAUSAL, BLOCK_M, BLOCK_N)

    if not IS_LOCAL:  # blocks with no masking (none in a window)
        for start_n in range(0, full_end, BLOCK_N):
            k, v = _load_full_kv_tile(k_base + k_off, v_base + v_off, mask_d, EVEN_D)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            p = tl.math.exp2(s - lse[:, None])
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
            k_base += BLOCK_N * stride_kt
            v_base += BLOCK_N * stride_vt
    for start_n in range(full_end, hi, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < seqlen_k
        k = tl.load(k_base + k_off, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        v = tl.load(v_base + v_off, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        visible = mask_n[None, :]
        if IS_CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None] + diag)
        if IS_LOCAL:
            visible = visible & _in_window(offs_m[:, None], cols[None, :], band_lo, band_hi)
        p = tl.where(visible, tl.math.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
        k_base += BLOCK_N * stride_kt
        v_base += BLOCK_N * stride_vt

    dq = dq * sm_scale
    tl.store(DQ + rows_q[:, None] * stride_dqt + hq.to(tl.int64) * stride_dqh + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=mask_md)


# --------------------------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------------------------

_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
BLOCK_DS = (16, 32, 64, 128, 256)
MAX_HEAD_DIM = 256
#: Tile sizes used under Triton's interpreter (CPU): large tiles, few loop iterations.
INTERPRETER_TILES = {"fwd": (32, 32), "dkdv": (32, 32), "dq": (32, 32)}


def block_d_for(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


#: Autotune candidates on CUDA: (BLOCK_M, BLOCK_N, num_warps, num_stages) per architecture, kernel, dtype class
#: ('16bit' = fp16/bf16 with tensor-core dots, 'fp32' = exact "ieee" dots on the FMA units) and padded head dim.
#: For dkdv, BLOCK_N is the key block a program owns and BLOCK_M the query rows per step. Every candidate
#: compiles for its architecture, in all variants (no mask or causal; power-of-two or padded D; for the window
#: variant see _NOT_IN_WINDOW), with no spill
#: and no stack frame under triton 3.4, 3.6 and 3.9 (AOT with the JIT's alignment hints) - except fp32 on sm_90 at
#: D = 128 (forward, dQ) and D = 256 (dQ): no candidate was clean under 3.4 (8-24 B stack frames), so these are
#: clean under 3.6 and 3.9 only (fp32 is the exact path, not the fast one). Under the releases between them (3.5,
#: 3.7, 3.8) a few more keep small stack frames, listed in _STACK_IN_PLAIN_BUILD below. Not yet timed on a GPU:
#: the autotuner times the candidates at the first launch of each key (``_TUNE_KEY``) and keeps the fastest.
_CANDIDATES = {
    "sm_80": {
        "16bit": {
            "fwd": {16: [(64, 64, 4, 3)],
                    32: [(128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3)],
                    64: [(128, 64, 8, 3), (128, 64, 8, 2)],
                    128: [(64, 64, 8, 2), (128, 32, 8, 2)],
                    256: [(32, 32, 8, 1)]},
            "dkdv": {16: [(64, 128, 8, 2), (32, 64, 4, 2)],
                     32: [(32, 128, 8, 2)],
                     64: [(16, 64, 8, 2)],
                     128: [(16, 64, 8, 2), (32, 32, 8, 2)],
                     256: [(16, 32, 8, 1), (16, 16, 8, 1)]},
            "dq": {16: [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
                   32: [(128, 32, 4, 3)],
                   64: [(128, 32, 8, 2), (64, 32, 4, 2)],
                   128: [(64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 8, 2)],
                   256: [(32, 32, 8, 1), (16, 32, 8, 1), (16, 16, 4, 1)]},
        },
        "fp32": {
            "fwd": {16: [(32, 16, 4, 1)], 32: [(32, 32, 4, 2)], 64: [(32, 32, 4, 1)],
                    128: [(32, 16, 4, 1)],
                    256: [(32, 16, 4, 1)]},
            "dkdv": {16: [(16, 32, 4, 1), (16, 16, 4, 1)], 32: [(16, 32, 4, 1)], 64: [(16, 16, 4, 1)],
                     128: [(16, 16, 4, 1)], 256: [(16, 32, 8, 1)]},
            "dq": {16: [(16, 16, 4, 1)], 32: [(32, 32, 4, 1)],
                   64: [(32, 32, 8, 1), (32, 32, 4, 1)], 128: [(32, 32, 8, 1)],
                   256: [(32, 32, 8, 1), (16, 16, 8, 1)]},
        },
    },
    "sm_90": {
        "16bit": {
            "fwd": {16: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
                    32: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
                    64: [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
                    128: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 8, 2)],
                    256: [(32, 32, 8, 2)]},
            "dkdv": {16: [(32, 128, 8, 2), (64, 128, 8, 2), (32, 64, 4, 2)],
                     32: [(32, 128, 8, 2), (64, 128, 8, 2), (32, 64, 4, 2)],
                     64: [(32, 128, 8, 2), (32, 64, 8, 2)],
                     128: [(16, 64, 8, 2), (32, 32, 8, 2)],
                     256: [(16, 32, 8, 1), (16, 16, 8, 1)]},
            "dq": {16: [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
                   32: [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
                   64: [(128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 4, 2)],
                   128: [(128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 8, 2)],
                   256: [(32, 32, 8, 1), (16, 16, 4, 1)]},
        },
        "fp32": {
            "fwd": {16: [(32, 32, 4, 1), (16, 32, 4, 1)], 32: [(32, 32, 4, 2), (32, 32, 4, 1)],
                    64: [(32, 32, 4, 1)], 128: [(16, 32, 8, 2)], 256: [(16, 16, 8, 3)]},
            "dkdv": {16: [(16, 32, 4, 1), (16, 16, 8, 1)], 32: [(16, 32, 4, 1)], 64: [(16, 16, 8, 1)],
                     128: [(16, 16, 4, 1), (16, 16, 8, 2)], 256: [(16, 16, 8, 1)]},
            "dq": {16: [(16, 32, 4, 1), (16, 16, 4, 1)], 32: [(32, 32, 4, 2)], 64: [(32, 32, 8, 1), (16, 16, 8, 1)],
                   128: [(16, 32, 8, 2)], 256: [(16, 16, 8, 3)]},
        },
    },
}
_KINDS = ("fwd", "dkdv", "dq")
#: (tag, IS_CAUSAL, IS_LOCAL): the mask variants every tile compiles in
_MASK_VARIANTS = (("", False, False), (" causal", True, False), (" window", False, True))
#: (arch, dtype class, kernel, padded D) -> releases under which a candidate keeps a small stack frame (8-24 B) in
#: the plain build: exact-fp32 slots under 3.4 (see above); under the releases between the three above (3.5, 3.7,
#: 3.8: the pins of torch 2.9, 2.12 and 2.14) some others, among them 16-bit dK/dV slots whose other candidates are
#: clean (the autotuner still times every candidate: a spilled tile that measures faster is faster)
_STACK_IN_PLAIN_BUILD = {
    ("sm_90", "fp32", "fwd", 128): ("3.4",), ("sm_90", "fp32", "dq", 128): ("3.4",),
    ("sm_90", "fp32", "dq", 256): ("3.4",),
    ("sm_80", "16bit", "dkdv", 16): ("3.7", "3.8"), ("sm_90", "16bit", "dkdv", 128): ("3.5",),
    ("sm_80", "fp32", "fwd", 256): ("3.7",), ("sm_90", "fp32", "fwd", 32): ("3.8",),
    ("sm_90", "fp32", "fwd", 256): ("3.5",),
    ("sm_90", "fp32", "dkdv", 128): ("3.8",), ("sm_90", "fp32", "dkdv", 256): ("3.8",),
}
#: (arch, dtype class, kernel, padded D) -> releases under which a candidate keeps a small stack frame (8-48 B)
#: only in the build Triton's JIT makes when every integer argument is a multiple of 16 (`fastsora compile
#: --divisible-ints`; the plain builds are clean). Under 3.6 and 3.9 only exact-fp32 slots where no candidate
#: tried was clean; 3.4 (the oldest release supported) also some 16-bit ones (see docs/varlen_attention.md), and
#: so do 3.7 and 3.8 (the sm_80 forward at D = 32 and the sm_90 one at D = 256).
_STACK_WITH_DIVISIBLE_INTS = {
    ("sm_80", "fp32", "dq", 128): ("3.4", "3.5", "3.6", "3.7", "3.8", "3.9"),
    ("sm_80", "fp32", "dq", 256): ("3.4", "3.5", "3.6", "3.7", "3.8", "3.9"),
    ("sm_90", "fp32", "fwd", 128): ("3.5", "3.6", "3.7", "3.8"),
    ("sm_90", "fp32", "fwd", 256): ("3.4", "3.6", "3.7", "3.8"),
    ("sm_80", "16bit", "fwd", 128): ("3.4",), ("sm_80", "16bit", "dq", 128): ("3.4",),
    ("sm_90", "16bit", "dq", 256): ("3.4",), ("sm_80", "16bit", "fwd", 32): ("3.7",),
    ("sm_90", "16bit", "fwd", 256): ("3.7", "3.8"),
    ("sm_80", "fp32", "fwd", 32): ("3.4",), ("sm_90", "fp32", "fwd", 32): ("3.4", "3.7"),
    ("sm_80", "fp32", "fwd", 64): ("3.4", "3.7", "3.8"), ("sm_90", "fp32", "fwd", 64): ("3.4", "3.7"),
    ("sm_80", "fp32", "fwd", 128): ("3.4", "3.5"), ("sm_80", "fp32", "dkdv", 64): ("3.4",),
    ("sm_80", "fp32", "dkdv", 128): ("3.4", "3.5"), ("sm_90", "fp32", "dkdv", 128): ("3.7",),
    ("sm_80", "fp32", "dq", 64): ("3.4",), ("sm_90", "fp32", "dq", 64): ("3.4",),
}
#: The window variant (IS_LOCAL) compiles to other code, where ptxas left small stack frames (8-16 B) in builds
#: that are clean in the other variants. Candidates it leaves out where its slot has clean ones, per (arch, dtype
#: class, kernel, padded D): sm_80 dQ 16x32 at D = 256 (plain build, triton 3.9) and 128x32 at D = 128 (plain,
#: 3.4); dK/dV 16x16 and sm_90 dQ 16x16 at D = 256 (launch specialisation, 3.6).
_NOT_IN_WINDOW = {("sm_80", "16bit", "dq", 256): ((16, 32, 8, 1),),
                  ("sm_80", "16bit", "dq", 128): ((128, 32, 8, 2),),
                  ("sm_80", "16bit", "dkdv", 256): ((16, 16, 8, 1),),
                  ("sm_90", "16bit", "dkdv", 256): ((16, 16, 8, 1),),
                  ("sm_90", "16bit", "dq", 256): ((16, 16, 4, 1),)}
#: Stack frames the window variant keeps beyond the tables above, in exact-fp32 slots: the sm_80 forward and dK/dV
#: at D = 256 in the plain build under 3.4; in the launch specialisation, at D = 32 the sm_80 dQ and the sm_90
#: forward under 3.6, and the sm_90 forward at D = 256 under 3.9; and some under 3.5, 3.7 and 3.8.
_WINDOW_STACK_IN_PLAIN_BUILD = {("sm_80", "fp32", "fwd", 256): ("3.4",), ("sm_80", "fp32", "dkdv", 256): ("3.4",),
                                ("sm_80", "fp32", "dkdv", 128): ("3.8",), ("sm_90", "fp32", "dq", 64): ("3.5",)}
_WINDOW_STACK_WITH_DIVISIBLE_INTS = {("sm_80", "fp32", "dq", 32): ("3.6", "3.7"),
                                     ("sm_90", "fp32", "fwd", 32): ("3.5", "3.6"),
                                     ("sm_90", "fp32", "fwd", 256): ("3.9",), ("sm_80", "fp32", "dq", 64): ("3.5",),
                                     ("sm_80", "fp32", "fwd", 64): ("3.5",)}


def _arch(device: torch.device) -> str:
    major, _ = torch.cuda.get_device_capability(device)
    return "sm_90" if major >= 9 else "sm_80"


def _klass(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def cuda_candidates(arch: str, kind: str, dtype: torch.dtype, block_d: int, local: bool = False
                    ) -> List[Tuple[int, int, int, int]]:
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages) the autotuner may pick on ``arch`` ('sm_80' or 'sm_90'), in
    the window variant when ``local``."""
    return _tiles(arch, _klass(dtype), kind, block_d, local)


def _tiles(arch: str, klass: str, kind: str, block_d: int, local: bool) -> List[Tuple[int, int, int, int]]:
    left_out = _NOT_IN_WINDOW.get((arch, klass, kind, block_d), ()) if local else ()
    return [tile for tile in _CANDIDATES[arch][klass][kind][block_d] if tile not in left_out]


def _dot_prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"




_RUNTIME_ARGS = {
    "fwd": ("Q", "K", "V", "O", "LSE", "CU_Q", "CU_K", "stride_qt", "stride_qh", "stride_kt", "stride_kh",
            "stride_vt", "stride_vh", "stride_ot", "stride_oh", "stride_lh", "total_q", "batch", "group", "head_dim",
            "qk_scale", "bottom_right", "win_left", "win_right"),
    "dkdv": ("Q", "K", "V", "DO", "LSE", "DELTA", "DK", "DV", "CU_Q", "CU_K", "stride_qt", "stride_qh", "stride_kt",
             "stride_kh", "stride_vt", "stride_vh", "stride_dot", "stride_doh", "stride_dkt", "stride_dkh",
             "stride_dvt", "stride_dvh", "stride_lh", "total_k", "batch", "group", "head_dim", "qk_scale",
             "sm_scale", "bottom_right", "win_left", "win_right"),
    "dq": ("Q", "K", "V", "DO", "LSE", "DELTA", "DQ", "CU_Q", "CU_K", "stride_qt", "stride_qh", "stride_kt",
           "stride_kh", "stride_vt", "stride_vh", "stride_dot", "stride_doh", "stride_dqt", "stride_dqh", "stride_lh",
           "total_q", "batch", "group", "head_dim", "qk_scale", "sm_scale", "bottom_right", "win_left", "win_right"),
}
_CONSTEXPRS = ("IS_CAUSAL", "IS_LOCAL", "BLOCK_M", "BLOCK_N", "BLOCK_D", "EVEN_D", "DOT_PREC")


def _signature(kind: str, dt: str) -> dict:
    def arg_type(name: str) -> str:
        if name in ("LSE", "DELTA"):
            return "*fp32"
        if name in ("CU_Q", "CU_K"):
            return "*i32"
        if name in ("qk_scale", "sm_scale"):
            return "fp32"
        return f"*{dt}" if name.isupper() else "i32"
    sig = {n: arg_type(n) for n in _RUNTIME_ARGS[kind]}
    sig.update({n: "constexpr" for n in _CONSTEXPRS})
    return sig


def _known_stack(tables: Sequence[dict], key: Tuple[str, str, int]):
    """A function of a tile's archs: the releases the ``tables`` list for (arch, *key) on any of them (a tile
    shared by both archs)."""
    return lambda archs: tuple(sorted({r for t in tables for a in archs for r in t.get((a, *key), ())}))


def _register() -> None:
    """Register every autotune candidate of every arch (a tile shared by both archs once, labelled with both)
    in every variant, and the preprocess kernel, for `fastsora compile`."""
    configs = {kind: [] for kind in _KINDS}
    pre = []
    for torch_dt, dt in _DTYPES.items():
        for block_d in BLOCK_DS:
            for kind, (mask, causal, local) in ((k, m) for k in _KINDS for m in _MASK_VARIANTS):
                archs_of = {}
                for arch in sorted(_CANDIDATES):
                    for tile in cuda_candidates(arch, kind, torch_dt, block_d, local):
                        archs_of.setdefault(tile, []).append(arch)
                key = (_klass(torch_dt), kind, block_d)
                known = _known_stack((_STACK_IN_PLAIN_BUILD,) + ((_WINDOW_STACK_IN_PLAIN_BUILD,) if local else ()),
                                     key)
                known_ints = _known_stack((_STACK_WITH_DIVISIBLE_INTS,)
                                          + ((_WINDOW_STACK_WITH_DIVISIBLE_INTS,) if local else ()), key)
                for (bm, bn, w, s), archs in archs_of.items():
                    for even_d in (True, False):
                        cx = dict(IS_CAUSAL=causal, IS_LOCAL=local, BLOCK_D=block_d, EVEN_D=even_d,
                                  DOT_PREC=_dot_prec(torch_dt), BLOCK_M=bm, BLOCK_N=bn)
                        tag = f"{dt} D={block_d}{'' if even_d else ' padded'}{mask}"
                        configs[kind].append(KernelConfig(f"{'/'.join(archs)} {kind} {tag} BM={bm} BN={bn} "
                                                          f"w{w} s{s}", _signature(kind, dt), cx, w, s,
                                                          archs=tuple(archs), known_stack_under=known(archs),
                                                          known_stack_with_divisible_ints=known_ints(archs)))
            sig = {"O": f"*{dt}", "DO": f"*{dt}", "DELTA": "*fp32"}
            sig.update({n: "i32" for n in ("stride_ot", "stride_oh", "stride_dot", "stride_doh",
                                           "stride_delh", "total_q", "head_dim")})
            sig.update(BLOCK_M="constexpr", BLOCK_D="constexpr")
            pre.append(KernelConfig(f"preprocess {dt} D={block_d}", sig,
                                    dict(BLOCK_M=_pre_block_m_cuda(block_d), BLOCK_D=block_d), 4, 1))
    register_kernel("varlen_attention", _fwd_kernel, configs["fwd"])
    register_kernel("varlen_attention", _bwd_preprocess_kernel, pre)
    register_kernel("varlen_attention", _bwd_dkdv_kernel, configs["dkdv"])
    register_kernel("varlen_attention", _bwd_dq_kernel, configs["dq"])


def _pre_block_m_cuda(block_d: int) -> int:
    return max(8, 2048 // block_d)


def _pre_block_m(block_d: int) -> int:
    return 64 if KERNELS_INTERPRETED else _pre_block_m_cuda(block_d)


_register()


# --------------------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------------------


_KERNELS = {"fwd": _fwd_kernel, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel}
#: What the autotuner's choice depends on besides the tensors' dtypes. Sequence lengths are left out on
#: purpose: packs change every step, and a re-tune per pack would cost more than it saves.
_TUNE_KEY = ["group", "IS_CAUSAL", "IS_LOCAL", "BLOCK_D", "EVEN_D", "DOT_PREC"]


@functools.lru_cache(maxsize=None)
def _tuned(kind: str, arch: str, klass: str, block_d: int, local: bool):
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
               for bm, bn, w, s in _tiles(arch, klass, kind, block_d, local)]
    return autotuned(f"varlen_attention {kind} {arch} {klass} D={block_d}{' window' if local else ''}",
                     _KERNELS[kind], configs, _TUNE_KEY)


def _launch(kind: str, rows: int, batch: int, heads: int, args: tuple, consts: dict, dtype: torch.dtype,
            device: torch.device) -> None:
    """Launch kernel ``kind`` over the (sequence, block) items of ``rows`` packed rows and ``heads`` heads: one
    fixed tile in the interpreter, the autotuned candidates of the device's architecture on CUDA. The
    blocked side is BLOCK_N for dkdv (key blocks) and BLOCK_M otherwise (query blocks)."""
    side = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"
    if KERNELS_INTERPRETED:
        bm, bn = INTERPRETER_TILES[kind]
        meta = {"BLOCK_M": bm, "BLOCK_N": bn}
        _KERNELS[kind][(_grid_items(rows, batch, meta[side]), heads)](*args, **consts, **meta, num_warps=4,
                                                                      num_stages=1, **LAUNCH_OPTIONS)
    else:
        grid = lambda meta: (_grid_items(rows, batch, meta[side]), heads)  # noqa: E731
        launch_tuned(_tuned(kind, _arch(device), _klass(dtype), consts["BLOCK_D"], consts["IS_LOCAL"]), grid, *args,
                     **consts)


def _consts(dtype: torch.dtype, head_dim: int, local: bool, causal: bool) -> dict:
    """The constexprs of the fwd/dkdv/dq kernels other than the tile."""
    block_d = block_d_for(head_dim)
    return dict(IS_CAUSAL=causal, IS_LOCAL=local, BLOCK_D=block_d, EVEN_D=block_d == head_dim,
                DOT_PREC=_dot_prec(dtype))


def _mask_args(causal_mode: int, window: Tuple[int, int]) -> Tuple[dict, Tuple[int, int, int]]:
    """The kernels' mask: (IS_CAUSAL / IS_LOCAL constexprs, (bottom_right, win_left, win_right)). A window
    ((left, right), -1 unbounded; aligned as the causal mode, bottom-right when there is none) runs the IS_LOCAL
    variant, with a causal mask folded in as right = 0; a causal mask alone - or the window (-1, 0), which is
    flash-attn's causal mask - the IS_CAUSAL one. A side past int32 is unbounded (no sequence is that long)."""
    left, right = (-1 if side > 2**31 - 1 else side for side in window)
    if causal_mode != 0:
        right = 0
    elif left < 0 and right == 0:
        causal_mode = 1
    if left >= 0 or (right >= 0 and causal_mode == 0):
        return dict(local=True, causal=False), (0 if causal_mode == 2 else 1, left, right)
    return dict(local=False, causal=causal_mode != 0), (1 if causal_mode == 1 else 0, -1, -1)


#: The window variant forms its band bounds in int32 from sequence lengths and window sides clamped to them
#: (sums of up to four such terms): a launch with a window takes fewer query and key tokens together than this.
MAX_WINDOW_TOKENS = 2 ** 29 - 1024


def window_unsupported(total_q: int, total_k: int) -> Optional[str]:
    """Why the window kernels cannot take q and k of these token counts (None when they can)."""
    if total_q + total_k >= MAX_WINDOW_TOKENS:
        return (f"a sliding window over {total_q} query and {total_k} key tokens (the window kernels take fewer "
                f"than {MAX_WINDOW_TOKENS} together: int32 band bounds)")
    return None


#: Largest token stride (elements) the kernels take in place. Within a tile they form row offsets as
#: ``offs[:, None] * stride_t`` and advance by ``BLOCK * stride_t`` in int32 (int64 tiles would double the
#: address registers); with tiles of at most MAX_TILE rows both stay below 2^31. Row and head starts are int64.
MAX_TILE = 256
MAX_TOKEN_STRIDE = 2 ** 31 // MAX_TILE


def _round8(d: int) -> int:
    return (d + 7) // 8 * 8


def token_size_unsupported(heads: int, d: int) -> Optional[str]:
    """Why a compact (tokens, heads, D) buffer cannot be used (None when it can): its token stride, heads x D
    padded to 8, must stay below MAX_TOKEN_STRIDE."""
    d8 = _round8(d)
    if heads * d8 >= MAX_TOKEN_STRIDE:
        return (f"heads x head dim = {heads} x {d8} elements per token (the kernels take fewer than "
                f"{MAX_TOKEN_STRIDE}: 2^31 / {MAX_TILE}-row tiles, int32 tile offsets)")
    return None


def _padded_d(heads: int, d: int) -> int:
    """D rounded up to a multiple of 8: the row length of a compact buffer, whose token stride is heads x that."""
    reason = token_size_unsupported(heads, d)
    if reason:   # the op refuses this input first (a BackendError); a direct launcher call gets this
        raise ValueError(reason)
    return _round8(d)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """A (tokens, heads, D) tensor whose head dim has unit stride, whose data pointer is 16-byte aligned and
    whose token and head strides are multiples of 8 elements (the kernels take them in units of 8, see _rows8:
    every row start is then provably aligned and loads vectorise), with a token stride below MAX_TOKEN_STRIDE
    and a head stride below 2^31 (_rows8 scales them in int32; the row and head indices they multiply are
    int64). Views of packed projections pass through; anything else is copied (into a buffer with D padded to a
    multiple of 8)."""
    if _is_aligned(t):
        return t
    d = t.shape[-1]
    d8 = _padded_d(t.shape[1], d)
    buf = t.new_zeros(t.shape[0], t.shape[1], d8)
    buf[..., :d] = t
    return buf[..., :d]


def _is_aligned(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 and t.stride(0) % 8 == 0 and t.stride(1) % 8 == 0 and t.data_ptr() % 16 == 0 \
        and t.stride(0) < MAX_TOKEN_STRIDE and t.stride(1) < 2 ** 31


def _new_aligned(shape, dtype, device) -> torch.Tensor:
    """Kernel output (NaN-poisoned under test) with 8-element-aligned strides."""
    d = shape[-1]
    return new_output(tuple(shape[:-1]) + (_padded_d(shape[1], d),), dtype, device)[..., :d]


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _st(t: torch.Tensor) -> Tuple[int, int]:
    """(token stride, head stride) of an aligned (tokens, heads, D) tensor, in units of 8 elements (see _rows8)."""
    return t.stride(0) // 8, t.stride(1) // 8


def _grid_items(total: int, batch: int, block: int) -> int:
    """Programs along axis 0: every sequence s owns cu[s]//block + s .. cu[s+1]//block + s (inclusive)."""
    return total // block + batch + 1


@on_input_device
def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
            softmax_scale: float, causal_mode: int, window: Tuple[int, int] = (-1, -1)
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. q (total_q, Hq, D), k/v (total_k, Hkv, D); cu_q/cu_k int32 (batch+1,) on
    q's device, already validated. causal_mode 0/1/2 (none / bottom-right / top-left); ``window`` (left, right),
    -1 unbounded: query i also sees only keys i + diag - left <= j <= i + diag + right, diag = Lk - Lq (0 when
    causal_mode is 2).
    Returns out (total_q, Hq, D) in q's dtype and lse (Hq, total_q) fp32."""
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    batch = cu_q.numel() - 1
    out = _new_aligned((total_q, hq, d), q.dtype, q.device)
    lse = new_output((hq, total_q), torch.float32, q.device)
    if total_q == 0 or hq == 0:
        return _dense(out), lse
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    flags, mask = _mask_args(causal_mode, window)
    _launch("fwd", total_q, batch, hq, (
        q, k, v, out, lse, cu_q, cu_k,
        *_st(q), *_st(k), *_st(v), *_st(out), lse.stride(0),
        total_q, batch, hq // hkv, d, float(softmax_scale) * LOG2E, *mask),
        _consts(q.dtype, d, **flags), q.dtype, q.device)
    return _dense(out), lse


@on_input_device
def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, softmax_scale: float, causal_mode: int,
             dlse: Optional[torch.Tensor] = None,
             grads: Optional[Tuple[Optional[torch.Tensor], ...]] = None, window: Tuple[int, int] = (-1, -1)
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch preprocess, dK/dV and dQ kernels. Returns dq, dk, dv shaped and typed like q, k, v. The mask
    (``causal_mode``, ``window``) as in :func:`forward`.
    ``dlse`` (Hq, total_q), optional: the gradient reaching the LSE output. ``grads``, optional: (dq, dk, dv)
    buffers to write instead of new ones (None items are allocated), each shaped and typed like its input,
    from :func:`new_grad_buffer` or views of one (the packed gradient of a qkv projection); they come back
    as given, not made dense."""
    total_q, hq, d = q.shape
    total_k, hkv, _ = k.shape
    batch = cu_q.numel() - 1
    given = (None, None, None) if grads is None else tuple(grads)
    dq, dk, dv = (_grad_buffer(name, g, t) for name, g, t in zip(("dq", "dk", "dv"), given, (q, k, v)))
    if do.dtype != q.dtype:
        do = do.to(q.dtype)
    q, k, v, out, do = (_aligned(t) for t in (q, k, v, out, do))
    block_d = block_d_for(d)
    delta = torch.empty((hq, total_q), dtype=torch.float32, device=q.device)
    lse = lse.contiguous()
    if total_q > 0 and hq > 0:
        pbm = _pre_block_m(block_d)
        _bwd_preprocess_kernel[(triton.cdiv(total_q, pbm), hq)](
            out, do, delta, *_st(out), *_st(do), delta.stride(0), total_q, d,
            BLOCK_M=pbm, BLOCK_D=block_d, num_warps=4, num_stages=1, **LAUNCH_OPTIONS)
        if dlse is not None:  # rows without a visible key (LSE +inf) take no LSE gradient: P is 0 there
            delta -= torch.where(torch.isinf(lse), 0.0, dlse.to(torch.float32))
    qk_scale = float(softmax_scale) * LOG2E
    flags, mask = _mask_args(causal_mode, window)
    common = _consts(q.dtype, d, **flags)
    if total_k > 0 and hkv > 0:
        _launch("dkdv", total_k, batch, hkv, (
            q, k, v, do, lse, delta, dk, dv, cu_q, cu_k,
            *_st(q), *_st(k), *_st(v), *_st(do), *_st(dk), *_st(dv), lse.stride(0),
            total_k, batch, hq // hkv, d, qk_scale, float(softmax_scale), *mask), common, q.dtype, q.device)
    if total_q > 0 and hq > 0:
        _launch("dq", total_q, batch, hq, (
            q, k, v, do, lse, delta, dq, cu_q, cu_k,
            *_st(q), *_st(k), *_st(v), *_st(do), *_st(dq), lse.stride(0),
            total_q, batch, hq // hkv, d, qk_scale, float(softmax_scale), *mask), common, q.dtype, q.device)
    return tuple(g if g is not None else _dense(t) for g, t in zip(given, (dq, dk, dv)))


def new_grad_buffer(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A (tokens, heads, D) buffer the backward kernels can write through any head slice of: a packed qkv (or kv)
    gradient whose (tokens, heads_i, D) views are passed to :func:`backward` as ``grads``."""
    return _new_aligned(tuple(shape), dtype, device)


def _grad_buffer(name: str, given: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if given is None:
        return _new_aligned(like.shape, like.dtype, like.device)
    if given.shape != like.shape or given.dtype != like.dtype or given.device != like.device \
            or not _is_aligned(given):
        raise ValueError(f"grads: the {name} buffer must be {tuple(like.shape)} {like.dtype} on {like.device} with "
                         f"unit stride along D, token and head strides multiples of 8 and a 16-byte aligned start "
                         f"(a new_grad_buffer or a head slice of one); got {tuple(given.shape)} {given.dtype} on "
                         f"{given.device}, strides {given.stride()}")
    return given
