"""Check and benchmark cases of fastsora.ops.varlen_attention (registered as op 'varlen_attention').

Case arguments: (q, k, v, cu_seqlens_q, cu_seqlens_k, causal_mode, softmax_scale, window) with q (total_q, Hq, D),
k/v (total_k, Hkv, D) grad leaves, int32 offsets, causal_mode 0 / 1 (bottom-right) / 2 (top-left), window the
sliding window (left, right) of flash-attn's ``window_size`` ((-1, -1): none).
``run`` and ``reference`` return (out, dq, dk, dv) for a fixed random cotangent.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, List, Optional, Sequence, Tuple

import torch

from fastsora.cases import step_thunk
from fastsora.reference.varlen_attention import NO_WINDOW
from fastsora.registry import Case, OpSpec, register_op
from fastsora.testing import grads
from fastsora.testing import packed_offsets as offsets

OP = "varlen_attention"


def visible_pairs(lq: Sequence[int], lk: Sequence[int], causal_mode: int,
                  window: Tuple[int, int] = NO_WINDOW) -> int:
    """Number of (query, key) pairs attended (the FLOP count is 4 * pairs * H * D)."""
    total = 0
    for a, b in zip(lq, lk):
        if causal_mode == 0 and window == NO_WINDOW:
            total += a * b
            continue
        diag = 0 if causal_mode == 2 else b - a
        right = 0 if causal_mode else window[1]
        for i in range(a):
            first = 0 if window[0] < 0 else max(0, i + diag - window[0])
            end = b if right < 0 else min(b, i + diag + right + 1)
            total += max(0, end - first)
    return total


def make_case(label: str, lq: Sequence[int], lk: Optional[Sequence[int]] = None, hq: int = 2, hkv: Optional[int] = None,
              d: int = 32, causal_mode: int = 0, scale: Optional[float] = None, extra_q: int = 0, extra_k: int = 0,
              window: Tuple[int, int] = NO_WINDOW, **meta: Any) -> Case:
    lk = list(lq) if lk is None else list(lk)
    hkv = hq if hkv is None else hkv

    def make(device, dtype):
        tq, tk = sum(lq) + extra_q, sum(lk) + extra_k
        mk = lambda n, h: torch.randn(n, h, d, device=device, dtype=torch.float32).to(dtype).requires_grad_(True)
        return (mk(tq, hq), mk(tk, hkv), mk(tk, hkv), offsets(lq, device), offsets(lk, device), causal_mode, scale,
                window)

    pairs = visible_pairs(lq, lk, causal_mode, window)
    return Case(label, make, flops=4.0 * pairs * hq * d,
                meta=dict(bwd_flops_factor=2.5, lq=list(lq), lk=list(lk), hq=hq, hkv=hkv, d=d, **meta))


def _op(q, k, v, cu_q, cu_k, causal_mode, scale, window, validate=False):
    from fastsora.ops.varlen_attention import _attention

    return _attention(q, k, v, cu_q, cu_k, 0.0, scale, causal_mode, validate, window)[0]


def run(q, k, v, cu_q, cu_k, causal_mode, scale, window):
    out = _op(q, k, v, cu_q, cu_k, causal_mode, scale, window, validate=True)
    return (out,) + tuple(grads(out, [q, k, v]))


def reference(q, k, v, cu_q, cu_k, causal_mode, scale, window):
    from fastsora.reference.varlen_attention import varlen_attention as ref

    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out, _ = ref(q, k, v, cu_q, cu_k, scale, causal_mode, window)
    return (out,) + tuple(grads(out, [q, k, v]))


def check_cases(device) -> List[Case]:
    if device.type == "cuda":
        return [
            make_case("navit d64 gqa", [256, 1024, 64, 576, 1, 0, 333], hq=8, hkv=2, d=64),
            make_case("video->text cross d72", [2048, 1500], [120, 77], hq=16, d=72),
            make_case("causal bottom-right d128 Lq!=Lk", [300, 1000, 7], [500, 900, 64], hq=4, d=128, causal_mode=1,
                      extra_q=5, extra_k=3),
            make_case("causal top-left d96", [200, 513], [300, 100], hq=4, hkv=1, d=96, causal_mode=2),
            make_case("self d256 scale", [129, 64, 700], hq=2, d=256, scale=0.3),
            make_case("window (300, 40) d72 gqa", [1000, 257, 3000], hq=8, hkv=2, d=72, window=(300, 40)),
            make_case("causal window 500 cross d128", [900, 2000], [1200, 1500], hq=4, d=128, causal_mode=1,
                      window=(500, -1)),
        ]
    return [
        make_case("tiny [1,0,5,17] d16", [1, 0, 5, 17], hq=2, d=16),
        make_case("cross causal gqa d72 tail", [3, 0, 40, 17], [7, 2, 33, 1], hq=4, hkv=2, d=72, causal_mode=1,
                  extra_q=3, extra_k=2),
        make_case("top-left causal mqa d32 scale", [9, 34], [40, 5], hq=3, hkv=1, d=32, causal_mode=2, scale=0.37),
        make_case("window (5, 2) gqa d16", [70, 3, 40], hq=4, hkv=2, d=16, window=(5, 2)),
    ]


# ----------------------------------------------------------------------------------------------------------
# benchmarks
# ----------------------------------------------------------------------------------------------------------


def _fastsora(args, mode):
    q, k, v, cu_q, cu_k, causal_mode, scale, window = args
    return step_thunk(lambda: _op(q, k, v, cu_q, cu_k, causal_mode, scale, window), (q, k, v), mode)


def _fastsora_qkvpacked(args, mode):
    """flash_attn_varlen_qkvpacked_func on the case's q, k, v stacked (self-attention cases): the same kernels,
    the backward writing one packed gradient (its time and peak memory against the separate-input row)."""
    from fastsora.ops.varlen_attention import flash_attn_varlen_qkvpacked_func

    q, k, v, cu_q, cu_k, causal_mode, scale, window = args
    if q.shape != k.shape or causal_mode == 2 or not torch.equal(cu_q, cu_k):  # (set-up only, not timed)
        return None
    qkv = torch.stack([q, k, v], 1).detach().requires_grad_(True)
    return step_thunk(lambda: flash_attn_varlen_qkvpacked_func(qkv, cu_q, None, 0.0, scale, causal_mode == 1,
                                                               window_size=window, validate=False), (qkv,), mode)


def _reference(args, mode):
    from fastsora.reference.varlen_attention import varlen_attention as ref

    q, k, v, cu_q, cu_k, causal_mode, scale, window = args
    longest = int(torch.diff(cu_q).max()) * int(torch.diff(cu_k).max()) if cu_q.numel() > 1 else 0
    if longest * q.shape[1] > (2**30 if q.device.type == "cuda" else 2**24):
        return None  # the per-sequence score matrix would not fit
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return step_thunk(lambda: ref(q, k, v, cu_q, cu_k, scale, causal_mode, window)[0], (q, k, v), mode)


def _dense_mask(cu_q: torch.Tensor, cu_k: torch.Tensor, tq: int, tk: int, causal_mode: int,
                window: Tuple[int, int] = NO_WINDOW) -> torch.Tensor:
    """(tq, tk) bool block-diagonal mask built on device without host synchronisation (causal and window as
    the op's: aligned to the bottom right unless causal_mode is 2)."""
    dev = cu_q.device
    iq = torch.arange(tq, device=dev)
    ik = torch.arange(tk, device=dev)
    sq = torch.searchsorted(cu_q[1:], iq, right=True)
    sk = torch.searchsorted(cu_k[1:], ik, right=True)
    mask = sq[:, None] == sk[None, :]
    if causal_mode or window != NO_WINDOW:
        pos_q = iq - cu_q[sq.clamp_max(cu_q.numel() - 1)]
        pos_k = ik - cu_k[sk.clamp_max(cu_k.numel() - 1)]
        if causal_mode != 2:
            lq = (cu_q[1:] - cu_q[:-1])
            lk = (cu_k[1:] - cu_k[:-1])
            diag = (lk - lq)[sq.clamp_max(lq.numel() - 1)]
        else:
            diag = torch.zeros_like(pos_q)
        offset = pos_k[None, :] - (pos_q + diag)[:, None]   # key position relative to the query's diagonal
        if causal_mode:
            mask &= offset <= 0
        if window[0] >= 0:
            mask &= offset >= -window[0]
        if window[1] >= 0:
            mask &= offset <= window[1]
    return mask


def _sdpa_dense(args, mode):
    import torch.nn.functional as F

    q, k, v, cu_q, cu_k, causal_mode, scale, window = args
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    if tq * tk > 2**31 or (q.device.type == "cpu" and tq * tk * hq > 2**26):
        return None

    def fn():
        mask = _dense_mask(cu_q, cu_k, tq, tk, causal_mode, window)
        kk, vv = k, v
        if hkv != hq:
            kk, vv = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kk.transpose(0, 1)[None],
                                             vv.transpose(0, 1)[None], attn_mask=mask, scale=scale)
        return out[0].transpose(0, 1)
    return step_thunk(fn, (q, k, v), mode)


