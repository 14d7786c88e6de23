"""``fastsora.ops.causal_conv3d``: causal 3-D convolution (magvit2-pytorch semantics) with a fused epilogue.

    y = act(conv(causal_pad(x), weight) + bias) + residual

x (B, C_in, T, H, W) float16/bfloat16/float32 (NCDHW, channels_last_3d or any strided view);
weight (C_out, C_in, kt, kh, kw) with kh, kw odd; bias (C_out,); residual (B, C_out, T // stride, H, W);
output (B, C_out, T // stride, H, W) in x's memory format. See :mod:`fastsora.reference.causal_conv3d` for the
padding rules. Streaming (``cache``) is used through :class:`fastsora.nn.CausalConv3d`.

The op is a ``torch.library.custom_op`` (``fastsora::causal_conv3d``) with a fake implementation and registered
autograd (backward op ``fastsora::causal_conv3d_backward``), so it works under ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from fastsora.backend import backend_request, interpreter_dtype_reason, select_backend
from fastsora.ops._custom_op import AUTOCAST_DEVICES, refuse_double_backward, without_autocast
from fastsora.reference import causal_conv3d as _ref

__all__ = ["causal_conv3d"]

OP_NAME = "causal_conv3d"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
#: positions (b, t, h, w) one kernel launch indexes (int32 arithmetic, with headroom for a tile past the end);
#: larger batches run as several launches over views of their samples
MAX_LAUNCH_POSITIONS = 2 ** 30


def _triton_unsupported(x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> Optional[str]:
    if x.dtype not in _FLOATS:
        return f"{str(x.dtype).removeprefix('torch.')} inputs (the kernels take float16, bfloat16 and float32)"
    if reason := interpreter_dtype_reason(x):
        return reason
    per_sample = x.shape[2] * x.shape[3] * x.shape[4]
    if per_sample > MAX_LAUNCH_POSITIONS:
        return f"T*H*W = {per_sample} positions in one sample > {MAX_LAUNCH_POSITIONS} (the kernels index " \
               "positions in int32 and split a batch only between samples; tensors with more than 2^31 " \
               "elements, and batches with more than 2^31 positions in all, are fine)"
    if weight is not None and weight.numel() >= 2 ** 31:
        return f"a weight of {weight.numel()} elements >= 2^31"
    return None


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"causal_conv3d: {name} must be an int (it applies to time only); got {value!r}")
    if value < minimum:
        raise ValueError(f"causal_conv3d: {name} must be >= {minimum}; got {value}")
    return value


def _validate(x, weight, bias, residual, cache, stride, dilation, pad_mode, activation, streaming,
              residual_any_dtype: bool = False) -> int:
    """Check every argument; return the time padding."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"causal_conv3d: {name} must be a tensor; got {type(t).__name__}")
    if x.dim() != 5:
        raise ValueError(f"causal_conv3d: x must be 5-D (B, C_in, T, H, W); got shape {tuple(x.shape)}")
    if weight.dim() != 5:
        raise ValueError(f"causal_conv3d: weight must be 5-D (C_out, C_in, kt, kh, kw); got shape "
                         f"{tuple(weight.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"causal_conv3d: x must be a floating tensor; got {x.dtype}")
    if x.shape[3] < 1 or x.shape[4] < 1:
        raise ValueError(f"causal_conv3d: x must have H >= 1 and W >= 1 (an empty frame has nothing to pad); "
                         f"got shape {tuple(x.shape)}")
    C_out, C_in, kt, kh, kw = weight.shape
    if x.shape[1] != C_in:
        raise ValueError(f"causal_conv3d: x has {x.shape[1]} channels but weight expects C_in={C_in} "
                         f"(weight shape {tuple(weight.shape)})")
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"causal_conv3d: the spatial kernel sizes must be odd (symmetric padding); got "
                         f"kh={kh}, kw={kw}")
    if kt < 1 or C_out < 1 or C_in < 1:
        raise ValueError(f"causal_conv3d: weight shape {tuple(weight.shape)} has an empty dimension")
    stride = _check_int("stride", stride)
    dilation = _check_int("dilation", dilation)
    if pad_mode not in _ref.PAD_MODES:
        raise ValueError(f"causal_conv3d: pad_mode must be 'constant' or 'replicate'; got {pad_mode!r}")
    if activation not in _ref.ACTIVATIONS:
        raise ValueError(f"causal_conv3d: activation must be None or 'silu'; got {activation!r}")
    named = [("weight", weight), ("bias", bias), ("residual", residual), ("cache", cache)]
    for name, t in named:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"causal_conv3d: {name} must be a tensor or None; got {type(t).__name__}")
        if t.dtype != x.dtype and not (name == "residual" and residual_any_dtype):
            raise TypeError(f"causal_conv3d: {name} has dtype {t.dtype} but x has {x.dtype}; cast them to one dtype")
        if t.device != x.device:
            raise ValueError(f"causal_conv3d: {name} is on {t.device} but x is on {x.device}")
    B, _, T, H, W = x.shape
    if T // stride < 1:
        raise ValueError(f"causal_conv3d: x has {T} frames, fewer than the time stride {stride}: no output frame")
    if (streaming or cache is not None) and T % stride:   # a cache implies streaming
        raise ValueError(f"causal_conv3d: streamed chunks must have a multiple of stride={stride} frames; got {T}")
    if bias is not None and tuple(bias.shape) != (C_out,):
        raise ValueError(f"causal_conv3d: bias must have shape ({C_out},); got {tuple(bias.shape)}")
    out_shape = (B, C_out, T // stride, H, W)
    if residual is not None and tuple(residual.shape) != out_shape:
        raise ValueError(f"causal_conv3d: residual must have the output's shape {out_shape}; got "
                         f"{tuple(residual.shape)}")
    tp = _ref.time_padding(kt, stride, dilation)
    if cache is not None:
        need = (B, C_in, max(tp, 0), H, W)
        if tuple(cache.shape) != need:
            raise ValueError(f"causal_conv3d: cache must have shape {need} (the {max(tp, 0)} frames before x); "
                             f"got {tuple(cache.shape)}")
    return tp


# ---------------------------------------------------------------------------------------------------------
# custom ops
# ---------------------------------------------------------------------------------------------------------

@torch.library.custom_op("fastsora::causal_conv3d", mutates_args=())
@without_autocast
def _causal_conv3d_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      residual: Optional[torch.Tensor], cache: Optional[torch.Tensor], stride: int, dilation: int,
                      pad_mode: str, activation: str, streaming: bool, save_pre: bool, requested_backend: str
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    act = activation or None
    backend = select_backend(OP_NAME, x.device, _triton_unsupported(x, weight), requested_backend, forward=True)
    tp = _ref.time_padding(weight.shape[2], stride, dilation)
    mode = _ref.effective_pad_mode(pad_mode, tp, x.shape[2], streaming or cache is not None)
    if backend == "triton":
        from fastsora.kernels import causal_conv3d as _k

        y, z = _k.causal_conv3d_fwd(x, weight, bias, residual, cache, stride, dilation, tp, mode == "replicate",
                                    act, save_pre, MAX_LAUNCH_POSITIONS)
        return y, (z if z is not None else x.new_empty(0))
    pre = _ref.causal_conv3d(x, weight, bias, stride=stride, dilation=dilation, pad_mode=pad_mode,
                             cache=cache, streaming=streaming)
    y = pre
    if act == "silu":
        y = torch.nn.functional.silu(y)
    if residual is not None:
        y = y + residual
    fmt = _ref.memory_format_of(x)
    y = y.contiguous(memory_format=fmt)
    if y is x or y is residual:
        y = y.clone()
    return y, (pre.contiguous(memory_format=fmt).clone() if save_pre else x.new_empty(0))


@_causal_conv3d_op.register_fake
def _(x, weight, bias, residual, cache, stride, dilation, pad_mode, activation, streaming, save_pre,
      requested_backend):
    B, _, T, H, W = x.shape
    shape = (B, weight.shape[0], T // stride, H, W)
    fmt = _ref.memory_format_of(x)
    y = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    z = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt) if save_pre else x.new_empty(0)
    return y, z


@torch.library.custom_op("fastsora::causal_conv3d_backward", mutates_args=())
@without_autocast
def _causal_conv3d_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                               bias: Optional[torch.Tensor], pre: torch.Tensor, cache: Optional[torch.Tensor],
                               stride: int, dilation: int, pad_mode: str, activation: str, streaming: bool,
                               need_input: bool, need_weight: bool, requested_backend: str
                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    act = activation or None
    backend = select_backend(OP_NAME, x.device, _triton_unsupported(x, weight), requested_backend)
    tp = _ref.time_padding(weight.shape[2], stride, dilation)
    has_bias = bias is not None
    if backend == "triton":
        from fastsora.kernels import causal_conv3d as _k

        mode = _ref.effective_pad_mode(pad_mode, tp, x.shape[2], streaming or cache is not None)
        g = _k.silu_backward(dy, pre) if act == "silu" else dy
        dx, dw, db = _k.causal_conv3d_bwd(g, x, weight, cache, stride, dilation, tp, mode == "replicate",
                                          has_bias and need_weight, need_input, need_weight, MAX_LAUNCH_POSITIONS)
    else:
        dx, dw, db = _ref.causal_conv3d_backward(dy, x, weight, bias, cache, stride, dilation, pad_mode, act,
                                                 streaming)
        dx = dx.contiguous(memory_format=_ref.memory_format_of(x))
        if dw is not None:  # ATen picks grad weight's layout from x's; the fake (and the kernels) use weight's
            dw = dw.contiguous(memory_format=_ref.memory_format_of(weight))
    return (dx if (need_input and dx is not None) else x.new_empty(0),
            dw if (need_weight and dw is not None) else x.new_empty(0),
            db if (need_weight and db is not None) else x.new_empty(0))


@_causal_conv3d_backward_op.register_fake
def _(dy, x, weight, bias, pre, cache, stride, dilation, pad_mode, activation, streaming, need_input, need_weight,
      requested_backend):
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_ref.memory_format_of(x)) \
        if need_input else x.new_empty(0)
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device,
                     memory_format=_ref.memory_format_of(weight)) if need_weight else x.new_empty(0)
    db = torch.empty(bias.shape, dtype=bias.dtype, device=bias.device) \
        if (need_weight and bias is not None) else x.new_empty(0)
    return dx, dw, db


