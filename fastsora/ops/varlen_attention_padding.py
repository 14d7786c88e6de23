"""Padding helpers with flash-attn's ``flash_attn.bert_padding`` names and return values, so a call site that
unpads a padded batch for the varlen kernels (and pads the result back) changes only its import:
``from fastsora.ops import unpad_input, pad_input``.

* :func:`unpad_input`: (batch, seqlen, ...) + a (batch, seqlen) mask -> the kept tokens packed, their flat
  indices, int32 ``cu_seqlens``, the longest length and the used lengths (flash-attn >= 2.7's five values).
* :func:`unpad_input_for_concatenated_sequences`: rows that each hold several sequences back to back, given by
  their lengths.
* :func:`pad_input`: the inverse (zeros where nothing was kept).
* :func:`index_first_axis`, :func:`index_put_first_axis`: the gather / scatter along dim 0 underneath;
  :func:`index_first_axis_residual`: the gather and its input, both differentiable (flash-attn's fused MLP
  form, for a block that runs on a subset of the tokens and keeps the whole input as its residual).

Plain torch ops (autograd included). Host synchronisations, outside torch.compile: the unpad forms find the
kept positions (``nonzero``) and read the longest length, as flash-attn's do, plus one for the overlap check
with ``unused_mask`` or for the concatenated form's length check; :func:`pad_input` and the index helpers check
the index range (one), where flash-attn would hit a device-side assert.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch

__all__ = ["index_first_axis", "index_first_axis_residual", "index_put_first_axis", "unpad_input",
           "unpad_input_for_concatenated_sequences", "pad_input"]


def _is_count(value) -> bool:
    return isinstance(value, (numbers.Integral, torch.SymInt)) and not isinstance(value, bool) and value >= 0


def _indices_on(indices: torch.Tensor, device: torch.device, size: int, size_name: str) -> torch.Tensor:
    """``indices`` checked (type; range: one host synchronisation, skipped under torch.compile, as an index out
    of range would be a device-side assert on CUDA) and moved to ``device``."""
    if not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.dtype not in (torch.int32,
                                                                                            torch.int64):
        raise TypeError("indices must be a 1-D int64 (or int32) tensor of positions along dim 0; got "
                        + (f"{indices.dtype} of shape {tuple(indices.shape)}" if isinstance(indices, torch.Tensor)
                           else type(indices).__name__))
    indices = indices.to(device)
    if indices.numel() and not torch.compiler.is_compiling():
        low, high = torch.stack([indices.min(), indices.max()]).tolist()
        if low < 0 or high >= size:
            raise IndexError(f"indices must lie in [0, {size_name} = {size}); got values from {low} to {high}")
    return indices


def _rows_of(t, name: str, layout: str, dims: int = 2) -> None:
    """ValueError unless t is a tensor of at least ``dims`` dims."""
    if not isinstance(t, torch.Tensor) or t.dim() < dims:
        raise ValueError(f"{name} must be {layout} with at least one trailing dim; got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")


def index_first_axis(input: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows ``indices`` of ``input`` (first_axis_dim, ...): (len(indices), ...). Differentiable in input (the
    gradient is scattered back, zeros elsewhere)."""
    _rows_of(input, "input", "(first_axis_dim, ...)")
    return input.index_select(0, _indices_on(indices, input.device, input.shape[0], "input.shape[0]"))


