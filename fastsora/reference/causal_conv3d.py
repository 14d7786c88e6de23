"""Plain-PyTorch causal 3-D convolution (magvit2-pytorch 0.5.1 semantics): the CPU path of the torch backend
and the float64 oracle of the tests.

This is the classic formulation everyone uses: ``F.pad`` (or ``torch.cat`` with a frame cache) of the input,
then ``F.conv3d``. The Triton kernels compute the same thing without materialising the padded input.

Semantics (``x``: (B, C_in, T, H, W), ``weight``: (C_out, C_in, kt, kh, kw), kh and kw odd):

* stride and dilation act on time only;
* time is padded at the front only, by ``time_pad = dilation * (kt - 1) + 1 - stride`` frames (a negative value
  crops frames from the front, as ``F.pad`` does), height by ``kh // 2`` and width by ``kw // 2`` on both sides;
* ``pad_mode='constant'`` pads with zeros, ``'replicate'`` repeats the first frame in time and the border pixels
  in space; when ``time_pad >= T`` a whole-clip call falls back to 'constant' (magvit2-pytorch does);
* output (B, C_out, T // stride, H, W); epilogue ``y = act(conv(x) + bias) + residual``.

Streaming: ``cache`` (B, C_in, max(time_pad, 0), H, W) holds the frames that precede ``x`` in the padded video
(real frames or padding frames); the short-clip fallback never applies to a streamed chunk.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

PAD_MODES = ("constant", "replicate")
ACTIVATIONS = (None, "silu")


def time_padding(kt: int, stride: int, dilation: int) -> int:
    """Front time padding of magvit2-pytorch's CausalConv3d: dilation * (kt - 1) + (1 - stride)."""
    return dilation * (kt - 1) + (1 - stride)


def effective_pad_mode(pad_mode: str, time_pad: int, frames: int, streaming: bool) -> str:
    """magvit2-pytorch's short-clip fallback: 'constant' when time_pad >= T (whole-clip calls only)."""
    if pad_mode == "replicate" and not streaming and time_pad >= frames:
        return "constant"
    return pad_mode


def cache_frames(kt: int, stride: int, dilation: int) -> int:
    """Frames a streaming cache holds: the time padding, or 0 when it is not positive."""
    return max(time_padding(kt, stride, dilation), 0)


def next_cache(x: torch.Tensor, cache: Optional[torch.Tensor], kt: int, stride: int, dilation: int,
               pad_mode: str) -> torch.Tensor:
    """The cache for the chunk after ``x``: the last ``cache_frames`` frames of [padding or cache, x].

    Only ``cache_frames`` frames are kept (a copy of them, never of the chunk). Before the first chunk the
    missing frames are zeros ('constant') or copies of the first frame ('replicate').
    """
    n = cache_frames(kt, stride, dilation)
    b, c, t, h, w = x.shape
    fmt = memory_format_of(x)
    if n == 0:
        return torch.empty((b, c, 0, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)
    if t >= n:
        return x[:, :, t - n:].detach().clone(memory_format=fmt)
    if cache is None:
        if pad_mode == "replicate":
            prev = x[:, :, :1].detach().expand(b, c, n, h, w)
        else:
            prev = x.new_zeros((b, c, n, h, w))
    else:
        prev = cache.detach()
    return torch.cat([prev[:, :, t:], x.detach()], dim=2).contiguous(memory_format=fmt)


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The memory format a result computed from x (B, C, T, H, W) takes: channels_last_3d when x is dense in
    it and not NCDHW-contiguous (a tensor that is both, e.g. with one channel, counts as NCDHW, as it does for
    torch's convolutions), else contiguous_format."""
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def causal_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *, stride: int = 1,
                  dilation: int = 1, pad_mode: str = "constant", activation: Optional[str] = None,
                  residual: Optional[torch.Tensor] = None, cache: Optional[torch.Tensor] = None,
                  streaming: bool = False) -> torch.Tensor:
    """Causal conv3d by F.pad (+ torch.cat of the cache) and F.conv3d; differentiable by autograd.

    x (B, C_in, T, H, W), weight (C_out, C_in, kt, kh, kw), bias (C_out,), residual (B, C_out, T // stride, H, W),
    cache (B, C_in, max(time_pad, 0), H, W); any floating dtype (all the same). Returns (B, C_out, T // stride, H, W).
    """
    kt, kh, kw = weight.shape[2:]
    tp = time_padding(kt, stride, dilation)
    streaming = streaming or cache is not None
    mode = effective_pad_mode(pad_mode, tp, x.shape[2], streaming)
    if cache is not None and cache.shape[2] > 0:
        x = torch.cat([cache.to(x.dtype), x], dim=2)
        tp -= cache.shape[2]
    padded = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2, tp, 0), mode=mode)
    y = F.conv3d(padded, weight, bias, stride=(stride, 1, 1), dilation=(dilation, 1, 1))
    if activation == "silu":
        y = F.silu(y)
    if residual is not None:
        y = y + residual
    return y


def causal_conv3d_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           cache: Optional[torch.Tensor], stride: int, dilation: int, pad_mode: str,
                           activation: Optional[str], streaming: bool
                           ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(grad x, grad weight, grad bias) of :func:`causal_conv3d` for the cotangent ``dy``; the residual's
    gradient is ``dy`` itself and the cache is a constant.

    Written without autograd (custom-op implementations run below the autograd dispatch key): the backward of
    F.pad (slice / replication_pad3d_backward) and of the convolution (aten.convolution_backward).
    """
    kt, kh, kw = weight.shape[2:]
    tp = time_padding(kt, stride, dilation)
    mode = effective_pad_mode(pad_mode, tp, x.shape[2], streaming or cache is not None)
    n_cache = cache.shape[2] if cache is not None else 0
    xin = torch.cat([cache.to(x.dtype), x], dim=2) if n_cache else x
    tp -= n_cache
    crop = max(-tp, 0)  # a negative time padding crops frames (F.pad semantics)
    xin_c = xin[:, :, crop:]
    pads = (kw // 2, kw // 2, kh // 2, kh // 2, max(tp, 0), 0)
    padded = F.pad(xin_c, pads, mode=mode)
    conv_args = dict(stride=[stride, 1, 1], padding=[0, 0, 0], dilation=[dilation, 1, 1], transposed=False,
                     output_padding=[0, 0, 0], groups=1)
    g = dy
    if activation == "silu":
        pre = F.conv3d(padded, weight, bias, stride=(stride, 1, 1), dilation=(dilation, 1, 1))
        sig = torch.sigmoid(pre)
        g = dy * sig * (1 + pre * (1 - sig))
    d_padded, d_weight, d_bias = torch.ops.aten.convolution_backward(
        g, padded, weight, [weight.shape[0]] if bias is not None else None, output_mask=[True, True, bias is not None],
        **conv_args)
    if mode == "replicate":
        d_xin_c = torch.ops.aten.replication_pad3d_backward(d_padded, xin_c, list(pads))
    else:
        d_xin_c = F.pad(d_padded, tuple(-p for p in pads))
    d_xin = F.pad(d_xin_c, (0, 0, 0, 0, crop, 0)) if crop else d_xin_c
    return d_xin[:, :, n_cache:], d_weight, (d_bias if bias is not None else None)
