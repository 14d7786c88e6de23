"""Fuzz suite for varlen (packed) attention on the Triton backend (the interpreter on CPU): random packs against
attention written out per sequence in float64 (fastsora.testing.attention_per_sequence) - output, LSE and the
gradients of q, k, v (through the LSE too, sometimes); every other case also checks the custom ops' fake
implementations (opcheck).

Each case draws from its own seeded generator: 1-4 sequences with ragged query lengths (0, 1, multiples of 16 and
not), self- or cross-attention (separate key lengths, Lk < Lq and Lk > Lq), GQA / MQA heads, head dims from 8 to
256 (fewer tokens for the large ones), causal on / off, flash-attn sliding windows (sides -1, 0 or a number of
keys, either side, through flash-attn's ``max_seqlen_k`` rule when an int is passed), a default or random
``softmax_scale``, non-contiguous inputs, tail rows past ``cu_seqlens[-1]`` (sometimes NaN-filled: output 0,
LSE +inf, zero gradient) and the entry point (``varlen_attention``, ``flash_attn_varlen_func`` with or without
``return_attn_probs``, and the qkv-packed / kv-packed forms when the shapes allow).

test_xformers_and_fixed_length_fuzz draws, per case, either xformers' ``memory_efficient_attention`` (every mask
class of docs/varlen_attention.md or None, from its constructor or a helper such as ``make_causal``; blocks or
batch elements of 0, 1 or more tokens with Lq != Lk; random ``_window_size`` / ``window_left`` / ``window_right``
for the local classes, past the key count too; the [B, M, K], [B, M, H, K] (fewer key heads: GQA) and
[B, M, G, H, K] layouts, key and value there expanded over H, of size 1 or per head) or one of flash-attn's
fixed-length forms (``flash_attn_func`` / ``_qkvpacked_func`` / ``_kvpacked_func``: batch 1-3, seqlen_q and
seqlen_k, causal from the bottom-right, ``window_size`` with its seqlen_k rule, GQA, the LSE), a default or
random scale and sometimes strided inputs; output, LSE and the gradient of every input tensor are checked against
``attention_per_sequence`` with each mask's documented alignment (xformers' plain causal masks are top-left).

Marked slow (CI deselects it). ``FASTSORA_FUZZ_CASES`` sets the number of cases (default 16 per dtype);
``FASTSORA_FUZZ_SEED`` (shown in pytest's header, drawn afresh per run unless given) reproduces a run:
``FASTSORA_FUZZ_SEED=<seed> pytest -m slow tests/test_varlen_attention_fuzz.py -k 'case<N>]'``."""
import random
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytest
import torch

import fastsora.ops
from fastsora import use_backend
from fastsora.ops import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func, flash_attn_varlen_func,
                          flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func,
                          memory_efficient_attention, varlen_attention)
from fastsora.testing import (ATTENTION_GRAD_TOL, TOLERANCE, assert_within_or_like_torch, attention_per_sequence,
                              fuzz_cases, fuzz_random, grads, noncontiguous, packed_offsets, randn, relative_error,
                              to_float64)

pytestmark = pytest.mark.slow

HEAD_DIMS = (8, 16, 24, 40, 64, 72, 96, 128, 256)
#: how far past ATTENTION_GRAD_TOL a gradient may be where the torch backend's error in the same dtype is as large
FALLBACK_CAP = 4
ENTRY_POINTS = ("varlen_attention", "flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func",
                "flash_attn_varlen_kvpacked_func")


def _longest(d: int) -> int:
    """The longest sequence drawn at head dim ``d``: each case stays within a few seconds in the interpreter."""
    return 128 if d <= 40 else 80 if d <= 96 else 64 if d <= 128 else 40


def _lengths(rng, n: int, longest: int) -> List[int]:
    def one():
        r = rng.random()
        if r < 0.15:
            return 0
        if r < 0.3:
            return 1
        if r < 0.4:
            return min(rng.choice((16, 32, 64)), longest)   # tile-sized
        return rng.randint(2, longest)
    return [one() for _ in range(n)]


def _side(rng, longest: int, max_k: int) -> int:
    """A window side: -1, 0, about max_seqlen_k (where flash-attn's rule turns it to -1) or a number of keys."""
    r = rng.random()
    if r < 0.25:
        return -1
    if r < 0.45:
        return 0
    if r < 0.6:
        return max(max_k + rng.randint(-1, 1), 0)
    return rng.randint(1, longest + 8)


