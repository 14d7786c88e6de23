"""Packed (varlen) multi-head attention module for NaViT-style packs and DiT blocks."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from fastsora.ops.varlen_attention import _attention, _causal_mode, _packed_attention, _split_packed, _window

__all__ = ["VarlenAttention"]


class VarlenAttention(nn.Module):
    """Multi-head attention over packed tokens: qkv projection, optional per-head QK RMSNorm, fastsora's varlen
    attention kernel, output projection.

    Self-attention: ``forward(x, cu_seqlens)`` with x (total, dim) and int32 cu_seqlens (batch + 1,).
    Cross-attention (``cross_attention_dim`` set, e.g. video tokens -> caption tokens):
    ``forward(x, cu_seqlens, context, cu_seqlens_k)`` with context (total_k, cross_attention_dim).

    Args:
        dim: model width; num_heads query heads of head_dim = dim // num_heads.
        num_kv_heads: key/value heads (GQA/MQA), must divide num_heads; default num_heads.
        qk_norm: RMSNorm over head_dim on q and k (SD3 / Open-Sora / Wan style).
        cross_attention_dim: width of the context for cross-attention (None: self-attention).
        causal: bottom-right aligned causal mask within each sequence.
        window_size: (left, right) sliding window within each sequence, as flash-attn's (query i sees keys
            i + Lk - Lq - left .. i + Lk - Lq + right; -1 unbounded; with ``causal`` the right side is 0).
        bias: biases of the projections.
        norm_eps: epsilon of the QK RMSNorms (with ``qk_norm``).
        softmax_scale: scale of q·k (default 1 / sqrt(head_dim)).
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: Optional[int] = None, qk_norm: bool = False,
                 cross_attention_dim: Optional[int] = None, causal: bool = False, bias: bool = True,
                 norm_eps: float = 1e-6, softmax_scale: Optional[float] = None,
                 window_size: Tuple[int, int] = (-1, -1)):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.dim, self.num_heads, self.num_kv_heads = dim, num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.causal, self.softmax_scale = causal, softmax_scale
        self.window_size = _window(window_size)
        self.is_cross = cross_attention_dim is not None
        kv_dim = 2 * num_kv_heads * self.head_dim
        if self.is_cross:
            self.q = nn.Linear(dim, dim, bias=bias)
            self.kv = nn.Linear(cross_attention_dim, kv_dim, bias=bias)
        else:
            self.qkv = nn.Linear(dim, dim + kv_dim, bias=bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, context: Optional[torch.Tensor] = None,
                cu_seqlens_k: Optional[torch.Tensor] = None, validate: bool = True) -> torch.Tensor:
        """x (total_q, dim), cu_seqlens int32 (batch + 1,); for cross-attention context (total_k, ctx_dim) and
        cu_seqlens_k int32 (batch + 1,). x and context float16/bfloat16/float32 (float64 on the torch backend),
        in the dtype of the projections' weights (or under autocast). ``validate``: check the offsets' values, as
        :func:`fastsora.ops.varlen_attention` does. Returns (total_q, dim) in x's dtype."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must be (total_tokens, {self.dim}); got {tuple(x.shape)}")
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        if self.is_cross:
            if context is None or cu_seqlens_k is None:
                raise ValueError("cross-attention needs context and cu_seqlens_k")
            q, packed = self.q(x).view(-1, h, d), self.kv(context).view(-1, 2 * hkv, d)  # heads [k | v]
        else:
            if context is not None or cu_seqlens_k is not None:
                given = "context" if context is not None else "cu_seqlens_k"
                raise ValueError(f"{given} given to a self-attention module (its keys are x's tokens, with "
                                 "cu_seqlens); build it with cross_attention_dim for cross-attention")
            cu_seqlens_k = cu_seqlens
            q, packed = None, self.qkv(x).view(-1, h + 2 * hkv, d)  # heads [q | k | v]
        mode = _causal_mode(self.causal)
        if isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity):
            # q, k and v stay head slices of the projections: the backward writes one packed gradient
            out, _ = _packed_attention(q, packed, h, cu_seqlens, cu_seqlens_k, 0.0, self.softmax_scale, mode,
                                       validate, self.window_size)
        else:
            q, k, v = _split_packed(q, packed, h)  # one split: its backward concatenates the gradients once
            out, _ = _attention(self.q_norm(q), self.k_norm(k), v, cu_seqlens, cu_seqlens_k, 0.0,
                                self.softmax_scale, mode, validate, self.window_size)
        return self.proj(out.reshape(-1, h * d))
