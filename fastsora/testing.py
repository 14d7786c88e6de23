"""Test helpers: random inputs, float64 references, tolerances, layout variants, NaN-poisoned outputs."""
from __future__ import annotations

import contextlib
import os
import random
import re
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from fastsora.kernels.utils import poisoned_outputs  # noqa: F401  (re-exported for tests)

#: Allowed relative error (max |out - ref| / max |ref|) of a kernel against a float64 reference.
#: fp32 leaves room for tf32 dots on GPUs; the interpreter computes fp32 exactly.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}

#: Gradient tolerances of the varlen attention kernels against their float64 reference (relative to its max)
ATTENTION_GRAD_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

TensorTree = Union[torch.Tensor, Sequence[Any], None]

#: The source checkout (README.md and docs/ are read from it; they are not installed).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def randn(*shape: int, dtype=torch.float32, device="cpu", requires_grad: bool = False, scale: float = 1.0,
          generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Fresh standard-normal values (never zeros), made in fp32 and cast, optionally a grad leaf."""
    t = (torch.randn(*shape, dtype=torch.float32, device=device, generator=generator) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


def to_float64(tree: Any) -> Any:
    """Detached float64 CPU copies of every floating tensor in ``tree`` (other leaves pass through)."""
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point():
            return tree.detach().to("cpu", torch.float64).requires_grad_(tree.requires_grad)
        return tree.cpu()
    if isinstance(tree, (list, tuple)):
        items = [to_float64(t) for t in tree]
        return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)  # namedtuples take *args
    if isinstance(tree, dict):
        return {k: to_float64(v) for k, v in tree.items()}
    return tree


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| in float64 (NaN anywhere in ``out`` gives inf)."""
    out64 = out.detach().to("cpu", torch.float64)
    ref64 = ref.detach().to("cpu", torch.float64)
    if out64.shape != ref64.shape:
        raise AssertionError(f"shape {tuple(out64.shape)} differs from reference {tuple(ref64.shape)}")
    if out64.numel() == 0:
        return 0.0
    if not torch.isfinite(out64).all() and torch.isfinite(ref64).all():
        return float("inf")
    denom = ref64.abs().max().item()
    err = (out64 - ref64).abs().max().item()
    return err / denom if denom > 0 else err


def assert_close(out: Any, ref: Any, dtype: torch.dtype, name: str = "output", tol: Optional[float] = None):
    """Assert every tensor of ``out`` is within the dtype tolerance of the matching tensor of ``ref``."""
    tol = TOLERANCE[dtype] if tol is None else tol
    for i, (o, r) in enumerate(zip(_flatten(out), _flatten(ref), strict=True)):
        err = relative_error(o, r)
        assert err <= tol, f"{name}[{i}]: relative error {err:.3e} > {tol:.1e} ({dtype})"


def assert_flash_rule(out: torch.Tensor, ref64: torch.Tensor, same_precision_torch: torch.Tensor,
                      factor: float = 2.0, name: str = "output", atol: float = 1e-6) -> None:
    """flash-attn's CUDA rule: max error vs the fp64/fp32 reference <= factor x the error of the same
    computation done by torch at the kernel's precision (plus a tiny floor)."""
    out, ref64, same_precision_torch = (t.detach().to("cpu", torch.float64) for t in (out, ref64, same_precision_torch))
    assert out.shape == ref64.shape == same_precision_torch.shape, (
        f"{name}: shapes {tuple(out.shape)}, reference {tuple(ref64.shape)}, torch {tuple(same_precision_torch.shape)}")
    if out.numel() == 0:
        return
    err = (out - ref64).abs().max().item()
    base = (same_precision_torch - ref64).abs().max().item()
    assert err <= factor * base + atol, f"{name}: error {err:.3e} > {factor} x torch error {base:.3e}"


def assert_within_or_like_torch(name: str, got: torch.Tensor, want: torch.Tensor, tol: float, cap: float,
                                torch_backend_run: Callable[[], torch.Tensor], where: str) -> None:
    """``got`` within ``tol`` (:func:`relative_error`) of the float64 ``want``; or else no worse than twice the error
    of ``torch_backend_run()`` (the torch backend's same computation in the same dtype, run only then), for cases
    where that rounding, shared by both backends, is what the tolerance does not allow for. Only up to ``cap`` x
    ``tol``: past it the float64 comparison alone decides. ``where`` ends the failure message (the fuzz case)."""
    err = relative_error(got, want)
    if err > tol:
        base = relative_error(torch_backend_run(), want)
        assert err <= min(2 * base, cap * tol), (
            f"{name}: relative error {err:.3e} > {tol:.1e} (and > min(2 x the torch backend's {base:.3e}, "
            f"{cap} x the tolerance)); {where}")


