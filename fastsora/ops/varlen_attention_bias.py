"""Attention-bias objects for :func:`fastsora.ops.memory_efficient_attention`, with xformers' class names,
constructors and attributes, so a call site that builds ``xformers.ops.fmha.BlockDiagonalMask`` objects runs
without xformers installed (``from fastsora.ops import BlockDiagonalMask``). xformers' own objects work as well:
``memory_efficient_attention`` reads either kind by class name and ``q_seqinfo`` / ``k_seqinfo``.

* :class:`BlockDiagonalMask`: packed sequences (query block i sees key block i); ``from_seqlens``,
  ``from_tensor_list``, ``split``, ``make_causal``, ``make_causal_from_bottomright``.
* :class:`BlockDiagonalCausalMask`: each block causal from its top-left (key j <= query i).
* :class:`BlockDiagonalCausalFromBottomRightMask`: each block causal from its bottom-right (j <= i + Lk - Lq,
  flash-attn's ``causal=True``). xformers refuses a block with fewer keys than queries; here its first rows see
  no key and give 0, as in flash-attn.
* :class:`LowerTriangularMask`, :class:`LowerTriangularFromBottomRightMask`: the same per batch element.
* Local (sliding-window) forms: :class:`BlockDiagonalCausalLocalAttentionMask` and
  :class:`BlockDiagonalCausalLocalAttentionFromBottomRightMask` (``make_local_attention(window_size)`` /
  ``make_local_attention_from_bottomright(window_size)``), :class:`LowerTriangularFromBottomRightLocalAttentionMask`
  (causal: query i sees the ``window_size`` keys ending at its diagonal), and
  :class:`LocalAttentionFromBottomRightMask` (``window_left`` keys before and ``window_right`` after the diagonal,
  no causal mask). xformers refuses a top-left local block whose last query sees no key; here such rows give 0.

``materialize(shape)`` writes any of them out as an additive bias (0 / -inf), for debugging and tests.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["SeqLenInfo", "BlockDiagonalMask", "BlockDiagonalCausalMask", "BlockDiagonalCausalFromBottomRightMask",
           "LowerTriangularMask", "LowerTriangularFromBottomRightMask", "BlockDiagonalCausalLocalAttentionMask",
           "BlockDiagonalCausalLocalAttentionFromBottomRightMask", "LowerTriangularFromBottomRightLocalAttentionMask",
           "LocalAttentionFromBottomRightMask"]

Device = Optional[Union[str, torch.device]]


@dataclasses.dataclass(frozen=True)
class SeqLenInfo:
    """Where each block of a packed dimension starts: ``seqstart`` (n + 1,) int32 and its host copy
    ``seqstart_py`` (read to validate without a device synchronisation), as xformers' ``_SeqLenInfo``."""

    seqstart: torch.Tensor
    seqstart_py: List[int]
    max_seqlen: int
    min_seqlen: int

    @classmethod
    def from_seqlens(cls, seqlens: Union[Sequence[int], torch.Tensor], *, device: Device = None) -> "SeqLenInfo":
        """From the block lengths (a sequence of ints or a 1-D integer tensor, each >= 0)."""
        lengths = [int(n) for n in (seqlens.tolist() if isinstance(seqlens, torch.Tensor) else seqlens)]
        if not lengths:
            raise ValueError("seqlens must name at least one block; got none")
        if min(lengths) < 0:
            raise ValueError(f"seqlens must be >= 0; got {lengths}")
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        return cls(torch.tensor(starts, dtype=torch.int32, device=device), starts, max(lengths), min(lengths))

    def to(self, device: Device) -> "SeqLenInfo":
        return dataclasses.replace(self, seqstart=self.seqstart.to(device))

    def intervals(self) -> List[Tuple[int, int]]:
        """[(start, end)] of each block."""
        return list(zip(self.seqstart_py[:-1], self.seqstart_py[1:]))

    def split(self, x: torch.Tensor, batch_sizes: Optional[Sequence[int]] = None) -> List[torch.Tensor]:
        """x [1, total, *] cut into its blocks [1, M_i, *] (views); with ``batch_sizes`` (from
        ``from_tensor_list``), consecutive equal-length blocks regrouped as [B_j, M_j, *]."""
        if x.dim() < 2 or x.shape[0] != 1 or x.shape[1] != self.seqstart_py[-1]:
            raise ValueError(f"x must be [1, {self.seqstart_py[-1]}, ...] (the packed blocks); got {tuple(x.shape)}")
        blocks = self.intervals()
        if batch_sizes is None:
            return [x[:, a:b] for a, b in blocks]
        if sum(batch_sizes) != len(blocks):
            raise ValueError(f"batch_sizes {list(batch_sizes)} add up to {sum(batch_sizes)}, not the "
                             f"{len(blocks)} blocks")
        out, i = [], 0
        for size in batch_sizes:
            if size == 0:  # an empty tensor of the list: no block
                out.append(x.new_empty(0, 0, *x.shape[2:]))
                continue
            first, length = blocks[i][0], blocks[i][1] - blocks[i][0]
            out.append(x[0, first:first + size * length].reshape(size, length, *x.shape[2:]))
            i += size
        return out


