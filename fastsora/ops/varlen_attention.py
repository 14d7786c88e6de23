"""Varlen (packed) attention: flash-attn 2 and xformers entry points over one Triton kernel family.

* :func:`varlen_attention` / :func:`flash_attn_varlen_func`: flash-attn 2's ``flash_attn_varlen_func``
  (positional order and semantics): q (total_q, Hq, D), k/v (total_k, Hkv, D), int32 ``cu_seqlens``;
  its packed forms :func:`flash_attn_varlen_qkvpacked_func` and :func:`flash_attn_varlen_kvpacked_func`; and
  the fixed-length batch forms :func:`flash_attn_func`, :func:`flash_attn_qkvpacked_func`,
  :func:`flash_attn_kvpacked_func` (batch, seqlen, nheads, headdim).
* :func:`memory_efficient_attention`: xformers' ``memory_efficient_attention`` in [B, M, H, K] layout (and
  [B, M, K], [B, M, G, H, K]) with ``BlockDiagonalMask``-style ``attn_bias`` objects (read by duck typing,
  xformers need not be installed).

All go through the custom ops ``fastsora::varlen_attention_fwd`` / ``fastsora::varlen_attention_bwd``, and the
packed forms through ``fastsora::varlen_attention_packed_fwd`` / ``_bwd``, which write the packed tensor's
gradient as one tensor (fake implementations and autograd registered: ``torch.compile(fullgraph=True)`` traces
them).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from fastsora.backend import backend_request, interpreter_dtype_reason, select_backend
from fastsora.ops._custom_op import refuse_double_backward, without_autocast
from fastsora.ops.varlen_attention_bias import window_attribute_shortfall
from fastsora.reference import varlen_attention as _ref

OP_NAME = "varlen_attention"
CAUSAL_NONE, CAUSAL_BOTTOM_RIGHT, CAUSAL_TOP_LEFT = _ref.CAUSAL_NONE, _ref.CAUSAL_BOTTOM_RIGHT, _ref.CAUSAL_TOP_LEFT
NO_WINDOW = _ref.NO_WINDOW
MAX_HEAD_DIM = 256
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

__all__ = ["varlen_attention", "flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func",
           "flash_attn_varlen_kvpacked_func", "flash_attn_func", "flash_attn_qkvpacked_func",
           "flash_attn_kvpacked_func", "memory_efficient_attention"]


def _unsupported(q: torch.Tensor, packed_heads: int = 0, k_tokens: int = 0, window: Tuple[int, int] = NO_WINDOW
                 ) -> Optional[str]:
    """Why the Triton kernels cannot take this input (None when they can). ``packed_heads``: the heads of a
    packed input, whose gradient the backward writes as one buffer; ``k_tokens`` and ``window``: the keys' token
    count and the sliding window, if any."""
    if q.dtype not in _KERNEL_DTYPES:
        return f"{str(q.dtype).removeprefix('torch.')} inputs (the kernels take float16, bfloat16 and float32)"
    if reason := interpreter_dtype_reason(q):
        return reason
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    try:
        kern = _kernels()
    except ImportError:   # no Triton: the backend selection says so
        return None
    if tuple(window) != NO_WINDOW and (reason := kern.window_unsupported(q.shape[0], k_tokens)):
        return reason
    # k and v have no more heads than q; a packed gradient buffer holds packed_heads
    return kern.token_size_unsupported(max(q.shape[1], packed_heads), q.shape[2])


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    """float32, as flash-attn; float64 for float64 inputs (torch backend), whose backward reads it."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _kernels():
    from fastsora.kernels import varlen_attention as kern

    return kern


# ----------------------------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastsora::varlen_attention_fwd", mutates_args=())
@without_autocast
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
            cu_seqlens_k: torch.Tensor, softmax_scale: float, causal_mode: int, requested_backend: str,
            window_left: int = -1, window_right: int = -1) -> Tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal_mode, requested_backend,
                    (window_left, window_right))


def _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal_mode, requested_backend, window,
             packed_heads=0):
    backend = select_backend(OP_NAME, q.device, _unsupported(q, packed_heads, k.shape[0], window), requested_backend,
                             forward=True)
    if backend == "triton":
        return _kernels().forward(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal_mode, window)
    out, lse = _ref.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal_mode, window)
    return out.contiguous(), lse.to(_lse_dtype(q)).contiguous()


@_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal_mode, requested_backend, window_left=-1,
      window_right=-1):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        q.new_empty((q.shape[1], q.shape[0]), dtype=_lse_dtype(q))


