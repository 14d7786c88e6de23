"""Lookup-free quantization (LFQ) ops with exact entropies: torch.library custom ops over the Triton kernels
(``fastsora.kernels.lfq``) or the torch reference (``fastsora.reference.lfq``).

Shapes: ``x`` (T, C, D) — T tokens, C codebooks, D = log2(codebook size) bits; any strides; float16,
bfloat16, float32 (float64 on the torch backend). Weights (T,) are per-token 0/1 masks (any non-negative
weights work: the means are weighted means).

* :func:`lfq_quantize` — codes, indices, straight-through output, per-bit probabilities, per-sample entropy
  and commitment in one pass.
* :func:`lfq_codebook_entropy` — exact entropy (C,) of each codebook's mean code distribution; the 2^D
  distribution is reduced tile by tile and never stored.
* :func:`lfq_code_sums` — the unnormalised code distribution S (C, 2^⌊D/2⌋, 2^⌈D/2⌉) (2^D floats per codebook,
  once): for an all-reduce across ranks or the anchor-compatible clamped entropy.
* :func:`lfq` — the three composed: everything vector-quantize-pytorch's ``LFQ`` computes, exactly.

All are differentiable w.r.t. x (indices excepted) and work under ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import contextlib

import torch
from torch import Tensor

from fastsora.backend import backend_request, interpreter_dtype_reason, select_backend
from fastsora.ops._custom_op import register_namedtuples_for_export, refuse_double_backward, without_autocast
from fastsora.reference import lfq as _ref

__all__ = ["lfq", "lfq_quantize", "lfq_codebook_entropy", "lfq_code_sums", "LFQOutput", "lfq_entropy_of_sums"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _kernels():
    from fastsora.kernels import lfq as kernels

    return kernels


def _check_x(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point() or x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a float16/bfloat16/float32/float64 tensor, got {x.dtype}")
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape (tokens, codebooks, codebook_dim), got {tuple(x.shape)}")
    if x.shape[-1] < 1:
        raise ValueError(f"{name}: codebook_dim (last dim) must be >= 1, got {x.shape[-1]}")


def _check_weight(w: Optional[Tensor], t: int, device: torch.device, name: str) -> None:
    if w is None:
        return
    if not isinstance(w, Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(w).__name__}")
    if w.shape != (t,):
        raise ValueError(f"{name} must have shape ({t},) (one weight per token), got {tuple(w.shape)}")
    if w.device != device:
        raise ValueError(f"{name} is on {w.device} but x is on {device}")


def _check_probs(pos: Tensor, neg: Tensor) -> None:
    _check_x(pos, "prob_pos")
    if neg.shape != pos.shape or neg.dtype != pos.dtype or neg.device != pos.device:
        raise ValueError(f"prob_neg must match prob_pos (shape {tuple(pos.shape)}, {pos.dtype}, {pos.device}); "
                         f"got {tuple(neg.shape)}, {neg.dtype}, {neg.device}")
    if pos.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"prob_pos/prob_neg must be float32 (or float64), got {pos.dtype}")


#: On CPU the torch path runs single-threaded below this many code-table entries (tokens × codebooks ×
#: 2^⌈D/2⌉): its ~40 large ops gain little from intra-op threads and lose a lot to their synchronisation on a
#: busy machine (measured on 2 shared cores: 512 tokens at 2^18 codes 16 ms with 1 thread, 300 ms with 2).
CPU_SINGLE_THREAD_BELOW = 1 << 24


@contextlib.contextmanager
def _cpu_threads(t: Tensor):
    """Single intra-op thread for small CPU problems (restored afterwards); no-op on other devices."""
    if t.device.type != "cpu" or t.dim() != 3:
        yield
        return
    tokens, c, d = t.shape
    if tokens * c * (1 << (d - d // 2)) >= CPU_SINGLE_THREAD_BELOW or torch.get_num_threads() == 1:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _count(w: Optional[Tensor], t: int, like: Tensor) -> Tensor:
    if w is None:
        return torch.full((), float(t), dtype=like.dtype, device=like.device)
    return w.to(like.dtype).sum()


def _x_reason(x: Tensor) -> Optional[str]:
    """The Triton kernels' reason to refuse x (None when they take it or Triton is missing: the backend
    selection then explains that)."""
    try:
        kernels = _kernels()
    except ImportError:
        return None
    return interpreter_dtype_reason(x) or kernels.unsupported_reason(x)


def _probs_reason(pos: Tensor) -> Optional[str]:
    if pos.dtype != torch.float32:
        return f"{str(pos.dtype).removeprefix('torch.')} probabilities (float32 only)"
    return _x_reason(pos)


def _weighted_tokens_only(pos: Tensor, neg: Tensor, w: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """pos, neg with a weight-0 token's bits set to 1/2: a masked-out token adds nothing to the code sums and
    gets a zero gradient, even where its probabilities are NaN (padding garbage; weighting alone would give
    0 · NaN). Both backends' code-table ops see the result; without weights pos, neg pass through."""
    if w is None:
        return pos, neg
    keep = (w.to(pos.dtype) != 0)[:, None, None]   # the weight as the kernels and the torch path read it
    half = torch.full((), 0.5, dtype=pos.dtype, device=pos.device)
    return torch.where(keep, pos, half), torch.where(keep, neg, half)


