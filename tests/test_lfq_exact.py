"""LFQ ops: exact entropies and gradients against a float64 brute force over all 2^D codes, the Triton
kernels (interpreter on CPU, compiled on CUDA) against the torch path in fp32/fp16 (+ bf16 on CUDA), dispatch,
poisoned outputs, bad inputs.

Tests that take the ``device`` fixture run the same code on CPU tensors in Triton's interpreter and compiled on
CUDA; their random inputs are drawn on CPU and moved, so both devices see the same values, and the float64
references stay on CPU (relative_error moves what it compares there)."""
import pytest
import torch

import fastsora.kernels.lfq as K
from fastsora import BackendError, use_backend
from fastsora.ops.lfq import lfq, lfq_code_sums, lfq_codebook_entropy, lfq_entropy_of_sums, lfq_quantize
from fastsora.reference.lfq import brute_force_entropies
from fastsora.testing import (TOLERANCE, deterministic_algorithms, grads, noncontiguous, randn, relative_error,
                              spread_past_int32, to_float64)

TAU = 100.0
#: both rows run on the ``device`` fixture's device: Triton in the interpreter on CPU, compiled on CUDA
BACKENDS = ["torch", "triton"]


def _dx_tol(dtype):
    """Relative tolerance of dx against the torch path's: fp32 1e-5; fp16/bf16 dx is computed in fp32 by both
    paths and rounded to dtype once, so the paths differ by at most an ulp of the largest entry (fp16 2^-10,
    bf16 2^-7 relative): TOLERANCE[dtype] (fp16 2e-3 as before, bf16 1.6e-2)."""
    return 1e-5 if dtype == torch.float32 else TOLERANCE[dtype]


