"""``fastsora.nn.CausalConv3d``: drop-in for magvit2-pytorch's ``CausalConv3d`` (same constructor, same
state_dict keys ``conv.weight`` / ``conv.bias``), backed by :func:`fastsora.ops.causal_conv3d`, with streaming.

    from magvit2_pytorch.magvit2_pytorch import CausalConv3d   # before
    from fastsora.nn import CausalConv3d                       # after
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple, Union

import torch
from torch import nn

from fastsora.ops.causal_conv3d import causal_conv3d
from fastsora.reference import causal_conv3d as _ref

__all__ = ["CausalConv3d"]


def _triple(k) -> Tuple[int, int, int]:
    k = (k, k, k) if isinstance(k, int) else tuple(k)
    if len(k) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in k):
        raise ValueError(f"CausalConv3d: kernel_size must be a positive int or 3 positive ints (kt, kh, kw); "
                         f"got {k!r}")
    return k


def _is_no_padding(name: str, value) -> bool:
    """nn.Conv3d's spellings of its defaults: padding 0, 'valid', (0, 0, 0) or [0, 0, 0]; padding_mode 'zeros'."""
    if name == "padding_mode":
        return value == "zeros"
    def zero(v) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v == 0

    if isinstance(value, (tuple, list)):
        return len(value) == 3 and all(zero(v) for v in value)
    return (isinstance(value, str) and value == "valid") or zero(value)


class CausalConv3d(nn.Module):
    """Causal 3-D convolution, magvit2-pytorch 0.5.1 semantics.

    ``CausalConv3d(chan_in, chan_out, kernel_size, pad_mode='constant', stride=1, dilation=1, **kwargs)``:
    stride and dilation act on time only; other keyword arguments (``bias``, ``device``, ``dtype``) go to the
    ``nn.Conv3d`` held as ``self.conv`` (it only holds ``weight`` and ``bias``; its forward is never called).

    ``forward(x, cache=None, return_cache=False, activation=None, residual=None)``: x (B, chan_in, T, H, W)
    float16/bfloat16/float32 (float64 on the torch backend) in the weight's dtype (or under autocast), NCDHW
    or channels_last_3d -> (B, chan_out, T // stride, H, W) in x's dtype and memory format. With
    ``return_cache=True`` it returns ``(y, cache)``; pass that cache with the next chunk of the same video
    (``cache=None`` starts a video). Chunks fed in order give the slices of the one-call output of the whole
    video up to the last bits of rounding (the same sums; a few units in the last place where the matmul's
    blocking differs, see docs/causal_conv3d.md), for a video longer than the time padding (when the
    short-clip fallback does not apply); with stride s, chunk lengths must be multiples of s. The cache holds
    the last ``max(time_pad, 0)`` frames only and is a constant for autograd (streaming is for inference).
    """

    def __init__(self, chan_in: int, chan_out: int, kernel_size: Union[int, Tuple[int, int, int]],
                 pad_mode: str = "constant", **kwargs):
        super().__init__()
        kt, kh, kw = _triple(kernel_size)
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"CausalConv3d: height and width kernel sizes must be odd; got {(kt, kh, kw)}")
        if pad_mode not in _ref.PAD_MODES:
            raise ValueError(f"CausalConv3d: pad_mode must be 'constant' or 'replicate'; got {pad_mode!r}")
        dilation = kwargs.pop("dilation", 1)
        stride = kwargs.pop("stride", 1)
        for name, v in (("stride", stride), ("dilation", dilation)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"CausalConv3d: {name} must be a positive int (time only); got {v!r}")
        for name, default in (("padding", 0), ("padding_mode", "zeros")):  # the defaults change nothing
            if name in kwargs and not _is_no_padding(name, kwargs.pop(name)):
                raise ValueError(f"CausalConv3d: {name!r} is not accepted (only its default, {default!r}): the "
                                 "causal padding is fixed by kernel_size, stride, dilation and pad_mode")
        if kwargs.get("groups", 1) != 1:
            raise ValueError(f"CausalConv3d: groups={kwargs['groups']} is not supported (groups=1 only)")
        self.pad_mode = pad_mode
        self.stride = stride
        self.dilation = dilation
        self.time_pad = _ref.time_padding(kt, stride, dilation)
        self.time_causal_padding = (kw // 2, kw // 2, kh // 2, kh // 2, self.time_pad, 0)
        self.conv = nn.Conv3d(chan_in, chan_out, (kt, kh, kw), stride=(stride, 1, 1), dilation=(dilation, 1, 1),
                              **kwargs)

    @property
    def cache_frames(self) -> int:
        """Frames a streaming cache holds (max(time_pad, 0))."""
        return max(self.time_pad, 0)

    def forward(self, x: torch.Tensor, cache: Optional[torch.Tensor] = None, return_cache: bool = False,
                activation: Optional[str] = None, residual: Optional[torch.Tensor] = None):
        streaming = cache is not None or return_cache
        y = causal_conv3d(x, self.conv.weight, self.conv.bias, stride=self.stride, dilation=self.dilation,
                          pad_mode=self.pad_mode, activation=activation, residual=residual, cache=cache,
                          streaming=streaming)
        if not return_cache:
            return y
        kt = self.conv.weight.shape[2]
        return y, _ref.next_cache(x, cache, kt, self.stride, self.dilation, self.pad_mode)

    def extra_repr(self) -> str:
        return f"pad_mode={self.pad_mode!r}, time_pad={self.time_pad}"