def _dense_like(t: Tensor) -> Tensor:
    """The fake of a (T, C, D) output or gradient: both backends return it contiguous, whatever t's strides."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------------------------- quantize
@torch.library.custom_op("fastsora::lfq_quantize", mutates_args=())
@without_autocast
def _quantize_op(x: Tensor, code_value: float, logit_scale: float, straight_through: bool, with_entropy: bool,
                 entropy_weight: Optional[Tensor], commit_weight: Optional[Tensor], requested_backend: str
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    t, c, d = x.shape
    backend = select_backend("lfq_quantize", x.device, _x_reason(x), requested_backend, forward=True)
    if backend == "torch":
        with _cpu_threads(x):  # contiguous, as the fake says (the reference keeps a permuted x's strides)
            return tuple(r.contiguous() for r in _ref.quantize(x, code_value, logit_scale, straight_through,
                                                                with_entropy, entropy_weight, commit_weight))
    out, idx, pos, neg, part = _kernels().quantize_fwd(x, code_value, logit_scale, straight_through,
                                                       with_entropy, entropy_weight, commit_weight)
    sums = part.sum(0)
    ps = sums[0] / (_count(entropy_weight, t, sums) * c) if with_entropy else sums.new_zeros(())
    cm = sums[1] / (_count(commit_weight, t, sums) * c * d)
    return out, idx, pos, neg, ps, cm


@_quantize_op.register_fake
def _(x, code_value, logit_scale, straight_through, with_entropy, entropy_weight, commit_weight, requested_backend):
    t, c, d = x.shape
    pdt = _ref.prob_dtype(x.dtype)
    pshape = (t, c, d) if with_entropy else (0,)
    return (_dense_like(x), x.new_empty((t, c), dtype=torch.int64),
            x.new_empty(pshape, dtype=pdt), x.new_empty(pshape, dtype=pdt), x.new_empty((), dtype=pdt),
            x.new_empty((), dtype=pdt))


@torch.library.custom_op("fastsora::lfq_quantize_backward", mutates_args=())
@without_autocast
def _quantize_bwd_op(x: Tensor, grad_out: Optional[Tensor], grad_pos: Optional[Tensor],
                     grad_neg: Optional[Tensor], grad_per_sample: Tensor, grad_commit: Tensor,
                     entropy_weight: Optional[Tensor], commit_weight: Optional[Tensor], code_value: float,
                     logit_scale: float, straight_through: bool, requested_backend: str) -> Tensor:
    t, c, d = x.shape
    backend = select_backend("lfq_quantize_backward", x.device, _x_reason(x), requested_backend)
    if backend == "torch":
        with _cpu_threads(x):
            return _ref.quantize_backward(x, grad_out, grad_pos, grad_neg, grad_per_sample, grad_commit,
                                          entropy_weight, commit_weight, code_value, logit_scale,
                                          straight_through).contiguous()
    f32 = torch.float32
    g_ps, g_cm = grad_per_sample.to(f32), grad_commit.to(f32)
    coef = torch.stack([_ref.mean_cotangent(g_ps, _count(entropy_weight, t, g_ps) * c),
                        2 * _ref.mean_cotangent(g_cm, _count(commit_weight, t, g_cm) * c * d)])
    return _kernels().quantize_bwd(x, grad_out if straight_through else None, grad_pos, grad_neg, coef,
                                   entropy_weight, commit_weight, code_value, logit_scale)


@_quantize_bwd_op.register_fake
def _(x, grad_out, grad_pos, grad_neg, grad_per_sample, grad_commit, entropy_weight, commit_weight, code_value,
      logit_scale, straight_through, requested_backend):
    return _dense_like(x)


def _quantize_setup(ctx, inputs, output):
    x, code_value, logit_scale, straight_through, with_entropy, ew, cw, requested_backend = inputs
    ctx.save_for_backward(x, ew, cw)
    ctx.args = (code_value, logit_scale, straight_through)
    ctx.with_entropy = with_entropy   # without it the per-sample entropy output is a constant 0
    ctx.requested_backend = requested_backend  # the backward resolves as the forward did (see select_backend)


def _quantize_backward(ctx, g_out, g_idx, g_pos, g_neg, g_ps, g_cm):
    x, ew, cw = ctx.saved_tensors
    code_value, logit_scale, straight_through = ctx.args
    pdt = _ref.prob_dtype(x.dtype)
    g_ps = g_ps if g_ps is not None and ctx.with_entropy else x.new_zeros((), dtype=pdt)
    g_cm = g_cm if g_cm is not None else x.new_zeros((), dtype=pdt)
    if g_pos is None or g_neg is None:
        g_pos = g_neg = None
    dx = _quantize_bwd_op(x, g_out, g_pos, g_neg, g_ps, g_cm, ew, cw, code_value, logit_scale, straight_through,
                          ctx.requested_backend)
    return dx, None, None, None, None, None, None, None


_quantize_op.register_autograd(_quantize_backward, setup_context=_quantize_setup)
refuse_double_backward(_quantize_bwd_op, "lfq_quantize")


def lfq_quantize(x: Tensor, code_value: float = 1.0, logit_scale: float = 400.0, straight_through: bool = True,
                 with_entropy: bool = True, entropy_weight: Optional[Tensor] = None,
                 commit_weight: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Quantize ``x`` (T, C, D) to ±code_value per bit, in one pass.

    x: float16/bfloat16/float32, or float64 on the torch backend; any strides. entropy_weight, commit_weight:
    (T,) floating tensors on x's device (per-token weights, e.g. a 0/1 mask), or None for all ones.

    Returns ``(out, indices, prob_pos, prob_neg, per_sample_entropy, commitment)``:
    out (T, C, D) x.dtype = x + (q - x) (straight-through: gradient 1) or q when ``straight_through`` is
    False (a zero gradient; ``LFQ`` detaches it in eval mode); indices (T, C) int64, MSB first;
    prob_pos/prob_neg (T, C, D) float32 (float64 for float64 x) = σ(±logit_scale·x), the per-bit
    probabilities of the code softmax (empty (0,) when ``with_entropy`` is False); per_sample_entropy (0-d,
    float32; float64 for float64 x) = entropy_weight-weighted mean over tokens and codebooks of the code
    distribution's entropy Σ_i h(prob_pos_i) (0 without entropy); commitment (0-d, same dtype) =
    commit_weight-weighted mean over tokens of mean (x - q)².
    vector-quantize-pytorch's softmax over codes with logits 2·τ·<x, c> has logit_scale = 4·τ·code_value.
    """
    _check_x(x)
    t = x.shape[0]
    _check_weight(entropy_weight, t, x.device, "entropy_weight")
    _check_weight(commit_weight, t, x.device, "commit_weight")
    return _quantize_op(x, float(code_value), float(logit_scale), bool(straight_through), bool(with_entropy),
                        entropy_weight, commit_weight, backend_request())