def draw(case: int) -> Tuple[Dict[str, Any], str]:
    """The configuration of fuzz case ``case`` and the words that reproduce it."""
    rng, reproduce = fuzz_random(case)
    entry = rng.choice(ENTRY_POINTS)
    d = rng.choice(HEAD_DIMS)
    longest = _longest(d)
    batch = rng.randint(1, 4)
    lq = _lengths(rng, batch, longest)
    self_attention = entry == "flash_attn_varlen_qkvpacked_func" or rng.random() < 0.4
    if self_attention:
        lk = list(lq)
    elif rng.random() < 0.35:   # fewer keys than queries: causal rows above the diagonal see no key
        lk = [rng.randint(0, n) for n in lq]
    else:
        lk = _lengths(rng, batch, longest)
    hkv = rng.choice((1, 1, 2, 3)) if d <= 128 else rng.choice((1, 2))
    groups = [g for g in (1, 1, 2, 3, 4) if hkv * g <= (6 if d <= 128 else 2)]   # at most 6 query heads (2 at D 256)
    group = 1 if entry == "flash_attn_varlen_qkvpacked_func" else rng.choice(groups)
    extra_q = 0 if rng.random() < 0.6 else rng.randint(1, 5)
    extra_k = extra_q if entry == "flash_attn_varlen_qkvpacked_func" else (
        0 if rng.random() < 0.6 else rng.randint(1, 5))
    window = (-1, -1) if rng.random() < 0.45 else (_side(rng, longest, max(lk)), _side(rng, longest, max(lk)))
    cfg = dict(
        entry=entry, lq=lq, lk=lk, hq=hkv * group, hkv=hkv, d=d, causal=rng.random() < 0.5, window=window,
        scale=None if rng.random() < 0.5 else round(d ** -0.5 * 2 ** rng.uniform(-3, 1.5), 6),
        max_seqlen=rng.choice(("int", "none")),   # an int max_seqlen_k makes window sides >= it unbounded
        extra_q=extra_q, extra_k=extra_k, nan_tail=rng.random() < 0.4,
        # None: contiguous; the dim (tokens, heads, head dim) whose stride is doubled; or "dense": the dims'
        # memory order reversed (no gaps, not contiguous: output layouts must not copy the input's)
        noncontiguous=None if rng.random() < 0.65 else rng.choice((0, -2, -1, "dense")),
        lse=rng.random() < (0.5 if entry == "varlen_attention" else 0.8),   # return it (return_attn_probs)
        lse_in_loss=rng.random() < 0.5,
        seed=rng.getrandbits(32),
    )
    return cfg, f"{reproduce}: {cfg}"


def effective_window(cfg: Dict[str, Any]) -> Tuple[int, int]:
    """flash-attn's rule as documented: with an int max_seqlen_k, a window side >= it counts as -1."""
    if cfg["max_seqlen"] != "int":
        return cfg["window"]
    max_k = max(cfg["lk"])
    return tuple(-1 if side >= max_k else side for side in cfg["window"])


def _leaf(shape: Sequence[int], cfg: Dict[str, Any], gen: torch.Generator, dtype, device, tail_rows: int, strided):
    """A gradient leaf of random values, its last ``tail_rows`` rows (past the offsets) NaN when the case says so,
    a strided view when ``strided``."""
    t = randn(*shape, dtype=dtype, generator=gen).to(device)
    if cfg["nan_tail"] and tail_rows:
        t[t.shape[0] - tail_rows:] = float("nan")
    if strided and cfg["noncontiguous"] == "dense" and t.numel():
        dims = tuple(range(t.dim()))[::-1]
        t = t.permute(dims).contiguous().permute(dims)   # the same values, the dims' memory order reversed
    elif strided and cfg["noncontiguous"] is not None and t.numel():   # (an empty tensor is contiguous whatever)
        t = noncontiguous(t, cfg["noncontiguous"])
    return t.requires_grad_(True)