def _inputs(t, c, d, scale, masked, seed=0, dtype=torch.float32, device="cpu"):
    """x (t, c, d) and 0/1 weights (t,) drawn on CPU from a seeded generator, then moved to ``device``."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(t, c, d, generator=gen) * scale).to(dtype).to(device).requires_grad_()
    w = (torch.rand(t, generator=gen) > 0.3).float().to(device) if masked else None
    return x, w


def _loss_terms(res):
    return res.per_sample_entropy, res.codebook_entropy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d,c,scale", [(1, 3, 0.01), (2, 2, 0.005), (4, 1, 0.02), (7, 2, 0.01), (10, 1, 0.004),
                                       (12, 1, 0.002), (12, 1, 1.0)])
def test_entropies_exact_vs_brute_force(backend, d, c, scale, device):
    """Values and gradients (w.r.t. x) within 1e-5 relative of float64 brute force over all 2^D codes."""
    x, w = _inputs(29, c, d, scale, masked=True, seed=d, device=device)
    with use_backend(backend):
        res = lfq(x, 1.0, TAU, entropy_weight=w)
    x64 = x.detach().to("cpu", torch.float64).requires_grad_()
    ps64, cb64 = brute_force_entropies(x64, 1.0, TAU, None if w is None else w.to("cpu", torch.float64))
    assert relative_error(res.per_sample_entropy, ps64) <= 1e-5
    assert relative_error(res.codebook_entropy, cb64) <= 1e-5
    gen = torch.Generator().manual_seed(1)
    coef = torch.randn(c + 1, generator=gen, dtype=torch.float64)
    cf = coef.float().to(device)
    g = torch.autograd.grad(res.per_sample_entropy * cf[0] + (res.codebook_entropy * cf[1:]).sum(), x)[0]
    g64 = torch.autograd.grad(ps64 * coef[0] + (cb64 * coef[1:]).sum(), x64)[0]
    assert relative_error(g, g64) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [3, 9])
def test_codebook_entropy_gradient_exact(backend, d, device):
    x, w = _inputs(23, 2, d, 0.01, masked=True, seed=3 + d, device=device)
    with use_backend(backend):
        res = lfq(x, 1.0, TAU, entropy_weight=w)
        g = torch.autograd.grad(res.codebook_entropy.sum(), x)[0]
    x64, w64 = to_float64((x.detach(), w))
    x64.requires_grad_()
    g64 = torch.autograd.grad(brute_force_entropies(x64, 1.0, TAU, w64)[1].sum(), x64)[0]
    assert relative_error(g, g64) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_code_sums_and_clamped_entropy(backend, device):
    d = 6
    x, w = _inputs(31, 2, d, 0.01, masked=True, seed=7, device=device)
    x64, w64 = to_float64((x.detach(), w))   # float64 CPU copies
    with use_backend(backend):
        _, _, pos, neg, _, _ = lfq_quantize(x, 1.0, 4 * TAU, entropy_weight=w)
        sums = lfq_code_sums(pos, neg, w)
        r = torch.randn(sums.shape, dtype=torch.float64)
        g = torch.autograd.grad((sums * r.float().to(device)).sum(), x)[0]
    # brute force: the weighted mean code distribution, row-major over (hi code, lo code)
    codes = torch.arange(2 ** d)
    bits = ((codes[:, None] >> torch.arange(d - 1, -1, -1)) & 1).double() * 2 - 1
    x64.requires_grad_()
    prob = (2 * TAU * torch.einsum("tcd,jd->tcj", x64, bits)).softmax(-1)
    sums64 = (w64[:, None, None] * prob).sum(0).reshape(sums.shape)
    assert relative_error(sums, sums64) <= 1e-5
    assert relative_error(g, torch.autograd.grad((sums64 * r).sum(), x64)[0]) <= 1e-5
    n = w.sum()
    _, cb_clamped = brute_force_entropies(x64.detach(), 1.0, TAU, w64, clamp=1e-5)
    assert relative_error(lfq_entropy_of_sums(sums, n, 1e-5), cb_clamped) <= 1e-5
    # the count as a plain number (what a caller who counted tokens on the host passes)
    assert torch.equal(lfq_entropy_of_sums(sums, n.item(), 1e-5), lfq_entropy_of_sums(sums, n, 1e-5))
    with use_backend(backend):
        res = lfq(x, 1.0, TAU, entropy_weight=w, clamp_compat=True)
    assert relative_error(res.codebook_entropy, cb_clamped) <= 1e-5


@pytest.mark.parametrize("t,c,d,masked", [(37, 2, 5, True), (20, 1, 14, False), (50, 3, 1, True), (16, 1, 8, False),
                                           (9, 1, 18, True)])
def test_triton_matches_torch_path(poison, dtype, device, t, c, d, masked):
    """Every output and gradient of the Triton path (NaN-poisoned outputs) equals the torch path's: out and
    indices exactly, the losses (fp32 from x's exact values) within 1e-5, dx within _dx_tol(dtype)."""
    x, w = _inputs(t, c, d, 0.02, masked, seed=t + d, dtype=dtype, device=device)
    cw = (torch.rand(t) > 0.5).float().to(device) if masked else None
    results = {}
    for backend in ("torch", "triton"):
        with use_backend(backend):
            res = lfq(x, 0.7, TAU, entropy_weight=w, commit_weight=cw)
            gen = torch.Generator().manual_seed(0)
            g_out = torch.randn(res.out.shape, generator=gen).to(device, dtype)
            loss = (res.out.float() * g_out.float()).sum() + 0.3 * res.per_sample_entropy \
                - res.codebook_entropy.sum() + 2.0 * res.commitment
            dx = torch.autograd.grad(loss, x)[0]
        results[backend] = (res, dx)
    (rt, gt), (rk, gk) = results["torch"], results["triton"]
    assert torch.equal(rk.out, rt.out) and torch.equal(rk.indices, rt.indices)
    for a, b in zip((rk.per_sample_entropy, rk.codebook_entropy, rk.commitment),
                    (rt.per_sample_entropy, rt.codebook_entropy, rt.commitment)):
        assert relative_error(a, b) <= 1e-5
    assert gk.dtype == dtype and torch.isfinite(gk).all()
    assert relative_error(gk, gt) <= _dx_tol(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_valued_token_weights_vs_float64(poison, backend, device):
    """Token weights need not be 0/1 masks: random positive reals for the entropies (entropy_weight) and the
    commitment (commit_weight). Per-sample and codebook entropies, the commitment and the gradient of a random
    mix of them w.r.t. x within 1e-5 relative of float64 (brute force over the codes; the commitment's weighted
    mean written out)."""
    gen = torch.Generator().manual_seed(11)
    t, c, d = 23, 2, 6
    x = (torch.randn(t, c, d, generator=gen) * 0.01).to(device).requires_grad_()
    w = torch.rand(t, generator=gen) * 2 + 0.05
    cw = torch.rand(t, generator=gen) * 3 + 0.05
    coef = torch.randn(c + 2, generator=gen, dtype=torch.float64)
    with use_backend(backend):
        res = lfq(x, 1.0, TAU, entropy_weight=w.to(device), commit_weight=cw.to(device))
    loss = res.per_sample_entropy * coef[0].item() + (res.codebook_entropy * coef[1:c + 1].float().to(device)).sum() \
        + res.commitment * coef[-1].item()
    g = torch.autograd.grad(loss, x)[0]
    x64 = x.detach().to("cpu", torch.float64).requires_grad_()
    ps64, cb64 = brute_force_entropies(x64, 1.0, TAU, w.double())
    commit64 = (cw.double()[:, None, None] * (x64 - torch.where(x64 > 0, 1.0, -1.0)) ** 2).sum() / (cw.sum() * c * d)
    g64 = torch.autograd.grad(ps64 * coef[0] + (cb64 * coef[1:c + 1]).sum() + commit64 * coef[-1], x64)[0]
    for name, got, want in (("per-sample", res.per_sample_entropy, ps64), ("codebook", res.codebook_entropy, cb64),
                            ("commitment", res.commitment, commit64), ("dx", g, g64)):
        assert relative_error(got, want) <= 1e-5, f"{name}: {relative_error(got, want):.2e}"


@pytest.mark.parametrize("weighted", [True, False], ids=["weights", "no-weights"])
@pytest.mark.parametrize("d,c", [(5, 1), (8, 2)])
def test_probability_gradients_independent_leaves_vs_float64(poison, device, d, c, weighted):
    """d/dprob_pos and d/dprob_neg of lfq_codebook_entropy and lfq_code_sums, each on its own, from the Triton
    path within 1e-5 relative of the torch path on float64 copies. prob_pos and prob_neg are independent leaves
    (not neg = 1 - pos, which would only check dpos - dneg: an error added equally to both would cancel); the
    weights are random positive reals; the code sums get a random cotangent. d = 5 and 8: odd and even splits."""
    gen = torch.Generator().manual_seed(100 + 10 * d + c)
    t = 29
    pos = torch.sigmoid(torch.randn(t, c, d, generator=gen) * 2).to(device).requires_grad_()
    neg = torch.sigmoid(torch.randn(t, c, d, generator=gen) * 2).to(device).requires_grad_()
    w = (torch.rand(t, generator=gen) + 0.1).to(device) if weighted else None
    pos64, neg64, w64 = to_float64((pos, neg, w))   # float64 CPU copies, for the torch path
    for op in (lfq_codebook_entropy, lfq_code_sums):
        with use_backend("triton"):
            out = op(pos, neg, w)
            g = grads(out, (pos, neg), seed=d + c)
        with use_backend("torch"):
            out64 = op(pos64, neg64, w64)
            g64 = grads(out64, (pos64, neg64), seed=d + c)
        assert relative_error(out, out64) <= 1e-5, op.__name__
        for name, a, b in zip(("dprob_pos", "dprob_neg"), g, g64):
            assert a.dtype == torch.float32 and b.dtype == torch.float64
            err = relative_error(a, b)
            assert err <= 1e-5, f"{op.__name__} {name}: relative error {err:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t,c,d,masked", [(37, 2, 5, True), (24, 1, 10, False)])
def test_fp16_inputs_vs_float64(poison, backend, device, t, c, d, masked):
    """lfq() on fp16 x: per-sample entropy, codebook entropy and dx against the torch path on a float64 copy of
    the same fp16 values. The entropies are computed in fp32 from the (exact) fp16 values, so they are held to
    the fp32 tolerance TOLERANCE[float32] (the fp16 one, 2e-3, would pass entropies computed from
    fp16-rounded probabilities); dx is stored in fp16 (rounding <= 2^-11 ~ 4.9e-4 relative to its largest
    entry) and is held to TOLERANCE[float16] = 2e-3. code_value 0.5 is exact in fp16 (the codes are x.dtype
    values, so the commitment of a code like 0.7 would differ from float64's by its fp16 rounding)."""
    x, w = _inputs(t, c, d, 0.02, masked, seed=40 + t + d, dtype=torch.float16, device=device)
    x64, w64 = to_float64((x, w))   # on CPU
    coef = torch.randn(c + 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def run(inp, weight, bk):
        with use_backend(bk):
            r = lfq(inp, 0.5, TAU, entropy_weight=weight, commit_weight=weight)
            cf = coef.to(r.codebook_entropy.device, r.codebook_entropy.dtype)
            loss = cf[0] * r.per_sample_entropy + (cf[1:-1] * r.codebook_entropy).sum() + cf[-1] * r.commitment
            return r, torch.autograd.grad(loss, inp)[0]

    res, dx = run(x, w, backend)
    ref, dx64 = run(x64, w64, "torch")
    assert res.per_sample_entropy.dtype == torch.float32 and dx.dtype == torch.float16
    assert torch.equal(res.indices.cpu(), ref.indices)   # ref: the float64 run, on CPU
    for name in ("per_sample_entropy", "codebook_entropy", "commitment"):
        err = relative_error(getattr(res, name), getattr(ref, name))
        assert err <= TOLERANCE[torch.float32], f"{name}: relative error {err:.2e}"
    err = relative_error(dx, dx64)
    assert err <= TOLERANCE[torch.float16], f"dx: relative error {err:.2e}"


def test_quantize_outputs(poison, device):
    """Codes ±v, MSB-first indices, probabilities, straight-through / eval outputs, Triton vs torch."""
    x, _ = _inputs(40, 2, 6, 1.0, masked=False, seed=11, device=device)
    x = x.detach()
    x[0, 0] = 0.0   # x == 0 maps to bit 0 / code -v
    for backend in ("torch", "triton"):
        with use_backend(backend):
            out, idx, pos, neg, ps, cm = lfq_quantize(x, 0.5, 40.0, straight_through=False)
            out_st = lfq_quantize(x, 0.5, 40.0)[0]
            ev = lfq_quantize(x, 0.5, 40.0, straight_through=False, with_entropy=False)
        q = torch.where(x > 0, 0.5, -0.5)
        assert torch.equal(out, q) and torch.equal(out_st, x + (q - x)) and torch.equal(ev[0], q)
        want = ((x > 0).long() * 2 ** torch.arange(5, -1, -1, device=device)).sum(-1)
        assert torch.equal(idx, want) and torch.equal(ev[1], want)
        assert torch.allclose(pos, torch.sigmoid(40 * x)) and torch.allclose(neg, torch.sigmoid(-40 * x))
        assert ev[2].numel() == 0 and ev[4].item() == 0
        assert abs(cm.item() - ((x - q) ** 2).mean().item()) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_entropy_the_zero_entropies_carry_no_gradient(backend, device, poison):
    """with_entropy=False returns a constant 0 per-sample entropy (and zero codebook entropies): a loss that
    includes them gets exactly the gradient it gets without them (the per-sample term's gradient used to be
    applied anyway, on both backends; found by tests/test_lfq_fuzz.py)."""
    x, w = _inputs(37, 2, 5, 0.05, masked=True, seed=12, device=device)
    gen = torch.Generator().manual_seed(13)
    cot = torch.randn(x.shape, generator=gen).to(device)
    with use_backend(backend):
        res = lfq(x, 1.0, TAU, entropy_weight=w, commit_weight=w, with_entropy=False)
        base = (res.out * cot).sum() + 0.7 * res.commitment
        (g_with,) = torch.autograd.grad(base + 3.0 * res.per_sample_entropy + res.codebook_entropy.sum(), x,
                                        retain_graph=True)
        (g_without,) = torch.autograd.grad(base, x)
    assert res.per_sample_entropy.item() == 0 and not res.codebook_entropy.any()
    assert torch.equal(g_with, g_without)
    x64, w64 = to_float64((x.detach(), w))
    x64.requires_grad_()
    q = torch.where(x64 > 0, 1.0, -1.0).double()
    commitment = (w64[:, None, None] * (x64 - q) ** 2).sum() / (w64.sum() * 2 * 5)
    (g64,) = torch.autograd.grad((x64 * cot.cpu().double()).sum() + 0.7 * commitment, x64)
    assert relative_error(g_with, g64) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_total_weight_gives_nan_like_the_anchor(backend, device):
    """entropy_weight selecting no token (an all-False mask): the mean code distribution is 0/0, so the codebook
    entropy is NaN on both backends (the anchor's too), as is the per-sample entropy - never a silent 0."""
    x, _ = _inputs(9, 2, 5, 0.02, masked=False, device=device)
    w = torch.zeros(9, device=device)
    with use_backend(backend):
        r = lfq(x, 1.0, TAU, entropy_weight=w)
        clamped = lfq(x, 1.0, TAU, entropy_weight=w, clamp_compat=True)
    assert torch.isnan(r.codebook_entropy).all() and torch.isnan(r.per_sample_entropy)
    assert torch.isnan(clamped.codebook_entropy).all()
    # a loss on the quantized output alone (the NaN losses left out of the graph, as the anchor allows): the
    # straight-through gradient is exactly the incoming one, not NaN, also when no token is under commit_weight
    x.requires_grad_(True)
    g = randn(*x.shape).to(device)
    for kw in (dict(entropy_weight=w), dict(entropy_weight=w, commit_weight=w)):
        with use_backend(backend):
            dx, = torch.autograd.grad(lfq(x, 1.0, TAU, **kw).out, x, g)
        assert torch.equal(dx, g), kw
    # the NaN losses in the loss too: a mean over no token has no terms, so they add nothing to x's gradient
    # (the anchor's gradient of an empty selection); with 0 · inf cotangents it was NaN
    for clamp in (False, True):
        with use_backend(backend):
            r = lfq(x, 1.0, TAU, entropy_weight=w, commit_weight=w, clamp_compat=clamp)
            loss = (r.out * g).sum() + r.per_sample_entropy + r.codebook_entropy.sum() + r.commitment
            dx, = torch.autograd.grad(loss, x)
        assert torch.isnan(loss) and torch.equal(dx, g), clamp


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t,d,tau,scale", [(6, 12, 0.25, 0.01), (64, 10, TAU, 1e-4)])
def test_codebook_entropy_gradient_near_uniform_codes(backend, t, d, tau, scale, device):
    """Logits 4·tau·x near 0: the code distribution is almost uniform and the entropy gradient tiny. lfq's
    backward centres the code-sum cotangents (-(log a + H) instead of -(log a + 1)), so fp32 keeps it exact to
    1e-5 of its largest entry (uncentred: 2e-4 to 7e-4, the d·log 2 parts cancelling only at the end)."""
    x, w = _inputs(t, 2, d, scale, masked=True, seed=5, device=device)
    x64, w64 = to_float64((x, w))   # on CPU
    want = torch.autograd.grad(brute_force_entropies(x64, 1.0, tau, w64)[1].sum(), x64)[0]
    with use_backend(backend):
        got = torch.autograd.grad(lfq(x, 1.0, tau, entropy_weight=w).codebook_entropy.sum(), x)[0]
    assert relative_error(got, want) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_input_gives_nan_entropy(backend, device):
    """A NaN in x reaches the codebook entropy and the gradient as NaN on both backends: a NaN in training must
    not come back as a plausible entropy (the Triton epilogue's `a > 0` and max(a, tiny) used to drop it)."""
    x, _ = _inputs(9, 2, 6, 0.02, masked=False, seed=21, device=device)
    with torch.no_grad():
        x[4, 1, 2] = float("nan")
    with use_backend(backend):
        r = lfq(x, 1.0, TAU)
        g = torch.autograd.grad(r.codebook_entropy.sum(), x)[0]
    assert torch.isnan(r.codebook_entropy[1]) and torch.isfinite(r.codebook_entropy[0])
    assert torch.isnan(g[:, 1]).any() and torch.isfinite(g[:, 0]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_input(backend, device):
    x, w = _inputs(21, 2, 6, 0.02, masked=True, seed=5, device=device)
    xn = noncontiguous(x.detach(), dim=0).requires_grad_()
    assert not xn.is_contiguous()
    with use_backend(backend):
        a = lfq(x, 1.0, TAU, entropy_weight=w)
        b = lfq(xn, 1.0, TAU, entropy_weight=w)
        ga = torch.autograd.grad(a.out.sum() + a.codebook_entropy.sum(), x)[0]
        gb = torch.autograd.grad(b.out.sum() + b.codebook_entropy.sum(), xn)[0]
    assert torch.equal(a.out, b.out) and torch.equal(a.indices, b.indices)
    assert relative_error(b.codebook_entropy, a.codebook_entropy) <= 1e-6
    assert relative_error(gb, ga) <= 1e-6


@pytest.mark.parametrize("spread", ["tokens", "codebooks"])
def test_offsets_past_2_31_elements(poison, dtype, device, spread):
    """x and the output's incoming gradient are views whose later tokens (or codebooks) lie past 2^31 elements
    of their storages: the Triton path reads them in place and every output and gradient equals the torch
    path's on compact copies (int32 offsets would wrap: token index x token stride, codebook index x codebook
    stride). On CPU the storages' untouched pages cost nothing; on CUDA they are allocated: two of ~2^31
    elements (16 GiB in fp32, 8 GiB in fp16/bf16), freed (and the cache emptied) before the comparisons."""
    x, w = _inputs(19, 3, 7, 0.02, masked=True, seed=13, dtype=dtype, device=device)
    cot = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    with use_backend("torch"):
        a = lfq(x, 1.0, TAU, entropy_weight=w)
        ga = torch.autograd.grad([a.out, a.codebook_entropy.sum() + a.commitment], x, [cot, None])[0]
    xs = cot_s = None
    try:
        if spread == "tokens":
            xs = spread_past_int32(x.detach()).requires_grad_()
        else:
            xs = spread_past_int32(x.detach().transpose(0, 1)).transpose(0, 1).requires_grad_()
            assert xs.stride(1) * 2 >= 2 ** 31
        cot_s = spread_past_int32(cot) if spread == "tokens" else \
            spread_past_int32(cot.transpose(0, 1)).transpose(0, 1)
        with use_backend("triton"):
            b = lfq(xs, 1.0, TAU, entropy_weight=w)
            gb = torch.autograd.grad([b.out, b.codebook_entropy.sum() + b.commitment], xs, [cot_s, None])[0]
        b = type(b)(*(t.detach() for t in b))   # b's graph holds xs (its AccumulateGrad node) until detached
    finally:
        del xs, cot_s
        if device.type == "cuda":
            torch.cuda.empty_cache()
    assert torch.equal(b.out, a.out) and torch.equal(b.indices, a.indices)
    for u, v in zip((b.per_sample_entropy, b.codebook_entropy, b.commitment),
                    (a.per_sample_entropy, a.codebook_entropy, a.commitment)):
        assert relative_error(u, v) <= 1e-5
    assert relative_error(gb, ga) <= _dx_tol(dtype)


def test_triton_path_uses_the_kernels(monkeypatch, device):
    """The triton backend runs the kernels' launchers (spied on, not replaced), the torch backend none."""
    calls = []
    for name in ("quantize_fwd", "quantize_bwd", "code_pair", "code_pair_bwd"):
        real = getattr(K, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)
        monkeypatch.setattr(K, name, spy)
    x, w = _inputs(12, 1, 4, 0.02, masked=True, device=device)
    with use_backend("triton"):
        res = lfq(x, 1.0, TAU, entropy_weight=w)
        torch.autograd.grad(res.out.sum() + res.codebook_entropy.sum() + res.per_sample_entropy, x)
    assert set(calls) == {"quantize_fwd", "quantize_bwd", "code_pair", "code_pair_bwd"}
    calls.clear()
    with use_backend("torch"):
        lfq(x, 1.0, TAU)
    assert calls == []


@pytest.mark.interpreter
@pytest.mark.parametrize("pick", ["widest", "narrowest"])
def test_code_pair_cuda_launch_autotunes_code_tiles(monkeypatch, pick):
    """The code-pair GEMM's CUDA launcher (an autotuner over code tiles, the grid following the tile, mode-0
    entropy partials zeroed around the trials) run here in the interpreter with a stand-in timer: whichever
    tile wins, the entropy, dH/dS and S equal the fixed-tile launch's, and the entropy the float64 brute force.
    The widest tile winning after the narrower ones ran checks that no stale partials are summed."""
    gen = torch.Generator().manual_seed(7)
    t, c, d = 37, 2, 13   # sides of 6 and 7 bits: tiles 64x64, 64x32, 32x32
    logits = torch.randn(t, c, d, generator=gen) * 0.5
    pos = torch.sigmoid(logits).contiguous()
    neg = (1 - pos).contiguous()
    w = torch.rand(t, generator=gen)
    n = w.sum()
    grad = torch.randn(c, generator=gen)
    fixed = [K.code_pair(pos, neg, w, n, mode, grad if mode == 1 else None) for mode in (0, 1, 2)]
    tiles = K._pair_tiles(d // 2, d - d // 2)
    assert len(tiles) == 3
    monkeypatch.setattr(K, "KERNELS_INTERPRETED", False)
    K._pair_tuned.cache_clear()
    timed = []

    def fake_bench(kernel_call, quantiles):  # no GPU timer here: run the trial, make one tile the fastest
        kernel_call()
        timed.append(1)
        position = (len(timed) - 1) % len(tiles)   # the tiles are tried in order, widest first
        fastest = position == (0 if pick == "widest" else len(tiles) - 1)
        return [1.0 if fastest else 2.0] * len(quantiles)

    try:
        tuned = [K._pair_tuned(mode, d // 2, d - d // 2) for mode in (0, 1, 2)]
        for tuner in tuned:
            tuner.do_bench = fake_bench
        got = [K.code_pair(pos, neg, w, n, mode, grad if mode == 1 else None) for mode in (0, 1, 2)]
        assert len(timed) == 3 * len(tiles), "each mode's tiles are timed once"
        want = tiles[0] if pick == "widest" else tiles[-1]
        for tuner in tuned:
            cfg = tuner.best_config.kwargs
            assert (cfg["BLOCK_H"], cfg["BLOCK_L"]) == want, cfg
        assert relative_error(got[0].sum((1, 2)), fixed[0].sum((1, 2))) < 1e-6
        assert relative_error(got[1], fixed[1]) < 1e-6 and relative_error(got[2], fixed[2]) < 1e-6
        # the codebook entropy of the weighted mean code distribution, over all 2^13 codes in float64
        dist = torch.ones(t, c, 1, dtype=torch.float64)
        for i in range(d):
            p1 = pos[:, :, i:i + 1].double()
            dist = torch.cat((dist * (1 - p1), dist * p1), dim=2)
        a = (w.double()[:, None, None] * dist).sum(0) / n.double()
        entropy = -(a * a.log()).sum(1)
        assert relative_error(got[0].sum((1, 2)), entropy) < 1e-5
        from fastsora.kernels.utils import autotune_picks
        assert any(name.startswith("lfq code_pair mode=0") for name in autotune_picks())
        # deterministic mode: the first (widest) tile, untimed, whichever tile the timer picked
        with deterministic_algorithms():
            again = [K.code_pair(pos, neg, w, n, mode, grad if mode == 1 else None) for mode in (0, 1, 2)]
        assert len(timed) == 3 * len(tiles), "nothing is timed under torch.use_deterministic_algorithms(True)"
        # mode 0 writes one partial per tile: the same nonzero pattern as the widest fixed tile's
        assert torch.equal(again[0], fixed[0])
        assert relative_error(again[1], fixed[1]) < 1e-6 and relative_error(again[2], fixed[2]) < 1e-6
        if pick == "widest":
            assert all(torch.equal(a, b) for a, b in zip(again, got)), "the same tile as the timed pick"
    finally:
        K._pair_tuned.cache_clear()


def test_kernels_run_in_interpreter_on_cpu():
    from fastsora.kernels import KERNELS_INTERPRETED

    assert KERNELS_INTERPRETED or torch.cuda.is_available()


def test_triton_refuses_float64_with_reason(device):
    """float64 x on the triton backend: a BackendError naming float64 (never a silent fallback to torch)."""
    x = torch.randn(4, 1, 3, dtype=torch.float64).to(device)
    with use_backend("triton"), pytest.raises(BackendError, match="float64"):
        lfq_quantize(x)
    with use_backend("torch"):
        assert lfq_quantize(x)[2].dtype == torch.float64


def test_op_bad_inputs():
    with pytest.raises(ValueError, match="tokens, codebooks, codebook_dim"):
        lfq_quantize(torch.randn(4, 3))
    with pytest.raises(TypeError, match="float"):
        lfq_quantize(torch.ones(4, 1, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="entropy_weight must have shape"):
        lfq_quantize(torch.randn(4, 1, 3), entropy_weight=torch.ones(5))
    p = torch.rand(4, 1, 3)
    with pytest.raises(ValueError, match="prob_neg must match"):
        lfq_codebook_entropy(p, torch.rand(4, 1, 2))
    with pytest.raises(TypeError, match="float32"):
        lfq_code_sums(p.half(), p.half())


def test_torch_compile_fullgraph_ops(device):
    torch._dynamo.reset()
    x, w = _inputs(16, 2, 5, 0.02, masked=True, device=device)

    def f(x, w):
        r = lfq(x, 1.0, TAU, entropy_weight=w)
        return r.out, r.per_sample_entropy, r.codebook_entropy, r.commitment

    for backend in ("torch", "triton"):   # a compiled graph keeps the backend it was traced with: one each
        torch._dynamo.reset()
        cf = torch.compile(f, fullgraph=True, backend="aot_eager")
        with use_backend(backend):
            got, want = cf(x, w), f(x, w)
            ga = torch.autograd.grad(got[0].sum() + got[2].sum() + got[1], x)[0]
            gb = torch.autograd.grad(want[0].sum() + want[2].sum() + want[1], x)[0]
        for a, b in zip(got, want):
            assert relative_error(a, b) <= 1e-6
        assert relative_error(ga, gb) <= 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("t,d", [(16384, 18), (65536, 10), (4096, 14)])
def test_gpu_realistic_flash_rule(dtype, t, d):
    """Compiled kernels at realistic sizes: codes/indices exact vs the torch path; losses and gradients within
    flash-attn's rule (<= 2x / 3x the error of the torch path at the same precision) of float64."""
    from fastsora.testing import assert_flash_rule

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(t, 1, d, device="cuda", generator=gen) * 0.05).to(dtype).requires_grad_()
    w = (torch.rand(t, device="cuda", generator=gen) > 0.2).float()

    def run(inp, backend):
        with use_backend(backend):
            r = lfq(inp, 1.0, TAU, entropy_weight=w.to(inp.dtype) if inp.dtype == torch.float64 else w)
            g = torch.autograd.grad(r.per_sample_entropy - r.codebook_entropy.sum() + r.commitment, inp)[0]
        return r, g

    rk, gk = run(x, "triton")
    rt, gt = run(x, "torch")
    x64 = x.detach().double().requires_grad_()
    r64, g64 = run(x64, "torch")
    assert torch.equal(rk.out, rt.out) and torch.equal(rk.indices, rt.indices)
    for name in ("per_sample_entropy", "codebook_entropy", "commitment"):
        assert_flash_rule(getattr(rk, name), getattr(r64, name), getattr(rt, name), name=name)
    assert_flash_rule(gk.float(), g64, gt.float(), factor=3.0, name="dx", atol=1e-6 * g64.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("d,c,scale", [(4, 1, 0.02), (10, 1, 0.004), (12, 2, 0.002), (12, 1, 1.0)])
def test_gpu_entropies_exact_vs_brute_force(d, c, scale):
    """The compiled kernels (3xTF32 code GEMMs on tensor cores): values and gradients within 1e-5 of the float64
    brute force over all 2^D codes, as the interpreter tests check on CPU."""
    x, w = _inputs(29, c, d, scale, masked=True, seed=d)
    xc = x.detach().cuda().requires_grad_()
    with use_backend("triton"):
        res = lfq(xc, 1.0, TAU, entropy_weight=w.cuda())
    x64 = x.detach().double().requires_grad_()
    ps64, cb64 = brute_force_entropies(x64, 1.0, TAU, w.double())
    assert relative_error(res.per_sample_entropy.cpu(), ps64) <= 1e-5
    assert relative_error(res.codebook_entropy.cpu(), cb64) <= 1e-5
    coef = torch.randn(c + 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g = torch.autograd.grad(res.per_sample_entropy * coef[0].float().cuda()
                            + (res.codebook_entropy * coef[1:].float().cuda()).sum(), xc)[0]
    g64 = torch.autograd.grad(ps64 * coef[0] + (cb64 * coef[1:]).sum(), x64)[0]
    assert relative_error(g.cpu(), g64) <= 1e-5


@pytest.mark.gpu
def test_gpu_module_matches_anchor():
    anchor = pytest.importorskip("vector_quantize_pytorch.lookup_free_quantization")
    from fastsora.nn.lfq import LFQ

    torch.manual_seed(0)
    ref = anchor.LFQ(codebook_size=2 ** 14, dim=32, commitment_loss_weight=0.25).cuda()
    ours = LFQ(codebook_size=2 ** 14, dim=32, commitment_loss_weight=0.25, entropy_clamp_compat=True).cuda()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(4, 32, 16, 16, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        (ra, la), (rb, lb) = ref(x, return_loss_breakdown=True), ours(x, return_loss_breakdown=True)
    assert torch.equal(ra.indices, rb.indices) and torch.equal(ra.quantized, rb.quantized)
    assert abs(la.commitment.item() - lb.commitment.item()) <= 1e-6
    assert relative_error(lb.batch_entropy, la.batch_entropy) <= 1e-4


def test_triton_matches_torch_at_2_18_codes(device):
    """The full tiling at d=18 (8×8 code tiles of 64, 16 contracted tiles of 32; on CUDA the autotuned tiles)
    with fewer tokens than one token tile, against the torch path within 1e-5."""
    x, w = _inputs(24, 1, 18, 0.02, masked=True, seed=18, device=device)
    out = {}
    for backend in ("torch", "triton"):
        with use_backend(backend):
            res = lfq(x, 1.0, TAU, entropy_weight=w)
            g = torch.autograd.grad(res.codebook_entropy.sum() + res.per_sample_entropy, x)[0]
        out[backend] = (res, g)
    (rt, gt), (rk, gk) = out["torch"], out["triton"]
    assert relative_error(rk.codebook_entropy, rt.codebook_entropy) <= 1e-5
    assert relative_error(gk, gt) <= 1e-5
