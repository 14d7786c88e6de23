"""Fuzz suite of the LFQ op (``fastsora.ops.lfq``) on the Triton backend: random token counts (one tile and
several, ragged), codebooks, bits per code (1..16), input scales, code values, temperatures, entropy and
commitment weights (none, 0/1 masks, positive reals), straight-through on/off, entropy on/off, the exact or the
clamp-compatible codebook entropy, and strided layouts, against float64 oracles written here from the
definitions (sign bits MSB first, weighted commitment) and the brute force over all 2^D codes
(``fastsora.reference.lfq.brute_force_entropies``): values, and the gradient w.r.t. x of a random mix of every
output.

Slow (CI deselects it): ``pytest -m slow tests/test_lfq_fuzz.py``; FASTSORA_FUZZ_CASES sets the number of cases,
FASTSORA_FUZZ_SEED the run's seed (pytest's header shows the one drawn; every failure message names it).
"""
import math

import pytest
import torch

from fastsora import use_backend
from fastsora.ops.lfq import lfq
from fastsora.reference.lfq import brute_force_entropies
from fastsora.testing import TOLERANCE, assert_within_or_like_torch, fuzz_cases, fuzz_random, relative_error

pytestmark = pytest.mark.slow

#: entropies and commitment: computed in fp32 from the input's own values (fp16 and bf16 are exact in fp32)
LOSS_TOL = 1e-5
#: and an absolute floor of 4 ulps of 1 for the entropies: the codebook entropy is -sum p log p over a distribution
#: of mass 1 held in fp32, so a near-deterministic one (the entropy ~1e-3 or less) is off by a few roundings of
#: the dominant p ~ 1 (seen: one token, d = 12, entropy 9.0e-4 off by 1.6e-7 on the Triton backend and 4.0e-8 on
#: the torch backend, which forms and sums the same 2^d terms differently)
ENTROPY_ABS_TOL = 4 * torch.finfo(torch.float32).eps
#: how far past its tolerance the op's dx may be where the torch backend's dx in the same dtype is off by at least
#: half as much: with small inputs and a low temperature the code distribution is near uniform, where the entropies'
#: gradient is a small difference of large fp32 terms (seen: d = 9, scale 0.002, inv_temperature 10, dx 9.0e-5 off
#: against the torch backend's 1.2e-4). Past the cap the float64 comparison alone decides
FALLBACK_CAP = 8


def _loss_tol(name: str, size: float, rel: float = LOSS_TOL) -> float:
    """The tolerance of loss ``name`` whose value is ``size`` in magnitude: ``rel`` x that size (at least 0.01),
    plus ENTROPY_ABS_TOL for an entropy (and the losses made of them), none for the commitment."""
    return rel * max(size, 1e-2) + (name != "commitment") * ENTROPY_ABS_TOL


def _draw(rng):
    d = rng.randint(1, 16)
    c = rng.randint(1, 3)
    # keep the brute force (T x C x 2^D float64) small
    t = rng.choice([1, 2, 3, 17, 64, 100, 257, 500] if d <= 9 else [1, 5, 33, 130, 300] if d <= 12 else [1, 4, 19, 40])
    return dict(t=t, c=c, d=d, scale=rng.choice([0.002, 0.01, 0.05, 0.3, 1.0]),
                code_value=rng.choice([1.0, 0.5, 1.7]), inv_temperature=rng.choice([100.0, 37.5, 10.0]),
                entropy_weight=rng.choice([None, "mask", "real"]), commit_weight=rng.choice([None, "mask", "real"]),
                straight_through=rng.random() < 0.8, with_entropy=rng.random() < 0.85,
                clamp_compat=rng.random() < 0.2, layout=rng.choice(["contiguous", "strided", "permuted"]))


def _weight(kind, t, gen):
    if kind is None:
        return None
    if kind == "mask":
        w = (torch.rand(t, generator=gen) > 0.35).double()
        w[torch.randint(t, (1,), generator=gen)] = 1.0   # at least one token counts
        return w
    return torch.rand(t, generator=gen, dtype=torch.float64) * 2 + 0.05