def assert_module_parity(out: torch.Tensor, got: Sequence[torch.Tensor], ref: torch.Tensor,
                         want: Sequence[torch.Tensor], names: Sequence[str], dtype: torch.dtype,
                         same_precision_run, where: str = "") -> None:
    """A module's output and the gradients ``got`` (of the inputs and parameters ``names``) against its float64
    twin's ``ref`` and ``want``. fp32: within TOLERANCE. fp16 / bf16: within the attention tolerances (output 2 x
    TOLERANCE, gradients ATTENTION_GRAD_TOL), or else by flash-attn's rule against ``same_precision_run()`` ->
    (out, grads), the torch backend's run of the module at the same precision, which shares the projections'
    rounding (run only then): output 2x and gradients 3x its error, and never past 4x the tolerance. The rule
    alone is noisy for a small gradient summed over many tokens (a norm weight's), where torch's run may land near
    float64 by chance; the cap keeps it from passing what is far from float64 in both runs (a wrong definition).
    ``where`` ends each failure message."""
    suffix = f"; {where}" if where else ""
    if dtype == torch.float32:
        assert_close(out, ref, dtype, f"out{suffix}")
        for name, a, b in zip(names, got, want, strict=True):
            assert_close(a, b, dtype, f"d{name}{suffix}")
        return
    checks = [("out", out, ref, 2 * TOLERANCE[dtype], 2.0)]
    checks += [(f"d{name}", a, b, ATTENTION_GRAD_TOL[dtype], 3.0) for name, a, b in zip(names, got, want, strict=True)]
    torch_run = []
    for i, (name, a, b, tol, factor) in enumerate(checks):
        err = relative_error(a, b)
        if err > tol:
            assert err <= 4 * tol, f"{name}: relative error {err:.3e} > 4 x {tol:.1e} ({dtype}){suffix}"
            if not torch_run:
                out_t, got_t = same_precision_run()
                torch_run.extend([out_t, *got_t])
            assert_flash_rule(a, b, torch_run[i], factor=factor, name=f"{name}{suffix}")


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """The same values in channels_last (4-D) / channels_last_3d (5-D) memory order."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}[t.dim()]
    return t.detach().contiguous(memory_format=fmt).requires_grad_(t.requires_grad)


def noncontiguous(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The same values as a strided view (every other element of a buffer twice as long along ``dim``)."""
    dim = dim % t.dim()
    shape = list(t.shape)
    shape[dim] *= 2
    buf = torch.randn(shape, dtype=torch.float32, device=t.device).to(t.dtype)
    view = buf[tuple(slice(None, None, 2) if d == dim else slice(None) for d in range(t.dim()))]
    view.copy_(t.detach())
    assert not view.is_contiguous() or t.shape[dim] <= 1
    return view.requires_grad_(t.requires_grad)


@contextlib.contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True)`` inside the block, the previous setting restored after."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def spread_past_int32(t: torch.Tensor) -> torch.Tensor:
    """The same values as a view whose slices along dim 0 lie about 2^30 elements apart inside one storage of
    more than 2^31 elements, so the last slices sit past 2^31: an offset computed in int32 would wrap there.

    The storage is left uninitialised except under the view (on CPU its untouched pages cost no memory). The
    dim-0 stride stays below 2^31 and is a multiple of 8 elements, so no kernel launcher copies the view for
    alignment; ``t`` needs at least 3 slices along dim 0."""
    if t.shape[0] < 3:
        raise ValueError(f"spread_past_int32: t needs at least 3 slices along dim 0; got shape {tuple(t.shape)}")
    inner = t[0].numel()
    gap = (2 ** 31 // (t.shape[0] - 1) + 8 + inner) // 8 * 8
    storage = torch.empty(gap * (t.shape[0] - 1) + inner, dtype=t.dtype, device=t.device)
    view = storage.as_strided(t.shape, (gap,) + tuple(t[0].contiguous().stride()))
    view.copy_(t.detach())
    assert view.storage_offset() + (t.shape[0] - 1) * gap >= 2 ** 31 and gap < 2 ** 31
    return view.requires_grad_(t.requires_grad)


def _flatten(tree: TensorTree) -> Iterable[torch.Tensor]:
    if tree is None:
        return []
    if isinstance(tree, torch.Tensor):
        return [tree]
    flat = []
    for t in tree:
        flat.extend(_flatten(t))
    return flat


def grads(outputs: Any, inputs: Sequence[torch.Tensor], seed: int = 0,
          spread: bool = False) -> Tuple[torch.Tensor, ...]:
    """Gradients of <outputs, R> (R a fixed random projection, same for every backend) w.r.t. ``inputs``.

    The projection is drawn from a seeded CPU generator in float64 and cast, so a kernel run and its float64
    reference see the same cotangent. ``spread``: each cotangent is a :func:`spread_past_int32` view (the
    same values, its later slices past 2^31 elements of their storage), so a backward that reads the
    incoming gradient in place must use int64 offsets."""
    gen = torch.Generator().manual_seed(seed)
    outs = [o for o in _flatten(outputs) if o.is_floating_point() and o.requires_grad]
    cot = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype) for o in outs]
    if spread:
        cot = [spread_past_int32(c) for c in cot]
    return torch.autograd.grad(outs, list(inputs), cot, allow_unused=False)