@torch.library.custom_op("fastsora::varlen_attention_bwd", mutates_args=())
@without_autocast
def _bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, softmax_scale: float,
            causal_mode: int, dlse: Optional[torch.Tensor], requested_backend: str, window_left: int = -1,
            window_right: int = -1) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    window = (window_left, window_right)
    backend = select_backend(OP_NAME, q.device, _unsupported(q, 0, k.shape[0], window), requested_backend)
    if backend == "triton":
        return _kernels().backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale,
                                   causal_mode, dlse, window=window)
    dq, dk, dv = _ref.varlen_attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                                softmax_scale, causal_mode, dlse, window)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_bwd_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal_mode, dlse, requested_backend,
      window_left=-1, window_right=-1):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, scale, mode, requested_backend, window_left, window_right = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.scale = scale
    ctx.mode = mode
    ctx.window = (window_left, window_right)
    ctx.requested_backend = requested_backend  # the backward resolves as the forward did (see select_backend)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _bwd_op(dout, q, k, v, out, lse, cu_q, cu_k, ctx.scale, ctx.mode, dlse, ctx.requested_backend,
                         *ctx.window)
    return dq, dk, dv, None, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(_bwd_op, "varlen_attention")


# Packed forms: k and v (and q) are head slices of one tensor, whose gradient the kernels write in place, as
# flash-attn's qkv- / kv-packed functions do: the separate-op path would return dq, dk, dv and autograd would
# then stack them (a second gradient-sized buffer and a copy).


def _split_packed(q: Optional[torch.Tensor], packed: torch.Tensor, q_heads: int):
    """q, k, v as head slices of ``packed`` (tokens, heads, D): [q | k | v] with q_heads query heads when q is
    None, else [k | v] (q given apart). One split: under autograd (the module with QK norms) its backward
    concatenates the gradients once, where separate slices would each build a zero-filled full-size one."""
    if q is None:
        hkv = (packed.shape[1] - q_heads) // 2
        return packed.split([q_heads, hkv, hkv], 1)
    hkv = packed.shape[1] // 2
    return (q, *packed.split([hkv, hkv], 1))


@torch.library.custom_op("fastsora::varlen_attention_packed_fwd", mutates_args=())
@without_autocast
def _packed_fwd_op(q: Optional[torch.Tensor], packed: torch.Tensor, q_heads: int, cu_seqlens_q: torch.Tensor,
                   cu_seqlens_k: torch.Tensor, softmax_scale: float, causal_mode: int, requested_backend: str,
                   window_left: int = -1, window_right: int = -1) -> Tuple[torch.Tensor, torch.Tensor]:
    return _forward(*_split_packed(q, packed, q_heads), cu_seqlens_q, cu_seqlens_k, softmax_scale, causal_mode,
                    requested_backend, (window_left, window_right), packed.shape[1])


@_packed_fwd_op.register_fake
def _(q, packed, q_heads, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal_mode, requested_backend,
      window_left=-1, window_right=-1):
    q = _split_packed(q, packed, q_heads)[0]
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        q.new_empty((q.shape[1], q.shape[0]), dtype=_lse_dtype(q))