def _laid_out(x, layout, gen):
    """x's values in the drawn memory layout: contiguous, a strided slice of a larger buffer, or a permuted one."""
    if layout == "contiguous":
        return x.contiguous()
    t, c, d = x.shape
    if layout == "strided":   # (from element 1 of the buffer: a base pointer off the usual alignment too)
        buf = torch.randn(t, c, 2 * d + 1, generator=gen).to(x.device, x.dtype)
        view = buf[:, :, 1::2]
    else:
        view = torch.empty(d, t, c, dtype=x.dtype, device=x.device).permute(1, 2, 0)
    view.copy_(x)
    return view


def _check_fakes(x, cfg, ew, cw, where):
    """The custom ops' fake implementations give the real outputs' shapes, strides and dtypes on the case's
    (strided) x and weights (torch.library.opcheck's fake-tensor test; torch.compile relies on them): quantize
    and its backward, and with entropy the codebook entropy and the code sums."""
    ops, logit_scale = torch.ops.fastsora, 4.0 * cfg["inv_temperature"] * cfg["code_value"]
    with use_backend("triton"):
        try:
            fwd = (x, cfg["code_value"], logit_scale, cfg["straight_through"], cfg["with_entropy"], ew, cw, "triton")
            torch.library.opcheck(ops.lfq_quantize.default, fwd, test_utils="test_faketensor")
            out, _, pos, neg, ps, cm = ops.lfq_quantize.default(*fwd)
            g = [torch.randn_like(t) if t.numel() else None for t in (out, pos, neg)]
            torch.library.opcheck(ops.lfq_quantize_backward.default,
                                  (x, *g, torch.ones_like(ps), torch.ones_like(cm), ew, cw, cfg["code_value"],
                                   logit_scale, cfg["straight_through"], "triton"), test_utils="test_faketensor")
            if cfg["with_entropy"]:
                for op in (ops.lfq_codebook_entropy, ops.lfq_code_sums):
                    torch.library.opcheck(op.default, (pos, neg, ew, "triton"), test_utils="test_faketensor")
        except Exception as e:
            raise AssertionError(f"opcheck: {e} {where}") from None