_FLEX = {}


def _flex(args, mode):
    q, k, v, cu_q, cu_k, causal_mode, scale, window = args
    if q.device.type != "cuda":
        return None
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    if "fn" not in _FLEX:
        # every case (shapes, grad mode, mask) recompiles flex_attention's one code object; past Dynamo's
        # recompile limit (8) it would run uncompiled, materialising the scores, and be timed as FlexAttention:
        # raise the limit, and make hitting it an error row rather than such a timing (for the whole process: the
        # limit must hold at every timed call, where a guard can fail, and a bench runs in a process of its own)
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
            torch._dynamo.config.fail_on_recompile_limit_hit = True
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    flex = _FLEX["fn"]
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape

    def fn():
        dev = q.device
        sq = torch.searchsorted(cu_q[1:], torch.arange(tq, device=dev), right=True)
        sk = torch.searchsorted(cu_k[1:], torch.arange(tk, device=dev), right=True)
        start_q, start_k = cu_q[sq.clamp_max(cu_q.numel() - 1)], cu_k[sk.clamp_max(cu_k.numel() - 1)]
        # the diagonal of each query's sequence (bottom-right causal; 0 for top-left), per query: every tensor
        # the mask reads is sized by the token counts, not by the number of sequences
        diag = (cu_k[1:] - cu_k[:-1] - cu_q[1:] + cu_q[:-1])[sq.clamp_max(cu_q.numel() - 2)] \
            if causal_mode != 2 else torch.zeros_like(sq)

        def mask_mod(b, h, qi, ki):
            same = sq[qi] == sk[ki]
            if causal_mode == 0 and window == NO_WINDOW:
                return same
            offset = ki - start_k[ki] - (qi - start_q[qi] + diag[qi])   # relative to the query's diagonal
            if causal_mode:
                same = same & (offset <= 0)
            if window[0] >= 0:
                same = same & (offset >= -window[0])
            if window[1] >= 0:
                same = same & (offset <= window[1])
            return same
        block_mask = create_block_mask(mask_mod, None, None, tq, tk, device=dev)
        out = flex(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=block_mask,
                   scale=scale, enable_gqa=hq != hkv)
        return out[0].transpose(0, 1)
    return step_thunk(fn, (q, k, v), mode)