def _finite_or_masked(seen: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill(~seen, -math.inf)


def _causal_block(lq: int, lk: int, offset: int, device: Device) -> torch.Tensor:
    """True where query i sees key j <= i + offset."""
    i = torch.arange(lq, device=device)[:, None]
    return torch.arange(lk, device=device)[None, :] <= i + offset


def _top_left_block(lq: int, lk: int, device: Device) -> torch.Tensor:
    """Causal from the top-left: query i sees keys j <= i (xformers' plain causal masks)."""
    return _causal_block(lq, lk, 0, device)


def _bottom_right_block(lq: int, lk: int, device: Device) -> torch.Tensor:
    """Causal from the bottom-right: query i sees keys j <= i + Lk - Lq (flash-attn's causal)."""
    return _causal_block(lq, lk, lk - lq, device)


def _local_block(lq: int, lk: int, offset: int, left: int, right: int, device: Device) -> torch.Tensor:
    """True where query i sees key j with i + offset - left <= j <= i + offset + right."""
    return _causal_block(lq, lk, offset + right, device) & ~_causal_block(lq, lk, offset - left - 1, device)


def window_attribute_shortfall(name: str, value: object) -> Optional[int]:
    """The least value xformers allows for the window attribute ``name`` (``_window_size`` 1, ``window_left`` /
    ``window_right`` 0) when ``value`` is not an int of at least that, else None. Shared by these classes and by
    :func:`fastsora.ops.memory_efficient_attention`, which reads xformers' own objects."""
    least = 1 if name == "_window_size" else 0
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        return least
    return None


def _check_window(owner: object, **sides: int) -> None:
    """ValueError naming the attribute of ``owner`` that is not an int of at least its minimum, as xformers
    refuses them."""
    for name, value in sides.items():
        least = window_attribute_shortfall(name, value)
        if least is not None:
            raise ValueError(f"{type(owner).__name__}: {name} must be an int >= {least}; got {value!r}")


@dataclasses.dataclass
class BlockDiagonalMask:
    """Queries and keys packed along M in as many blocks; query block i attends to key block i only.
    Use with B = 1: ``memory_efficient_attention(q, k, v, attn_bias=mask)``, q [1, sum Mq_i, H, K]."""

    q_seqinfo: SeqLenInfo
    k_seqinfo: SeqLenInfo
    _batch_sizes: Optional[Sequence[int]] = None

    def __post_init__(self) -> None:
        nq, nk = len(self.q_seqinfo.seqstart_py) - 1, len(self.k_seqinfo.seqstart_py) - 1
        if nq != nk:
            raise ValueError(f"{type(self).__name__}: {nq} query blocks but {nk} key blocks (they must pair up)")

    @classmethod
    def from_seqlens(cls, q_seqlen: Union[Sequence[int], torch.Tensor],
                     kv_seqlen: Optional[Union[Sequence[int], torch.Tensor]] = None, *, device: Device = None):
        """Blocks of ``q_seqlen`` queries and ``kv_seqlen`` keys (default: the same lengths)."""
        q = SeqLenInfo.from_seqlens(q_seqlen, device=device)
        k = q if kv_seqlen is None else SeqLenInfo.from_seqlens(kv_seqlen, device=device)
        return cls(q_seqinfo=q, k_seqinfo=k)

    @classmethod
    def from_tensor_list(cls, tensors: Sequence[torch.Tensor]):
        """(mask, x): tensors [B_i, M_i, *] packed into x [1, sum B_i * M_i, *], one block per batch element;
        ``mask.split(out)`` gives back the list."""
        if not tensors:
            raise ValueError("tensors must hold at least one tensor")
        lengths = [t.shape[1] for t in tensors for _ in range(t.shape[0])]
        mask = cls.from_seqlens(lengths, device=tensors[0].device)
        mask._batch_sizes = [t.shape[0] for t in tensors]
        return mask, torch.cat([t.reshape(1, -1, *t.shape[2:]) for t in tensors], dim=1)

    def split_queries(self, tensor: torch.Tensor) -> List[torch.Tensor]:
        """The inverse of ``from_tensor_list`` for query-length tensors: [1, total_q, *] back to its tensors."""
        return self.q_seqinfo.split(tensor, self._batch_sizes)

    split = split_queries

    def split_kv(self, tensor: torch.Tensor) -> List[torch.Tensor]:
        return self.k_seqinfo.split(tensor, self._batch_sizes)

    def make_causal(self) -> "BlockDiagonalCausalMask":
        return BlockDiagonalCausalMask(self.q_seqinfo, self.k_seqinfo, self._batch_sizes)

    def make_causal_from_bottomright(self) -> "BlockDiagonalCausalFromBottomRightMask":
        return BlockDiagonalCausalFromBottomRightMask(self.q_seqinfo, self.k_seqinfo, self._batch_sizes)

    def make_local_attention(self, window_size: int) -> "BlockDiagonalCausalLocalAttentionMask":
        """Each block causal from its top-left, query i seeing keys i - window_size < j <= i."""
        return BlockDiagonalCausalLocalAttentionMask(self.q_seqinfo, self.k_seqinfo, self._batch_sizes, window_size)

    def make_local_attention_from_bottomright(self, window_size: int
                                              ) -> "BlockDiagonalCausalLocalAttentionFromBottomRightMask":
        """Each block causal from its bottom-right, query i seeing the ``window_size`` keys up to i + Lk - Lq."""
        return BlockDiagonalCausalLocalAttentionFromBottomRightMask(self.q_seqinfo, self.k_seqinfo,
                                                                    self._batch_sizes, window_size)

    def to(self, device: Device):
        return dataclasses.replace(self, q_seqinfo=self.q_seqinfo.to(device), k_seqinfo=self.k_seqinfo.to(device))

    def _block(self, lq: int, lk: int, device: Device) -> torch.Tensor:
        return torch.ones(lq, lk, dtype=torch.bool, device=device)

    def materialize(self, shape: Sequence[int], dtype: torch.dtype = torch.float32, device: Device = "cpu"
                    ) -> torch.Tensor:
        """The additive bias (0 where a query sees a key, -inf elsewhere) of ``shape`` [..., total_q, total_k]."""
        tq, tk = self.q_seqinfo.seqstart_py[-1], self.k_seqinfo.seqstart_py[-1]
        if tuple(shape[-2:]) != (tq, tk):
            raise ValueError(f"shape must end in ({tq}, {tk}) (total queries, total keys); got {tuple(shape)}")
        seen = torch.zeros(tq, tk, dtype=torch.bool, device=device)
        for (qa, qb), (ka, kb) in zip(self.q_seqinfo.intervals(), self.k_seqinfo.intervals()):
            seen[qa:qb, ka:kb] = self._block(qb - qa, kb - ka, device)
        return _finite_or_masked(seen, dtype).expand(*shape)


@dataclasses.dataclass
class BlockDiagonalCausalMask(BlockDiagonalMask):
    """:class:`BlockDiagonalMask` with each block causal from its top-left: query i sees keys j <= i."""

    _block = staticmethod(_top_left_block)


@dataclasses.dataclass
class BlockDiagonalCausalFromBottomRightMask(BlockDiagonalMask):
    """:class:`BlockDiagonalMask` with each block causal from its bottom-right: query i sees keys
    j <= i + Lk - Lq (flash-attn's causal)."""

    _block = staticmethod(_bottom_right_block)


class _PerBatchElementMask:
    """A mask applied to each batch element's (Mq, Mk) scores alike, given by ``_block``."""

    def _block(self, lq: int, lk: int, device: Device) -> torch.Tensor:
        raise NotImplementedError

    def materialize(self, shape: Sequence[int], dtype: torch.dtype = torch.float32, device: Device = "cpu"
                    ) -> torch.Tensor:
        return _finite_or_masked(self._block(shape[-2], shape[-1], device), dtype).expand(*shape)


class LowerTriangularMask(_PerBatchElementMask):
    """Causal attention per batch element, from the top-left: query i sees keys j <= i."""

    _block = staticmethod(_top_left_block)


class LowerTriangularFromBottomRightMask(LowerTriangularMask):
    """Causal attention per batch element, from the bottom-right: query i sees keys j <= i + Lk - Lq."""

    _block = staticmethod(_bottom_right_block)

    def make_local_attention(self, window_size: int) -> "LowerTriangularFromBottomRightLocalAttentionMask":
        """The same, query i seeing only the ``window_size`` keys ending at its diagonal."""
        return LowerTriangularFromBottomRightLocalAttentionMask(window_size)


@dataclasses.dataclass
class BlockDiagonalCausalLocalAttentionMask(BlockDiagonalCausalMask):
    """:class:`BlockDiagonalCausalMask` made local: query i of a block sees keys i - window_size < j <= i."""

    _window_size: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_window(self, _window_size=self._window_size)

    def _block(self, lq: int, lk: int, device: Device) -> torch.Tensor:
        return _local_block(lq, lk, 0, self._window_size - 1, 0, device)


@dataclasses.dataclass
class BlockDiagonalCausalLocalAttentionFromBottomRightMask(BlockDiagonalCausalFromBottomRightMask):
    """:class:`BlockDiagonalCausalFromBottomRightMask` made local: query i of a block sees the ``window_size``
    keys ending at its diagonal, i + Lk - Lq - window_size < j <= i + Lk - Lq."""

    _window_size: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_window(self, _window_size=self._window_size)

    def _block(self, lq: int, lk: int, device: Device) -> torch.Tensor:
        return _local_block(lq, lk, lk - lq, self._window_size - 1, 0, device)


@dataclasses.dataclass
class LowerTriangularFromBottomRightLocalAttentionMask(LowerTriangularFromBottomRightMask):
    """:class:`LowerTriangularFromBottomRightMask` made local, per batch element: query i sees keys
    i + Lk - Lq - window_size < j <= i + Lk - Lq."""

    _window_size: int

    def __post_init__(self) -> None:
        _check_window(self, _window_size=self._window_size)

    def _block(self, lq: int, lk: int, device: Device) -> torch.Tensor:
        return _local_block(lq, lk, lk - lq, self._window_size - 1, 0, device)


@dataclasses.dataclass
class LocalAttentionFromBottomRightMask(_PerBatchElementMask):
    """Sliding window per batch element, no causal mask: query i sees keys
    i + Lk - Lq - window_left <= j <= i + Lk - Lq + window_right (flash-attn's ``window_size``)."""

    window_left: int
    window_right: int

    def __post_init__(self) -> None:
        _check_window(self, window_left=self.window_left, window_right=self.window_right)

    def _block(self, lq: int, lk: int, device: Device) -> torch.Tensor:
        return _local_block(lq, lk, lk - lq, self.window_left, self.window_right, device)