@torch.library.custom_op("fastsora::varlen_attention_packed_bwd", mutates_args=())
@without_autocast
def _packed_bwd_op(dout: torch.Tensor, q: Optional[torch.Tensor], packed: torch.Tensor, q_heads: int,
                   out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                   softmax_scale: float, causal_mode: int, dlse: Optional[torch.Tensor], requested_backend: str,
                   window_left: int = -1, window_right: int = -1) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dq, dpacked): dq empty when q is part of ``packed``."""
    qs, k, v = _split_packed(q, packed, q_heads)
    window = (window_left, window_right)
    backend = select_backend(OP_NAME, qs.device, _unsupported(qs, packed.shape[1], k.shape[0], window),
                             requested_backend)
    args = (dout, qs, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal_mode, dlse)
    if backend == "triton":
        kern = _kernels()
        dpacked = kern.new_grad_buffer(packed.shape, packed.dtype, packed.device)
        views = _split_packed(q, dpacked, q_heads)
        dq = kern.backward(*args, grads=(views[0] if q is None else None,) + views[1:], window=window)[0]
        dpacked = dpacked.contiguous()
    else:
        dq, dk, dv = _ref.varlen_attention_backward(*args, window)
        dpacked = torch.cat([dq, dk, dv] if q is None else [dk, dv], 1)
    return (packed.new_empty(0) if q is None else dq.contiguous()), dpacked


@_packed_bwd_op.register_fake
def _(dout, q, packed, q_heads, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal_mode, dlse,
      requested_backend, window_left=-1, window_right=-1):
    dq = packed.new_empty(0) if q is None else torch.empty_like(q, memory_format=torch.contiguous_format)
    return dq, torch.empty_like(packed, memory_format=torch.contiguous_format)


def _packed_setup_context(ctx, inputs, output):
    q, packed, q_heads, cu_q, cu_k, scale, mode, requested_backend, window_left, window_right = inputs
    out, lse = output
    ctx.save_for_backward(q, packed, out, lse, cu_q, cu_k)
    ctx.q_heads, ctx.scale, ctx.mode, ctx.requested_backend = q_heads, scale, mode, requested_backend
    ctx.window = (window_left, window_right)


def _packed_backward(ctx, dout, dlse):
    q, packed, out, lse, cu_q, cu_k = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dpacked = _packed_bwd_op(dout, q, packed, ctx.q_heads, out, lse, cu_q, cu_k, ctx.scale, ctx.mode, dlse,
                                 ctx.requested_backend, *ctx.window)
    return (None if q is None else dq), dpacked, None, None, None, None, None, None, None, None


_packed_fwd_op.register_autograd(_packed_backward, setup_context=_packed_setup_context)
refuse_double_backward(_packed_bwd_op, "varlen_attention")


# ----------------------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------------------


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # torch < 2.3
        return False


def _check_offsets(name: str, cu: Any, device: torch.device) -> None:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be an int32 tensor of shape (batch + 1,); got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype torch.int32 (flash-attn's convention); got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be 1-D with batch + 1 >= 1 entries; got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} must be on the same device as q ({device}); got {cu.device}")


def _check_values(name: str, cu: List[int], total: int) -> None:
    if cu[0] != 0:
        raise ValueError(f"{name}[0] must be 0; got {cu[0]}")
    for i in range(len(cu) - 1):
        if cu[i + 1] < cu[i]:
            raise ValueError(f"{name} must be non-decreasing; {name}[{i + 1}] = {cu[i + 1]} < {name}[{i}] = {cu[i]}")
    if cu[-1] > total:
        raise ValueError(f"{name}[-1] = {cu[-1]} is past the number of tokens ({total})")


def _check_inputs(q, k, v, cu_q, cu_k, validate: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor; got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D (total_tokens, heads, head_dim); got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device; got {q.device}, {k.device}, {v.device}")
    if not (q.shape[2] == k.shape[2] == v.shape[2]):
        raise ValueError(f"head dims differ: q {q.shape[2]}, k {k.shape[2]}, v {v.shape[2]} (they must be equal)")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"k and v must have the same (total_k, heads); got {tuple(k.shape[:2])} and "
                         f"{tuple(v.shape[:2])}")
    if q.shape[2] == 0:
        raise ValueError(f"head dim must be at least 1; got q of shape {tuple(q.shape)}")
    if q.shape[1] == 0 or k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"the number of query heads ({q.shape[1]}) must be a positive multiple of the number of "
                         f"key/value heads ({k.shape[1]})")
    _check_offsets("cu_seqlens_q", cu_q, q.device)
    _check_offsets("cu_seqlens_k", cu_k, q.device)
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1); got "
                         f"{cu_q.numel()} and {cu_k.numel()}")
    if validate and not _compiling():
        _check_offset_values((("cu_seqlens_q", cu_q, q.shape[0]), ("cu_seqlens_k", cu_k, k.shape[0])))


#: offsets tensors whose values passed the checks: {tensor: (version counter, token count, data pointer)}.
#: Every layer of a model gets the same cu_seqlens, so only the first call of a step synchronises; an in-place
#: change (which moves the version counter), another token count or new storage (``cu.data = ...``) checks
#: again. Writes that bypass the version counter (through ``cu.numpy()``) cannot be seen. Inference tensors
#: have no version counter and are checked at every call.
_CHECKED = WeakIdKeyDictionary()


def _version(t: torch.Tensor) -> Optional[int]:
    try:
        return t._version
    except RuntimeError:  # inference tensors do not track versions
        return None


def _check_offset_values(offsets: Sequence[Tuple[str, torch.Tensor, int]]) -> None:
    todo = [(name, cu, total, _version(cu)) for name, cu, total in offsets]
    todo = [item for item in todo
            if item[3] is None or _CHECKED.get(item[1]) != (item[3], item[2], item[1].data_ptr())]
    if not todo:
        return
    values = torch.cat([cu for _, cu, _, _ in todo]).tolist()  # one host synchronisation for all of them
    start = 0
    for name, cu, total, version in todo:
        _check_values(name, values[start:start + cu.numel()], total)
        start += cu.numel()
        if version is not None:
            _CHECKED[cu] = (version, total, cu.data_ptr())


def _is_int_like(value: Any) -> bool:
    """None, an int (or SymInt, numpy integer) or a 0-d integer tensor: what flash-attn's ``int`` arguments take.
    A tensor is never read (no host synchronisation): the offsets define the lengths; an int max_seqlen_k only
    feeds flash-attn's window rule (:func:`_window`)."""
    if isinstance(value, bool):
        return False
    if value is None or isinstance(value, (numbers.Integral, torch.SymInt)):
        return True
    return isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() \
        and not value.is_complex() and value.dtype != torch.bool


def _check_max_seqlen(max_seqlen_q: Any, max_seqlen_k: Any) -> None:
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not _is_int_like(value):
            raise TypeError(f"{name} must be an integer (int, numpy integer or 0-d integer tensor) or None; got "
                            f"{type(value).__name__}")


def _causal_mode(causal: bool, top_left: bool = False) -> int:
    if not causal:
        return CAUSAL_NONE
    return CAUSAL_TOP_LEFT if top_left else CAUSAL_BOTTOM_RIGHT