def _setup_context(ctx, inputs, output):
    (x, weight, bias, residual, cache, stride, dilation, pad_mode, activation, streaming, save_pre,
     requested_backend) = inputs
    _, pre = output
    ctx.save_for_backward(x, weight, bias, pre, cache)
    ctx.args = (stride, dilation, pad_mode, activation, streaming)
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None
    ctx.requested_backend = requested_backend  # the backward resolves as the forward did (see select_backend)


def _backward(ctx, dy, dpre):
    x, weight, bias, pre, cache = ctx.saved_tensors
    stride, dilation, pad_mode, activation, streaming = ctx.args
    need_x = ctx.needs_input_grad[0]
    need_w = ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2])
    dx = dw = db = None
    if need_x or need_w:
        gx, gw, gb = _causal_conv3d_backward_op(dy, x, weight, bias, pre, cache, stride, dilation, pad_mode,
                                                activation, streaming, need_x, need_w, ctx.requested_backend)
        dx = gx if need_x else None
        dw = gw if ctx.needs_input_grad[1] else None
        db = gb if (ctx.has_bias and ctx.needs_input_grad[2]) else None
    dres = dy if (ctx.has_residual and ctx.needs_input_grad[3]) else None
    return dx, dw, db, dres, None, None, None, None, None, None, None, None


