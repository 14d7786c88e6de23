"""Triton kernels of lookup-free quantization (LFQ) with exact entropies, and their host launchers.

* ``_lfq_quantize_fwd_kernel``: one pass over x (T, C, D) producing the straight-through output, the
  indices (MSB first), the per-bit probabilities σ(±z) (z = logit_scale·x) and per-program partial sums of
  the (weighted) per-sample entropy Σ_i h(σ(z_i)) and of the (weighted) squared commitment error.
* ``_lfq_quantize_bwd_kernel``: the elementwise gradient of all of the above w.r.t. x.
* ``_lfq_code_pair_kernel``: one (hi-code tile × lo-code tile) block of S = (w·P_hi)ᵀ P_lo, the hi/lo
  probability tables built on the fly from the per-bit probabilities (never stored), with an epilogue that
  either reduces the tile to its share of the entropy -Σ a·log a (a = S/N, MODE 0: the 2^D distribution is
  never stored), writes dH/dS = -g·(log a + 1)/N (MODE 1, backward) or writes S itself (MODE 2).
* ``_lfq_code_pair_bwd_kernel``: gradients of <S, G> w.r.t. the per-bit probabilities of one side of the
  split (hi or lo, chosen by the launch arguments): dP_A = w·P_B·G_ABᵀ, then through the products to bits.

Tiles over codes are at least 16 wide (``tl.dot`` needs M, N, K >= 16); codes beyond 2^bits are masked, so
small codebooks (D = 1..8) use the same kernels.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastsora.kernels import KERNELS_INTERPRETED
from fastsora.kernels.utils import new_output
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
        x = tl.load(x_row + c * stride_xc, mask=m2, other=0.0)
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
        com_acc += cw * _sum(diff * diff, axis=1)
        if with_entropy != 0:
            pos, neg, h, _ = _bit_stats(xf * logit_scale)
            tl.store(pos_ptr + o_offs, pos, mask=m2)
            tl.store(neg_ptr + o_offs, neg, mask=m2)
            ent_acc += ew * _sum(tl.where(m2, h, 0.0), axis=1)
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
        x = tl.load(x_row + c * stride_xc, mask=m2, other=0.0)
        xf = x.to(tl.float32)
        z = xf * logit_scale
        pos, neg, h, pn = _bit_stats(z)
        dz = ew[:, None] * coef_ent * (-z * pn)
        o_offs = o_row + c * D
        if has_gp != 0:
            gp = tl.load(gpos_ptr + o_offs, mask=m2, other=0.0)
            gn = tl.load(gneg_ptr + o_offs, mask=m2, other=0.0)
            dz += (gp - gn) * pn
        qf = tl.where(xf > 0, code_value, -code_value).to(x.dtype).to(tl.float32)
        dx = dz * logit_scale + cw[:, None] * coef_com * (xf - qf)
        if has_gout != 0:
            dx += tl.load(g_row + c * stride_gc, mask=m2, other=0.0).to(tl.float32)
        tl.store(dx_ptr + o_offs, dx.to(x.dtype), mask=m2)


@triton.jit
def _side_products(pos_ptr, neg_ptr, base, mask_t, codes, first_bit, n_bits, P):
    """P[t, j] *= Π_k p_k(bit k of code j), bits first_bit.. first_bit+n_bits-1 (MSB first)."""
    for i in range(0, n_bits):
        p1 = tl.load(pos_ptr + base + first_bit + i, mask=mask_t, other=0.0)
        p0 = tl.load(neg_ptr + base + first_bit + i, mask=mask_t, other=0.0)
        bit = (codes >> (n_bits - 1 - i)) & 1
        P = P * tl.where(bit[None, :] == 1, p1[:, None], p0[:, None])
    return P


@triton.jit
def _lfq_code_pair_kernel(pos_ptr, neg_ptr, w_ptr, n_ptr, g_ptr, out_ptr, T, C, D, NH, NL,
                          stride_oc, stride_oh, stride_ol,
                          MODE: tl.constexpr, BLOCK_T: tl.constexpr,
                          BLOCK_H: tl.constexpr, BLOCK_L: tl.constexpr, PRECISION: tl.constexpr):
    c = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_l = tl.program_id(2)
    jh = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    jl = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    valid_h = jh < (1 << NH)
    valid_l = jl < (1 << NL)
    acc = tl.full([BLOCK_H, BLOCK_L], 0.0, tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        mask_t = offs_t < T
        base = (offs_t * C + c) * D
        w = tl.load(w_ptr + offs_t, mask=mask_t, other=0.0).to(tl.float32)
        p_hi = tl.where(valid_h[None, :], w[:, None], 0.0)
        p_hi = _side_products(pos_ptr, neg_ptr, base, mask_t, jh, 0, NH, p_hi)
        p_lo = tl.where(mask_t[:, None] & valid_l[None, :], 1.0, 0.0)
        p_lo = _side_products(pos_ptr, neg_ptr, base, mask_t, jl, NH, NL, p_lo)
        acc += tl.dot(tl.trans(p_hi), p_lo, input_precision=PRECISION)
    valid = valid_h[:, None] & valid_l[None, :]
    o_offs = c.to(tl.int64) * stride_oc + jh[:, None].to(tl.int64) * stride_oh + jl[None, :] * stride_ol
    if MODE == 2:
        tl.store(out_ptr + o_offs, acc, mask=valid)
    else:
        n = tl.load(n_ptr)
        a = acc / n
        log_a = tl.log(tl.maximum(a, 1.1754943508222875e-38))
        if MODE == 0:
            ent = tl.where(valid & (a > 0), -a * log_a, 0.0)
            part = _sum(_sum(ent, axis=1), axis=0)
            n_tiles_h = tl.num_programs(1)
            n_tiles_l = tl.num_programs(2)
            tl.store(out_ptr + (c * n_tiles_h + pid_h) * n_tiles_l + pid_l, part)
        else:
            g = tl.load(g_ptr + c).to(tl.float32)
            tl.store(out_ptr + o_offs, -g * (log_a + 1.0) / n, mask=valid)


@triton.jit
def _lfq_code_pair_bwd_kernel(pos_ptr, neg_ptr, w_ptr, g_ptr, dpos_ptr, dneg_ptr, T, C, D,
                              OFF_A, NA, OFF_B, NB, stride_gc, stride_ga, stride_gb,
                              BLOCK_T: tl.constexpr, BLOCK_A: tl.constexpr,
                              BLOCK_B: tl.constexpr, BLOCK_BITS: tl.constexpr, PRECISION: tl.constexpr):
    pid_t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    mask_t = offs_t < T
    base = (offs_t * C + c) * D
    w = tl.load(w_ptr + offs_t, mask=mask_t, other=0.0).to(tl.float32)
    cols = tl.arange(0, BLOCK_BITS)
    acc_pos = tl.full([BLOCK_T, BLOCK_BITS], 0.0, tl.float32)
    acc_neg = tl.full([BLOCK_T, BLOCK_BITS], 0.0, tl.float32)
    g_base = g_ptr + c.to(tl.int64) * stride_gc
    for a0 in range(0, 1 << NA, BLOCK_A):
        ja = a0 + tl.arange(0, BLOCK_A)
        valid_a = ja < (1 << NA)
        d_pa = tl.full([BLOCK_T, BLOCK_A], 0.0, tl.float32)
        for b0 in range(0, 1 << NB, BLOCK_B):
            jb = b0 + tl.arange(0, BLOCK_B)
            valid_b = jb < (1 << NB)
            p_b = tl.where(mask_t[:, None] & valid_b[None, :], 1.0, 0.0)
            p_b = _side_products(pos_ptr, neg_ptr, base, mask_t, jb, OFF_B, NB, p_b)
            g = tl.load(g_base + ja[:, None].to(tl.int64) * stride_ga + jb[None, :].to(tl.int64) * stride_gb,
                        mask=valid_a[:, None] & valid_b[None, :], other=0.0).to(tl.float32)
            d_pa += tl.dot(p_b, tl.trans(g), input_precision=PRECISION)
        d_pa = d_pa * w[:, None]
        d_pa = tl.where(valid_a[None, :], d_pa, 0.0)
        for i in range(0, NA):
            excl = d_pa
            for k in range(0, NA):
                p1 = tl.load(pos_ptr + base + OFF_A + k, mask=mask_t, other=0.0)
                p0 = tl.load(neg_ptr + base + OFF_A + k, mask=mask_t, other=0.0)
                bit_k = (ja >> (NA - 1 - k)) & 1
                f = tl.where(bit_k[None, :] == 1, p1[:, None], p0[:, None])
                excl = excl * tl.where(k == i, 1.0, f)
            bit_i = ((ja >> (NA - 1 - i)) & 1)[None, :]
            s_pos = _sum(tl.where(bit_i == 1, excl, 0.0), axis=1)
            s_neg = _sum(tl.where(bit_i == 0, excl, 0.0), axis=1)
            acc_pos += tl.where(cols[None, :] == i, s_pos[:, None], 0.0)
            acc_neg += tl.where(cols[None, :] == i, s_neg[:, None], 0.0)
    offs = base[:, None] + OFF_A + cols[None, :]
    m2 = mask_t[:, None] & (cols[None, :] < NA)
    tl.store(dpos_ptr + offs, acc_pos, mask=m2)
    tl.store(dneg_ptr + offs, acc_neg, mask=m2)


# ---------------------------------------------------------------------------------------------- configs
#: Largest codebook dim the kernels take (indices are int64; each side of the split has <= 16 bits).
MAX_BITS = 32
#: Exact fp32 products in the code GEMMs: the entropies are compared with float64 to 1e-5.
PRECISION = "ieee"
_CUDA_QUANT = dict(ELEMENTS=512, num_warps=4, num_stages=1)   # BLOCK_T = ELEMENTS // BLOCK_D
#: Launch settings on CUDA. Each compiles with no spill and no stack frame for every code tile it is used with,
#: on sm_80 and sm_90, under triton 3.4, 3.6 and 3.9 (ptxas leaves small stack frames in some combinations
#: even far below the register limit, and which ones differs between releases, hence the per-tile table).
_CUDA_PAIR = dict(BLOCK_T=32, num_warps=4, num_stages=2)
_CUDA_PAIR_BWD = dict(BLOCK_T=32, num_warps=4, num_stages=2)
#: (BLOCK_A, BLOCK_B, BLOCK_BITS) -> settings of the pair backward where the default above spills
_CUDA_PAIR_BWD_BY_TILE = {(16, 16, 2): dict(BLOCK_T=16, num_warps=4, num_stages=2),
                          (16, 16, 4): dict(BLOCK_T=16, num_warps=4, num_stages=2),
                          (32, 32, 8): dict(BLOCK_T=64, num_warps=4, num_stages=2),
                          (64, 32, 8): dict(BLOCK_T=64, num_warps=8, num_stages=2),
                          (64, 32, 16): dict(BLOCK_T=64, num_warps=8, num_stages=2)}
#: (MODE, BLOCK_H, BLOCK_L) -> settings of the pair forward where the default above spills
_CUDA_PAIR_BY_TILE = {(2, 32, 32): dict(BLOCK_T=64, num_warps=4, num_stages=2)}


def _pair_settings(mode: int, block_h: int, block_l: int) -> dict:
    return _CUDA_PAIR_BY_TILE.get((mode, block_h, block_l), _CUDA_PAIR)


def _pair_bwd_settings(block_a: int, block_b: int, bits: int) -> dict:
    return _CUDA_PAIR_BWD_BY_TILE.get((block_a, block_b, bits), _CUDA_PAIR_BWD)


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


#: The backward's contracted side uses narrower tiles (register pressure: no spills on sm_80/sm_90).
_BWD_B_WIDEST = 32


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
                         num_warps=_CUDA_QUANT["num_warps"], num_stages=_CUDA_QUANT["num_stages"])
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
    """Every (BLOCK_H, BLOCK_L) the launcher picks for D = 1..MAX_BITS."""
    return sorted({(_code_block(d // 2), _code_block(d - d // 2)) for d in range(1, MAX_BITS + 1)})


def _pair_bwd_blocks():
    """Every (BLOCK_A, BLOCK_B, BLOCK_BITS) the launcher picks for both sides, D = 1..MAX_BITS."""
    found = set()
    for d in range(1, MAX_BITS + 1):
        nh, nl = d // 2, d - d // 2
        for na, nb in ((nh, nl), (nl, nh)):
            if na:
                found.add((_code_block(na), _code_block(nb, _BWD_B_WIDEST), _block_bits(na)))
    return sorted(found)


def _pair_configs():
    names = ["pos_ptr", "neg_ptr", "w_ptr", "n_ptr", "g_ptr", "out_ptr", "T", "C", "D", "NH", "NL",
             "stride_oc", "stride_oh", "stride_ol", "MODE", "BLOCK_T", "BLOCK_H", "BLOCK_L", "PRECISION"]
    types = ["*fp32"] * 6 + ["i32"] * 5 + ["i64"] * 3 + ["constexpr"] * 5
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
    names = ["pos_ptr", "neg_ptr", "w_ptr", "g_ptr", "dpos_ptr", "dneg_ptr", "T", "C", "D", "OFF_A", "NA", "OFF_B",
             "NB", "stride_gc", "stride_ga", "stride_gb", "BLOCK_T", "BLOCK_A", "BLOCK_B", "BLOCK_BITS",
             "PRECISION"]
    types = ["*fp32"] * 6 + ["i32"] * 7 + ["i64"] * 3 + ["constexpr"] * 5
    configs = []
    for ba, bb, bits in _pair_bwd_blocks():
        cfg = _pair_bwd_settings(ba, bb, bits)
        configs.append(KernelConfig(f"code pair bwd BLOCK_A={ba} BLOCK_B={bb} BITS={bits} T={cfg['BLOCK_T']}",
                                    _sig(names, types), dict(BLOCK_T=cfg["BLOCK_T"], BLOCK_A=ba, BLOCK_B=bb,
                                                             BLOCK_BITS=bits, PRECISION=PRECISION),
                                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    return configs


register_kernel("lfq", _lfq_quantize_fwd_kernel, _quantize_fwd_configs())
register_kernel("lfq", _lfq_quantize_bwd_kernel, _quantize_bwd_configs())
register_kernel("lfq", _lfq_code_pair_kernel, _pair_configs())
register_kernel("lfq", _lfq_code_pair_bwd_kernel, _pair_bwd_configs())


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
        num_stages=_CUDA_QUANT["num_stages"])
    return out, idx, pos, neg, part


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
        num_stages=_CUDA_QUANT["num_stages"])
    return dx


def code_pair(pos: torch.Tensor, neg: torch.Tensor, weight: Optional[torch.Tensor], count: torch.Tensor,
              mode: int, grad: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The hi/lo code GEMM S = (w·P_hi)ᵀ P_lo per codebook, with an epilogue chosen by ``mode``:
    0: per-tile entropy partials (C, tiles_h, tiles_l) of a = S/count (S never stored);
    1: dH/dS = -grad[c]·(log a + 1)/count, (C, 2^hi, 2^lo); 2: S itself, (C, 2^hi, 2^lo).
    ``pos``/``neg`` (T, C, D) fp32 contiguous; ``count`` 0-d; ``grad`` (C,) for mode 1."""
    t, c, d = pos.shape
    nh, nl = d // 2, d - d // 2
    bh, bl = _code_block(nh), _code_block(nl)
    grid = (c, triton.cdiv(1 << nh, bh), triton.cdiv(1 << nl, bl))
    shape = grid if mode == 0 else (c, 1 << nh, 1 << nl)
    out = new_output(shape, torch.float32, pos.device)
    if c == 0:
        return out
    n = count.to(torch.float32).reshape(1).contiguous()
    g = grad.to(torch.float32).contiguous() if grad is not None else n
    so = (0, 0, 0) if mode == 0 else out.stride()
    cfg = _pair_settings(mode, bh, bl)
    _lfq_code_pair_kernel[grid](
        pos, neg, _weights(weight, t, pos.device), n, g, out, t, c, d, nh, nl, so[0], so[1], so[2],
        MODE=mode, BLOCK_T=_block_t(t, cfg["BLOCK_T"], 512), BLOCK_H=bh, BLOCK_L=bl, PRECISION=PRECISION,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def code_pair_bwd(pos: torch.Tensor, neg: torch.Tensor, weight: Optional[torch.Tensor], grad_sums: torch.Tensor
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients (T, C, D) fp32 w.r.t. pos/neg of <S, grad_sums>, grad_sums (C, 2^hi, 2^lo) any strides."""
    t, c, d = pos.shape
    nh, nl = d // 2, d - d // 2
    dev = pos.device
    dpos = new_output((t, c, d), torch.float32, dev)
    dneg = new_output((t, c, d), torch.float32, dev)
    if t * c * d == 0:
        return dpos, dneg
    w = _weights(weight, t, dev)
    g = grad_sums.to(torch.float32)
    # side A receives its bits' gradients, side B is contracted; G_AB is G or Gᵀ through the strides
    for off_a, na, off_b, nb, sa, sb in ((0, nh, nh, nl, g.stride(1), g.stride(2)),
                                         (nh, nl, 0, nh, g.stride(2), g.stride(1))):
        if na == 0:
            continue
        block_a, block_b, bits = _code_block(na), _code_block(nb, _BWD_B_WIDEST), _block_bits(na)
        cfg = _pair_bwd_settings(block_a, block_b, bits)
        block_t = _block_t(t, cfg["BLOCK_T"], 512)
        _lfq_code_pair_bwd_kernel[(triton.cdiv(t, block_t), c)](
            pos, neg, w, g, dpos, dneg, t, c, d, off_a, na, off_b, nb, g.stride(0), sa, sb,
            BLOCK_T=block_t, BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_BITS=bits, PRECISION=PRECISION,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dpos, dneg