def run_case(cfg: Dict[str, Any], where: str, dtype, device, backend: str = "triton"):
    """The case through its entry point on ``backend``: (out, lse or None, (dq, dk, dv), (q, k, v))."""
    gen = torch.Generator().manual_seed(cfg["seed"])
    lq, lk, hq, hkv, d = cfg["lq"], cfg["lk"], cfg["hq"], cfg["hkv"], cfg["d"]
    tq, tk = sum(lq) + cfg["extra_q"], sum(lk) + cfg["extra_k"]
    cu_q, cu_k = packed_offsets(lq, device), packed_offsets(lk, device)
    max_q, max_k = (max(lq), max(lk)) if cfg["max_seqlen"] == "int" else (None, None)
    kw = dict(softmax_scale=cfg["scale"], causal=cfg["causal"], window_size=cfg["window"])
    entry = cfg["entry"]
    with use_backend(backend):
        if entry == "flash_attn_varlen_qkvpacked_func":
            qkv = _leaf((tq, 3, hq, d), cfg, gen, dtype, device, cfg["extra_q"], True)
            leaves, views = [qkv], qkv.unbind(1)
            res = flash_attn_varlen_qkvpacked_func(qkv, cu_q, max_q, return_attn_probs=cfg["lse"], **kw)
        elif entry == "flash_attn_varlen_kvpacked_func":
            q = _leaf((tq, hq, d), cfg, gen, dtype, device, cfg["extra_q"], True)
            kv = _leaf((tk, 2, hkv, d), cfg, gen, dtype, device, cfg["extra_k"], True)
            leaves, views = [q, kv], (q, *kv.unbind(1))
            res = flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, max_q, max_k, return_attn_probs=cfg["lse"], **kw)
        else:
            q = _leaf((tq, hq, d), cfg, gen, dtype, device, cfg["extra_q"], True)
            k = _leaf((tk, hkv, d), cfg, gen, dtype, device, cfg["extra_k"], True)
            v = _leaf((tk, hkv, d), cfg, gen, dtype, device, cfg["extra_k"], True)
            leaves, views = [q, k, v], (q, k, v)
            if entry == "varlen_attention":
                res = varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, return_lse=cfg["lse"], **kw)
            else:
                res = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, return_attn_probs=cfg["lse"], **kw)
        if not cfg["lse"]:
            out, lse = res, None
        elif entry == "varlen_attention":
            out, lse = res
        else:
            out, lse, probs = res
            assert probs is None, f"return_attn_probs: third item {type(probs).__name__}, not None; {where}"
        g = grads([out, lse] if lse is not None and cfg["lse_in_loss"] else out, leaves, seed=cfg["seed"])
    if entry == "flash_attn_varlen_qkvpacked_func":
        g = g[0].unbind(1)
    elif entry == "flash_attn_varlen_kvpacked_func":
        g = (g[0], *g[1].unbind(1))
    return out, lse, tuple(g), views


def oracle(cfg: Dict[str, Any], views):
    """float64 attention from the masks' definitions: out, LSE and the gradients of q, k, v, from the same values
    (tail rows, NaN or not, are never read: their gradient is 0)."""
    q64, k64, v64 = to_float64(list(views))
    scale = cfg["d"] ** -0.5 if cfg["scale"] is None else cfg["scale"]
    out, lse = attention_per_sequence(q64, k64, v64, cfg["lq"], cfg["lk"], scale, 1 if cfg["causal"] else 0,
                                      effective_window(cfg))
    # a pack whose sequences leave q (or k, v) unread (no query, or no key, anywhere) still gives them a gradient,
    # 0: an empty slice's sum ties them into the graph without reading a value (tail rows may hold NaN)
    out = out + sum(t[:0].sum() for t in (q64, k64, v64))
    g = grads([out, lse] if cfg["lse"] and cfg["lse_in_loss"] else out, [q64, k64, v64], seed=cfg["seed"])
    return out, lse, g


def check_fakes(cfg: Dict[str, Any], views, where: str) -> None:
    """The forward and backward custom ops' fake implementations give the real outputs' shapes, strides and dtypes
    on the case's q, k, v (torch.library.opcheck's fake-tensor test; torch.compile relies on them)."""
    q, k, v = (t.detach() for t in views)
    dev = q.device
    cu_q, cu_k = packed_offsets(cfg["lq"], dev), packed_offsets(cfg["lk"], dev)
    scale = cfg["d"] ** -0.5 if cfg["scale"] is None else cfg["scale"]
    fwd = (q, k, v, cu_q, cu_k, scale, 1 if cfg["causal"] else 0, "triton", *effective_window(cfg))
    ops = torch.ops.fastsora
    with use_backend("triton"):
        try:
            torch.library.opcheck(ops.varlen_attention_fwd.default, fwd, test_utils="test_faketensor")
            out, lse = ops.varlen_attention_fwd.default(*fwd)
            dout = randn(*out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(cfg["seed"])).to(dev)
            torch.library.opcheck(ops.varlen_attention_bwd.default,
                                  (dout, q, k, v, out, lse, *fwd[3:7], None, "triton", *fwd[8:]),
                                  test_utils="test_faketensor")
        except Exception as e:
            raise AssertionError(f"opcheck: {e} {where}") from None


