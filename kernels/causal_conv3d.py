"""Causal 3-D convolution as implicit GEMMs in Triton: forward, grad input, grad weight (+ bias), SiLU backward.

Notation: x (B, C_in, T, H, W) read through its strides (NCDHW, channels_last_3d or any view), weight packed on
the host to (taps, C_in, C_out) with taps = kt*kh*kw (a copy of the weight only), output y
(B, C_out, T_out, H, W) with T_out = T // stride in the input's memory format.

The padded input is never built. A padded coordinate (tv, hv, wv) of output (to, h, w) and tap (i, j, k) is
``tv = to*stride + i*dilation - time_pad``, ``hv = h + j - kh//2``, ``wv = w + k - kw//2``; the kernels turn it
into a load by index arithmetic:

* constant mode: masked load (zero) outside the clip;
* replicate mode: coordinates clamped to the clip (first frame in time, borders in space);
* streaming: frames tv < 0 come from a second base pointer, the cache (B, C_in, Tc, H, W), at frame tv + Tc.

Grad input of the replicate mode: an input pixel p on a border receives the gradient of every padded position v
that clamps to it. The main grad-input launch sums the direct term (v = p) for every pixel; more launches
recompute border pixels (all of frame 0 when time is replicated, then the spatial border pixels grouped by
the halo they need: edge rows, edge columns, corners) summing over every v that clamps to p, and overwrite
them. No padded gradient buffer is built.

All offsets are int64. fp32 inputs use IEEE fp32 dots (no tf32); fp16/bf16 accumulate in fp32.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from fastsora.kernels import KERNELS_INTERPRETED
from fastsora.kernels.utils import LAUNCH_OPTIONS, autotuned, launch_tuned, new_output, on_input_device
from fastsora.reference.causal_conv3d import memory_format_of
from fastsora.registry import KernelConfig, register_kernel

# ----------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b, in exact fp32 ("ieee") when IEEE, else the default (tf32 for fp32 inputs on GPUs)."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _decode_position(m, T, H, W):
    """Flat position m = ((b*T + t)*H + h)*W + w (int32) -> (b as int64, t, h, w)."""
    w = m % W
    r = m // W
    h = r % H
    r = r // H
    return (r // T).to(tl.int64), r % T, h, w


@triton.jit
def _advance_position(b, t, h, w, db, dt, dh, dw, T, H, W):
    """Positions (b, t, h, w) advanced by a fixed step whose digits are (db, dt, dh, dw) (each below its
    radix): mixed-radix addition with carries, no division."""
    w = w + dw
    carry = w >= W
    w = tl.where(carry, w - W, w)
    h = h + dh + carry.to(tl.int32)
    carry = h >= H
    h = tl.where(carry, h - H, h)
    t = t + dt + carry.to(tl.int32)
    carry = t >= T
    t = tl.where(carry, t - T, t)
    return b + db + carry.to(tl.int32), t, h, w


@triton.jit
def _x_rows(x_ptr, c_ptr, xb, cb, tv, hv, wv, row_ok, H, W, Tc, sxc, sxt, sxh, sxw, scc, sct, sch, scw,
            REPLICATE: tl.constexpr, HAS_CACHE: tl.constexpr):
    """Per-row base pointers, channel strides and masks of the (virtually) padded input at padded coordinates
    (tv, hv, wv) (int32 vectors). Rows with tv < 0 point into the cache when there is one (frame tv + Tc).
    xb / cb: the rows' batch offsets (b * stride_b, int64)."""
    if REPLICATE:
        hh = tl.minimum(tl.maximum(hv, 0), H - 1)
        ww = tl.minimum(tl.maximum(wv, 0), W - 1)
        ok = row_ok
    else:
        hh = hv
        ww = wv
        ok = row_ok & (hv >= 0) & (hv < H) & (wv >= 0) & (wv < W)
    h64 = hh.to(tl.int64)
    w64 = ww.to(tl.int64)
    if HAS_CACHE:
        in_c = tv < 0
        p_x = x_ptr + (xb + tv.to(tl.int64) * sxt + h64 * sxh + w64 * sxw)
        p_c = c_ptr + (cb + (tv + Tc).to(tl.int64) * sct + h64 * sch + w64 * scw)
        rows = tl.where(in_c, p_c, p_x)
        cs = tl.where(in_c, scc, sxc).to(tl.int64)
    else:
        if REPLICATE:
            tt = tl.maximum(tv, 0)
        else:
            tt = tv
            ok = ok & (tv >= 0)
        rows = x_ptr + (xb + tt.to(tl.int64) * sxt + h64 * sxh + w64 * sxw)
        cs = tl.full(tv.shape, 0, tl.int64) + sxc
    return rows, cs, ok


@triton.jit
def _x_tile(rows, cs, ok, offs_c, C_in):
    """[BLOCK_M, BLOCK_K] input tile for the rows of :func:`_x_rows` and channels offs_c."""
    c_ok = offs_c < C_in
    return tl.load(rows[:, None] + offs_c.to(tl.int64)[None, :] * cs[:, None], mask=ok[:, None] & c_ok[None, :],
                   other=0.0)


