"""``fastsora.nn.LFQ``: drop-in for vector-quantize-pytorch 1.32's ``LFQ`` with exact, scalable entropies.

Same constructor keywords and defaults, ``forward(x, inv_temperature=100., return_loss_breakdown=False,
mask=None)``, ``Return``/``LossBreakdown`` namedtuples, ``indices_to_codes`` and state_dict keys. One extra
keyword, ``entropy_clamp_compat=False``: set it to reproduce the anchor's codebook entropy (its log is clamped
at 1e-5) instead of the exact one. See docs/lfq.md for the differences from the anchor.
"""
from __future__ import annotations

import math
from collections import namedtuple
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastsora.ops._custom_op import register_namedtuples_for_export
from fastsora.ops.lfq import lfq

__all__ = ["LFQ", "Return", "LossBreakdown", "CosineSimLinear"]

Return = namedtuple("Return", ["quantized", "indices", "entropy_aux_loss"])
LossBreakdown = namedtuple("LossBreakdown", ["per_sample_entropy", "batch_entropy", "commitment"])
register_namedtuples_for_export(Return, LossBreakdown)


class CosineSimLinear(nn.Module):
    """x ↦ normalize(x) @ normalize(W, dim 0) · scale; ``weight`` (dim_in, dim_out)."""

    def __init__(self, dim_in: int, dim_out: int, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.randn(dim_in, dim_out))

    def forward(self, x: Tensor) -> Tensor:
        return (F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=0)) * self.scale


def _l2norm_code_value(scale: float, d: int, dtype: torch.dtype) -> float:
    """The value of every entry of l2norm(±scale·1_d)·scale, rounded exactly as torch computes it in dtype."""
    return float((F.normalize(torch.full((1, d), scale, dtype=dtype), dim=-1) * scale)[0, 0])