@pytest.mark.parametrize("case", fuzz_cases(), ids=lambda c: f"case{c}")
def test_lfq_op_matches_float64_oracles(case, device, dtype, poison):
    rng, repro = fuzz_random(case)
    cfg = _draw(rng)
    where = f"{repro}, {dtype}: {cfg}"
    t, c, d = cfg["t"], cfg["c"], cfg["d"]
    gen = torch.Generator().manual_seed(rng.randrange(2 ** 31))
    x0 = (torch.randn(t, c, d, generator=gen) * cfg["scale"]).to(dtype)
    ew, cw = _weight(cfg["entropy_weight"], t, gen), _weight(cfg["commit_weight"], t, gen)
    x = _laid_out(x0.to(device), cfg["layout"], gen).requires_grad_()   # laid out on the device: .to() would copy
    assert torch.equal(x.detach().cpu(), x0), where
    ew_op, cw_op = (None if w is None else w.float().to(device) for w in (ew, cw))   # as the op takes them

    def run(backend):
        with use_backend(backend):
            return lfq(x, cfg["code_value"], cfg["inv_temperature"], distributed=False, entropy_weight=ew_op,
                       commit_weight=cw_op, straight_through=cfg["straight_through"],
                       with_entropy=cfg["with_entropy"], clamp_compat=cfg["clamp_compat"])

    res = run("triton")
    if case % 2 == 0:
        _check_fakes(x.detach(), cfg, ew_op, cw_op, where)

    # float64 oracles from the definitions
    x64 = x0.double().requires_grad_()
    cv = cfg["code_value"]
    q = torch.where(x64 > 0, cv, -cv).to(dtype).double()   # the code value in the input's dtype, as the op returns it
    indices = ((x64 > 0).long() * 2 ** torch.arange(d - 1, -1, -1)).sum(-1)
    out64 = x64 + (q - x64).detach() if cfg["straight_through"] else q
    cw64 = torch.ones(t, dtype=torch.float64) if cw is None else cw
    commitment = (cw64[:, None, None] * (x64 - q) ** 2).sum() / (cw64.sum() * c * d)
    if cfg["with_entropy"]:
        ps64, cb64 = brute_force_entropies(x64, cv, cfg["inv_temperature"], ew)
        if cfg["clamp_compat"]:   # the anchor's clamped logs, in the codebook entropy only
            cb64 = brute_force_entropies(x64, cv, cfg["inv_temperature"], ew, clamp=1e-5)[1]
    else:
        ps64, cb64 = x64.new_zeros(()), x64.new_zeros(c)

    assert res.out.dtype == dtype and res.indices.dtype == torch.int64, where
    assert torch.equal(res.indices.cpu(), indices), where
    assert relative_error(res.out, out64) <= TOLERANCE[dtype], where
    for name, got, want in (("per-sample entropy", res.per_sample_entropy, ps64),
                            ("codebook entropy", res.codebook_entropy, cb64), ("commitment", res.commitment,
                                                                               commitment)):
        assert got.shape == want.shape and torch.isfinite(got).all(), f"{name}: {where}"
        err = (got.detach().cpu().double() - want.detach()).abs().max().item()
        tol = _loss_tol(name, want.detach().abs().max().item())
        assert err <= tol, f"{name}: error {err:.2e} > {tol:.1e}; {where}"

    # the gradient w.r.t. x of a random mix of every output
    coef = torch.randn(c + 2, generator=gen, dtype=torch.float64)
    cot = torch.randn(t, c, d, generator=gen, dtype=torch.float64)

    def mix(out, ps, cb, cm, to=torch.float64):
        coef_, cot_ = coef.to(device, to), cot.to(device, out.dtype)
        return ((out * cot_).sum().to(to) + ps.to(to) * coef_[0] + (cb.to(to) * coef_[1:c + 1]).sum()
                + cm.to(to) * coef_[c + 1])

    def dx(res):
        loss = mix(res.out, res.per_sample_entropy, res.codebook_entropy, res.commitment, torch.float32)
        return torch.autograd.grad(loss, x)[0] if loss.requires_grad else None

    g = dx(res)
    if g is None:   # nothing differentiable was asked for (no straight-through, entropy or commitment)
        return
    want = mix(out64, ps64, cb64, commitment)
    (g64,) = torch.autograd.grad(want, x64) if want.requires_grad else (torch.zeros_like(x64),)
    assert g.dtype == dtype and g.shape == x.shape, where
    assert_within_or_like_torch("dx", g, g64, max(TOLERANCE[dtype], 2e-5), FALLBACK_CAP, lambda: dx(run("torch")),
                                where)   # see FALLBACK_CAP


def _draw_module(rng):
    """Constructor options of vector-quantize-pytorch's LFQ (every one the anchor has), an input shape, a mode."""
    d, c = rng.randint(1, 9), rng.randint(1, 3)
    kw = dict(codebook_size=2 ** d, num_codebooks=c, codebook_scale=rng.choice([1.0, 0.5, 1.7]),
              spherical=rng.random() < 0.3, commitment_loss_weight=rng.choice([0.0, 0.25]),
              entropy_loss_weight=rng.choice([0.1, 0.3]), diversity_gamma=rng.choice([1.0, 2.5]),
              frac_per_sample_entropy=rng.choice([1.0, 1.0, 0.5]), force_quantization_f32=rng.random() < 0.7,
              orthogonal_rotation=rng.random() < 0.2)
    if c == 1 and rng.random() < 0.3:
        kw["keep_num_codebooks_dim"] = True
    if rng.random() < 0.4:   # projections in and out
        kw["dim"] = d * c + rng.randint(1, 5)
        kw["projection_has_bias"] = rng.random() < 0.7
        if rng.random() < 0.3:
            kw["cosine_sim_project_in"] = True
            if rng.random() < 0.5:
                kw["cosine_sim_project_in_scale"] = rng.choice([0.5, 3.0])
    if rng.random() < 0.25:
        kw["soft_clamp_input_value"] = kw["codebook_scale"] * rng.choice([1.0, 1.5])
    if rng.random() < 0.2:
        kw["straight_through_activation"] = torch.nn.Tanh()
    if rng.random() < 0.2:
        kw.update(experimental_softplus_entropy_loss=True, entropy_loss_offset=rng.choice([5.0, 3.0]))
    dim = kw.get("dim", d * c)
    layout = rng.choice(["tokens", "tokens", "image", "video", "channel_first"])
    b = rng.randint(1, 3)
    shape = {"tokens": (b, rng.randint(1, 40), dim), "image": (b, dim, rng.randint(1, 5), rng.randint(1, 5)),
             "video": (b, dim, rng.randint(1, 3), rng.randint(1, 4), rng.randint(1, 4)),
             "channel_first": (b, dim, rng.randint(1, 30))}[layout]
    if layout == "channel_first":
        kw["channel_first"] = True
    # (b,) masks: with a (b, n) mask the anchor's codebook entropy is its per-sample entropy, a documented
    # difference (docs/lfq.md; tests/test_lfq.py checks ours against the selected tokens alone)
    mask = rng.random() < 0.3
    return kw, shape, dict(training=rng.random() < 0.8, mask=mask, inv_temperature=rng.choice([100.0, 37.0, 10.0]),
                           scale=rng.choice([0.05, 0.3, 1.0]))