# --------------------------------------------------------------------------------------- codebook entropy
@torch.library.custom_op("fastsora::lfq_codebook_entropy", mutates_args=())
@without_autocast
def _entropy_op(prob_pos: Tensor, prob_neg: Tensor, entropy_weight: Optional[Tensor], requested_backend: str,
                centered: bool = False) -> Tensor:
    """``centered`` changes the backward only (see :func:`_entropy_bwd_op`)."""
    t, c, d = prob_pos.shape
    backend = select_backend("lfq_codebook_entropy", prob_pos.device, _probs_reason(prob_pos), requested_backend,
                             forward=True)
    if backend == "torch":
        with _cpu_threads(prob_pos):
            return _ref.codebook_entropy(prob_pos, prob_neg, entropy_weight)
    n = _count(entropy_weight, t, prob_pos)
    h = _kernels().code_pair(prob_pos.contiguous(), prob_neg.contiguous(), entropy_weight, n, 0).sum((1, 2))
    return torch.where(n > 0, h, torch.nan)  # no token weighted: 0/0, NaN as on the torch path and the anchor


@_entropy_op.register_fake
def _(prob_pos, prob_neg, entropy_weight, requested_backend, centered=False):
    return prob_pos.new_empty((prob_pos.shape[1],))


@torch.library.custom_op("fastsora::lfq_codebook_entropy_backward", mutates_args=())
@without_autocast
def _entropy_bwd_op(prob_pos: Tensor, prob_neg: Tensor, entropy_weight: Optional[Tensor], grad: Tensor,
                    entropy: Optional[Tensor], requested_backend: str) -> Tuple[Tensor, Tensor]:
    """With ``entropy`` (the forward's H, (C,)) the code-sum cotangents -(log a + 1)·g/n are centred on their
    a-weighted mean (H - 1)·g/n: a constant per codebook adds the same amount to d/dprob_pos and d/dprob_neg, so
    their difference (all that lfq_quantize's backward uses) keeps its value, and near a uniform code
    distribution it no longer cancels d·log 2-sized terms in fp32."""
    t, c, d = prob_pos.shape
    backend = select_backend("lfq_codebook_entropy_backward", prob_pos.device, _probs_reason(prob_pos),
                             requested_backend)
    if backend == "torch":
        with _cpu_threads(prob_pos):
            grads = _ref.codebook_entropy_backward(prob_pos, prob_neg, entropy_weight, grad, entropy)
        return tuple(g.contiguous() for g in grads)
    k = _kernels()
    pos, neg = prob_pos.contiguous(), prob_neg.contiguous()
    tables = k.code_tables(pos, neg, entropy_weight)
    n = _ref.safe_count(_count(entropy_weight, t, pos))
    g_sums = k.code_pair(pos, neg, entropy_weight, n, 1, grad, tables)
    if entropy is not None:
        shift = entropy.to(g_sums.dtype).nan_to_num(1.0) - 1  # H is NaN only when no token is weighted
        g_sums = g_sums - (shift * grad.to(g_sums.dtype) / n).view(-1, 1, 1)
    return k.code_pair_bwd(pos, neg, entropy_weight, g_sums, tables)