class LFQ(nn.Module):
    """Lookup-free quantization (MAGVIT-v2) with exact per-sample and codebook entropies.

    Inputs: (b, n, dim) sequences, or channel-first (b, dim, ...) images/videos (ndim >= 4, or
    ``channel_first=True``); float16/bfloat16/float32 (float64 on the torch backend). Returns
    ``Return(quantized, indices, entropy_aux_loss)`` (plus ``LossBreakdown(per_sample_entropy, batch_entropy,
    commitment)`` with ``return_loss_breakdown=True``): quantized in x's shape and dtype; indices int64, MSB
    first, (b, n) for sequences and (b, *spatial) — (b, h, w), (b, t, h, w) — for channel-first inputs, with a
    trailing num_codebooks dim under ``keep_num_codebooks_dim``; the losses 0-d float32 (zero in eval mode;
    float64 for float64 x only with ``force_quantization_f32=False``).
    """

    def __init__(self, *, dim=None, codebook_size=None, entropy_loss_weight=0.1, commitment_loss_weight=0.,
                 diversity_gamma=1., straight_through_activation=nn.Identity(), num_codebooks=1,
                 keep_num_codebooks_dim=None, codebook_scale=1., frac_per_sample_entropy=1., has_projections=None,
                 projection_has_bias=True, soft_clamp_input_value=None, cosine_sim_project_in=False,
                 cosine_sim_project_in_scale=None, channel_first=None, experimental_softplus_entropy_loss=False,
                 entropy_loss_offset=5., spherical=False, force_quantization_f32=True, orthogonal_rotation=False,
                 entropy_clamp_compat=False):
        super().__init__()
        if dim is None and codebook_size is None:
            raise ValueError("LFQ: either dim or codebook_size must be specified")
        if codebook_size is not None:
            if int(codebook_size) != codebook_size or codebook_size < 2 or not math.log2(codebook_size).is_integer():
                suggestion = 2 ** math.ceil(math.log2(max(codebook_size, 2)))
                raise ValueError(f"LFQ: codebook_size must be a power of 2 >= 2, got {codebook_size} "
                                 f"(suggested {suggestion})")
        if not 0 < frac_per_sample_entropy <= 1:
            raise ValueError(f"LFQ: frac_per_sample_entropy must be in (0, 1], got {frac_per_sample_entropy}")
        if soft_clamp_input_value is not None and soft_clamp_input_value < codebook_scale:
            raise ValueError(f"LFQ: soft_clamp_input_value ({soft_clamp_input_value}) must be >= codebook_scale "
                             f"({codebook_scale})")
        if num_codebooks < 1:
            raise ValueError(f"LFQ: num_codebooks must be >= 1, got {num_codebooks}")

        codebook_size = codebook_size if codebook_size is not None else 2 ** dim
        self.codebook_size = int(codebook_size)
        codebook_dim = int(math.log2(codebook_size))
        codebook_dims = codebook_dim * num_codebooks
        dim = dim if dim is not None else codebook_dims
        has_projections = has_projections if has_projections is not None else dim != codebook_dims

        if cosine_sim_project_in:
            cos_scale = cosine_sim_project_in_scale if cosine_sim_project_in_scale is not None else codebook_scale
            self.project_in = CosineSimLinear(dim, codebook_dims, scale=cos_scale) if has_projections else nn.Identity()
        else:
            self.project_in = nn.Linear(dim, codebook_dims, bias=projection_has_bias) if has_projections \
                else nn.Identity()
        self.project_out = nn.Linear(codebook_dims, dim, bias=projection_has_bias) if has_projections \
            else nn.Identity()
        self.has_projections = has_projections

        self.dim = dim
        self.codebook_dim = codebook_dim
        self.num_codebooks = num_codebooks
        keep_num_codebooks_dim = keep_num_codebooks_dim if keep_num_codebooks_dim is not None else num_codebooks > 1
        if num_codebooks > 1 and not keep_num_codebooks_dim:
            raise ValueError("LFQ: keep_num_codebooks_dim must be True when num_codebooks > 1")
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        self.channel_first = channel_first
        self.activation = straight_through_activation
        self.spherical = spherical
        self.orthogonal_rotation = orthogonal_rotation
        if orthogonal_rotation:
            rot = torch.empty(codebook_dim, codebook_dim)
            nn.init.orthogonal_(rot)
            self.register_buffer("orthogonal_rot", rot)
        self.frac_per_sample_entropy = frac_per_sample_entropy
        self.diversity_gamma = diversity_gamma
        self.entropy_loss_weight = entropy_loss_weight
        self.codebook_scale = codebook_scale
        self.commitment_loss_weight = commitment_loss_weight
        self.soft_clamp_input_value = soft_clamp_input_value
        self.entropy_loss_offset = entropy_loss_offset
        self.experimental_softplus_entropy_loss = experimental_softplus_entropy_loss
        self.force_quantization_f32 = force_quantization_f32
        self.entropy_clamp_compat = entropy_clamp_compat

        self.register_buffer("mask", 2 ** torch.arange(codebook_dim - 1, -1, -1))
        self.register_buffer("zero", torch.tensor(0.), persistent=False)
        # the per-bit code value (after the optional l2norm) in each dtype the quantizer may run in
        self._code_values = {dt: (_l2norm_code_value(codebook_scale, codebook_dim, dt) if spherical
                                  else float(torch.tensor(codebook_scale, dtype=dt)))
                             for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}

    # ------------------------------------------------------------------------------------------- helpers
    def bits_to_codes(self, bits: Tensor) -> Tensor:
        return bits * self.codebook_scale * 2 - self.codebook_scale

    def maybe_l2norm(self, t: Tensor) -> Tensor:
        return F.normalize(t, dim=-1) * self.codebook_scale if self.spherical else t

    @property
    def dtype(self) -> torch.dtype:
        return self.zero.dtype

    @property
    def codebook(self) -> Tensor:
        """All 2^codebook_dim codes (codebook_size, codebook_dim), built on access (the anchor keeps it as a
        buffer; here it is never needed: 19 MB at 2^18 codes)."""
        codes = torch.arange(self.codebook_size, device=self.mask.device)
        bits = ((codes[:, None].int() & self.mask) != 0).to(self.dtype)
        return self.bits_to_codes(bits)

    def indices_to_codes(self, indices: Tensor, project_out: bool = True) -> Tensor:
        """Codes (..., dim) — channel-first for image/video indices — from indices (b, n[, c]) or (b, ...[, c])."""
        if not isinstance(indices, Tensor) or indices.is_floating_point() or indices.is_complex():
            raise TypeError(f"indices must be an integer tensor, got "
                            f"{indices.dtype if isinstance(indices, Tensor) else type(indices).__name__}")
        is_img_or_video = indices.ndim >= (3 + int(self.keep_num_codebooks_dim))
        should_transpose = self.channel_first if self.channel_first is not None else is_img_or_video
        if not self.keep_num_codebooks_dim:
            indices = indices[..., None]
        bits = ((indices[..., None].int() & self.mask) != 0).to(self.dtype)
        codes = self.maybe_l2norm(self.bits_to_codes(bits))
        if self.orthogonal_rotation:
            codes = codes @ self.orthogonal_rot.t()
        codes = codes.flatten(-2)
        if project_out:
            codes = self.project_out(codes)
        if should_transpose:
            codes = codes.movedim(-1, 1)
        return codes

    def _token_weights(self, mask: Optional[Tensor], b: int, n: int, device: torch.device):
        """(entropy weights, commitment weights), each (b·n,) float or None."""
        commit_w = None
        selected = None
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor of shape ({b},) or ({b}, {n}), got "
                                f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}")
            if tuple(mask.shape) == (b,):
                selected = mask[:, None].expand(b, n).reshape(-1)
            elif tuple(mask.shape) == (b, n):
                selected = mask.reshape(-1)
            else:
                raise ValueError(f"mask must have shape ({b},) or ({b}, {n}) (batch, tokens), got {tuple(mask.shape)}")
            if selected.device != device:
                raise ValueError(f"mask is on {mask.device} but the input is on {device}")
            commit_w = selected.float()
        entropy_w = commit_w
        if self.training and self.frac_per_sample_entropy < 1.:
            # a random fraction of the (selected) tokens, drawn like the anchor (CPU generator, same calls)
            chosen = torch.arange(b * n, device=device) if selected is None else selected.nonzero()[:, 0]
            num_tokens = chosen.numel()
            num_sampled = int(num_tokens * self.frac_per_sample_entropy)
            rand_mask = torch.randn(num_tokens).argsort(dim=-1) < num_sampled
            entropy_w = torch.zeros(b * n, device=device)
            entropy_w[chosen] = rand_mask.to(device).float()
        return entropy_w, commit_w

    # ------------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, inv_temperature: float = 100., return_loss_breakdown: bool = False,
                mask: Optional[Tensor] = None):
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        is_img_or_video = x.ndim >= 4
        should_transpose = self.channel_first if self.channel_first is not None else is_img_or_video
        if x.ndim < 3:
            raise ValueError(f"x must be (batch, seq, {self.dim}) or channel-first (batch, {self.dim}, ...), "
                             f"got shape {tuple(x.shape)}")
        spatial = None
        if should_transpose:
            x = x.movedim(1, -1)
            spatial = x.shape[1:-1]
            x = x.reshape(x.shape[0], -1, x.shape[-1])
            if not isinstance(self.project_in, nn.Identity) or self.orthogonal_rotation or self.spherical:
                # a contiguous copy, as the anchor's einops.pack makes, for the matmuls and the l2norm below to
                # sum in its order, which decides the signs of components within rounding of 0 and the last bit
                # of the normalized values (without a matmul or a norm the kernels read the permuted view in
                # place)
                x = x.contiguous()
        elif x.ndim != 3:
            raise ValueError(f"channel_first=False takes (batch, seq, {self.dim}) inputs, got shape {tuple(x.shape)}")
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected dimension of {self.dim} but received {x.shape[-1]}")

        x = self.project_in(x)
        if self.soft_clamp_input_value is not None:
            clamp_value = self.soft_clamp_input_value
            x = (x / clamp_value).tanh() * clamp_value
        b, n, _ = x.shape
        c, d = self.num_codebooks, self.codebook_dim
        x = x.unflatten(-1, (c, d))
        if self.orthogonal_rotation:
            x = x @ self.orthogonal_rot
        x = self.maybe_l2norm(x)

        force_f32 = self.force_quantization_f32
        context = torch.autocast("cuda", enabled=False) if force_f32 else nullcontext()
        with context:
            orig_dtype = x.dtype
            if force_f32:
                x = x.float()
            original_input = x
            training = self.training
            custom_activation = training and not isinstance(self.activation, nn.Identity)
            # before the token sampling, as in the anchor: a random activation (RReLU, Dropout) and
            # frac_per_sample_entropy's draw share the global generator
            act = self.activation(original_input) if custom_activation else None
            entropy_w, commit_w = self._token_weights(mask, b, n, x.device)
            code_value = self._code_values.get(x.dtype, float(self.codebook_scale))
            entropy_scale = self._code_values[torch.float32]   # the anchor's codebook is float32
            # the straight-through step in torch, as the anchor's, where the kernel's fused one would not give its
            # bits: with a custom activation, and with spherical, whose l2norm's backward reduces in the memory
            # order the gradient arrives in (the anchor's add hands it on as it comes, e.g. channel-first; the
            # fused backward writes it contiguous)
            straight_through_in_torch = training and (custom_activation or self.spherical)
            res = lfq(original_input.reshape(b * n, c, d), code_value, 1.0, entropy_weight=entropy_w,
                      commit_weight=commit_w, straight_through=training and not straight_through_in_torch,
                      with_entropy=training, clamp_compat=self.entropy_clamp_compat,
                      logit_scale=4.0 * float(inv_temperature) * entropy_scale)
            out = res.out.view(b, n, c, d)
            if not training:   # the bare codes, as the anchor: no gradient (None, not zeros) to x or project_in
                out = out.detach()
            indices = res.indices.view(b, n, c)
            if straight_through_in_torch:
                # out holds the codes, from x's signs as the anchor's (a fused x + (q - x) with the activation's
                # output for x would round to 0 or the wrong sign where it dwarfs the code value)
                src = act if custom_activation else original_input
                out = src + (out - src).detach()
            if training:
                per_sample_entropy = res.per_sample_entropy
                codebook_entropy = res.codebook_entropy.mean()
                entropy_aux_loss = per_sample_entropy - self.diversity_gamma * codebook_entropy
                if self.experimental_softplus_entropy_loss:
                    entropy_aux_loss = F.softplus(entropy_aux_loss + self.entropy_loss_offset)
            else:
                entropy_aux_loss = per_sample_entropy = codebook_entropy = self.zero
            commit_loss = res.commitment if training and self.commitment_loss_weight > 0. else self.zero
            if force_f32:
                out = out.type(orig_dtype)

        if self.orthogonal_rotation:
            out = out @ self.orthogonal_rot.t()
        out = self.project_out(out.flatten(-2))
        if should_transpose:
            # the slice of the token axis the anchor's einops.unpack takes (all of it): its backward is a
            # contiguous copy in some torch releases (2.8, not 2.11), which decides the memory order in which the
            # backward's reductions (project_out's weight and bias, spherical's l2norm) sum, and so their bits
            out = out[:, 0:out.shape[1]]
            out = out.unflatten(1, spatial).movedim(-1, 1)
            indices = indices.unflatten(1, spatial)
        if not self.keep_num_codebooks_dim:
            indices = indices[..., 0]
        aux_loss = entropy_aux_loss * self.entropy_loss_weight + commit_loss * self.commitment_loss_weight
        ret = Return(out, indices, aux_loss)
        if not return_loss_breakdown:
            return ret
        return ret, LossBreakdown(per_sample_entropy, codebook_entropy, commit_loss)