@pytest.mark.parametrize("case", fuzz_cases(), ids=lambda c: f"case{c}")
def test_lfq_module_matches_the_anchor(case, device, dtype, poison, monkeypatch):
    """fastsora.nn.LFQ on the Triton backend with the anchor's state_dict (loaded strictly) and
    entropy_clamp_compat=True, both modules and the input in ``dtype``: quantized outputs, indices and
    straight-through gradients (x and every parameter) exactly, for a cotangent in either layout, and
    indices_to_codes exactly; commitment to 1e-6, the codebook entropy to 1e-5 relative plus ENTROPY_ABS_TOL, the
    entropy aux loss to 2e-3 relative to its terms (the anchor's per-sample entropy clamps its logs at 1e-5; ours
    is exact). In half precision the anchor computes its losses in that precision without force_quantization_f32
    (then only the commitment is compared, to its rounding), and its codebook keeps codebook_scale rounded to it
    (docs/lfq.md). The anchor's codebook entropy carries its own fp32 rounding, of logits up to hundreds (2e-5
    relative seen at inv_temperature 100); past the tolerance, ours is held to it against float64 from the op's
    input instead."""
    anchor = pytest.importorskip("vector_quantize_pytorch.lookup_free_quantization")
    import fastsora.nn.lfq
    from fastsora.nn.lfq import LFQ

    op_calls = []   # the op's arguments in our module's run, for the float64 codebook entropy

    def recorded_lfq(*args, **kwargs):
        op_calls.append((args, kwargs))
        return lfq(*args, **kwargs)

    monkeypatch.setattr(fastsora.nn.lfq, "lfq", recorded_lfq)

    rng, repro = fuzz_random(case)
    kw, shape, run = _draw_module(rng)
    where = f"{repro}, {dtype}: {kw}, shape {shape}, {run}"
    seed = rng.randrange(2 ** 31)
    torch.manual_seed(seed)
    ref = anchor.LFQ(**kw)
    ours = LFQ(**kw, entropy_clamp_compat=True)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref, ours = (m.to(device, dtype).train(run["training"]) for m in (ref, ours))
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * run["scale"]).to(device, dtype).requires_grad_()
    mask = None
    if run["mask"]:
        mask = torch.rand(shape[0], generator=gen) > 0.4
        mask[torch.randint(shape[0], (1,), generator=gen)] = True   # at least one element of the batch
        mask = mask.to(device)
    results = []
    for module, backend in ((ref, "torch"), (ours, "triton")):
        torch.manual_seed(seed + 1)   # frac_per_sample_entropy draws from the global generator, as the anchor's
        with use_backend(backend):
            results.append(module(x, inv_temperature=run["inv_temperature"], return_loss_breakdown=True, mask=mask))
    (ra, la), (rb, lb) = results
    assert torch.equal(rb.quantized, ra.quantized), where
    assert torch.equal(rb.indices, ra.indices), where
    # the anchor in half precision: without force_quantization_f32 its losses are computed in that precision
    # (ours in fp32), which makes them no reference (2^d code probabilities summed in fp16 are off by percents):
    # then only the commitment is compared, to its rounding; with it, its codebook keeps codebook_scale rounded
    # to that precision (a documented difference, docs/lfq.md), whose rounding enters the comparison
    half_losses = dtype != torch.float32 and not kw["force_quantization_f32"]
    scale_rounded = float(torch.tensor(kw["codebook_scale"], dtype=dtype)) != kw["codebook_scale"]
    rounding = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}.get(dtype, 0.0)
    assert abs(lb.commitment.item() - la.commitment.item()) <= 1e-6 + half_losses * rounding * la.commitment.item(), \
        where
    if not half_losses:
        rounding = rounding if scale_rounded else 0.0
        # entropies: relative to their size, at least 0.01, plus ENTROPY_ABS_TOL (p ~ 1 rounded in fp32); NaN
        # where no token was sampled (frac_per_sample_entropy of 1 token), in both
        cb_a, cb_b = (t.detach().double().cpu() for t in (la.batch_entropy, lb.batch_entropy))
        assert torch.equal(cb_a.isnan(), cb_b.isnan()), f"codebook entropy NaN {cb_b} vs {cb_a}: {where}"
        err = (cb_b - cb_a).nan_to_num().abs().max().item()
        tol = _loss_tol("codebook entropy", cb_a.nan_to_num().abs().max().item(), max(LOSS_TOL, 16 * rounding))
        if err > tol:
            (x_op, _, _), op_kw = op_calls[-1]
            ew = op_kw["entropy_weight"]
            cb64 = brute_force_entropies(x_op.detach().double().cpu(), 1.0, op_kw["logit_scale"] / 4,
                                         None if ew is None else ew.cpu(), clamp=1e-5)[1].mean()
            err64 = (cb_b - cb64).nan_to_num().abs().max().item()
            assert err64 <= tol, f"codebook entropy {err:.2e} from the anchor's, {err64:.2e} from float64: {where}"
        # the aux loss is a difference (per-sample - gamma x codebook): relative to the size of its terms
        terms = la.per_sample_entropy.abs().item() + kw["diversity_gamma"] * cb_a.abs().max().item()
        aux_a, aux_b = ra.entropy_aux_loss.item(), rb.entropy_aux_loss.item()
        assert math.isnan(aux_a) == math.isnan(aux_b), f"aux loss {aux_b} vs {aux_a}: {where}"
        if not math.isnan(aux_a):
            err = abs(aux_b - aux_a)
            assert err <= max(2e-3, 16 * rounding) * max(terms, 1e-2), f"aux loss {err:.2e}: {where}"
    with torch.no_grad():   # indices back to codes, projected out or not: bitwise the anchor's
        for project_out in (True, False):
            ca, cb = ref.indices_to_codes(ra.indices, project_out), ours.indices_to_codes(rb.indices, project_out)
            assert cb.dtype == ca.dtype and cb.shape == ca.shape, f"indices_to_codes({project_out}): {where}"
            torch.testing.assert_close(cb, ca, rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m: f"indices_to_codes({project_out}): {m} {where}")
    assert rb.quantized.requires_grad == ra.quantized.requires_grad, where   # none in eval mode
    if not ra.quantized.requires_grad:
        return
    cot = torch.randn(ra.quantized.shape, generator=gen).to(device, dtype)
    if rng.random() < 0.5:   # laid out like the output (a channel-first view), as torch.randn_like makes it
        cot = torch.empty_like(ra.quantized).copy_(cot)
    leaves_a = [x] + [p for p in ref.parameters() if p.requires_grad]
    leaves_b = [x] + [p for p in ours.parameters() if p.requires_grad]
    ga = torch.autograd.grad(ra.quantized, leaves_a, cot, allow_unused=True)
    gb = torch.autograd.grad(rb.quantized, leaves_b, cot, allow_unused=True)
    for i, (a, b) in enumerate(zip(ga, gb, strict=True)):
        assert (a is None) == (b is None), f"gradient {i}: {where}"
        if a is not None:   # bitwise, NaN where the anchor's is (fp16 l2norm of a vector whose square underflows)
            torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"gradient {i}: {m} {where}")