@_entropy_bwd_op.register_fake
def _(prob_pos, prob_neg, entropy_weight, grad, entropy, requested_backend):
    return _dense_like(prob_pos), _dense_like(prob_neg)


def _probs_setup(ctx, inputs, output):
    """Saves prob_pos, prob_neg, entropy_weight and, for the centred codebook entropy, its output H (else None:
    see _entropy_bwd_op); inputs are (prob_pos, prob_neg, entropy_weight, requested_backend[, centered])."""
    centered = len(inputs) > 4 and inputs[4]
    ctx.save_for_backward(*inputs[:3], output if centered else None)
    ctx.requested_backend = inputs[3]  # the backward resolves as the forward did (see select_backend)


def _zero_without_tokens(grad: Tensor, pos: Tensor, w: Optional[Tensor]) -> Tensor:
    """The cotangent, or 0 when no token is weighted (on this rank): the output then depends on no token, so
    its gradient is 0 whatever the cotangent, also a NaN one from a loss that is NaN for the same reason
    (experimental_softplus_entropy_loss: softplus'(NaN))."""
    return torch.where(_count(w, pos.shape[0], grad) > 0, grad, torch.zeros_like(grad))


def _entropy_backward(ctx, grad):
    pos, neg, w, entropy = ctx.saved_tensors
    grad = _zero_without_tokens(grad, pos, w)
    dpos, dneg = _entropy_bwd_op(pos, neg, w, grad, entropy, ctx.requested_backend)
    return dpos, dneg, None, None, None


_entropy_op.register_autograd(_entropy_backward, setup_context=_probs_setup)
refuse_double_backward(_entropy_bwd_op, "lfq_codebook_entropy")


def lfq_codebook_entropy(prob_pos: Tensor, prob_neg: Tensor, entropy_weight: Optional[Tensor] = None) -> Tensor:
    """Exact entropy (C,) of each codebook's weighted-mean code distribution, from the per-bit
    probabilities prob_pos, prob_neg (T, C, D) of :func:`lfq_quantize` (float32, or float64 on the torch
    backend; the result has their dtype); entropy_weight (T,) per-token weights or None (a token of weight 0
    adds nothing, whatever its probabilities). One GEMM per codebook (hi bits × lo bits) with the entropy
    reduced in its epilogue: O(T·2^(D/2)) work memory, the 2^D distribution is never stored."""
    _check_probs(prob_pos, prob_neg)
    _check_weight(entropy_weight, prob_pos.shape[0], prob_pos.device, "entropy_weight")
    prob_pos, prob_neg = _weighted_tokens_only(prob_pos, prob_neg, entropy_weight)
    return _entropy_op(prob_pos, prob_neg, entropy_weight, backend_request())