def _refuse_dropout(value, name: str) -> None:
    """Dropout is not implemented: anything but 0.0 (or None) for the argument ``name`` is refused by name."""
    if value is not None and value != 0.0:
        raise NotImplementedError(f"{name}={value}: fastsora's varlen attention has no dropout; pass "
                                  f"{name}=0.0 (apply dropout outside the attention if you need it)")


def _checked(q, k, v, cu_q, cu_k, dropout_p, softmax_scale, validate) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """What every entry point does before the op: refuse dropout, check the inputs, make the offsets
    unit-stride (the kernels index them so) and default the scale. Returns (cu_q, cu_k, softmax_scale)."""
    _refuse_dropout(dropout_p, "dropout_p")
    _check_inputs(q, k, v, cu_q, cu_k, validate)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    return cu_q.contiguous(), cu_k.contiguous(), float(scale)


def _attention(q, k, v, cu_q, cu_k, dropout_p, softmax_scale, causal_mode, validate, window=NO_WINDOW):
    cu_q, cu_k, scale = _checked(q, k, v, cu_q, cu_k, dropout_p, softmax_scale, validate)
    return _fwd_op(q, k, v, cu_q, cu_k, scale, int(causal_mode), backend_request(), *window)


def _packed_attention(q, packed, q_heads, cu_q, cu_k, dropout_p, softmax_scale, causal_mode, validate,
                      window=NO_WINDOW):
    """:func:`_attention` of the head slices of ``packed`` (tokens, heads, D): [q | k | v] with ``q_heads``
    query heads when q is None, else [k | v]; the gradient of ``packed`` is written as one tensor."""
    cu_q, cu_k, scale = _checked(*_split_packed(q, packed, q_heads), cu_q, cu_k, dropout_p, softmax_scale, validate)
    return _packed_fwd_op(q, packed, int(q_heads), cu_q, cu_k, scale, int(causal_mode), backend_request(), *window)


def _window(window_size: Any, max_seqlen_k: Any = None) -> Tuple[int, int]:
    """flash-attn's ``window_size`` (left, right) checked: two ints, each -1 (unbounded) or >= 0. As flash-attn,
    a side of at least ``max_seqlen_k`` (when it is a Python or numpy int: a tensor is never read) becomes -1;
    so does a side of 2^31 or more (int32 offsets: no sequence is that long)."""
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise TypeError(f"window_size must be a pair (left, right) of ints; got {window_size!r}") from None
    for name, side in (("left", left), ("right", right)):
        if isinstance(side, bool) or not isinstance(side, numbers.Integral):
            raise TypeError(f"window_size {name} must be an int; got {type(side).__name__}")
        if side < -1:
            raise ValueError(f"window_size {name} must be -1 (unbounded) or a number of keys >= 0; got {side}")
    left, right = (-1 if side >= 2**31 else int(side) for side in (left, right))
    if isinstance(max_seqlen_k, numbers.Integral) and not isinstance(max_seqlen_k, bool):
        left, right = (-1 if side >= max_seqlen_k else side for side in (left, right))
    return left, right