def check_lse(lse: torch.Tensor, want_lse: torch.Tensor, where: str) -> None:
    """float32, want_lse's shape, +inf exactly where a row sees no key, else within 1e-5 relative."""
    assert lse.shape == want_lse.shape and lse.dtype == torch.float32, (
        f"lse {tuple(lse.shape)} {lse.dtype}, want {tuple(want_lse.shape)} float32; {where}")
    lse_c = lse.detach().cpu()
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse_c), finite), f"lse: rows without a visible key must be +inf; {where}"
    assert (lse_c[~finite] == float("inf")).all(), f"lse: non-finite rows not +inf; {where}"
    err = relative_error(lse_c[finite], want_lse[finite])
    assert err < 1e-5, f"lse: relative error {err:.3e} > 1e-5; {where}"


def check_gradient(name: str, got: torch.Tensor, want: torch.Tensor, dtype, torch_backend_gradient, where: str):
    """got within ATTENTION_GRAD_TOL of the float64 want, or else flash-attn's rule where that tolerance is too
    tight for the case: at most twice the error of the torch backend's gradient in the same dtype
    (``torch_backend_gradient()``, run only then), whose backward has the same form (dS = P (dP - rowsum(dO O))),
    so it shares its cancellation - e.g. a one-key sequence, whose dk is exactly 0 in float64, beside long
    sequences with a small scale (small dk): the rounding of dP - rowsum(dO O) is then the error. Only near the
    tolerance (FALLBACK_CAP x): past it the float64 comparison alone decides."""
    assert torch.isfinite(got).all(), f"{name} has non-finite values; {where}"
    assert_within_or_like_torch(name, got, want, ATTENTION_GRAD_TOL[dtype], FALLBACK_CAP, torch_backend_gradient, where)


@pytest.mark.parametrize("case", fuzz_cases(), ids=lambda c: f"case{c}")
def test_varlen_attention_fuzz(case, dtype, device, poison):
    cfg, where = draw(case)
    out, lse, g, views = run_case(cfg, where, dtype, device)
    want, want_lse, want_g = oracle(cfg, views)
    if case % 2 == 0 and all(t.numel() for t in views):   # (opcheck's input copies fail on an empty view whose
        check_fakes(cfg, views, where)                    # storage offset lies past its empty storage: kv[:, 1])
    nq, nk = sum(cfg["lq"]), sum(cfg["lk"])
    tq = nq + cfg["extra_q"]

    assert out.shape == (tq, cfg["hq"], cfg["d"]) and out.dtype == dtype, f"out {out.shape} {out.dtype}; {where}"
    out_c = out.detach().cpu()
    assert torch.isfinite(out_c).all(), f"out has non-finite values; {where}"
    assert (out_c[nq:] == 0).all(), f"out rows past cu_seqlens_q[-1] not 0; {where}"
    err = relative_error(out_c, want)
    tol = TOLERANCE[dtype] * 2
    assert err <= tol, f"out: relative error {err:.3e} > {tol:.1e}; {where}"

    if lse is not None:
        assert lse.shape == (cfg["hq"], tq), f"lse {tuple(lse.shape)}; {where}"
        check_lse(lse, want_lse, where)

    baseline = []   # the torch backend's gradients, computed once if a check asks for them

    def torch_backend(i):
        if not baseline:
            baseline.extend(run_case(cfg, where, dtype, device, backend="torch")[2])
        return baseline[i].cpu()

    for i, (name, a, b, n) in enumerate(zip("qkv", g, want_g, (nq, nk, nk))):
        a = a.cpu()
        assert a.shape == b.shape, f"d{name} shape {tuple(a.shape)} != {tuple(b.shape)}; {where}"
        assert (a[n:] == 0).all(), f"d{name} rows past the offsets not 0; {where}"
        check_gradient(f"d{name}", a, b, dtype, lambda: torch_backend(i), where)


# ----------------------------------------------------------------------------------------------------------
# xformers' memory_efficient_attention and flash-attn's fixed-length forms
# ----------------------------------------------------------------------------------------------------------