@pytest.mark.parametrize("case", fuzz_cases(), ids=lambda c: f"case{c}")
def test_lfq_token_mask_is_the_selected_tokens_alone(case, device, dtype, poison):
    """A (b, n) token mask (where the anchor's codebook entropy is its per-sample one, docs/lfq.md): the Triton
    module's outputs on the selected tokens and its losses equal those of a batch of the selected tokens alone,
    exact and clamp-compatible entropies, over random options (the whole batch: frac_per_sample_entropy 1; no
    projection or rotation)."""
    from fastsora.nn.lfq import LFQ

    rng, repro = fuzz_random(case)
    kw, _, run = _draw_module(rng)
    # no matmul before the quantizer (projection, rotation): BLAS may round a row differently in another batch
    kw = {k: v for k, v in kw.items() if k not in ("channel_first", "dim", "projection_has_bias",
                                                  "cosine_sim_project_in", "cosine_sim_project_in_scale")}
    kw.update(frac_per_sample_entropy=1.0, orthogonal_rotation=False)
    compat = rng.random() < 0.5
    b, n = rng.randint(1, 3), rng.randint(1, 40)
    where = f"{repro}, {dtype}: {kw}, compat {compat}, (b, n) = {(b, n)}, {run}"
    seed = rng.randrange(2 ** 31)
    torch.manual_seed(seed)
    module = LFQ(**kw, entropy_clamp_compat=compat).to(device, dtype).train()
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, n, module.dim, generator=gen) * run["scale"]).to(device, dtype)
    mask = torch.rand(b, n, generator=gen) > 0.4
    mask[torch.randint(b, (1,), generator=gen), torch.randint(n, (1,), generator=gen)] = True
    mask = mask.to(device)
    with use_backend("triton"):
        rm, lm = module(x, inv_temperature=run["inv_temperature"], return_loss_breakdown=True, mask=mask)
        rs, ls = module(x[mask][None], inv_temperature=run["inv_temperature"], return_loss_breakdown=True)
    assert torch.equal(rm.quantized[mask], rs.quantized[0]), where
    assert torch.equal(rm.indices[mask], rs.indices[0]), where
    for name, a, b_ in (("per-sample entropy", lm.per_sample_entropy, ls.per_sample_entropy),
                        ("codebook entropy", lm.batch_entropy, ls.batch_entropy), ("commitment", lm.commitment,
                                                                                  ls.commitment),
                        ("aux loss", rm.entropy_aux_loss, rs.entropy_aux_loss)):
        err = (a.double() - b_.double()).abs().max().item()
        tol = _loss_tol(name, b_.double().abs().max().item())
        assert err <= tol, f"{name}: {err:.2e}; {where}"