def _flash_style(args) -> Optional[Tuple[int, int]]:
    """max_seqlen_q and max_seqlen_k (host ints: setup only, outside the timed thunk) for the flash-attn-style
    baselines (torch varlen_attn, flash-attn), or None where they do not run: CPU, fp32, top-left causal."""
    q, _, _, cu_q, cu_k, causal_mode = args[:6]
    if q.device.type != "cuda" or q.dtype == torch.float32 or causal_mode == 2:
        return None
    return int(torch.diff(cu_q).max()), int(torch.diff(cu_k).max())


def _torch_varlen(args, mode):
    q, k, v, cu_q, cu_k, causal_mode, scale, window = args
    if (max_seqlens := _flash_style(args)) is None:
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if q.shape[1] != k.shape[1] and "enable_gqa" not in params:  # GQA needs a release with enable_gqa
        return None
    kwargs = dict(scale=scale) if scale is not None else {}
    if q.shape[1] != k.shape[1]:
        kwargs["enable_gqa"] = True
    if window != NO_WINDOW:  # flash-attn's window (its causal right side 0), in releases that take window_size
        if "window_size" not in params:
            return None
        kwargs["window_size"] = (window[0], 0 if causal_mode else window[1])
    elif causal_mode == 1:  # releases with is_causal take it; the others (torch 2.11, 2.13) mask by window_size
        if "is_causal" in params:
            kwargs["is_causal"] = True
        else:
            kwargs["window_size"] = (-1, 0)

    def fn():
        return varlen_attn(q, k, v, cu_q, cu_k, *max_seqlens, **kwargs)
    return step_thunk(fn, (q, k, v), mode)