#: xformers' mask classes as docs/varlen_attention.md defines them (query i, key j of a block / batch element of
#: Lq queries and Lk keys): (block diagonal?, causal mode of attention_per_sequence, window kind). Causal modes:
#: 0 none, 1 bottom-right (j <= i + Lk - Lq), 2 top-left (j <= i). Window kinds: "size", xformers'
#: ``_window_size`` w of a causal local mask - the w keys ending at the query's diagonal, d - w < j <= d, i.e. the
#: window (w - 1, 0) around the diagonal d of the causal mode; "sides", ``LocalAttentionFromBottomRightMask(window_left,
#: window_right)``: d - left <= j <= d + right with d = i + Lk - Lq, flash-attn's window_size without its
#: max_seqlen_k rule (xformers' masks have none: a side past Lk stays as given)
XFORMERS_MASKS: Dict[Optional[str], Tuple[bool, int, Optional[str]]] = {
    None: (False, 0, None),   # full attention per batch element
    "BlockDiagonalMask": (True, 0, None),
    "BlockDiagonalCausalMask": (True, 2, None),
    "BlockDiagonalCausalFromBottomRightMask": (True, 1, None),
    "BlockDiagonalCausalLocalAttentionMask": (True, 2, "size"),
    "BlockDiagonalCausalLocalAttentionFromBottomRightMask": (True, 1, "size"),
    "LowerTriangularMask": (False, 2, None),
    "LowerTriangularFromBottomRightMask": (False, 1, None),
    "LowerTriangularFromBottomRightLocalAttentionMask": (False, 1, "size"),
    "LocalAttentionFromBottomRightMask": (False, 0, "sides"),
}
FIXED_LENGTH_ENTRIES = ("flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func")


def _length(rng, longest: int, least: int = 0) -> int:
    """One sequence length >= ``least``: 0 (rarely), 1, tile-sized or any."""
    r = rng.random()
    if r < 0.06 and least == 0:
        return 0
    if r < 0.25:
        return max(1, least)
    if r < 0.35:
        return min(rng.choice((16, 32, 64)), longest)
    return rng.randint(max(2, least), longest)


def _xformers_window(rng, kind: Optional[str], longest: int, max_k: int, max_q: int):
    """``_window_size`` (>= 1) or (window_left, window_right) (each >= 0): small, about the longest key block,
    between it and the longest query block (where flash-attn's max_seqlen_k rule, which xformers' masks do not
    have, would unbound a side that still bounds rows) or any."""
    def side(least):
        r = rng.random()
        if r < 0.2:
            return least
        if r < 0.35:
            return max(max_k + rng.randint(-1, 1), least)
        if r < 0.55:
            return max(rng.randint(max_k, max(max_k, max_q)), least)
        return rng.randint(least + 1, longest + 8)
    if kind == "size":
        return side(1)
    if kind == "sides":
        return side(0), side(0)
    return None


def _heads(rng, d: int, gqa: bool = True) -> Tuple[int, int]:
    """(query heads, key heads): at most 6 query heads (2 at D 256), key heads dividing them."""
    hkv = rng.choice((1, 1, 2, 3)) if d <= 128 else rng.choice((1, 2))
    groups = [g for g in (1, 1, 2, 3, 4) if hkv * g <= (6 if d <= 128 else 2)]
    return hkv * (rng.choice(groups) if gqa else 1), hkv