@pytest.mark.parametrize("case", fuzz_cases(), ids=lambda c: f"case{c}")
def test_lfq_module_compiles_to_the_eager_result(case, device, poison):
    """torch.compile(fullgraph=True, backend="aot_eager") of the Triton module over random options (custom ops'
    fakes, autograd registration, the torch-side straight-through): the eager outputs bitwise, the losses and the
    gradient of x to fp32 rounding (frac_per_sample_entropy 1: its draw is eager-only randomness)."""
    from fastsora.nn.lfq import LFQ

    rng, repro = fuzz_random(case)
    kw, shape, run = _draw_module(rng)
    kw["frac_per_sample_entropy"] = 1.0
    where = f"{repro}: {kw}, shape {shape}, {run}"
    seed = rng.randrange(2 ** 31)
    torch.manual_seed(seed)
    module = LFQ(**kw).to(device).train(run["training"])
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * run["scale"]).to(device).requires_grad_()
    mask = None
    if run["mask"]:
        mask = torch.rand(shape[0], generator=gen) > 0.4
        mask[0] = True
        mask = mask.to(device)

    def step(x):
        ret, losses = module(x, inv_temperature=run["inv_temperature"], return_loss_breakdown=True, mask=mask)
        return ret.quantized, ret.indices, ret.entropy_aux_loss, losses.commitment

    torch._dynamo.reset()
    with use_backend("triton"):
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
        want = step(x)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), where
        for name, a, b in (("aux loss", got[2], want[2]), ("commitment", got[3], want[3])):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, equal_nan=True, msg=lambda m: f"{name}: {m} {where}")
        if want[0].requires_grad:   # (in eval mode only project_out's parameters get one: x's is None)
            (gg,), (gw,) = (torch.autograd.grad(r[0].sum() * 0.3 + r[2] + r[3], x, allow_unused=True)
                            for r in (got, want))
            assert (gg is None) == (gw is None), where
            if gw is not None:
                torch.testing.assert_close(gg, gw, rtol=1e-5, atol=1e-7, equal_nan=True,
                                           msg=lambda m: f"dx: {m} {where}")