# --------------------------------------------------------------------------------------------- code sums
@torch.library.custom_op("fastsora::lfq_code_sums", mutates_args=())
@without_autocast
def _sums_op(prob_pos: Tensor, prob_neg: Tensor, entropy_weight: Optional[Tensor], requested_backend: str
             ) -> Tensor:
    t, c, d = prob_pos.shape
    backend = select_backend("lfq_code_sums", prob_pos.device, _probs_reason(prob_pos), requested_backend,
                             forward=True)
    if backend == "torch":
        with _cpu_threads(prob_pos):
            return _ref.code_sums(prob_pos, prob_neg, entropy_weight)
    n = _count(entropy_weight, t, prob_pos)
    return _kernels().code_pair(prob_pos.contiguous(), prob_neg.contiguous(), entropy_weight, n, 2)


@_sums_op.register_fake
def _(prob_pos, prob_neg, entropy_weight, requested_backend):
    t, c, d = prob_pos.shape
    return prob_pos.new_empty((c, 2 ** (d // 2), 2 ** (d - d // 2)))


@torch.library.custom_op("fastsora::lfq_code_sums_backward", mutates_args=())
@without_autocast
def _sums_bwd_op(prob_pos: Tensor, prob_neg: Tensor, entropy_weight: Optional[Tensor], grad: Tensor,
                 requested_backend: str) -> Tuple[Tensor, Tensor]:
    backend = select_backend("lfq_code_sums_backward", prob_pos.device, _probs_reason(prob_pos),
                             requested_backend)
    if backend == "torch":
        with _cpu_threads(prob_pos):
            grads = _ref.code_sums_backward(prob_pos, prob_neg, entropy_weight, grad)
        return tuple(g.contiguous() for g in grads)
    return _kernels().code_pair_bwd(prob_pos.contiguous(), prob_neg.contiguous(), entropy_weight, grad)


@_sums_bwd_op.register_fake
def _(prob_pos, prob_neg, entropy_weight, grad, requested_backend):
    return _dense_like(prob_pos), _dense_like(prob_neg)


def _sums_backward(ctx, grad):
    pos, neg, w, _ = ctx.saved_tensors
    grad = _zero_without_tokens(grad, pos, w)
    dpos, dneg = _sums_bwd_op(pos, neg, w, grad, ctx.requested_backend)
    return dpos, dneg, None, None


_sums_op.register_autograd(_sums_backward, setup_context=_probs_setup)
refuse_double_backward(_sums_bwd_op, "lfq_code_sums")


def lfq_code_sums(prob_pos: Tensor, prob_neg: Tensor, entropy_weight: Optional[Tensor] = None) -> Tensor:
    """S (C, 2^⌊D/2⌋, 2^⌈D/2⌉) = Σ_t w_t P_hi[t]ᵀ P_lo[t]: the unnormalised code distribution
    (code index = row·2^⌈D/2⌉ + column, MSB first). prob_pos, prob_neg (T, C, D) float32 (float64 on the torch
    backend; S has their dtype), entropy_weight w (T,) or None (all ones; a token of weight 0 adds nothing,
    whatever its probabilities). Materialises 2^D floats per codebook (once)."""
    _check_probs(prob_pos, prob_neg)
    _check_weight(entropy_weight, prob_pos.shape[0], prob_pos.device, "entropy_weight")
    prob_pos, prob_neg = _weighted_tokens_only(prob_pos, prob_neg, entropy_weight)
    return _sums_op(prob_pos, prob_neg, entropy_weight, backend_request())


def lfq_entropy_of_sums(sums: Tensor, count: Tensor, clamp: Optional[float] = None) -> Tensor:
    """Entropy (C,) of sums/count (see :func:`lfq_code_sums`): exact for ``clamp=None``; ``clamp=1e-5``
    reproduces vector-quantize-pytorch's -Σ a·log(max(a, 1e-5)). sums (C, ...) float32/float64; count: the
    total token weight, a number or 0-d tensor (a count of 0 gives NaN, as the anchor's 0/0). Result in sums'
    dtype."""
    return _ref.entropy_of_sums(sums, count, clamp)


# ---------------------------------------------------------------------------------------------- composed
class LFQOutput(NamedTuple):
    out: Tensor                 # (T, C, D) straight-through output (or q)
    indices: Tensor             # (T, C) int64
    per_sample_entropy: Tensor  # 0-d
    codebook_entropy: Tensor    # (C,)
    commitment: Tensor          # 0-d


register_namedtuples_for_export(LFQOutput)


@torch.library.custom_op("fastsora::lfq_global_sum", mutates_args=())
def _global_sum(t: Tensor) -> Tensor:
    """t summed over the ranks of the default process group (all_reduce of a copy; t is left as it is).

    A custom op, so torch.compile keeps it whole: dynamo's rewrite of an in-place ``dist.all_reduce`` inside an
    ``autograd.Function`` gives zero gradients under torch 2.11 (2.8 and 2.13 are right; the compiled DDP test
    caught it)."""
    import torch.distributed as dist

    out = t.clone()
    dist.all_reduce(out)
    return out


@_global_sum.register_fake
def _(t):
    return torch.empty_like(t)


def _global_sum_backward(ctx, grad: Tensor) -> Tensor:
    """The local cotangent times the world size. Every rank's loss weighs the global value alike (LFQ's does), so
    a collective backward would sum world-size equal cotangents: the same gradient, but this backward has no
    collective (a rank that skips its backward, e.g. for a NaN loss, does not hang the others) and one rank's
    NaN cotangent stays on that rank."""
    import torch.distributed as dist

    return grad * dist.get_world_size()


_global_sum.register_autograd(_global_sum_backward)


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def lfq(x: Tensor, code_value: float = 1.0, inv_temperature: float = 100.0, *, entropy_weight: Optional[Tensor] = None,
        commit_weight: Optional[Tensor] = None, straight_through: bool = True, with_entropy: bool = True,
        clamp_compat: bool = False, distributed: Optional[bool] = None,
        logit_scale: Optional[float] = None) -> LFQOutput:
    """Quantize x (T, C, D) and compute LFQ's losses exactly.

    x: float16/bfloat16/float32 (float64 on the torch backend); entropy_weight, commit_weight (T,) per-token
    weights or None (see :func:`lfq_quantize`).

    The code softmax has logits 2·inv_temperature·<x, c> over c ∈ {±code_value}^D. ``clamp_compat=True``
    computes the codebook entropy as vector-quantize-pytorch does (log clamped at 1e-5; the 2^D distribution
    is then materialised once). ``distributed`` (default: a process group with >1 rank is initialised): the
    code distribution is all-reduced (sums and token counts) so the codebook entropy is the exact global
    one; the backward scales the local cotangent by the world size (see :func:`_global_sum_backward`), so
    DDP's gradient averaging yields the gradient of the global entropy. ``logit_scale`` overrides
    4·inv_temperature·code_value (the per-bit logit is logit_scale·x).

    Returns ``LFQOutput(out (T, C, D) x.dtype, indices (T, C) int64, per_sample_entropy (0-d),
    codebook_entropy (C,), commitment (0-d))``, the losses float32 (float64 for float64 x).
    """
    if logit_scale is None:
        logit_scale = 4.0 * float(inv_temperature) * float(code_value)
    out, idx, pos, neg, ps, cm = lfq_quantize(x, code_value, logit_scale,
                                              straight_through, with_entropy, entropy_weight, commit_weight)
    if not with_entropy:
        return LFQOutput(out, idx, ps, ps.new_zeros((x.shape[1],)), cm)
    if distributed is None:
        distributed = _distributed()
    if distributed or clamp_compat:
        sums = lfq_code_sums(pos, neg, entropy_weight)
        count = _count(entropy_weight, x.shape[0], sums)
        if distributed:
            sums, count = _global_sum(sums), _global_sum(count)
        cb = lfq_entropy_of_sums(sums, count, 1e-5 if clamp_compat else None)
    else:
        # pos and neg reach x only through lfq_quantize's backward, which takes d/dpos - d/dneg: the centred
        # backward is exact for it and keeps fp32 precision near a uniform code distribution
        pos, neg = _weighted_tokens_only(pos, neg, entropy_weight)
        cb = _entropy_op(pos, neg, entropy_weight, backend_request(), True)
    return LFQOutput(out, idx, ps, cb, cm)