def draw_xformers_or_fixed(case: int) -> Tuple[Dict[str, Any], str]:
    """The configuration of case ``case`` of test_xformers_and_fixed_length_fuzz and the words that reproduce it.
    The case's generator is reseeded from its own first draw, so these cases are not the other test's."""
    base, reproduce = fuzz_random(case)
    rng = random.Random(f"xformers-or-fixed-{base.getrandbits(64)}")
    reproduce = f"{reproduce} (-k 'xformers and case{case}]')"
    d = rng.choice(HEAD_DIMS)
    longest = _longest(d)
    cfg: Dict[str, Any] = dict(d=d)
    if rng.random() < 0.55:
        bias = rng.choice(list(XFORMERS_MASKS))
        block_diagonal, _, window_kind = XFORMERS_MASKS[bias]
        cfg.update(entry="memory_efficient_attention", bias=bias, layout=rng.choice(("BMK", "BMHK", "BMGHK")))
        if block_diagonal:   # B = 1, 1-4 blocks packed along M
            n = rng.randint(1, 4)
            lq = [_length(rng, longest) for _ in range(n)]
            r = rng.random()
            lk = list(lq) if r < 0.35 else [rng.randint(0, m) for m in lq] if r < 0.6 else \
                [_length(rng, longest) for _ in range(n)]
            cfg.update(batch=1, lq=lq, lk=lk)
        else:                # B elements of Mq queries and Mk keys each
            mq = _length(rng, longest)
            r = rng.random()
            mk = mq if r < 0.35 else rng.randint(0, mq) if r < 0.6 else _length(rng, longest)
            cfg.update(batch=rng.randint(1, 3), lq=[mq], lk=[mk])
        if cfg["layout"] == "BMK":
            cfg.update(hq=1, hkv=1, kv_form=None)
        elif cfg["layout"] == "BMHK":   # key heads dividing the query heads: fastsora's GQA extension
            hq, hkv = _heads(rng, d)
            cfg.update(hq=hq, hkv=hkv, kv_form=None)
        else:                           # G groups of H query heads; key / value one head per group or per head
            g = rng.choice((1, 2, 3) if d <= 128 else (1, 2))
            h = rng.choice([h for h in (1, 2, 3) if g * h <= (6 if d <= 128 else 2)])
            kv_form = rng.choice(("expanded", "one_head", "per_head"))
            cfg.update(groups=g, hq=g * h, hkv=g * h if kv_form == "per_head" else g, kv_form=kv_form)
        cfg.update(window=_xformers_window(rng, window_kind, longest, max(cfg["lk"]), max(cfg["lq"])),
                   # how the mask is built: its class's constructor or a helper (make_causal, ...); .to(device)
                   construct=rng.choice(("class", "helper")), to_device=rng.random() < 0.3, lse=False,
                   lse_in_loss=False)
    else:
        entry = rng.choice(FIXED_LENGTH_ENTRIES)
        sq = _length(rng, longest, least=1)
        r = rng.random()
        sk = sq if entry == "flash_attn_qkvpacked_func" or r < 0.4 else rng.randint(1, sq) if r < 0.65 else \
            _length(rng, longest, least=1)
        hq, hkv = _heads(rng, d, gqa=entry != "flash_attn_qkvpacked_func")
        window = (-1, -1) if rng.random() < 0.45 else (_side(rng, longest, sk), _side(rng, longest, sk))
        cfg.update(entry=entry, batch=rng.randint(1, 3), lq=[sq], lk=[sk], hq=hq, hkv=hkv, causal=rng.random() < 0.5,
                   window=window, lse=rng.random() < 0.7, lse_in_loss=rng.random() < 0.5)
    cfg.update(scale=None if rng.random() < 0.5 else round(d ** -0.5 * 2 ** rng.uniform(-3, 1.5), 6),
               # None: contiguous; else the dim (tokens, heads, head dim) whose stride is doubled
               noncontiguous=None if rng.random() < 0.7 else rng.choice((1, -2, -1)), seed=rng.getrandbits(32))
    return cfg, f"{reproduce}: {cfg}"


def _sequences(cfg: Dict[str, Any]) -> Tuple[List[int], List[int]]:
    """The query and key lengths of the sequences the case packs: the blocks (B = 1), or one per batch element."""
    return cfg["lq"] * cfg["batch"], cfg["lk"] * cfg["batch"]


def _mask(cfg: Dict[str, Any], device):
    """The case's attn_bias, a fastsora mask object built the way the case says."""
    name, w = cfg["bias"], cfg["window"]
    if name is None:
        return None
    cls, helper = getattr(fastsora.ops, name), cfg["construct"] == "helper"
    if XFORMERS_MASKS[name][0]:
        kv = None if helper and cfg["lk"] == cfg["lq"] else cfg["lk"]   # from_seqlens(q) is self-attention
        base = fastsora.ops.BlockDiagonalMask.from_seqlens(cfg["lq"], kv)
        if name == "BlockDiagonalMask":
            mask = base
        elif name == "BlockDiagonalCausalMask":
            mask = base.make_causal() if helper else cls.from_seqlens(cfg["lq"], cfg["lk"])
        elif name == "BlockDiagonalCausalFromBottomRightMask":
            mask = base.make_causal_from_bottomright() if helper else cls.from_seqlens(cfg["lq"], cfg["lk"])
        elif name == "BlockDiagonalCausalLocalAttentionMask":
            mask = base.make_local_attention(w) if helper else cls(base.q_seqinfo, base.k_seqinfo, _window_size=w)
        else:
            mask = base.make_local_attention_from_bottomright(w) if helper else \
                cls(base.q_seqinfo, base.k_seqinfo, _window_size=w)
        return mask.to(device) if cfg["to_device"] else mask
    if name == "LowerTriangularFromBottomRightLocalAttentionMask":
        return fastsora.ops.LowerTriangularFromBottomRightMask().make_local_attention(w) if helper else cls(w)
    if name == "LocalAttentionFromBottomRightMask":
        return cls(*w)
    return cls()


def _xf_leaf(shape: Sequence[int], cfg: Dict[str, Any], gen: torch.Generator, dtype, device):
    t = randn(*shape, dtype=dtype, generator=gen).to(device)
    if cfg["noncontiguous"] is not None and t.numel():
        t = noncontiguous(t, cfg["noncontiguous"])
    return t.requires_grad_(True)