def _flash_attn(args, mode):
    q, k, v, cu_q, cu_k, causal_mode, scale, window = args
    if (max_seqlens := _flash_style(args)) is None:
        return None
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return step_thunk(lambda: flash_attn_varlen_func(q, k, v, cu_q, cu_k, *max_seqlens, softmax_scale=scale,
                                                     causal=causal_mode == 1, window_size=window), (q, k, v), mode)


def _xformers(args, mode):
    q, k, v, cu_q, cu_k, causal_mode, scale, window = args
    if q.device.type != "cuda" or q.shape[1] != k.shape[1] or window != NO_WINDOW:
        return None
    try:
        from xformers.ops import fmha
    except ImportError:
        return None
    lq, lk = torch.diff(cu_q).tolist(), torch.diff(cu_k).tolist()
    cls = {0: fmha.attn_bias.BlockDiagonalMask, 1: fmha.attn_bias.BlockDiagonalCausalFromBottomRightMask,
           2: fmha.attn_bias.BlockDiagonalCausalMask}[causal_mode]
    bias = cls.from_seqlens(lq, lk)
    return step_thunk(lambda: fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias,
                                                              scale=scale)[0], (q, k, v), mode)


def _navit_image_lengths(total: int, patch: int = 16, seed: int = 0) -> List[int]:
    """Token counts of NaViT-style images of mixed sizes (aspect ratios and resolutions) filling ``total``."""
    import random

    rng = random.Random(seed)
    sides = [128, 192, 256, 320, 384, 448, 512]
    out: List[int] = []
    while sum(out) < total:
        n = (rng.choice(sides) // patch) * (rng.choice(sides) // patch)
        out.append(min(n, total - sum(out)))
    return out


def bench_cases(device) -> List[Case]:
    if device.type != "cuda":
        return [
            make_case("cpu pack [64,200,17,300] h4 d64", [64, 200, 17, 300], hq=4, d=64),
            make_case("cpu causal cross [128,256]->[77,300] h4 d64", [128, 256], [77, 300], hq=4, d=64,
                      causal_mode=1),
        ]
    cases: List[Case] = []
    total = 16384
    for d in (64, 128):
        h = 2048 // d
        for causal in (0, 1):
            for seqlen in (512, 1024, 2048, 4096, 8192, 16384):
                lens = [seqlen] * (total // seqlen)
                cases.append(make_case(f"flash protocol L={seqlen} d{d} h{h}{' causal' if causal else ''}", lens,
                                       hq=h, d=d, causal_mode=causal, protocol="flash-attn"))
    images = _navit_image_lengths(16384)
    cases.append(make_case(f"navit images x{len(images)} d72 h16", images, hq=16, d=72, protocol="navit"))
    cases.append(make_case(f"navit images x{len(images)} d64 h16 gqa4", images, hq=16, hkv=4, d=64, protocol="navit"))
    video = [12288] + _navit_image_lengths(4096, seed=1)
    cases.append(make_case(f"navit video 12288 + {len(video) - 1} images d72 h16", video, hq=16, d=72,
                           protocol="navit"))
    cases.append(make_case(f"navit video 12288 + {len(video) - 1} images d128 h16", video, hq=16, d=128,
                           protocol="navit"))
    # sliding windows: a long causal sequence with a 1k-key window, and the video pack with a local window
    cases.append(make_case("window causal 1024 L=16384 d128 h16", [16384], hq=16, d=128, causal_mode=1,
                           window=(1024, -1), protocol="window"))
    cases.append(make_case(f"window (256, 256) video 12288 + {len(video) - 1} images d72 h16", video, hq=16, d=72,
                           window=(256, 256), protocol="window"))
    cases.append(make_case("cross video 8x2048 -> text 8x120 d72 h16", [2048] * 8, [120] * 8, hq=16, d=72,
                           protocol="cross"))
    return cases


register_op(OpSpec(
    name=OP,
    family="varlen_attention",
    run=run,
    reference=reference,
    check_cases=check_cases,
    tolerance={torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2},
    bench_cases=bench_cases,
    bench_impls={"fastsora": _fastsora, "fastsora[qkvpacked]": _fastsora_qkvpacked, "reference": _reference,
                 "sdpa_dense": _sdpa_dense, "flex_attention": _flex, "torch_varlen_attn": _torch_varlen,
                 "flash_attn": _flash_attn, "xformers": _xformers},
    bench_modes=("fwd", "fwd+bwd"),
))