# ----------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: Optional[int] = None,
                     max_seqlen_k: Optional[int] = None, dropout_p: float = 0.0,
                     softmax_scale: Optional[float] = None, causal: bool = False, *,
                     window_size: Tuple[int, int] = (-1, -1), return_lse: bool = False, validate: bool = True):
    """Attention within each packed sequence (flash-attn 2 ``flash_attn_varlen_func`` semantics).

    Args:
        q: (total_q, Hq, D) float16 / bfloat16 / float32 (float64 on the torch backend).
        k, v: (total_k, Hkv, D), same dtype and device; Hq % Hkv == 0 (GQA / MQA).
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,) on q's device: sequence b owns query rows
            ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` and key rows ``cu_seqlens_k[b]:cu_seqlens_k[b+1]``.
            Zero-length sequences are allowed; rows past ``cu_seqlens_q[-1]`` output 0 (and get zero gradient).
        max_seqlen_q, max_seqlen_k: accepted for flash-attn compatibility, not needed for the lengths: int,
            numpy integer, 0-d integer tensor (never read) or None. An int max_seqlen_k is read only for
            flash-attn's window rule (below).
        dropout_p: must be 0.0 (no dropout; NotImplementedError otherwise).
        softmax_scale: default 1 / sqrt(D).
        causal: mask aligned to the bottom-right corner: query i sees key j iff j <= i + Lk - Lq. A query row
            that sees no key outputs 0 (its LSE is +inf).
        window_size: (left, right) sliding window, flash-attn's: query i sees only keys
            i + Lk - Lq - left <= j <= i + Lk - Lq + right (and the causal mask when ``causal``); -1 leaves a
            side unbounded. A side >= ``max_seqlen_k`` (an int) counts as -1, as in flash-attn.
        return_lse: also return the log-sum-exp, (Hq, total_q) float32 (float64 for float64 inputs),
            differentiable.
        validate: check the offsets' values: one host synchronisation the first time an offsets tensor is
            seen (every layer of a step gets the same one) and again after it changes in place. False skips
            it; the kernels themselves never synchronise. Skipped under torch.compile.

    Returns:
        out (total_q, Hq, D) in q's dtype, or (out, lse) with ``return_lse``.
    """
    _check_max_seqlen(max_seqlen_q, max_seqlen_k)
    out, lse = _attention(q, k, v, cu_seqlens_q, cu_seqlens_k, dropout_p, softmax_scale,
                          _causal_mode(bool(causal)), validate, _window(window_size, max_seqlen_k))
    return (out, lse) if return_lse else out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None, *,
                           validate=True):
    """Drop-in for ``flash_attn.flash_attn_varlen_func`` (flash-attn 2 keyword names).

    Supported: everything :func:`varlen_attention` supports, ``window_size`` (sliding windows) included.
    ``deterministic`` is accepted either way (the backward has no atomics: bit-identical within a process;
    across processes ``torch.use_deterministic_algorithms(True)`` also fixes the autotuned tiles). Refused with
    NotImplementedError: ``softcap`` != 0, ``alibi_slopes``, ``block_table``, ``dropout_p`` > 0.
    ``return_attn_probs=True`` returns ``(out, softmax_lse, None)``: the LSE (Hq, total_q) float32 (float64 for
    float64 inputs); the dropout mask flash-attn would return as the third item does not exist here (no
    dropout).
    ``validate`` (keyword only, not in flash-attn): as in :func:`varlen_attention`, a host synchronisation to
    check a new offsets tensor's values; flash-attn never checks them, pass False for its behaviour.
    """
    _refuse_flash_attn_options(softcap, alibi_slopes, block_table)
    _check_max_seqlen(max_seqlen_q, max_seqlen_k)
    out, lse = _attention(q, k, v, cu_seqlens_q, cu_seqlens_k, dropout_p, softmax_scale,
                          _causal_mode(bool(causal)), validate, _window(window_size, max_seqlen_k))
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen=None, dropout_p=0.0, softmax_scale=None,
                                     causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                     deterministic=False, return_attn_probs=False, *, validate=True):
    """Drop-in for ``flash_attn.flash_attn_varlen_qkvpacked_func``: self-attention of packed sequences with
    q, k and v stacked in one tensor ``qkv`` (total, 3, nheads, headdim), read as views (no copy), whose gradient
    the backward writes as one tensor (as flash-attn: no stack of dq, dk, dv);
    ``cu_seqlens`` (batch + 1,) int32 serves queries and keys. Returns (total, nheads, headdim), or
    ``(out, softmax_lse, None)`` with ``return_attn_probs``. Options as :func:`flash_attn_varlen_func`."""
    _check_packed(qkv, "qkv", 3, "(total, 3, nheads, headdim)")
    _refuse_flash_attn_options(softcap, alibi_slopes, None)
    _check_max_seqlen(max_seqlen, max_seqlen)
    out, lse = _packed_attention(None, qkv.flatten(1, 2), qkv.shape[2], cu_seqlens, cu_seqlens, dropout_p,
                                 softmax_scale, _causal_mode(bool(causal)), validate, _window(window_size, max_seqlen))
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                                    dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                                    validate=True):
    """Drop-in for ``flash_attn.flash_attn_varlen_kvpacked_func``: q (total_q, nheads, headdim) attends to k and v
    stacked in ``kv`` (total_k, 2, nheads_k, headdim), read as views (no copy), its gradient written as one
    tensor; nheads_k dividing nheads (GQA), e.g. video tokens attending to caption tokens. Returns (total_q,
    nheads, headdim), or ``(out, softmax_lse, None)`` with ``return_attn_probs``. Options as
    :func:`flash_attn_varlen_func`."""
    if not isinstance(q, torch.Tensor):  # (None would read as "q packed in kv")
        raise TypeError(f"q must be a tensor; got {type(q).__name__}")
    _check_packed(kv, "kv", 2, "(total_k, 2, nheads_k, headdim)")
    _refuse_flash_attn_options(softcap, alibi_slopes, None)
    _check_max_seqlen(max_seqlen_q, max_seqlen_k)
    out, lse = _packed_attention(q, kv.flatten(1, 2), 0, cu_seqlens_q, cu_seqlens_k, dropout_p, softmax_scale,
                                 _causal_mode(bool(causal)), validate, _window(window_size, max_seqlen_k))
    return (out, lse, None) if return_attn_probs else out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Drop-in for ``flash_attn.flash_attn_func``: attention per batch element of q (batch, seqlen_q, nheads,
    headdim), k and v (batch, seqlen_k, nheads_k, headdim), nheads_k dividing nheads (GQA); causal aligned to the
    bottom right. Returns (batch, seqlen_q, nheads, headdim), or ``(out, softmax_lse, None)`` with
    ``return_attn_probs``, the LSE (batch, nheads, seqlen_q) float32 (float64 for float64 inputs). Options and
    refusals as :func:`flash_attn_varlen_func`."""
    _refuse_flash_attn_options(softcap, alibi_slopes, None)
    out, lse = _batched_attention(q, k, v, dropout_p, softmax_scale, _causal_mode(bool(causal)), window=window_size)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Drop-in for ``flash_attn.flash_attn_qkvpacked_func``: :func:`flash_attn_func` with q, k and v stacked in
    ``qkv`` (batch, seqlen, 3, nheads, headdim), read as views (no copy), its gradient written as one tensor."""
    _check_packed(qkv, "qkv", 3, "(batch, seqlen, 3, nheads, headdim)", dim=2)
    _refuse_flash_attn_options(softcap, alibi_slopes, None)
    out, lse = _batched_attention(*qkv.unbind(2), dropout_p, softmax_scale, _causal_mode(bool(causal)), packed=qkv,
                                  window=window_size)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Drop-in for ``flash_attn.flash_attn_kvpacked_func``: :func:`flash_attn_func` with k and v stacked in ``kv``
    (batch, seqlen_k, 2, nheads_k, headdim), read as views (no copy), its gradient written as one tensor."""
    _check_packed(kv, "kv", 2, "(batch, seqlen_k, 2, nheads_k, headdim)", dim=2)
    _refuse_flash_attn_options(softcap, alibi_slopes, None)
    out, lse = _batched_attention(q, *kv.unbind(2), dropout_p, softmax_scale, _causal_mode(bool(causal)), packed=kv,
                                  window=window_size)
    return (out, lse, None) if return_attn_probs else out


def _refuse_flash_attn_options(softcap: float, alibi_slopes: Any, block_table: Any) -> None:
    """NotImplementedError naming each flash-attn option given a value other than its default."""
    if softcap != 0.0:
        raise NotImplementedError(f"softcap={softcap}: logit soft-capping is not supported; only softcap=0.0")
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes: ALiBi biases are not supported; pass alibi_slopes=None")
    if block_table is not None:
        raise NotImplementedError("block_table: paged KV caches are not supported; pass block_table=None")


def _check_packed(t: Any, name: str, parts: int, layout: str, dim: int = 1) -> None:
    """ValueError unless ``t`` is a (dim + 3)-D tensor stacking ``parts`` tensors along ``dim``."""
    if not isinstance(t, torch.Tensor) or t.dim() != dim + 3 or t.shape[dim] != parts:
        raise ValueError(f"{name} must be {layout}; got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")


# ----------------------------------------------------------------------------------------------------------
# xformers entry point
# ----------------------------------------------------------------------------------------------------------

#: attn_bias class names understood, mapped to (block diagonal?, causal mode, window attributes): a causal local
#: mask's ``_window_size`` w is the window (w - 1, -1) (the causal mask bounds the right side), the sliding
#: window's ``window_left`` / ``window_right`` are flash-attn's window_size
_XFORMERS_BIASES = {
    "BlockDiagonalMask": (True, CAUSAL_NONE, ()),
    "BlockDiagonalCausalMask": (True, CAUSAL_TOP_LEFT, ()),
    "BlockDiagonalCausalFromBottomRightMask": (True, CAUSAL_BOTTOM_RIGHT, ()),
    "LowerTriangularMask": (False, CAUSAL_TOP_LEFT, ()),
    "LowerTriangularFromBottomRightMask": (False, CAUSAL_BOTTOM_RIGHT, ()),
    "BlockDiagonalCausalLocalAttentionMask": (True, CAUSAL_TOP_LEFT, ("_window_size",)),
    "BlockDiagonalCausalLocalAttentionFromBottomRightMask": (True, CAUSAL_BOTTOM_RIGHT, ("_window_size",)),
    "LowerTriangularFromBottomRightLocalAttentionMask": (False, CAUSAL_BOTTOM_RIGHT, ("_window_size",)),
    "LocalAttentionFromBottomRightMask": (False, CAUSAL_NONE, ("window_left", "window_right")),
}


def _xformers_window(attn_bias: Any, names: Tuple[str, ...]) -> Tuple[int, int]:
    """The window (left, right) of a local xformers mask, read from its attributes ``names`` (see above)."""
    values = []
    for name in names:
        value = getattr(attn_bias, name, None)
        least = window_attribute_shortfall(name, value)
        if least is not None:
            raise ValueError(f"attn_bias ({type(attn_bias).__name__}) must have an int {name} >= {least}; got "
                             f"{value!r}")
        values.append(int(value))
    if names == ("_window_size",):
        return _window((values[0] - 1, -1))
    return _window(tuple(values)) if values else NO_WINDOW


def _seqstart(info: Any, name: str, device: torch.device, total: int) -> Tuple[torch.Tensor, bool]:
    """The block starts of ``attn_bias.<name>`` as int32 offsets on ``device``, and whether their values were
    checked here (from the host copy ``seqstart_py`` that xformers keeps: no device synchronisation)."""
    if info is None:
        raise TypeError(f"attn_bias has no '{name}' attribute; expected an xformers BlockDiagonalMask-style object")
    seqstart = getattr(info, "seqstart", None)
    if seqstart is None:
        raise TypeError(f"attn_bias.{name} has no 'seqstart' attribute; expected an xformers _SeqLenInfo")
    cu = seqstart.to(device=device, dtype=torch.int32)
    if _compiling():  # value checks are skipped under torch.compile, as for cu_seqlens; reading the host list
        return cu, False  # there would also guard the graph on its length: a recompile per number of blocks
    seqstart_py = getattr(info, "seqstart_py", None)
    if seqstart_py is None:
        return cu, False
    _check_values(f"attn_bias.{name}.seqstart", [int(x) for x in seqstart_py], total)
    if len(seqstart_py) != seqstart.numel():
        raise ValueError(f"attn_bias.{name}: seqstart has {seqstart.numel()} entries but seqstart_py has "
                         f"{len(seqstart_py)}")
    return cu, True


def memory_efficient_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attn_bias: Any = None, p: float = 0.0, scale: Optional[float] = None,
                               *, op: Any = None) -> torch.Tensor:
    """Drop-in for ``xformers.ops.memory_efficient_attention`` with block-diagonal (packed) masks.

    Args:
        query: [B, Mq, H, K] float16 / bfloat16 / float32 (float64 on the torch backend); key, value:
            [B, Mk, Hkv, K], same dtype and device (Hkv dividing H: GQA, an extension). xformers' other layouts
            work too, all three tensors in the same one: [B, M, K] (one head) and, for GQA / MQA,
            [B, M, G, H, K] (G groups of H query heads; key and value [B, Mk, G, H, K] expanded over H, i.e.
            stride 0 there, or [B, Mk, G, 1, K]; the group's keys are then read once, not H times).
        attn_bias: None (full attention per batch element), or an xformers mask object, read by duck typing
            (class name plus ``q_seqinfo.seqstart`` / ``k_seqinfo.seqstart`` / ``seqstart_py``):
            ``BlockDiagonalMask`` (B must be 1; packed sequences, no causal mask),
            ``BlockDiagonalCausalMask`` (causal from the top-left of each block: key j <= query i),
            ``BlockDiagonalCausalFromBottomRightMask`` (causal from the bottom-right: j <= i + Lk - Lq),
            ``LowerTriangularMask`` / ``LowerTriangularFromBottomRightMask`` (per batch element); and the local
            forms ``BlockDiagonalCausalLocalAttentionMask`` / ``...FromBottomRightMask`` and
            ``LowerTriangularFromBottomRightLocalAttentionMask`` (causal, each query seeing the ``_window_size``
            keys ending at its diagonal) and ``LocalAttentionFromBottomRightMask`` (``window_left`` keys before
            and ``window_right`` after the diagonal).
            fastsora's classes of the same names (:mod:`fastsora.ops.varlen_attention_bias`) need no xformers.
            Tensor biases and other classes (padded or gappy keys, paged, ...) raise NotImplementedError.
        p: dropout probability, must be 0.0.
        scale: default 1 / sqrt(K).
        op: ignored (xformers' kernel choice).

    Returns:
        query's shape ([B, Mq, H, K], [B, Mq, K] or [B, Mq, G, H, K]) and dtype.
    """
    _refuse_dropout(p, "p")
    q, k, v = _xformers_to_bmhk(query, key, value)
    return _memory_efficient_attention_bmhk(q, k, v, attn_bias, scale).reshape(query.shape)


_XFORMERS_LAYOUTS = {3: "[B, M, K]", 4: "[B, M, H, K]", 5: "[B, M, G, H, K]"}


def _xformers_to_bmhk(query: Any, key: Any, value: Any) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """query, key, value in one of xformers' layouts as [B, M, H, K] views where possible: [B, M, K] is one head;
    [B, M, G, H, K] is G * H query heads, and key and value, when both have one head per group (expanded over H or
    of size 1 there), G key heads for GQA, else G * H."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() not in _XFORMERS_LAYOUTS:
            raise ValueError(f"{name} must be a 4-D tensor [B, M, H, K] (or xformers' [B, M, K] or [B, M, G, H, K]); "
                             f"got {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not query.dim() == key.dim() == value.dim():
        raise ValueError(f"query, key and value must share one layout; got {query.dim()}-D, {key.dim()}-D and "
                         f"{value.dim()}-D ({', '.join(_XFORMERS_LAYOUTS[t.dim()] for t in (query, key, value))})")
    if key.shape[:2] != value.shape[:2]:
        raise ValueError(f"key and value must agree on B and M; got {tuple(key.shape)} and {tuple(value.shape)}")
    if query.dim() == 3:
        return query.unsqueeze(2), key.unsqueeze(2), value.unsqueeze(2)
    if query.dim() == 4:
        return query, key, value
    b, mq, g, h, d = query.shape
    for name, t in (("key", key), ("value", value)):
        if t.shape[2] != g or t.shape[3] not in (1, h):
            raise ValueError(f"{name} must be [B, Mk, G, H, K] or [B, Mk, G, 1, K] with query's G = {g} and H = {h}; "
                             f"got {tuple(t.shape)}")
    if all(t.shape[3] == 1 or t.stride(3) == 0 for t in (key, value)):  # one head per group: GQA, G key heads
        return query.flatten(2, 3), key[:, :, :, 0], value[:, :, :, 0]
    return query.flatten(2, 3), *(t.expand(-1, -1, -1, h, -1).flatten(2, 3) for t in (key, value))


def _memory_efficient_attention_bmhk(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_bias: Any,
                                     scale: Optional[float]) -> torch.Tensor:
    if key.shape[:3] != value.shape[:3]:
        raise ValueError(f"key and value must agree on [B, M, H]; got {tuple(key.shape)} and {tuple(value.shape)}")
    if value.shape[3] != query.shape[3] or key.shape[3] != query.shape[3]:
        raise ValueError(f"query, key and value must have the same head dim K; got {query.shape[3]}, "
                         f"{key.shape[3]}, {value.shape[3]}")
    if query.shape[0] != key.shape[0]:
        raise ValueError(f"query and key must have the same batch size; got {query.shape[0]} and {key.shape[0]}")
    b, mq, h, d = query.shape
    mk = key.shape[1]
    device = query.device
    window = NO_WINDOW
    if attn_bias is None:
        mode, block_diag = CAUSAL_NONE, False
    elif isinstance(attn_bias, torch.Tensor):
        raise NotImplementedError("attn_bias as a tensor is not supported; pass an xformers BlockDiagonalMask-style "
                                  "object or None")
    else:
        cls = type(attn_bias).__name__
        if cls not in _XFORMERS_BIASES:
            raise NotImplementedError(f"attn_bias of type {cls} is not supported; supported: "
                                      f"{', '.join(sorted(_XFORMERS_BIASES))}")
        block_diag, mode, window_names = _XFORMERS_BIASES[cls]
        window = _xformers_window(attn_bias, window_names)
    if not block_diag:
        return _batched_attention(query, key, value, 0.0, scale, mode, window=window, seqlen_k_resets_window=False)[0]
    if b != 1:
        raise ValueError(f"with a {type(attn_bias).__name__} the batch size must be 1 (sequences packed along "
                         f"M); got B={b}")
    cu_q, checked_q = _seqstart(getattr(attn_bias, "q_seqinfo", None), "q_seqinfo", device, mq)
    cu_k, checked_k = _seqstart(getattr(attn_bias, "k_seqinfo", None), "k_seqinfo", device, mk)
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"attn_bias: {cu_q.numel() - 1} query blocks but {cu_k.numel() - 1} key blocks")
    out, _ = _attention(query[0], key[0], value[0], cu_q, cu_k, 0.0, scale, mode, not (checked_q and checked_k),
                        window)
    return out.reshape(b, mq, h, d)


def _batched_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
                       scale: Optional[float], mode: int, packed: Optional[torch.Tensor] = None,
                       window: Any = NO_WINDOW, seqlen_k_resets_window: bool = True
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention per batch element of q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D): one packed sequence each
    (``dropout_p`` refused as in :func:`_attention`). Returns out (B, Sq, Hq, D) and LSE (B, Hq, Sq).
    ``packed``: the (B, S, 2 or 3, H, D) tensor that k and v (or q, k and v) are dim-2 slices of, whose gradient
    is then written as one tensor. ``window``: flash-attn's ``window_size``, checked here; a side of at least
    seqlen_k is unbounded when ``seqlen_k_resets_window`` (flash-attn's rule; xformers' masks have no such
    rule)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, seqlen, nheads, headdim); got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if k.shape[:3] != v.shape[:3] or k.shape[0] != q.shape[0] or not q.shape[3] == k.shape[3] == v.shape[3] >= 1 \
            or k.shape[2] < 1 or q.shape[2] % k.shape[2]:
        raise ValueError(f"q (batch, seqlen_q, nheads, headdim), k and v (batch, seqlen_k, nheads_k, headdim) must "
                         f"share batch and headdim >= 1, k and v also seqlen_k and nheads_k, with nheads_k dividing "
                         f"nheads; got {tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}")
    b, sq, h = q.shape[:3]
    window = _window(window, k.shape[1] if seqlen_k_resets_window else None)
    starts = torch.arange(b + 1, dtype=torch.int32, device=q.device)
    cu_q, cu_k = starts * sq, starts * k.shape[1]
    if packed is None:
        out, lse = _attention(*(t.flatten(0, 1) for t in (q, k, v)), cu_q, cu_k, dropout_p, scale, mode, False,
                              window)
    else:
        q = None if packed.shape[2] == 3 else q.flatten(0, 1)  # else q is a slice of packed too
        out, lse = _packed_attention(q, packed.flatten(0, 1).flatten(1, 2), h, cu_q, cu_k, dropout_p, scale, mode,
                                     False, window)
    # (an explicit head dim: -1 is ambiguous for 0 elements); the LSE contiguous as flash-attn's
    return out.view(b, sq, h, out.shape[-1]), lse.view(h, b, sq).transpose(0, 1).contiguous()
