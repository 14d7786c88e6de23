"""Check and benchmark cases of ``causal_conv3d`` (one call) and ``causal_conv3d_stream`` (chunked video).

CUDA bench shapes are those of REFERENCE §2: MAGVIT-v2 (conv_in k7 and residual k3 stages), the CogVideoX VAE
(480x720, 8-frame chunks), the Open-Sora 1.2 temporal VAE (90x160, 17 frames) and a Wan-like layer. Baselines:
``F.pad + F.conv3d`` on NCDHW and on channels_last_3d inputs (cuDNN; the JSON records its version), and for the
streamed video a CogVideoX-style ``torch.cat`` frame cache.
"""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from fastsora.cases import step_thunk
from fastsora.registry import Case, OpSpec, register_op
from fastsora.testing import grads

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _flops(b, ci, co, t, h, w, k, s):
    kt, kh, kw = k
    return 2.0 * b * co * (t // s) * h * w * ci * kt * kh * kw


def _bytes(b, ci, co, t, h, w, k, s, elt=2):
    return float(elt * (b * ci * t * h * w + b * co * (t // s) * h * w + co * ci * k[0] * k[1] * k[2]))


def _case(label, b, ci, co, t, h, w, k=(3, 3, 3), stride=1, dilation=1, pad_mode="constant", bias=True,
          activation=None, residual=False, layout="ncdhw", grad=True) -> Case:
    k = (k, k, k) if isinstance(k, int) else tuple(k)

    def make(device, dtype):
        x = torch.randn(b, ci, t, h, w, device=device, dtype=torch.float32).to(dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last_3d)
        elif layout == "noncontiguous":
            x = torch.randn(b, ci, t, h, 2 * w, device=device, dtype=torch.float32).to(dtype)[..., ::2]
        fan_in = ci * k[0] * k[1] * k[2]
        wt = (torch.randn(co, ci, *k, device=device, dtype=torch.float32) / fan_in ** 0.5).to(dtype)
        bs = torch.randn(co, device=device, dtype=torch.float32).to(dtype) if bias else None
        rs = torch.randn(b, co, t // stride, h, w, device=device, dtype=torch.float32).to(dtype) if residual else None
        if grad:
            for tt in (x, wt, bs, rs):
                if tt is not None:
                    tt.requires_grad_(True)
        return (x, wt, bs, rs, stride, dilation, pad_mode, activation)

    return Case(label, make, flops=_flops(b, ci, co, t, h, w, k, stride), bytes=_bytes(b, ci, co, t, h, w, k, stride),
                meta={"shape": (b, ci, co, t, h, w), "k": k, "layout": layout})


def _leaves(args) -> List[torch.Tensor]:
    return [t for t in args[:4] if isinstance(t, torch.Tensor) and t.requires_grad]


def _run(x, w, b, r, stride, dilation, pad_mode, activation) -> Tuple[torch.Tensor, ...]:
    from fastsora.ops.causal_conv3d import causal_conv3d

    y = causal_conv3d(x, w, b, stride=stride, dilation=dilation, pad_mode=pad_mode, activation=activation,
                      residual=r)
    leaves = _leaves((x, w, b, r))
    return (y, *grads(y, leaves)) if leaves else (y,)


def _reference(x, w, b, r, stride, dilation, pad_mode, activation) -> Tuple[torch.Tensor, ...]:
    from fastsora.reference.causal_conv3d import causal_conv3d

    y = causal_conv3d(x, w, b, stride=stride, dilation=dilation, pad_mode=pad_mode, activation=activation,
                      residual=r)
    leaves = _leaves((x, w, b, r))
    return (y, *grads(y, leaves)) if leaves else (y,)


def _check_cases(device) -> Sequence[Case]:
    if device.type == "cuda":
        return [
            _case("magvit-in k7 3->64 replicate", 1, 3, 64, 9, 64, 64, k=7, pad_mode="replicate"),
            _case("k3 64->64 constant", 1, 64, 64, 9, 64, 64),
            _case("k3 128->128 replicate cl3d silu+res", 1, 128, 128, 8, 60, 90, pad_mode="replicate",
                  activation="silu", residual=True, layout="channels_last"),
            _case("k3 128->256 stride2 replicate", 1, 128, 256, 8, 32, 48, stride=2, pad_mode="replicate"),
            _case("k(3,1,1) 256->256 dil2 noncontig", 2, 256, 256, 9, 16, 16, k=(3, 1, 1), dilation=2,
                  layout="noncontiguous"),
        ]
    return [
        _case("k3 10->6 constant", 1, 10, 6, 4, 5, 6),
        _case("k3 12->5 replicate dil2", 1, 12, 5, 5, 5, 6, dilation=2, pad_mode="replicate"),
        _case("k3 4->7 replicate stride2 silu+res cl3d", 1, 4, 7, 4, 5, 5, stride=2, pad_mode="replicate",
              activation="silu", residual=True, layout="channels_last"),
        _case("k(3,5,1) 3->5 dil2 nobias noncontig", 2, 3, 5, 5, 6, 5, k=(3, 5, 1), dilation=2, bias=False,
              layout="noncontiguous"),
    ]


def _bench_cases(device) -> Sequence[Case]:
    if device.type == "cuda":
        B = 2
        return [
            _case("magvit2 conv_in 3->64 k7 20x128x128", B, 3, 64, 20, 128, 128, k=7),
            _case("magvit2 res 64 k3 20x128x128", B, 64, 64, 20, 128, 128),
            _case("magvit2 res 128 k3 10x64x64", B, 128, 128, 10, 64, 64),
            _case("magvit2 res 256 k3 5x32x32", B, 256, 256, 5, 32, 32),
            _case("magvit2 res 512 k3 5x16x16", B, 512, 512, 5, 16, 16),
            _case("cogvideox 128 k3 8x480x720", 1, 128, 128, 8, 480, 720),
            _case("cogvideox 256 k3 8x240x360", 1, 256, 256, 8, 240, 360),
            _case("cogvideox 512 k3 8x60x90", 1, 512, 512, 8, 60, 90),
            _case("opensora 256 k3 17x90x160", 1, 256, 256, 17, 90, 160),
            _case("opensora 512 k3 17x90x160", 1, 512, 512, 17, 90, 160),
            _case("wan 128->512 k3 21x60x106", 1, 128, 512, 21, 60, 106),
        ]
    return [
        _case("k3 16->16 8x32x32", 1, 16, 16, 8, 32, 32),
        _case("k7 3->16 8x32x32", 1, 3, 16, 8, 32, 32, k=7),
    ]


def _channels_last(args):
    """The case's x, weight and residual in channels_last_3d (same values)."""
    x, w, b, r, *rest = args
    cl = [t if t is None else t.detach().contiguous(memory_format=torch.channels_last_3d)
          .requires_grad_(t.requires_grad) for t in (x, w, r)]
    return (cl[0], cl[1], b, cl[2], *rest)


def _impl(op: Callable, channels_last: bool):
    """fastsora's op or the F.pad + F.conv3d reference, on the case's inputs or their channels_last_3d copies."""
    def make(args, mode):
        args = _channels_last(args) if channels_last else args
        x, w, b, r, stride, dilation, pad_mode, activation = args
        return step_thunk(lambda: op()(x, w, b, stride=stride, dilation=dilation, pad_mode=pad_mode,
                                       activation=activation, residual=r), _leaves(args), mode)
    return make


def _fastsora_op():
    from fastsora.ops.causal_conv3d import causal_conv3d
    return causal_conv3d


def _reference_op():
    from fastsora.reference.causal_conv3d import causal_conv3d
    return causal_conv3d


register_op(OpSpec(
    name="causal_conv3d",
    family="causal_conv3d",
    run=_run,
    reference=_reference,
    check_cases=_check_cases,
    tolerance=TOL,
    bench_cases=_bench_cases,
    bench_impls={"fastsora": _impl(_fastsora_op, False), "fastsora[channels_last_3d]": _impl(_fastsora_op, True),
                 "F.pad+F.conv3d": _impl(_reference_op, False),
                 "F.pad+F.conv3d[channels_last_3d]": _impl(_reference_op, True)},
    bench_modes=("fwd", "bwd", "fwd+bwd"),
))


# ---------------------------------------------------------------------------------------------------------
# streamed video: chunks through a cache vs one call
# ---------------------------------------------------------------------------------------------------------

def _stream_case(label, b, ci, co, chunks, h, w, k=3, pad_mode="replicate", stride=1) -> Case:
    k = (k, k, k) if isinstance(k, int) else tuple(k)
    t = sum(chunks)

    def make(device, dtype):
        x = torch.randn(b, ci, t, h, w, device=device, dtype=torch.float32).to(dtype)
        wt = (torch.randn(co, ci, *k, device=device, dtype=torch.float32) / (ci * k[0] * k[1] * k[2]) ** 0.5
              ).to(dtype)
        bs = torch.randn(co, device=device, dtype=torch.float32).to(dtype)
        return (x, wt, bs, tuple(chunks), stride, pad_mode)

    return Case(label, make, flops=_flops(b, ci, co, t, h, w, k, stride), bytes=_bytes(b, ci, co, t, h, w, k, stride),
                meta={"chunks": tuple(chunks)})


def _stream_fastsora(x, w, b, chunks, stride, pad_mode) -> List[torch.Tensor]:
    from fastsora.ops.causal_conv3d import causal_conv3d
    from fastsora.reference.causal_conv3d import next_cache

    outs, cache, t0 = [], None, 0
    for n in chunks:
        xc = x[:, :, t0:t0 + n]
        outs.append(causal_conv3d(xc, w, b, stride=stride, pad_mode=pad_mode, cache=cache, streaming=True))
        cache = next_cache(xc, cache, w.shape[2], stride, 1, pad_mode)
        t0 += n
    return outs


def _stream_cat(x, w, b, chunks, stride, pad_mode) -> List[torch.Tensor]:
    """CogVideoX-style: keep the last frames, torch.cat them to the chunk, F.pad space, F.conv3d."""
    kt, kh, kw = w.shape[2:]
    tp = (kt - 1) + 1 - stride
    outs, cache, t0 = [], None, 0
    for n in chunks:
        xc = x[:, :, t0:t0 + n]
        if cache is None:
            cache = xc[:, :, :1].expand(-1, -1, tp, -1, -1) if pad_mode == "replicate" else \
                torch.zeros_like(xc[:, :, :1]).expand(-1, -1, tp, -1, -1)
        full = torch.cat([cache, xc], dim=2)
        padded = F.pad(full, (kw // 2, kw // 2, kh // 2, kh // 2, 0, 0), mode=pad_mode)
        outs.append(F.conv3d(padded, w, b, stride=(stride, 1, 1)))
        cache = full[:, :, full.shape[2] - tp:].clone()
        t0 += n
    return outs


def _stream_run(x, w, b, chunks, stride, pad_mode):
    with torch.no_grad():
        return (torch.cat(_stream_fastsora(x, w, b, chunks, stride, pad_mode), dim=2),)


def _stream_reference(x, w, b, chunks, stride, pad_mode):
    from fastsora.reference.causal_conv3d import causal_conv3d

    return (causal_conv3d(x, w, b, stride=stride, pad_mode=pad_mode, streaming=True),)


def _stream_check_cases(device) -> Sequence[Case]:
    if device.type == "cuda":
        return [_stream_case("cogvideox-like 128 [1,8,8] 60x90", 1, 128, 128, [1, 8, 8], 60, 90),
                _stream_case("rgb 3->64 k7 [1,4,4] 64x64", 1, 3, 64, [1, 4, 4], 64, 64, k=7)]
    return [_stream_case("k3 4->5 [1,2,3] replicate", 1, 4, 5, [1, 2, 3], 5, 6),
            _stream_case("k3 10->5 [1,2,3] replicate", 1, 10, 5, [1, 2, 3], 5, 6),
            _stream_case("k3 4->5 [2,4] constant stride2", 1, 4, 5, [2, 4], 5, 5, pad_mode="constant", stride=2)]


def _stream_bench_cases(device) -> Sequence[Case]:
    if device.type == "cuda":
        return [_stream_case("cogvideox 256 k3 [1,8,8,8] 240x360", 1, 256, 256, [1, 8, 8, 8], 240, 360),
                _stream_case("cogvideox 128 k3 [1,8,8,8] 480x720", 1, 128, 128, [1, 8, 8, 8], 480, 720)]
    return [_stream_case("k3 16->16 [1,4,4,4] 32x32", 1, 16, 16, [1, 4, 4, 4], 32, 32)]


def _stream_impl(fn):
    def make(args, mode):
        if mode != "fwd":
            return None

        def run():
            with torch.no_grad():
                return fn(*args)
        return run
    return make


register_op(OpSpec(
    name="causal_conv3d_stream",
    family="causal_conv3d",
    run=_stream_run,
    reference=_stream_reference,
    check_cases=_stream_check_cases,
    tolerance=TOL,
    bench_cases=_stream_bench_cases,
    bench_impls={"fastsora": _stream_impl(_stream_fastsora),
                 "torch.cat cache+F.pad+F.conv3d": _stream_impl(_stream_cat)},
    bench_modes=("fwd",),
))