def index_first_axis_residual(input: torch.Tensor, indices: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for ``flash_attn.bert_padding.index_first_axis_residual``: ``(input[indices], residual)`` for
    input (first_axis_dim, ...), the rows (len(indices), ...) and ``residual``, a view of all of input (same
    values, shape and strides, its storage shared). The gradients of both reach input and add up: the rows'
    scattered back (summed over repeated indices), plus the residual's."""
    rows = index_first_axis(input, indices)
    return rows, input.view_as(input)


def _index_put(values: torch.Tensor, indices: torch.Tensor, size: int, values_name: str, size_name: str):
    indices = _indices_on(indices, values.device, size, size_name)
    if indices.shape[0] != values.shape[0]:
        raise ValueError(f"indices ({indices.shape[0]} entries) and {values_name} ({values.shape[0]} rows) must "
                         "have one entry per row")
    return values.new_zeros((size, *values.shape[1:])).index_copy(0, indices.long(), values)


def index_put_first_axis(values: torch.Tensor, indices: torch.Tensor, first_axis_dim: int) -> torch.Tensor:
    """A (first_axis_dim, ...) tensor of zeros with ``values`` (len(indices), ...) written at rows ``indices``
    (distinct). Differentiable in values."""
    _rows_of(values, "values", "(nnz, ...)")
    if not _is_count(first_axis_dim):
        raise TypeError(f"first_axis_dim must be an int >= 0; got {first_axis_dim!r}")
    return _index_put(values, indices, first_axis_dim, "values", "first_axis_dim")


def _check_mask(name: str, mask: torch.Tensor, batch_seqlen: Tuple[int, ...]) -> None:
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != batch_seqlen:
        raise ValueError(f"{name} must be a (batch, seqlen) = {batch_seqlen} tensor; got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if mask.is_complex():
        raise TypeError(f"{name} must be real (bool, integer or floating; nonzero = kept); got {mask.dtype}")


def _cumulative(lengths: torch.Tensor) -> torch.Tensor:
    """int32 (n + 1,) offsets starting at 0."""
    out = lengths.new_zeros(lengths.numel() + 1, dtype=torch.int32)
    out[1:] = torch.cumsum(lengths, 0, dtype=torch.int32)
    return out


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor,
                unused_mask: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Drop-in for ``flash_attn.bert_padding.unpad_input`` (flash-attn >= 2.7, five values; code written for
    older releases unpacks four: add ``_`` for the fifth).

    Args:
        hidden_states: (batch, seqlen, ...) any dtype.
        attention_mask: (batch, seqlen) bool, integer or floating, nonzero = a real token (anywhere in its row:
            left or right padding, or holes).
        unused_mask: optional (batch, seqlen), nonzero = a slot kept in the packed output but not used
            (flash-attn's ``seqused``); must not overlap attention_mask.

    Returns:
        (packed (total, ...), indices (total,) int64 into the flattened batch * seqlen positions, cu_seqlens
        (batch + 1,) int32, max_seqlen_in_batch int, used_seqlens_in_batch (batch,) int32: the real tokens per
        row, kept slots of unused_mask not counted).
    """
    _rows_of(hidden_states, "hidden_states", "(batch, seqlen, ...)", 3)
    batch_seqlen = tuple(hidden_states.shape[:2])
    _check_mask("attention_mask", attention_mask, batch_seqlen)
    used = attention_mask.to(hidden_states.device) != 0
    kept = used
    if unused_mask is not None:
        _check_mask("unused_mask", unused_mask, batch_seqlen)
        unused = unused_mask.to(hidden_states.device) != 0
        if not torch.compiler.is_compiling() and bool((used & unused).any()):
            raise ValueError("unused_mask overlaps attention_mask: a slot is either a used token or an unused one")
        kept = used | unused
    lengths = kept.sum(-1, dtype=torch.int32)
    indices = torch.nonzero(kept.flatten()).flatten()
    max_seqlen = int(lengths.max()) if lengths.numel() else 0  # (batch 0: no row)
    packed = hidden_states.flatten(0, 1).index_select(0, indices)  # (indices valid by construction)
    return packed, indices, _cumulative(lengths), max_seqlen, used.sum(-1, dtype=torch.int32)


def unpad_input_for_concatenated_sequences(hidden_states: torch.Tensor, attention_mask_in_length: torch.Tensor
                                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Drop-in for ``flash_attn.bert_padding.unpad_input_for_concatenated_sequences``: each row of
    hidden_states (batch, seqlen, ...) holds several sequences back to back from its start;
    ``attention_mask_in_length`` (batch, seqlen) integer lists their lengths, nonzero entries in order, zeros
    after (row [2, 3, 0, 0, 0, 0]: a 2-token and a 3-token sequence, then one padding slot).

    Returns (packed (total, ...), indices (total,) int64, cu_seqlens int32 with one entry per sequence of every
    row, in row order, max_seqlen int): each sequence attends only within itself.
    """
    _rows_of(hidden_states, "hidden_states", "(batch, seqlen, ...)", 3)
    batch, seqlen = hidden_states.shape[:2]
    _check_mask("attention_mask_in_length", attention_mask_in_length, (batch, seqlen))
    lengths_in_rows = attention_mask_in_length.to(hidden_states.device)
    if lengths_in_rows.is_floating_point() or lengths_in_rows.dtype == torch.bool:
        raise TypeError(f"attention_mask_in_length must be integer (sequence lengths); got "
                        f"{attention_mask_in_length.dtype}")
    per_row = lengths_in_rows.sum(-1)
    if not torch.compiler.is_compiling():  # one host synchronisation for both checks
        negative, too_long = torch.stack([(lengths_in_rows < 0).any(), (per_row > seqlen).any()]).tolist()
        if negative:
            raise ValueError("attention_mask_in_length must hold lengths >= 0")
        if too_long:
            raise ValueError(f"attention_mask_in_length: a row's lengths add up to more than seqlen ({seqlen})")
    kept = torch.arange(seqlen, device=per_row.device) < per_row[:, None]
    flat = lengths_in_rows.flatten()
    lengths = flat.index_select(0, torch.nonzero(flat).flatten()).to(torch.int32)
    indices = torch.nonzero(kept.flatten()).flatten()
    max_seqlen = int(flat.max()) if flat.numel() else 0  # (zero entries do not change the maximum)
    return hidden_states.flatten(0, 1).index_select(0, indices), indices, _cumulative(lengths), max_seqlen


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Drop-in for ``flash_attn.bert_padding.pad_input``: the inverse of :func:`unpad_input`. hidden_states
    (total, ...) and the ``indices`` unpad_input returned -> (batch, seqlen, ...), zeros at the dropped
    positions. Differentiable in hidden_states."""
    _rows_of(hidden_states, "hidden_states", "(total, ...)")
    for name, value in (("batch", batch), ("seqlen", seqlen)):
        if not _is_count(value):
            raise TypeError(f"{name} must be an int >= 0; got {value!r}")
    out = _index_put(hidden_states, indices, batch * seqlen, "hidden_states", "batch * seqlen")
    return out.unflatten(0, (batch, seqlen))