_causal_conv3d_op.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(_causal_conv3d_backward_op, "causal_conv3d")


# ---------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------

def _autocast_inputs(device_type: str, *tensors):
    """What autocast does for nn.Conv3d (a lower-precision op): floating-point inputs other than float64 in
    the autocast dtype."""
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.float16,
                                                                             torch.bfloat16) else t
                 for t in tensors)


def causal_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *, stride: int = 1,
                  dilation: int = 1, pad_mode: str = "constant", activation: Optional[str] = None,
                  residual: Optional[torch.Tensor] = None, cache: Optional[torch.Tensor] = None,
                  streaming: bool = False) -> torch.Tensor:
    """Causal 3-D convolution with magvit2-pytorch's padding and a fused epilogue.

    Args:
        x: (B, C_in, T, H, W) float16, bfloat16 or float32; any strides (NCDHW and channels_last_3d are read
            in place).
        weight: (C_out, C_in, kt, kh, kw), kh and kw odd, same dtype and device as x.
        bias: optional (C_out,).
        stride, dilation: time-only stride and dilation (ints).
        pad_mode: 'constant' (zeros) or 'replicate' (first frame in time, border pixels in space); a whole-clip
            call with time_pad >= T falls back to 'constant' like magvit2-pytorch.
        activation: None or 'silu', applied to conv + bias.
        residual: optional (B, C_out, T // stride, H, W), added last: ``y = act(conv + bias) + residual``.
        cache: optional (B, C_in, max(time_pad, 0), H, W): the frames preceding x (streaming; see
            :class:`fastsora.nn.CausalConv3d`). It is a constant for autograd.
        streaming: treat x as a chunk of a longer video (no short-clip fallback); implied by ``cache``.

    Under ``torch.autocast`` x, weight, bias and cache are first cast to the autocast dtype, as autocast casts
    nn.Conv3d's inputs (float64 is left alone); a residual in another dtype is then added after the kernel,
    as ``conv(x) + residual`` would be (an fp32 residual stream stays fp32).

    Returns:
        (B, C_out, T // stride, H, W) in x's dtype (under autocast: the autocast dtype, promoted with a
        residual's) and memory format.
    """
    late_residual = None
    if isinstance(x, torch.Tensor) and x.device.type in AUTOCAST_DEVICES and torch.is_autocast_enabled(x.device.type):
        x, weight, bias, cache = _autocast_inputs(x.device.type, x, weight, bias, cache)
        if isinstance(residual, torch.Tensor) and residual.dtype != x.dtype:
            late_residual = residual   # added after the op, as conv(x) + residual: an fp32 residual stays fp32
    tp = _validate(x, weight, bias, residual, cache, stride, dilation, pad_mode, activation, streaming,
                   residual_any_dtype=late_residual is not None)
    del tp
    if late_residual is not None:
        residual = None
    save_pre = activation == "silu" and torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    y, _ = _causal_conv3d_op(x, weight, bias, residual, cache, stride, dilation, pad_mode, activation or "",
                             bool(streaming), bool(save_pre), backend_request())
    return y if late_residual is None else y + late_residual