@triton.jit
def _x_flat_tile(x_ptr, c_ptr, xb, cb, t_o, h_o, w_o, row_ok, offs_f, C_in, H, W, Tc, stride_t, dil_t, pad_t,
                 sxc, sxt, sxh, sxw, scc, sct, sch, scw, KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                 REPLICATE: tl.constexpr, HAS_CACHE: tl.constexpr):
    """[BLOCK_M, BLOCK_K] tile of the padded input where the K index runs over (tap, channel) flattened,
    f = tap * C_in + c (small C_in, e.g. the RGB input layer: no K-tile wasted on 3 channels)."""
    f_ok = offs_f < KT * KH * KW * C_in
    tap = offs_f // C_in
    c = offs_f % C_in
    i = tap // (KH * KW)
    j = (tap // KW) % KH
    k = tap % KW
    tv = t_o[:, None] * stride_t + (i * dil_t - pad_t)[None, :]
    hv = h_o[:, None] + (j - KH // 2)[None, :]
    wv = w_o[:, None] + (k - KW // 2)[None, :]
    ok = row_ok[:, None] & f_ok[None, :]
    if REPLICATE:
        hv = tl.minimum(tl.maximum(hv, 0), H - 1)
        wv = tl.minimum(tl.maximum(wv, 0), W - 1)
    else:
        ok = ok & (hv >= 0) & (hv < H) & (wv >= 0) & (wv < W)
    sp_x = hv.to(tl.int64) * sxh + wv.to(tl.int64) * sxw
    if HAS_CACHE:
        in_c = tv < 0
        p_x = x_ptr + (xb[:, None] + tv.to(tl.int64) * sxt + sp_x + (c.to(tl.int64) * sxc)[None, :])
        p_c = c_ptr + (cb[:, None] + (tv + Tc).to(tl.int64) * sct + hv.to(tl.int64) * sch + wv.to(tl.int64) * scw
                       + (c.to(tl.int64) * scc)[None, :])
        ptrs = tl.where(in_c, p_c, p_x)
    else:
        if REPLICATE:
            tv = tl.maximum(tv, 0)
        else:
            ok = ok & (tv >= 0)
        ptrs = x_ptr + (xb[:, None] + tv.to(tl.int64) * sxt + sp_x + (c.to(tl.int64) * sxc)[None, :])
    return tl.load(ptrs, mask=ok, other=0.0)


@triton.jit
def _causal_conv3d_fwd_kernel(
    x_ptr, c_ptr, w_ptr, b_ptr, r_ptr, y_ptr, z_ptr,
    M, C_in, H, W, C_out, T_out, Tc,
    sxb, sxc, sxt, sxh, sxw,
    scb, scc, sct, sch, scw,
    srb, src, srt, srh, srw,
    syb, syc, syt, syh, syw,
    stride_t, dil_t, pad_t,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    REPLICATE: tl.constexpr, HAS_CACHE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    ACT: tl.constexpr, STORE_PRE: tl.constexpr, IEEE: tl.constexpr, FLAT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[m, n] = act(sum_{tap, c} xpad[m, tap, c] * w[tap, c, n] + bias[n]) + res[m, n]; m = (b, to, h, w).
    With FLAT the reduction runs over f = tap * C_in + c in BLOCK_K steps (small C_in).

    Positions m and weight elements fit in int32 (checked on the host); every memory offset is int64."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    b64, t_o, h_o, w_o = _decode_position(offs_m, T_out, H, W)
    xb = b64 * sxb
    cb = b64 * scb
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < C_out
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    if FLAT:
        for f0 in range(0, KT * KH * KW * C_in, BLOCK_K):
            offs_f = f0 + offs_k
            a = _x_flat_tile(x_ptr, c_ptr, xb, cb, t_o, h_o, w_o, row_ok, offs_f, C_in, H, W, Tc, stride_t, dil_t,
                             pad_t, sxc, sxt, sxh, sxw, scc, sct, sch, scw, KT, KH, KW, REPLICATE, HAS_CACHE)
            wt = tl.load(w_ptr + offs_f[:, None] * C_out + offs_n[None, :],
                         mask=(offs_f < KT * KH * KW * C_in)[:, None] & n_ok[None, :], other=0.0)
            acc = _mma(a, wt, acc, IEEE)
    else:
        for tap in range(KT * KH * KW):
            i = tap // (KH * KW)
            j = (tap // KW) % KH
            k = tap % KW
            tv = t_o * stride_t + (i * dil_t - pad_t)
            hv = h_o + (j - KH // 2)
            wv = w_o + (k - KW // 2)
            rows, cs, ok = _x_rows(x_ptr, c_ptr, xb, cb, tv, hv, wv, row_ok, H, W, Tc, sxc, sxt, sxh, sxw,
                                   scc, sct, sch, scw, REPLICATE, HAS_CACHE)
            w_row = tap * C_in
            for c0 in range(0, C_in, BLOCK_K):
                offs_c = c0 + offs_k
                a = _x_tile(rows, cs, ok, offs_c, C_in)
                wt = tl.load(w_ptr + (w_row + offs_c)[:, None] * C_out + offs_n[None, :],
                             mask=(offs_c < C_in)[:, None] & n_ok[None, :], other=0.0)
                acc = _mma(a, wt, acc, IEEE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = row_ok[:, None] & n_ok[None, :]
    t64 = t_o.to(tl.int64)
    h64 = h_o.to(tl.int64)
    w64 = w_o.to(tl.int64)
    n64 = offs_n.to(tl.int64)
    y_off = (b64 * syb + t64 * syt + h64 * syh + w64 * syw)[:, None] + (n64 * syc)[None, :]
    if STORE_PRE:
        tl.store(z_ptr + y_off, acc.to(z_ptr.dtype.element_ty), mask=mask)
    if ACT == 1:
        acc = acc / (1.0 + tl.exp(-acc))
    if HAS_RES:
        r_off = (b64 * srb + t64 * srt + h64 * srh + w64 * srw)[:, None] + (n64 * src)[None, :]
        acc += tl.load(r_ptr + r_off, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _causal_conv3d_bwd_weight_kernel(
    x_ptr, c_ptr, g_ptr, dw_ptr, db_ptr,
    M, C_in, H, W, C_out, T_out, Tc, rows_per_split,
    sxb, sxc, sxt, sxh, sxw,
    scb, scc, sct, sch, scw,
    sgb, sgc, sgt, sgh, sgw,
    stride_t, dil_t, pad_t,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    REPLICATE: tl.constexpr, HAS_CACHE: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    FLAT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dw[tap, c, n] += sum_m xpad[m, tap, c] * g[m, n] over this program's rows [pid_s * rows_per_split, +
    rows_per_split) (rows_per_split a multiple of BLOCK_M; fp32 atomics); db[n] += sum_m g[m, n] (program 0 of
    axis 0). Grid (taps * C_in blocks, C_out blocks, splits of m); with FLAT, axis 0 runs over blocks of the
    flattened (tap, c) index instead (small C_in)."""
    pid0 = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_cb = (C_in + BLOCK_K - 1) // BLOCK_K
    tap = pid0 // n_cb
    cblk = pid0 % n_cb
    i = tap // (KH * KW)
    j = (tap // KW) % KH
    k = tap % KW
    offs_c = cblk * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_f = pid0 * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < C_out
    n64 = offs_n.to(tl.int64)
    acc = tl.full((BLOCK_K, BLOCK_N), 0.0, tl.float32)
    # bias gradient by a dot with a ones matrix (16 identical rows; row 0 is stored): no reduction builtin
    do_db = HAS_BIAS & (pid0 == 0)
    dbacc = tl.full((16, BLOCK_N), 0.0, tl.float32)
    m_begin = pid_s * rows_per_split
    m_end = tl.minimum(m_begin + rows_per_split, M)
    # the rows' positions are decoded once and then advanced by BLOCK_M per step (no division in the loop)
    b_o, t_o, h_o, w_o = _decode_position(m_begin + tl.arange(0, BLOCK_M), T_out, H, W)
    b_o = b_o.to(tl.int32)
    step_b, step_t, step_h, step_w = _decode_position(BLOCK_M + 0 * pid0, T_out, H, W)
    for m0 in range(0, rows_per_split, BLOCK_M):
        offs_m = m_begin + m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < m_end
        b64 = b_o.to(tl.int64)
        if FLAT:
            a = _x_flat_tile(x_ptr, c_ptr, b64 * sxb, b64 * scb, t_o, h_o, w_o, row_ok, offs_f, C_in, H, W, Tc,
                             stride_t, dil_t, pad_t, sxc, sxt, sxh, sxw, scc, sct, sch, scw, KT, KH, KW, REPLICATE,
                             HAS_CACHE)
        else:
            tv = t_o * stride_t + (i * dil_t - pad_t)
            hv = h_o + (j - KH // 2)
            wv = w_o + (k - KW // 2)
            rows, cs, ok = _x_rows(x_ptr, c_ptr, b64 * sxb, b64 * scb, tv, hv, wv, row_ok, H, W, Tc, sxc, sxt,
                                   sxh, sxw, scc, sct, sch, scw, REPLICATE, HAS_CACHE)
            a = _x_tile(rows, cs, ok, offs_c, C_in)
        g_off = (b64 * sgb + t_o.to(tl.int64) * sgt + h_o.to(tl.int64) * sgh + w_o.to(tl.int64) * sgw)[:, None] \
            + (n64 * sgc)[None, :]
        g = tl.load(g_ptr + g_off, mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mma(tl.trans(a), g, acc, IEEE)
        if do_db:
            ones = tl.full((16, BLOCK_M), 1.0, g.dtype)
            dbacc = _mma(ones, g, dbacc, IEEE)
        b_o, t_o, h_o, w_o = _advance_position(b_o, t_o, h_o, w_o, step_b.to(tl.int32), step_t, step_h, step_w,
                                               T_out, H, W)
    if FLAT:
        dw_off = offs_f[:, None] * C_out + offs_n[None, :]
        tl.atomic_add(dw_ptr + dw_off, acc, mask=(offs_f < KT * KH * KW * C_in)[:, None] & n_ok[None, :])
    else:
        dw_off = (tap * C_in + offs_c)[:, None] * C_out + offs_n[None, :]
        tl.atomic_add(dw_ptr + dw_off, acc, mask=(offs_c < C_in)[:, None] & n_ok[None, :])
    if do_db:
        first = tl.arange(0, 16) == 0
        tl.atomic_add(db_ptr + offs_n[None, :] + 0 * tl.arange(0, 16)[:, None], dbacc,
                      mask=first[:, None] & n_ok[None, :])


@triton.jit
def _causal_conv3d_bwd_input_kernel(
    g_ptr, w_ptr, dx_ptr, rows_ptr,
    R, C_in, T_rows, H, W, C_out, T_out,
    sgb, sgc, sgt, sgh, sgw,
    sxb, sxc, sxt, sxh, sxw,
    stride_t, dil_t, pad_t, halo_t, halo_h, halo_w, NT, NH, NW,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    ROW_LIST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx[p, c] = sum over taps and padded positions v that map to p of g[out(v, tap), n] * w[tap, c, n].

    Rows p = (b, t, h, w): all positions (flat index over B x T_rows x H x W) or, with ROW_LIST, the flat
    indices (over B x T x H x W) in rows_ptr. The padded positions of p are v in [lo, hi] per dimension,
    lo = p - halo at the first index (frame 0 / row 0 / column 0), hi = p + halo at the last row/column
    (replicate); halo 0 gives v = p.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_r < R
    if ROW_LIST:
        flat = tl.load(rows_ptr + offs_r, mask=row_ok, other=0).to(tl.int32)
    else:
        flat = offs_r
    b64, t_i, h_i, w_i = _decode_position(flat, T_rows, H, W)
    gb = b64 * sgb
    lo_t = tl.where(t_i == 0, t_i - halo_t, t_i)
    lo_h = tl.where(h_i == 0, h_i - halo_h, h_i)
    hi_h = tl.where(h_i == H - 1, h_i + halo_h, h_i)
    lo_w = tl.where(w_i == 0, w_i - halo_w, w_i)
    hi_w = tl.where(w_i == W - 1, w_i + halo_w, w_i)
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = offs_c < C_in
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    n_e = NT * NH * NW
    for tap in range(KT * KH * KW):
        i = tap // (KH * KW)
        j = (tap // KW) % KH
        k = tap % KW
        w_row = tap * C_in
        for e in range(0, n_e):
            vt = lo_t + e // (NH * NW)
            vh = lo_h + (e // NW) % NH
            vw = lo_w + e % NW
            num = vt + (pad_t - i * dil_t)
            t_o = num // stride_t
            h_o = vh + (KH // 2 - j)
            w_o = vw + (KW // 2 - k)
            ok = row_ok & (vt <= t_i) & (vh <= hi_h) & (vw <= hi_w)
            ok = ok & (num >= 0) & (num - t_o * stride_t == 0) & (t_o < T_out)
            ok = ok & (h_o >= 0) & (h_o < H) & (w_o >= 0) & (w_o < W)
            g_row = gb + t_o.to(tl.int64) * sgt + h_o.to(tl.int64) * sgh + w_o.to(tl.int64) * sgw
            for n0 in range(0, C_out, BLOCK_K):
                offs_n = n0 + offs_k
                n_ok = offs_n < C_out
                g = tl.load(g_ptr + g_row[:, None] + (offs_n.to(tl.int64) * sgc)[None, :],
                            mask=ok[:, None] & n_ok[None, :], other=0.0)
                wt = tl.load(w_ptr + (w_row + offs_c)[None, :] * C_out + offs_n[:, None],
                             mask=n_ok[:, None] & c_ok[None, :], other=0.0)
                acc = _mma(g, wt, acc, IEEE)
    x_off = (b64 * sxb + t_i.to(tl.int64) * sxt + h_i.to(tl.int64) * sxh + w_i.to(tl.int64) * sxw)[:, None] \
        + (offs_c.to(tl.int64) * sxc)[None, :]
    tl.store(dx_ptr + x_off, acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & c_ok[None, :])


@triton.jit
def _silu_bwd_kernel(dy_ptr, z_ptr, dz_ptr, N, S1, S2, S3, S4,
                     ya0, ya1, ya2, ya3, ya4, za0, za1, za2, za3, za4, BLOCK: tl.constexpr):
    """dz = dy * silu'(z) elementwise over a 5-D index space (sizes S0..S4, any strides for dy; z and dz share
    strides)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    i4 = offs % S4
    r = offs // S4
    i3 = r % S3
    r = r // S3
    i2 = r % S2
    r = r // S2
    i1 = r % S1
    i0 = r // S1
    y_off = i0 * ya0 + i1 * ya1 + i2 * ya2 + i3 * ya3 + i4 * ya4
    z_off = i0 * za0 + i1 * za1 + i2 * za2 + i3 * za3 + i4 * za4
    dy = tl.load(dy_ptr + y_off, mask=ok, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + z_off, mask=ok, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-z))
    # silu'(z) = s + z·s·(1 - s); the second term tends to 0 at ±inf (a pre-activation stored as ±inf in
    # fp16/bf16 that the fp32 epilogue activated to a finite value), where z·s·(1 - s) alone would be NaN
    curve = tl.where(tl.abs(z) < float("inf"), z * s * (1.0 - s), 0.0)
    dz = dy * (s + curve)
    tl.store(dz_ptr + z_off, dz.to(dz_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------------------

_TL = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

#: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per kernel kind, variant, arch and dtype class
#: ('lp' = fp16/bf16, 'fp32'). fwd / bwd-input: M = positions, N = output channels (fwd) or input channels
#: (bwd-input), K = channels reduced per step; bwd-weight: M = positions reduced, N = C_out, K = C_in.
#: Variant 'heavy' = the launches with more live state (fwd: cache / residual / stored pre-activation;
#: bwd-input: the border-row list; bwd-weight: cache or replicate clamping). Every tile listed here compiles
#: for its architecture with no spills and no stack frame under triton 3.4, 3.6 and 3.9, and under 3.5, 3.7 and
#: 3.8 but for the few in _STACK_IN_PLAIN_BUILD below (checked with cuobjdump; `bash scripts/compile_matrix.sh`),
#: which rules out the 128x128 tiles: the gathered implicit-GEMM operands need a 64-bit pointer per element.
#: The autotuner times the candidates of a key at its first launch.
_TABLE = {
    ("fwd", "plain", "lp"): [(128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 32, 8, 3)],
    ("fwd", "heavy", "lp"): [(64, 64, 32, 8, 3)],
    ("fwd", "plain", "fp32"): [(32, 64, 16, 4, 2)],
    ("fwd", "heavy", "fp32"): [(64, 64, 16, 8, 2), (32, 64, 16, 4, 2)],
    ("bwd_input", "plain", "lp"): [(64, 128, 32, 8, 3), (64, 64, 32, 8, 4), (64, 64, 32, 8, 3)],
    ("bwd_input", "heavy", "lp"): [(64, 64, 32, 8, 4), (64, 64, 32, 8, 3)],
    ("bwd_input", "plain", "fp32"): [(64, 32, 16, 8, 1), (32, 64, 16, 4, 1)],
    ("bwd_input", "heavy", "fp32"): [(32, 32, 16, 4, 1)],
    ("bwd_weight", "plain", "lp"): [(64, 64, 64, 8, 4), (64, 64, 64, 8, 3), (64, 64, 32, 8, 4), (32, 64, 64, 4, 3)],
    ("bwd_weight", "heavy", "lp"): [(64, 64, 64, 8, 4), (64, 64, 64, 8, 3), (64, 64, 32, 8, 4), (32, 64, 64, 4, 3)],
    ("bwd_weight", "plain", "fp32"): [(32, 32, 32, 4, 1)],
    # '_cl': input, cache and grad with unit channel stride (channels_last_3d) and channel counts and strides
    # that are multiples of 16, compiled as Triton's JIT specialises such a launch (those strides the constant
    # 1, the others divisible by 16): the gathered rows load as 16-byte vectors, so wider tiles fit and amortise
    # the per-row address work (per step 512 instructions per warp for 1 M MACs, against 294 for 262 k at
    # 64x64x64; triton 3.6, sm_90)
    ("bwd_weight", "plain_cl", "lp"): [(64, 128, 128, 8, 3), (64, 64, 64, 8, 4), (64, 64, 64, 8, 3),
                                       (64, 64, 32, 8, 4)],
    ("bwd_weight", "heavy_cl", "lp"): [(64, 128, 128, 8, 3), (64, 64, 64, 8, 4), (64, 64, 64, 8, 3),
                                       (64, 64, 32, 8, 4)],
    ("bwd_weight", "heavy", "fp32"): [(32, 32, 32, 8, 2)],
    # 'flat': (tap, channel) flattened into one reduction index for small C_in (the RGB input layer)
    ("fwd", "flat", "lp"): [(64, 64, 32, 8, 3)],
    ("fwd", "flat", "fp32"): [(32, 64, 16, 4, 2)],
    ("bwd_weight", "flat", "lp"): [(64, 64, 32, 8, 3), (32, 64, 32, 4, 3)],
    ("bwd_weight", "flat", "fp32"): [(32, 32, 32, 8, 2)],
}
#: per-architecture tables: the common table, plus deeper pipelines where the H100's 227 KiB of shared memory
#: allows them, with the entries where one architecture's compile spills replaced
_CONFIGS = {
    "sm_80": {**_TABLE,
              ("bwd_input", "plain", "lp"): [(64, 128, 32, 8, 4), (64, 128, 32, 8, 3), (64, 64, 32, 8, 3)],
              ("bwd_input", "heavy", "lp"): [(64, 64, 32, 8, 3)]},
    "sm_90": {**_TABLE,
              ("fwd", "plain", "lp"): [(128, 64, 32, 8, 4), (64, 128, 32, 8, 4), (128, 64, 32, 8, 3),
                                       (64, 128, 32, 8, 3), (64, 64, 64, 8, 3)],
              ("bwd_input", "plain", "fp32"): [(32, 64, 16, 4, 1), (32, 16, 16, 4, 1)],
              ("bwd_input", "heavy", "fp32"): [(32, 16, 16, 4, 1)]},
}
#: (kind, variant, dtype class, tile) -> releases under which the tile keeps a small stack frame (8 B) on an
#: architecture that may pick it, only in the build Triton's JIT makes when every integer argument is a multiple
#: of 16 (`fastsora compile --divisible-ints`; its plain builds are clean): under 3.6 and 3.9 every tile is clean
#: in both builds, under 3.4 (the oldest release supported) this one is not (sm_80), and no tile was clean there
#: in both builds under all three releases for the heavy variant; under 3.5 the fp32 32x64x16 one (sm_80)
_STACK_WITH_DIVISIBLE_INTS = {**{("bwd_input", variant, "lp", (64, 64, 32, 8, 3)): ("3.4",)
                                 for variant in ("plain", "heavy")},
                              ("bwd_input", "plain", "fp32", (32, 64, 16, 4, 1)): ("3.5",)}
#: (kind, variant, dtype class, tile) -> the releases between those above (3.5, 3.7, 3.8: the pins of torch 2.9,
#: 2.12 and 2.14) under which the tile keeps a small stack frame (8-56 B) on an architecture that may pick it, in
#: its plain build (so in both). Each slot but the fp32 grad weight (one candidate) keeps candidates clean under
#: every release; the autotuner still times these tiles there, since a spilled tile that measures faster is faster
_STACK_IN_PLAIN_BUILD = {("bwd_weight", "plain", "fp32", (32, 32, 32, 4, 1)): ("3.5",),
                         ("bwd_weight", "plain", "lp", (32, 64, 64, 4, 3)): ("3.7", "3.8"),
                         ("fwd", "plain", "lp", (64, 128, 32, 8, 3)): ("3.8",),
                         ("fwd", "plain", "lp", (64, 128, 32, 8, 4)): ("3.8",)}
#: one config in the interpreter: big tiles (the interpreter costs per loop iteration, not per element)
_INTERP = (256, 32, 32, 4, 1)
_INTERP_WGRAD = (256, 32, 32, 4, 1)
_SILU_BLOCK = 1024


def _arch(device: torch.device) -> str:
    major, _ = torch.cuda.get_device_capability(device)
    return "sm_90" if major >= 9 else "sm_80"


def _klass(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "lp"


def _variant(kind: str, consts: dict) -> str:
    if consts.get("FLAT"):
        return "flat"
    if kind == "fwd":
        heavy = consts["HAS_CACHE"] or consts["HAS_RES"] or consts["STORE_PRE"]
    elif kind == "bwd_input":
        heavy = consts["ROW_LIST"]
    else:
        heavy = consts["HAS_CACHE"] or consts["REPLICATE"]
    return "heavy" if heavy else "plain"


_KERNELS = {}
_KEYS = {
    "fwd": ["C_in", "C_out", "KT", "KH", "KW", "REPLICATE", "HAS_CACHE", "HAS_RES", "ACT", "STORE_PRE"],
    "bwd_input": ["C_in", "C_out", "KT", "KH", "KW", "ROW_LIST", "NT", "NH", "NW"],
    "bwd_weight": ["C_in", "C_out", "KT", "KH", "KW", "REPLICATE", "HAS_CACHE"],
}


@functools.lru_cache(maxsize=None)
def _tuned(kind: str, variant: str, arch: str, klass: str):
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=nw, num_stages=ns)
               for bm, bn, bk, nw, ns in _CONFIGS[arch][(kind, variant, klass)]]
    extra = {"reset_to_zero": ["dw_ptr", "db_ptr"]} if kind == "bwd_weight" else {}
    return autotuned(f"causal_conv3d {kind} {variant} {arch} {klass}", _KERNELS[kind], configs, _KEYS[kind], **extra)


def _launch(kind: str, kernel, grid, args: tuple, consts: dict, dtype: torch.dtype, device: torch.device,
            unit_channel_stride: bool = False):
    """Launch ``kernel``: one fixed config in the interpreter, the per-arch autotuned configs on CUDA
    (``unit_channel_stride``: the '_cl' table of the variant, where there is one)."""
    if KERNELS_INTERPRETED:
        bm, bn, bk, nw, ns = _INTERP_WGRAD if kind == "bwd_weight" else _INTERP
        meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
        kernel[grid(meta)](*args, **consts, **meta, num_warps=nw, num_stages=ns, **LAUNCH_OPTIONS)
    else:
        variant, arch, klass = _variant(kind, consts), _arch(device), _klass(dtype)
        if unit_channel_stride and (kind, variant + "_cl", klass) in _CONFIGS[arch]:
            variant += "_cl"
        launch_tuned(_tuned(kind, variant, arch, klass), grid, *args, **consts)


# ----------------------------------------------------------------------------------------------------------
# registration for `fastsora compile`
# ----------------------------------------------------------------------------------------------------------

def _sig(names: List[str], types: Dict[str, str]) -> Dict[str, str]:
    return {n: types.get(n, "i32") for n in names}


_VARIANT_CONSTS = {
    ("fwd", "plain"): dict(REPLICATE=True, HAS_CACHE=False, HAS_BIAS=True, HAS_RES=False, ACT=0, STORE_PRE=False,
                           FLAT=False),
    ("fwd", "heavy"): dict(REPLICATE=True, HAS_CACHE=True, HAS_BIAS=True, HAS_RES=True, ACT=1, STORE_PRE=True,
                           FLAT=False),
    ("fwd", "flat"): dict(REPLICATE=True, HAS_CACHE=True, HAS_BIAS=True, HAS_RES=True, ACT=1, STORE_PRE=True,
                          FLAT=True),
    ("bwd_input", "plain"): dict(ROW_LIST=False),
    ("bwd_input", "heavy"): dict(ROW_LIST=True),
    ("bwd_weight", "plain"): dict(REPLICATE=False, HAS_CACHE=False, HAS_BIAS=True, FLAT=False),
    ("bwd_weight", "heavy"): dict(REPLICATE=True, HAS_CACHE=True, HAS_BIAS=True, FLAT=False),
    ("bwd_weight", "flat"): dict(REPLICATE=True, HAS_CACHE=True, HAS_BIAS=True, FLAT=True),
}
# the '_cl' variants: their base variant with the channel strides of x, the cache and the gradient equal to 1
for _base in ("plain", "heavy"):
    _VARIANT_CONSTS[("bwd_weight", _base + "_cl")] = {**_VARIANT_CONSTS[("bwd_weight", _base)], "sxc": 1, "scc": 1,
                                                      "sgc": 1}


def _register() -> None:
    import inspect

    def argnames(kernel):
        fn = getattr(kernel, "fn", kernel)
        return list(inspect.signature(fn).parameters)

    _KERNELS.update(fwd=_causal_conv3d_fwd_kernel, bwd_input=_causal_conv3d_bwd_input_kernel,
                    bwd_weight=_causal_conv3d_bwd_weight_kernel)
    for kind, kernel in _KERNELS.items():
        names = argnames(kernel)
        # a tile shared by several archs is registered once, labelled with (and built by `fastsora compile`
        # for) the archs whose autotuner may pick it
        tiles: Dict[tuple, List[str]] = {}
        for arch, table in sorted(_CONFIGS.items()):
            for (k, variant, klass), rows in table.items():
                if k == kind:
                    for row in rows:
                        tiles.setdefault((variant, klass) + tuple(row), []).append(arch)
        configs = []
        for (variant, klass, bm, bn, bk, nw, ns), archs in tiles.items():
            archs = tuple(sorted(set(archs)))
            arch = "/".join(archs)
            for dtype in ((torch.float16, torch.bfloat16) if klass == "lp" else (torch.float32,)):
                t = _TL[dtype]
                consts = {"KT": 3, "KH": 3, "KW": 3, "IEEE": dtype == torch.float32,
                          "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, **_VARIANT_CONSTS[(kind, variant)]}
                if kind == "fwd":
                    types = {p: f"*{t}" for p in ("x_ptr", "c_ptr", "w_ptr", "b_ptr", "r_ptr", "y_ptr", "z_ptr")}
                elif kind == "bwd_input":
                    types = dict(g_ptr=f"*{t}", w_ptr=f"*{t}", dx_ptr=f"*{t}", rows_ptr="*i64")
                else:
                    types = dict(x_ptr=f"*{t}", c_ptr=f"*{t}", g_ptr=f"*{t}", dw_ptr="*fp32", db_ptr="*fp32")
                sig = _sig(names, types)
                for c in consts:
                    sig[c] = "constexpr"
                divisible = None
                if variant.endswith("_cl"):   # what the JIT assumes for a launch the '_cl' table serves
                    divisible = tuple(n for n, ty in sig.items() if ty.startswith("*")) + (
                        "C_in", "C_out") + tuple(f"s{t_}{d}" for t_ in "xcg" for d in "bthw")
                slot = (kind, variant, klass, (bm, bn, bk, nw, ns))
                configs.append(KernelConfig(f"{arch} {kind} {variant} {t} BM={bm} BN={bn} BK={bk} w{nw} s{ns}",
                                            sig, consts, nw, ns, archs=archs, divisible_by_16=divisible,
                                            known_stack_under=_STACK_IN_PLAIN_BUILD.get(slot, ()),
                                            known_stack_with_divisible_ints=_STACK_WITH_DIVISIBLE_INTS.get(slot, ())))
        register_kernel("causal_conv3d", kernel, configs)
    names = argnames(_silu_bwd_kernel)
    configs = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        t = _TL[dtype]
        sig = _sig(names, {"dy_ptr": f"*{t}", "z_ptr": f"*{t}", "dz_ptr": f"*{t}", "N": "i64"})
        sig["BLOCK"] = "constexpr"
        configs.append(KernelConfig(f"silu_bwd {t} BLOCK={_SILU_BLOCK}", sig, {"BLOCK": _SILU_BLOCK}, 4, 1))
    register_kernel("causal_conv3d", _silu_bwd_kernel, configs)


_register()


# ----------------------------------------------------------------------------------------------------------
# host launchers
# ----------------------------------------------------------------------------------------------------------

#: input channels up to which the kernels flatten (tap, channel) into one reduction index
FLAT_MAX_C_IN = 8


def _flat(C_in: int, has_cache: bool) -> bool:
    """Flatten (tap, channel) for small C_in; independent of the cache so that a streamed chunk accumulates
    in the same order as the one-call output (bitwise-equal slices)."""
    return C_in <= FLAT_MAX_C_IN


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, kt, kh, kw) -> (kt*kh*kw, C_in, C_out) contiguous (a copy of the weight only)."""
    c_out, c_in = weight.shape[:2]
    return weight.permute(2, 3, 4, 1, 0).reshape(-1, c_in, c_out).contiguous()


def batch_chunks(B: int, per_sample: int, max_positions: int) -> List[Tuple[int, int]]:
    """Batch ranges [b0, b1) covering [0, B) whose launches index at most ``max_positions`` positions
    (b, t, h, w) each: the kernels index positions in int32, so a batch whose B*T*H*W passes that is run as
    several launches on views of its samples (no copy). One sample must fit on its own."""
    if per_sample > max_positions:
        raise ValueError(f"causal_conv3d: one sample has {per_sample} positions (T*H*W), more than the "
                         f"{max_positions} one launch can index")
    step = max(1, max_positions // max(per_sample, 1))
    return [(b0, min(b0 + step, B)) for b0 in range(0, B, step)]


def _rows(t: Optional[torch.Tensor], b0: int, b1: int) -> Optional[torch.Tensor]:
    return t[b0:b1] if t is not None else None


@on_input_device
def causal_conv3d_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      residual: Optional[torch.Tensor], cache: Optional[torch.Tensor], stride: int, dilation: int,
                      time_pad: int, replicate: bool, activation: Optional[str], store_pre: bool,
                      max_positions: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Forward launch. x (B, C_in, T, H, W); weight (C_out, C_in, kt, kh, kw); bias (C_out,); residual
    (B, C_out, T_out, H, W); cache (B, C_in, Tc, H, W) = frames -Tc..-1 (time padding then comes from it).
    Returns y (B, C_out, T_out, H, W) in x's memory format and, with ``store_pre``, conv + bias (same shape).
    Batches of more than ``max_positions`` positions run as one launch per chunk of samples."""
    B, C_in, T, H, W = x.shape
    C_out = weight.shape[0]
    T_out = T // stride
    fmt = memory_format_of(x)
    y = new_output((B, C_out, T_out, H, W), x.dtype, x.device, memory_format=fmt)
    z = new_output((B, C_out, T_out, H, W), x.dtype, x.device, memory_format=fmt) if store_pre else None
    if B * T_out * H * W == 0 or C_out == 0:
        return y, z
    wp = pack_weight(weight)
    bias = bias.contiguous() if bias is not None else None   # the kernel reads bias[n] at b_ptr + n
    for b0, b1 in batch_chunks(B, T * H * W, max_positions):
        _fwd_launch(x[b0:b1], wp, weight.shape, bias, _rows(residual, b0, b1), _rows(cache, b0, b1), y[b0:b1],
                    _rows(z, b0, b1), stride, dilation, time_pad, replicate, activation)
    return y, z


def _fwd_launch(x, wp, w_shape, bias, residual, cache, y, z, stride, dilation, time_pad, replicate, activation):
    """One forward launch over all positions of x (fewer than 2^31)."""
    B, C_in, T, H, W = x.shape
    C_out, _, KT, KH, KW = w_shape
    T_out = T // stride
    M = B * T_out * H * W
    store_pre = z is not None
    has_cache = cache is not None and cache.shape[2] > 0
    c = cache if has_cache else x
    rs = residual.stride() if residual is not None else (0,) * 5
    args = (x, c, wp, bias if bias is not None else wp, residual if residual is not None else x, y,
            z if z is not None else y,
            M, C_in, H, W, C_out, T_out, c.shape[2] if has_cache else 0,
            *x.stride(), *c.stride(), *rs, *y.stride(), stride, dilation, time_pad)
    consts = dict(KT=KT, KH=KH, KW=KW, REPLICATE=bool(replicate), HAS_CACHE=has_cache, HAS_BIAS=bias is not None,
                  HAS_RES=residual is not None, ACT=1 if activation == "silu" else 0, STORE_PRE=bool(store_pre),
                  IEEE=x.dtype == torch.float32, FLAT=_flat(C_in, has_cache))

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(C_out, meta["BLOCK_N"]))
    _launch("fwd", _causal_conv3d_fwd_kernel, grid, args, consts, x.dtype, x.device)


@on_input_device
def silu_backward(dy: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """dz = dy * silu'(z), dz in z's layout (dy read through its strides)."""
    dz = new_output(z.shape, z.dtype, z.device, memory_format=memory_format_of(z))
    n = z.numel()
    if n == 0:
        return dz
    # walk the index space in z's physical order so z/dz accesses are coalesced
    order = sorted(range(5), key=lambda d: -z.stride(d))
    sizes = [z.shape[d] for d in order]
    ys = [dy.stride(d) for d in order]
    zs = [z.stride(d) for d in order]
    grid = (triton.cdiv(n, _SILU_BLOCK),)
    _silu_bwd_kernel[grid](dy, z, dz, n, sizes[1], sizes[2], sizes[3], sizes[4], *ys, *zs, BLOCK=_SILU_BLOCK,
                           **LAUNCH_OPTIONS)
    return dz


def _border_groups(B: int, T: int, H: int, W: int, ph: int, pw: int, split_frame0: bool, device: torch.device
                   ) -> List[Tuple[torch.Tensor, bool, bool, bool]]:
    """The spatial border pixels grouped by the halo they need, so each grad-input launch loops over the
    padded positions its rows really have: [(flat (b, t, h, w) indices, frame-0 rows?, h halo?, w halo?)].

    Groups: top/bottom rows (h halo only), left/right columns (w halo only), corners (both); each split into
    frame 0 and the other frames when frame 0 also has a time halo."""
    h = torch.arange(H, device=device)
    w = torch.arange(W, device=device)
    n_border = (H * W - max(H - 2, 0) * max(W - 2, 0)) * B * T
    if n_border < GROUP_MIN_ROWS:
        # few rows: one launch over all of them with the full halo (launches cost more than masked work)
        edge = ((h == 0) | (h == H - 1))[:, None] | ((w == 0) | (w == W - 1))[None, :]
        hw = edge.flatten().nonzero().flatten()
        bt = torch.arange(B * T, device=device)
        return [((bt[:, None] * (H * W) + hw[None, :]).flatten().to(torch.int64), True, True, True)]
    h_edge = (((h == 0) | (h == H - 1)) & (ph > 0))[:, None].expand(H, W)
    w_edge = (((w == 0) | (w == W - 1)) & (pw > 0))[None, :].expand(H, W)
    groups = []
    for need_h, need_w in ((True, False), (False, True), (True, True)):
        sel = (h_edge == need_h) & (w_edge == need_w)
        hw = sel.flatten().nonzero().flatten()
        if hw.numel() == 0:
            continue
        frame_sets = ((True, range(0, 1)), (False, range(1, T))) if split_frame0 else ((False, range(0, T)),)
        for frame0, ts in frame_sets:
            if len(ts) == 0:
                continue
            bt = torch.arange(B, device=device)[:, None] * T + torch.arange(ts.start, ts.stop, device=device)[None, :]
            rows = (bt.flatten()[:, None] * (H * W) + hw[None, :]).flatten().to(torch.int64)
            groups.append((rows, frame0, need_h, need_w))
    return groups


_BORDER_CACHE: Dict[tuple, list] = {}
#: below this many border pixels the replicate grad-input border pass is one launch instead of one per group
GROUP_MIN_ROWS = 4096


@on_input_device
def causal_conv3d_bwd(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, cache: Optional[torch.Tensor],
                      stride: int, dilation: int, time_pad: int, replicate: bool, has_bias: bool,
                      need_input: bool, need_weight: bool, max_positions: int
                      ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Grad input, grad weight and grad bias for the cotangent ``g`` of conv + bias (B, C_out, T_out, H, W)
    (after the activation's backward). The cache is a constant: no gradient flows into it. Batches of more than
    ``max_positions`` positions run as one set of launches per chunk of samples (grad weight and bias
    accumulate over the chunks)."""
    B, C_in, T, H, W = x.shape
    C_out, _, KT, KH, KW = weight.shape
    dx = dw = db = None
    dw32 = db32 = None
    if need_input:
        dx = new_output(x.shape, x.dtype, x.device, memory_format=memory_format_of(x))
    if need_weight:
        dw32 = torch.zeros((KT * KH * KW, C_in, C_out), dtype=torch.float32, device=x.device)
        db32 = torch.zeros((C_out,), dtype=torch.float32, device=x.device) if has_bias else dw32
    wp = pack_weight(weight) if need_input else None
    for b0, b1 in batch_chunks(B, T * H * W, max_positions):
        gb, xb, cb = g[b0:b1], x[b0:b1], _rows(cache, b0, b1)
        if need_input and dx.numel():
            _bwd_input_launches(gb, xb, wp, weight.shape, cb, dx[b0:b1], stride, dilation, time_pad, replicate)
        if need_weight:
            _bwd_weight_launch(gb, xb, weight.shape, cb, dw32, db32, stride, dilation, time_pad, replicate,
                               has_bias)
    if need_weight:
        dw = dw32.reshape(KT, KH, KW, C_in, C_out).permute(4, 3, 0, 1, 2).to(weight.dtype) \
            .contiguous(memory_format=memory_format_of(weight))
        if has_bias:
            db = db32.to(weight.dtype)
    return dx, dw, db


def _bwd_input_launches(g, x, wp, w_shape, cache, dx, stride, dilation, time_pad, replicate) -> None:
    """dx for all positions of x (fewer than 2^31): the direct term for every pixel, then frame 0 and the
    spatial border pixels recomputed with their halo where the padding replicates."""
    B, C_in, T, H, W = x.shape
    C_out, _, KT, KH, KW = w_shape
    T_out = g.shape[2]
    has_cache = cache is not None and cache.shape[2] > 0
    ph, pw = KH // 2, KW // 2
    halo_t = max(time_pad, 0) if (replicate and not has_cache) else 0
    halo_h, halo_w = (ph, pw) if replicate else (0, 0)

    def run(rows, R, T_rows, ht, hh, hw):
        nt, nh, nw = ht + 1, (hh + 1 if H > 1 else 2 * hh + 1), (hw + 1 if W > 1 else 2 * hw + 1)
        args = (g, wp, dx, rows if rows is not None else dx, R, C_in, T_rows, H, W, C_out, T_out,
                *g.stride(), *dx.stride(), stride, dilation, time_pad, ht, hh, hw, nt, nh, nw)
        consts = dict(KT=KT, KH=KH, KW=KW, ROW_LIST=rows is not None, IEEE=x.dtype == torch.float32)

        def grid(meta):
            return (triton.cdiv(R, meta["BLOCK_M"]), triton.cdiv(C_in, meta["BLOCK_N"]))
        _launch("bwd_input", _causal_conv3d_bwd_input_kernel, grid, args, consts, x.dtype, x.device)

    # 1) direct term for every pixel
    run(None, B * T * H * W, T, 0, 0, 0)
    # 2) frame 0 with the time halo (replicate in time): overwrite
    if halo_t > 0:
        run(None, B * H * W, 1, halo_t, 0, 0)
    # 3) spatial border pixels with their full halo (time halo too on frame 0): overwrite
    if halo_h > 0 or halo_w > 0:
        key = (B, T, H, W, halo_h, halo_w, halo_t > 0, GROUP_MIN_ROWS, x.device)
        groups = _BORDER_CACHE.get(key)
        if groups is None:
            groups = _border_groups(B, T, H, W, halo_h, halo_w, halo_t > 0, x.device)
            if len(_BORDER_CACHE) > 64:
                _BORDER_CACHE.clear()
            _BORDER_CACHE[key] = groups
        for rows, frame0, need_h, need_w in groups:
            # flat indices over (B, T, H, W); the time halo applies to t == 0 rows only
            run(rows, rows.numel(), T, halo_t if frame0 else 0, halo_h if need_h else 0, halo_w if need_w else 0)


#: on CUDA grad weight splits its positions over programs (fp32 atomics) in parts of about this many rows or more
SPLIT_MIN_ROWS = 1024


def _bwd_weight_launch(g, x, w_shape, cache, dw32, db32, stride, dilation, time_pad, replicate, has_bias) -> None:
    """dw32 (taps, C_in, C_out) and db32 (C_out,) += the contributions of all positions of x (fewer than 2^31),
    fp32 atomics."""
    B, C_in, T, H, W = x.shape
    C_out, _, KT, KH, KW = w_shape
    T_out = g.shape[2]
    M = B * T_out * H * W
    if M == 0:
        return
    taps = KT * KH * KW
    has_cache = cache is not None and cache.shape[2] > 0
    c = cache if has_cache else x
    args_base = (x, c, g, dw32, db32, M, C_in, H, W, C_out, T_out, c.shape[2] if has_cache else 0)
    strides = (*x.stride(), *c.stride(), *g.stride(), stride, dilation, time_pad)
    flat = _flat(C_in, has_cache)
    consts = dict(KT=KT, KH=KH, KW=KW, REPLICATE=bool(replicate), HAS_CACHE=has_cache,
                  HAS_BIAS=has_bias, IEEE=x.dtype == torch.float32, FLAT=flat)
    if KERNELS_INTERPRETED or torch.are_deterministic_algorithms_enabled():
        # one program per weight tile reduces every position: each element has one writer, so the
        # fp32 atomics add in a fixed order and the result is bit-reproducible
        splits = 1
    else:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        tiles = taps * triton.cdiv(C_in, 64) * triton.cdiv(C_out, 64)
        splits = max(1, min(triton.cdiv(M, SPLIT_MIN_ROWS), triton.cdiv(4 * sms, tiles)))
    # a multiple of every BLOCK_M (all divide 256): the splits tile [0, M) exactly
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), 256) * 256
    splits = triton.cdiv(M, rows_per_split)

    def grid(meta):
        rows = triton.cdiv(taps * C_in, meta["BLOCK_K"]) if flat else taps * triton.cdiv(C_in, meta["BLOCK_K"])
        return (rows, triton.cdiv(C_out, meta["BLOCK_N"]), splits)
    unit_c = not flat and x.stride(1) == 1 and c.stride(1) == 1 and g.stride(1) == 1 \
        and all(v % 16 == 0 for v in (C_in, C_out, *x.stride(), *c.stride(), *g.stride()) if v != 1)
    _launch("bwd_weight", _causal_conv3d_bwd_weight_kernel, grid, args_base + (rows_per_split,) + strides,
            consts, x.dtype, x.device, unit_channel_stride=unit_c)