def packed_offsets(lengths: Sequence[int], device: Any = "cpu") -> torch.Tensor:
    """int32 (len(lengths) + 1,) prefix sums of ``lengths``: the cu_seqlens of sequences packed in that order."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + int(n))
    return torch.tensor(out, dtype=torch.int32, device=device)


def attention_per_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens_q: Sequence[int],
                           lens_k: Sequence[int], scale: float, causal_mode: int,
                           window: Tuple[int, int] = (-1, -1)) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of packed sequences written out per sequence and query head from the masks' definitions,
    independent of fastsora.reference (a test oracle for it and for the modules). q (Tq, Hq, D), k and v (Tk, Hkv,
    D) with Hq a multiple of Hkv (GQA), sequences of ``lens_q`` / ``lens_k`` tokens packed from row 0.
    ``causal_mode`` 0 sees every key; 1 key j from query i when j <= i + Lk - Lq (bottom-right, flash-attn's
    causal); 2 when j <= i (top-left). ``window`` (left, right), flash-attn's sliding window, -1 unbounded:
    also only keys with -left <= j - (i + shift) <= right, shift = 0 in mode 2 and Lk - Lq otherwise. A row that
    sees no key, and a tail row past the last sequence, gives 0 with LSE +inf. Returns (out like q, LSE (Hq, Tq)
    in q's dtype); differentiable."""
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("inf"), dtype=q.dtype, device=q.device)
    group = q.shape[1] // k.shape[1]
    a = b = 0
    for lq, lk in zip(lens_q, lens_k):
        i = torch.arange(lq, device=q.device)[:, None]
        j = torch.arange(lk, device=q.device)[None, :]
        everything = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
        seen = {0: everything, 1: j <= i + lk - lq, 2: j <= i}[causal_mode]
        offset = j - i - (0 if causal_mode == 2 else lk - lq)   # key position relative to the query's own
        if window[0] != -1:
            seen = seen & (offset >= -window[0])
        if window[1] != -1:
            seen = seen & (offset <= window[1])
        has_key = seen.any(1)
        for h in range(q.shape[1]):
            s = (q[a:a + lq, h] @ k[b:b + lk, h // group].T * scale).masked_fill(~seen, float("-inf"))
            p = torch.where(has_key[:, None], s.softmax(-1), 0.0) if lk else s.new_zeros(lq, 0)
            out[a:a + lq, h] = p @ v[b:b + lk, h // group]
            lse[h, a:a + lq] = torch.where(has_key, s.logsumexp(-1), float("inf")) if lk else float("inf")
        a, b = a + lq, b + lk
    return out, lse


def varlen_attention_module_definition(module: torch.nn.Module, x: torch.Tensor, lens_q: Sequence[int],
                                       context: Optional[torch.Tensor] = None,
                                       lens_k: Optional[Sequence[int]] = None) -> torch.Tensor:
    """fastsora.nn.VarlenAttention written out (a test oracle; call it on a float64 copy of the module with float64
    x and context): projections to heads ([q | k | v] of x, or q of x and [k | v] of the context), the module's q and
    k norms, attention within each sequence (:func:`attention_per_sequence`: the module's scale, bottom-right causal
    mask and window), the output projection. x (total_q, dim), context (total_k, cross_attention_dim) with
    cross-attention (sequences of ``lens_k`` keys), else the keys are x's (``lens_q``). A pack with no query (or no
    key) anywhere still gives x, the context and the parameters a gradient, 0, as the module's own graph does: an
    empty slice's sum ties them in."""
    h, hkv, d = module.num_heads, module.num_kv_heads, module.head_dim
    if module.is_cross:
        q = module.q(x).view(-1, h, d)
        k, v = module.kv(context).view(-1, 2, hkv, d).unbind(1)
    else:
        qkv = module.qkv(x)
        q = qkv[:, :h * d].view(-1, h, d)
        k, v = qkv[:, h * d:].view(-1, 2, hkv, d).unbind(1)
        lens_k = lens_q
    scale = d ** -0.5 if module.softmax_scale is None else module.softmax_scale
    out, _ = attention_per_sequence(module.q_norm(q), module.k_norm(k), v, lens_q, lens_k, scale,
                                    1 if module.causal else 0, module.window_size)
    unread = [t for t in (x, context, *module.parameters()) if t is not None]
    return module.proj(out.reshape(-1, h * d)) + sum(t.reshape(-1)[:0].sum() for t in unread)


#: the fuzz suites' settings: FASTSORA_FUZZ_CASES cases per suite (default 16); FASTSORA_FUZZ_SEED, drawn afresh
#: per run by conftest.py (which shows it in pytest's header) unless given, so a failing case reproduces with
#: ``FASTSORA_FUZZ_SEED=<seed> pytest -m slow <file> -k 'case<N>]'``
FUZZ_CASES_ENV, FUZZ_SEED_ENV = "FASTSORA_FUZZ_CASES", "FASTSORA_FUZZ_SEED"


def fuzz_cases(default: int = 16) -> range:
    """The case numbers of a fuzz suite: ``range(FASTSORA_FUZZ_CASES)``."""
    return range(int(os.environ.get(FUZZ_CASES_ENV, default)))


def fuzz_random(case: int) -> Tuple[random.Random, str]:
    """A ``random.Random`` for fuzz case ``case`` of this run's seed, and the words that reproduce it."""
    seed = int(os.environ.get(FUZZ_SEED_ENV, "0"))
    return random.Random(seed * 1_000_003 + case), f"{FUZZ_SEED_ENV}={seed}, case {case}"


def causal_conv3d_definition(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None,
                             r: Optional[torch.Tensor] = None, *, stride: int = 1, dilation: int = 1,
                             pad_mode: str = "constant", activation: Optional[str] = None,
                             whole_clip: bool = True) -> torch.Tensor:
    """magvit2-pytorch's CausalConv3d written out with F.pad + F.conv3d, in float64 (floating inputs of other
    dtypes are copied to float64 leaves), independent of fastsora.reference (a test oracle for it and for the
    kernels). x (B, C_in, T, H, W), w (C_out, C_in, kt, kh, kw), b (C_out,), r (B, C_out, T // stride, H, W): time
    padded at the front by time_pad = dilation·(kt − 1) + 1 − stride frames (negative: that many cropped), height
    and width by kh // 2, kw // 2 on both sides, zeros ('constant') or edge values ('replicate'); a whole-clip
    call with time_pad >= T pads with zeros (the short-clip fallback; ``whole_clip=False``, a chunk of a stream,
    never falls back). Then y = act(conv + b) + r, act None or 'silu'."""
    x, w, b, r = [t if t is None or t.dtype == torch.float64 else to_float64(t) for t in (x, w, b, r)]
    kt, kh, kw_ = w.shape[2:]
    tp = dilation * (kt - 1) + (1 - stride)
    mode = pad_mode if tp < x.shape[2] or not whole_clip else "constant"
    y = F.conv3d(F.pad(x, (kw_ // 2, kw_ // 2, kh // 2, kh // 2, tp, 0), mode=mode), w, b,
                 stride=(stride, 1, 1), dilation=(dilation, 1, 1))
    if activation == "silu":
        y = F.silu(y)
    return y + r if r is not None else y


def assert_compiles_clean(key: str, config: Any, arch: str, result: Any) -> None:
    """The compile tests' rule for one build of ``config`` (a ``KernelConfig`` of kernel ``key``) for ``arch``, whose
    ``fastsora.aot.compile_config`` result is ``result``: no problem at all, or only a stack frame the config
    documents for the running triton release (``KernelConfig.stack_frame_known``), which is an xfail."""
    import pytest
    import triton

    if config.stack_frame_known(result.problems, triton.__version__):
        pytest.xfail(f"documented stack frame under triton {triton.__version__}: {result.problems}")
    assert result.problems == [], f"{key} [{config.label}] on {arch}: {result.problems}"


def doc_examples(relative_path: str) -> Tuple[str, ...]:
    """The fenced ```python blocks of a Markdown file of the checkout (``README.md``, ``docs/<family>.md``), in
    order, as source to ``exec``: the tests run the documented examples so they cannot drift from the API."""
    with open(os.path.join(REPO_ROOT, relative_path), encoding="utf-8") as f:
        text = f.read()
    blocks = tuple(re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M))
    if not blocks:
        raise ValueError(f"{relative_path} has no ```python block")
    return blocks