def run_xformers_or_fixed(cfg: Dict[str, Any], where: str, dtype, device, backend: str = "triton"):
    """The case through its entry point on ``backend``: (out, lse or None, leaves, their gradients)."""
    gen = torch.Generator().manual_seed(cfg["seed"])
    b, hq, hkv, d, entry = cfg["batch"], cfg["hq"], cfg["hkv"], cfg["d"], cfg["entry"]
    mq, mk = sum(cfg["lq"]), sum(cfg["lk"])   # tokens per batch element
    lse = None
    with use_backend(backend):
        if entry == "memory_efficient_attention":
            layout = cfg["layout"]
            if layout == "BMK":
                shapes = (b, mq, d), (b, mk, d)
            elif layout == "BMHK":
                shapes = (b, mq, hq, d), (b, mk, hkv, d)
            else:
                g = cfg["groups"]
                shapes = (b, mq, g, hq // g, d), (b, mk, g, hq // g if cfg["kv_form"] == "per_head" else 1, d)
            q = _xf_leaf(shapes[0], cfg, gen, dtype, device)
            k, v = (_xf_leaf(shapes[1], cfg, gen, dtype, device) for _ in range(2))
            leaves = [q, k, v]
            if cfg["kv_form"] == "expanded":   # stride 0 over H, as xformers asks for GQA
                k, v = (t.expand(-1, -1, -1, hq // cfg["groups"], -1) for t in (k, v))
            out = memory_efficient_attention(q, k, v, _mask(cfg, device), scale=cfg["scale"])
        else:
            kw = dict(softmax_scale=cfg["scale"], causal=cfg["causal"], window_size=cfg["window"],
                      return_attn_probs=cfg["lse"])
            if entry == "flash_attn_qkvpacked_func":
                leaves = [_xf_leaf((b, mq, 3, hq, d), cfg, gen, dtype, device)]
                res = flash_attn_qkvpacked_func(leaves[0], **kw)
            elif entry == "flash_attn_kvpacked_func":
                leaves = [_xf_leaf((b, mq, hq, d), cfg, gen, dtype, device),
                          _xf_leaf((b, mk, 2, hkv, d), cfg, gen, dtype, device)]
                res = flash_attn_kvpacked_func(*leaves, **kw)
            else:
                leaves = [_xf_leaf((b, mq, hq, d), cfg, gen, dtype, device)] + \
                    [_xf_leaf((b, mk, hkv, d), cfg, gen, dtype, device) for _ in range(2)]
                res = flash_attn_func(*leaves, **kw)
            if cfg["lse"]:
                out, lse, probs = res
                assert probs is None, f"return_attn_probs: third item {type(probs).__name__}, not None; {where}"
            else:
                out = res
        g = grads([out, lse] if lse is not None and cfg["lse_in_loss"] else out, leaves, seed=cfg["seed"])
    return out, lse, leaves, g


def _as_packed(cfg: Dict[str, Any], leaves) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (tokens, Hq, D), k and v (tokens, Hkv, D) for attention_per_sequence from the case's input tensors (key
    head h // (Hq / Hkv) serves query head h): batch elements (or blocks) one after another."""
    entry = cfg["entry"]
    if entry == "memory_efficient_attention":
        q, k, v = leaves
        if cfg["layout"] == "BMK":   # one head
            return tuple(t.flatten(0, 1)[:, None] for t in (q, k, v))
        if cfg["layout"] == "BMHK":
            return tuple(t.flatten(0, 1) for t in (q, k, v))
        # [B, M, G, H, K]: query head g * H + h; one key head per group (key head g), or one per query head
        q = q.flatten(0, 1).flatten(1, 2)
        if cfg["kv_form"] == "per_head":
            return (q, *(t.flatten(0, 1).flatten(1, 2) for t in (k, v)))
        return (q, *(t.flatten(0, 1)[:, :, 0] for t in (k, v)))
    if entry == "flash_attn_qkvpacked_func":
        return tuple(t.flatten(0, 1) for t in leaves[0].unbind(2))
    if entry == "flash_attn_kvpacked_func":
        return (leaves[0].flatten(0, 1), *(t.flatten(0, 1) for t in leaves[1].unbind(2)))
    return tuple(t.flatten(0, 1) for t in leaves)


def xformers_or_fixed_mask(cfg: Dict[str, Any]) -> Tuple[int, Tuple[int, int]]:
    """(causal mode, window (left, right)) of attention_per_sequence for the case, from the documented
    definitions: the xformers masks above; flash-attn's fixed-length forms causal from the bottom-right, their
    window_size (left, right) around i + Lk - Lq, a side of at least seqlen_k unbounded (flash-attn's rule)."""
    if cfg["entry"] == "memory_efficient_attention":
        _, mode, kind = XFORMERS_MASKS[cfg["bias"]]
        if kind == "size":
            return mode, (cfg["window"] - 1, 0)
        return mode, tuple(cfg["window"]) if kind == "sides" else (-1, -1)
    sk = cfg["lk"][0]
    return (1 if cfg["causal"] else 0), tuple(-1 if side >= sk else side for side in cfg["window"])


def xformers_or_fixed_oracle(cfg: Dict[str, Any], leaves, out_shape):
    """float64 out (in the query's shape), LSE (batch, Hq, seqlen_q) or None, and the gradients of the inputs."""
    leaves64 = to_float64(list(leaves))
    q, k, v = _as_packed(cfg, leaves64)
    lens_q, lens_k = _sequences(cfg)
    mode, window = xformers_or_fixed_mask(cfg)
    scale = cfg["d"] ** -0.5 if cfg["scale"] is None else cfg["scale"]
    out, lse = attention_per_sequence(q, k, v, lens_q, lens_k, scale, mode, window)
    # inputs no query reads (no key anywhere, no query) still get a gradient, 0
    out = (out + sum(t[:0].sum() for t in leaves64)).reshape(out_shape)
    lse = lse.view(cfg["hq"], cfg["batch"], -1).transpose(0, 1) if cfg["lse"] else None
    g = grads([out, lse] if cfg["lse"] and cfg["lse_in_loss"] else out, leaves64, seed=cfg["seed"])
    return out, lse, g


def _parts(cfg: Dict[str, Any], i: int, grad: torch.Tensor) -> List[Tuple[str, torch.Tensor]]:
    """The gradient of input ``i`` cut into its named q / k / v parts (packed inputs along their dim 2)."""
    entry = cfg["entry"]
    if entry == "flash_attn_qkvpacked_func":
        return [(f"dqkv[:, :, {j}] (d{n})", t) for j, (n, t) in enumerate(zip("qkv", grad.unbind(2)))]
    if entry == "flash_attn_kvpacked_func" and i == 1:
        return [(f"dkv[:, :, {j}] (d{n})", t) for j, (n, t) in enumerate(zip("kv", grad.unbind(2)))]
    return [(f"d{'qkv'[i]}", grad)]


@pytest.mark.parametrize("case", fuzz_cases(), ids=lambda c: f"case{c}")
def test_xformers_and_fixed_length_fuzz(case, dtype, device, poison):
    """xformers' memory_efficient_attention (every mask class or None, its three layouts, GQA) and flash-attn's
    fixed-length forms (flash_attn_func / _qkvpacked_func / _kvpacked_func: causal, window_size, GQA) on the
    Triton backend against float64 attention written from each mask's documented definition: output, LSE (when
    returned, sometimes in the loss) and the gradient of every input tensor."""
    cfg, where = draw_xformers_or_fixed(case)
    out, lse, leaves, g = run_xformers_or_fixed(cfg, where, dtype, device)
    q_shape = leaves[0][:, :, 0].shape if cfg["entry"] == "flash_attn_qkvpacked_func" else leaves[0].shape
    want, want_lse, want_g = xformers_or_fixed_oracle(cfg, leaves, q_shape)

    assert out.shape == q_shape and out.dtype == dtype, f"out {tuple(out.shape)} {out.dtype}; {where}"
    out_c = out.detach().cpu()
    assert torch.isfinite(out_c).all(), f"out has non-finite values; {where}"
    err, tol = relative_error(out_c, want), TOLERANCE[dtype] * 2
    assert err <= tol, f"out: relative error {err:.3e} > {tol:.1e}; {where}"

    if cfg["lse"]:
        assert lse is not None, f"no LSE returned; {where}"
        check_lse(lse, want_lse, where)

    baseline = []   # the torch backend's gradients, computed once if a check asks for them

    def torch_backend(i, j):
        if not baseline:
            baseline.extend(run_xformers_or_fixed(cfg, where, dtype, device, backend="torch")[3])
        return _parts(cfg, i, baseline[i].cpu())[j][1]

    for i, (a, b) in enumerate(zip(g, want_g)):
        assert a.shape == b.shape, f"d{'qkv'[i]} shape {tuple(a.shape)} != {tuple(b.shape)}; {where}"
        for j, ((name, pa), (_, pb)) in enumerate(zip(_parts(cfg, i, a.cpu()), _parts(cfg, i, b))):
            check_gradient(name, pa, pb, dtype, lambda: torch_backend(i, j), where)
