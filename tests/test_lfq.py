"""fastsora.nn.LFQ against vector-quantize-pytorch 1.32's LFQ (the anchor): API, state_dict, exact
quantization/indices/straight-through gradients, losses, masks, options, eval mode, bad inputs, compile.

Tests that take the ``device`` fixture run the Triton path in the interpreter on CPU and compiled on CUDA; the
anchor then runs on the same device (the bitwise comparisons need the same torch ops on the same device) and
the inputs are drawn on CPU and moved."""
import inspect

import pytest
import torch
from torch import nn

from fastsora import use_backend
from fastsora.nn.lfq import LFQ, LossBreakdown, Return
from fastsora.reference.lfq import brute_force_entropies
from fastsora.testing import channels_last, doc_examples, relative_error

anchor = pytest.importorskip("vector_quantize_pytorch.lookup_free_quantization")

CONFIGS = [
    ("default", dict(codebook_size=2 ** 8), (2, 12, 8)),
    ("projections", dict(dim=16, codebook_size=2 ** 6, commitment_loss_weight=0.25), (2, 9, 16)),
    ("no-bias projections", dict(dim=10, codebook_size=2 ** 4, projection_has_bias=False), (1, 7, 10)),
    ("2 codebooks", dict(codebook_size=2 ** 5, num_codebooks=2, commitment_loss_weight=0.5), (2, 6, 10)),
    ("keep codebook dim", dict(codebook_size=2 ** 6, keep_num_codebooks_dim=True), (2, 5, 6)),
    ("image channel-first", dict(dim=8, codebook_size=2 ** 8), (2, 8, 3, 4)),
    ("video channel-first", dict(dim=12, codebook_size=2 ** 6, num_codebooks=2), (1, 12, 2, 3, 3)),
    ("3-D channel_first", dict(codebook_size=2 ** 7, channel_first=True), (2, 7, 5)),
    ("cosine-sim project-in", dict(dim=12, codebook_size=2 ** 5, cosine_sim_project_in=True), (2, 6, 12)),
    ("cosine-sim scale", dict(dim=9, codebook_size=2 ** 4, cosine_sim_project_in=True,
                              cosine_sim_project_in_scale=3.0), (1, 8, 9)),
    ("soft clamp", dict(codebook_size=2 ** 6, soft_clamp_input_value=1.5), (2, 8, 6)),
    ("codebook scale", dict(codebook_size=2 ** 6, codebook_scale=0.5, commitment_loss_weight=1.0), (2, 8, 6)),
    ("spherical", dict(codebook_size=2 ** 5, spherical=True, commitment_loss_weight=0.1), (2, 7, 5)),
    ("spherical scaled", dict(codebook_size=2 ** 9, spherical=True, codebook_scale=1.7), (1, 6, 9)),
    ("tanh straight-through", dict(codebook_size=2 ** 6, straight_through_activation=nn.Tanh()), (2, 5, 6)),
    ("frac per-sample entropy", dict(codebook_size=2 ** 6, frac_per_sample_entropy=0.5), (2, 10, 6)),
    ("softplus loss", dict(codebook_size=2 ** 6, experimental_softplus_entropy_loss=True,
                           entropy_loss_offset=3.0), (2, 5, 6)),
    ("no f32 forcing", dict(codebook_size=2 ** 6, force_quantization_f32=False), (2, 5, 6)),
    ("orthogonal rotation", dict(codebook_size=2 ** 6, orthogonal_rotation=True), (2, 6, 6)),
    ("weights", dict(codebook_size=2 ** 6, entropy_loss_weight=0.3, diversity_gamma=2.5,
                     commitment_loss_weight=0.2), (2, 6, 6)),
    ("codebook dim 1", dict(codebook_size=2, commitment_loss_weight=0.2), (3, 5, 1)),
]


def _pair(kw, compat=True, seed=0, device="cpu"):
    torch.manual_seed(seed)
    ref = anchor.LFQ(**kw)
    ours = LFQ(**kw, entropy_clamp_compat=compat)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.to(device), ours.to(device)


def _call(module, x, backend="torch", seed=123, **kw):
    torch.manual_seed(seed)  # frac_per_sample_entropy draws from the global CPU generator, as the anchor does
    with use_backend(backend):
        return module(x, return_loss_breakdown=True, **kw)


def _leaves(module, x):
    return [x] + [p for p in module.parameters() if p.requires_grad]


@pytest.mark.parametrize("name,kw,shape", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_parity_with_anchor(name, kw, shape):
    ref, ours = _pair(kw)
    x = (torch.randn(*shape) * 0.3).requires_grad_()
    (ra, la), (rb, lb) = _call(ref, x), _call(ours, x)
    assert isinstance(rb, Return) and isinstance(lb, LossBreakdown)
    assert torch.equal(rb.quantized, ra.quantized)
    assert rb.indices.dtype == ra.indices.dtype == torch.int64 and torch.equal(rb.indices, ra.indices)
    assert abs(lb.commitment.item() - la.commitment.item()) <= 1e-6
    # clamp-compatible codebook entropy reproduces the anchor's; the per-sample entropy is always exact
    assert relative_error(lb.batch_entropy, la.batch_entropy) <= 1e-5
    # (the anchor clamps its logs at 1e-5 here too: a small difference, tiny on confident inputs)
    assert abs(lb.per_sample_entropy.item() - la.per_sample_entropy.item()) <= 1e-5 + 2e-3 * la.per_sample_entropy.item()
    assert relative_error(rb.entropy_aux_loss, ra.entropy_aux_loss) <= 2e-3
    # straight-through gradient (and the projections' gradients) exactly
    g = torch.randn_like(ra.quantized)
    ga = torch.autograd.grad(ra.quantized, _leaves(ref, x), g, retain_graph=True)
    gb = torch.autograd.grad(rb.quantized, _leaves(ours, x), g, retain_graph=True)
    for a, b in zip(ga, gb, strict=True):
        assert torch.equal(a, b)
    # the codebook-entropy gradient matches the anchor's clamped one
    if la.batch_entropy.requires_grad:
        ga = torch.autograd.grad(la.batch_entropy, x)[0]
        gb = torch.autograd.grad(lb.batch_entropy, x)[0]
        # (the anchor's fp32 softmax backward loses terms for saturated tokens: a floor for tiny gradients)
        assert (gb - ga).abs().max().item() <= 5e-4 * max(ga.abs().max().item(), 1e-4)


@pytest.mark.parametrize("inv_temperature", [100.0, 37.0, 10.0])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_losses_and_their_gradients_match_anchor(backend, inv_temperature):
    """The losses and their gradients (x and the projections), at the default and other inverse temperatures
    (the forward's inv_temperature): commitment exactly as the anchor's; the entropy aux loss and its gradient
    within 2e-3 (the anchor clamps its per-sample logs at 1e-5), with the clamp-compatible codebook entropy."""
    ref, ours = _pair(dict(codebook_size=2 ** 6, dim=8, entropy_loss_weight=0.3, diversity_gamma=2.5,
                           commitment_loss_weight=0.2))
    x = (torch.randn(2, 6, 8) * 0.3).requires_grad_()
    (ra, la), (rb, lb) = (_call(ref, x, inv_temperature=inv_temperature),
                          _call(ours, x, backend=backend, inv_temperature=inv_temperature))
    assert relative_error(lb.batch_entropy, la.batch_entropy) <= 1e-5
    assert relative_error(rb.entropy_aux_loss, ra.entropy_aux_loss) <= 2e-3
    assert abs(lb.commitment.item() - la.commitment.item()) <= 1e-6
    for name, loss_a, loss_b, tol in (("commitment", la.commitment, lb.commitment, 1e-5),
                                      ("entropy aux loss", ra.entropy_aux_loss, rb.entropy_aux_loss, 2e-3)):
        ga = torch.autograd.grad(loss_a, _leaves(ref, x), retain_graph=True, allow_unused=True)
        gb = torch.autograd.grad(loss_b, _leaves(ours, x), retain_graph=True, allow_unused=True)
        for a, b in zip(ga, gb, strict=True):
            assert (a is None) == (b is None), name
            if a is not None:
                assert relative_error(b, a) <= tol, name


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_straight_through_activation_with_large_inputs(backend, device):
    """A straight-through activation takes its codes from x's signs, as the anchor: x + (q - x) rounds to 0 or
    the wrong sign once |x| dwarfs the code value (x = 3e7 against 1; 5e4 against codebook_scale 1e-3)."""
    for kw, big in ((dict(codebook_size=2 ** 4), 3e7), (dict(codebook_size=2 ** 4, codebook_scale=1e-3), 5e4)):
        ref, ours = _pair(dict(kw, straight_through_activation=nn.Tanh()), device=device)
        x = torch.randn(2, 3, 4)
        x[0, 1] = torch.tensor([big, -big, big / 3, -2.0])
        x = x.to(device)
        (ra, _), (rb, _) = _call(ref, x), _call(ours, x, backend=backend)
        assert torch.equal(rb.quantized, ra.quantized) and torch.equal(rb.indices, ra.indices)


@pytest.mark.parametrize("name,kw,shape", CONFIGS[:6] + CONFIGS[12:13], ids=[c[0] for c in CONFIGS[:6] + CONFIGS[12:13]])
def test_eval_mode_matches_anchor(name, kw, shape):
    ref, ours = _pair(kw)
    ref.eval()
    ours.eval()
    x = torch.randn(*shape, requires_grad=True)
    (ra, la), (rb, lb) = _call(ref, x), _call(ours, x)
    assert torch.equal(rb.quantized, ra.quantized) and torch.equal(rb.indices, ra.indices)
    assert rb.entropy_aux_loss.item() == 0 and lb.per_sample_entropy.item() == 0 and lb.commitment.item() == 0
    assert ra.entropy_aux_loss.item() == 0 and la.per_sample_entropy.item() == 0 and la.commitment.item() == 0
    # the codes carry no gradient back to x or project_in (None, not zeros: optimisers skip None), only to
    # project_out where there is one
    assert rb.quantized.requires_grad == ra.quantized.requires_grad
    if ra.quantized.requires_grad:
        g = torch.randn_like(ra.quantized)
        ga = torch.autograd.grad(ra.quantized, _leaves(ref, x), g, allow_unused=True)
        gb = torch.autograd.grad(rb.quantized, _leaves(ours, x), g, allow_unused=True)
        for a, b in zip(ga, gb, strict=True):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


def test_triton_backend_matches_anchor(device):
    kw = dict(dim=12, codebook_size=2 ** 5, num_codebooks=2, commitment_loss_weight=0.3)
    ref, ours = _pair(kw, device=device)
    x = torch.randn(2, 12, 3, 3).to(device).requires_grad_()
    (ra, la), (rb, lb) = _call(ref, x), _call(ours, x, backend="triton")
    assert torch.equal(rb.quantized, ra.quantized) and torch.equal(rb.indices, ra.indices)
    assert abs(lb.commitment.item() - la.commitment.item()) <= 1e-6
    assert relative_error(lb.batch_entropy, la.batch_entropy) <= 1e-5
    g = torch.randn_like(ra.quantized)
    ga = torch.autograd.grad(ra.quantized, _leaves(ref, x), g)
    gb = torch.autograd.grad(rb.quantized, _leaves(ours, x), g, retain_graph=True)
    for a, b in zip(ga, gb, strict=True):
        assert torch.equal(a, b)


def test_exact_entropy_is_default_and_differs_from_clamp():
    """Default: the exact codebook entropy (float64 brute force), above the anchor's clamped value."""
    ref, ours = _pair(dict(codebook_size=2 ** 12), compat=False)
    x = torch.randn(1, 64, 12) * 0.02   # many rare codes below the anchor's 1e-5 clamp
    (_, la), (_, lb) = _call(ref, x), _call(ours, x)
    ps, cb = brute_force_entropies(x.double().reshape(64, 1, 12), 1.0, 100.0)
    assert relative_error(lb.batch_entropy, cb.mean()) <= 1e-5
    assert relative_error(lb.per_sample_entropy, ps) <= 1e-5
    assert lb.batch_entropy.item() > la.batch_entropy.item() + 1e-3


def test_uniform_codebook_entropy_at_2_18():
    """Fully uncertain inputs: the exact entropy of 2^18 codes is 18·log 2 (the anchor's clamp caps it)."""
    ours = LFQ(codebook_size=2 ** 18)
    x = torch.zeros(1, 4, 18)
    _, lb = _call(ours, x)
    assert abs(lb.batch_entropy.item() - 18 * torch.log(torch.tensor(2.0)).item()) < 1e-4
    assert abs(lb.per_sample_entropy.item() - 18 * torch.log(torch.tensor(2.0)).item()) < 1e-4


def test_token_mask_batch_matches_anchor():
    ref, ours = _pair(dict(codebook_size=2 ** 6, commitment_loss_weight=0.5))
    x = torch.randn(3, 7, 6, requires_grad=True)
    mask = torch.tensor([True, False, True])
    (ra, la), (rb, lb) = _call(ref, x, mask=mask), _call(ours, x, mask=mask)
    assert torch.equal(rb.quantized, ra.quantized)
    assert abs(lb.per_sample_entropy.item() - la.per_sample_entropy.item()) <= 1e-5 + 2e-3 * la.per_sample_entropy.item()
    assert abs(lb.commitment.item() - la.commitment.item()) <= 1e-6
    assert relative_error(lb.batch_entropy, la.batch_entropy) <= 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_token_mask_averages_selected_tokens_only(backend, device):
    """A (b, n) mask gives exactly the losses of the selected tokens alone (the anchor skips the average)."""
    _, ours = _pair(dict(codebook_size=2 ** 6, commitment_loss_weight=0.5), compat=False, device=device)
    x = torch.randn(2, 9, 6) * 0.02
    mask = torch.rand(2, 9) > 0.4
    mask[0, 0] = True
    x, mask = x.to(device), mask.to(device)
    _, lm = _call(ours, x, backend=backend, mask=mask)
    _, ls = _call(ours, x[mask][None], backend=backend)
    for a, b in zip(lm, ls):
        assert relative_error(a, b) <= 1e-5
    # and the anchor's codebook entropy with this mask is (wrongly) its per-sample entropy
    ref, _ = _pair(dict(codebook_size=2 ** 6), device=device)
    _, la = _call(ref, x, mask=mask)
    assert abs(la.batch_entropy.item() - la.per_sample_entropy.item()) < 1e-6
    assert relative_error(lm.per_sample_entropy, la.per_sample_entropy) <= 2e-3



@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mask_kind", ["tokens", "batch"])
@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), 1e30], ids=["nan", "inf", "1e30"])
@pytest.mark.parametrize("compat", [False, True], ids=["exact", "clamp_compat"])
def test_masked_out_garbage_tokens_are_left_out(backend, mask_kind, garbage, compat, device):
    """Masked-out padding holding NaN, inf or a value whose square overflows changes nothing but its own
    quantized entries: losses and every gradient equal those with finite padding (the anchor selects the
    masked tokens out; a weight-0 token must add 0, not 0 · NaN). Both codebook-entropy paths: the fused
    entropy and the code sums (clamp-compatible, as the distributed one)."""
    _, ours = _pair(dict(dim=8, codebook_size=2 ** 8, commitment_loss_weight=0.25), compat=compat, device=device)
    clean = torch.randn(2, 6, 8, device=device)
    mask = torch.ones(2, 6, dtype=torch.bool, device=device)
    mask[1, 4:] = False
    if mask_kind == "batch":
        mask = torch.tensor([True, False], device=device)
    dropped = (mask if mask.dim() == 2 else mask[:, None].expand(2, 6)).logical_not()
    dirty = clean.masked_fill(dropped[..., None], garbage)
    results = []
    for x in (clean, dirty):
        x = x.clone().requires_grad_()
        (ret, loss) = _call(ours, x, backend=backend, mask=mask)
        (dx,) = torch.autograd.grad(ret.entropy_aux_loss + (ret.quantized * clean).sum(), [x])
        results.append((ret, loss, dx))
    (ret_c, loss_c, dx_c), (ret_d, loss_d, dx_d) = results
    for a, b in zip(loss_d, loss_c):
        assert torch.isfinite(a) and relative_error(a, b) <= 1e-6
    assert relative_error(ret_d.entropy_aux_loss, ret_c.entropy_aux_loss) <= 1e-6
    keep = dropped.logical_not()
    assert torch.equal(ret_d.indices[keep], ret_c.indices[keep])
    assert torch.equal(ret_d.quantized[keep], ret_c.quantized[keep])
    assert relative_error(dx_d[keep], dx_c[keep]) <= 1e-6
    # a masked-out token's gradient is the straight-through cotangent alone, as the anchor's
    assert torch.equal(dx_d[dropped], clean[dropped]) and torch.equal(dx_c[dropped], clean[dropped])


def test_channels_last_and_noncontiguous_inputs():
    ref, ours = _pair(dict(dim=8, codebook_size=2 ** 8))
    x = torch.randn(2, 8, 4, 5)
    for variant in (channels_last(x), x.transpose(2, 3).contiguous().transpose(2, 3)):
        (ra, _), (rb, _) = _call(ref, variant), _call(ours, variant)
        assert torch.equal(rb.quantized, ra.quantized) and torch.equal(rb.indices, ra.indices)


def _quantize_strides(monkeypatch):
    """Spy on the Triton quantize launchers: the strides of every x they receive."""
    import fastsora.kernels.lfq as K

    seen = []
    for name in ("quantize_fwd", "quantize_bwd"):
        real = getattr(K, name)

        def spy(x, *args, _real=real, **kwargs):
            seen.append(x.stride())
            return _real(x, *args, **kwargs)
        monkeypatch.setattr(K, name, spy)
    return seen


@pytest.mark.parametrize("kw,shape", [(dict(dim=8, codebook_size=2 ** 8), (2, 8, 4, 5)),
                                      (dict(codebook_size=16, dim=8, num_codebooks=2), (1, 8, 3, 5))],
                         ids=["batch 2", "batch 1"])
def test_triton_channels_last_and_strided_views_match_torch(poison, monkeypatch, device, kw, shape):
    """Channel-first inputs in contiguous, channels_last and transposed layouts on the Triton path: quantized and
    indices equal the torch path's exactly, the aux loss and the straight-through gradient within 1e-6. A
    batch-1 channel-first input reaches the quantize kernels as a view whose token dim has stride 1 (checked by
    a spy that records the strides and calls the real launcher)."""
    torch.manual_seed(0)
    ours = LFQ(**kw).to(device)
    seen = _quantize_strides(monkeypatch)
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(*shape, generator=gen) * 0.05).to(device)
    g = torch.randn(*shape, generator=gen).to(device)
    for variant in (x, channels_last(x), x.transpose(2, 3).contiguous().transpose(2, 3)):
        out = {}
        for backend in ("torch", "triton"):
            xv = variant.detach().clone(memory_format=torch.preserve_format).requires_grad_()
            assert xv.stride() == variant.stride()
            ret, _ = _call(ours, xv, backend=backend)
            out[backend] = ret, torch.autograd.grad(ret.quantized, xv, g)[0]
        (rt, gt), (rk, gk) = out["torch"], out["triton"]
        assert torch.equal(rk.quantized, rt.quantized) and torch.equal(rk.indices, rt.indices)
        assert relative_error(rk.entropy_aux_loss, rt.entropy_aux_loss) <= 1e-6
        assert relative_error(gk, gt) <= 1e-6
    if shape[0] == 1:
        assert any(s[0] == 1 for s in seen), seen   # the stride-1 token dim reached the kernels


@pytest.mark.parametrize("kw,shape", [
    (dict(dim=16, codebook_size=2 ** 6, num_codebooks=2, commitment_loss_weight=0.25), (2, 9, 16)),
    (dict(dim=10, codebook_size=2 ** 4, projection_has_bias=False, diversity_gamma=2.5), (1, 7, 10)),
    (dict(codebook_size=16, dim=8, num_codebooks=2), (1, 8, 3, 5)),
], ids=["projections 2 codebooks", "no-bias projections", "batch-1 channel-first"])
def test_triton_entropy_loss_gradient_matches_torch(poison, device, kw, shape):
    """Training mode: the gradient of entropy_aux_loss w.r.t. x and project_in's parameters (the per-sample and
    codebook entropies' backward, through the Triton kernels) within 1e-5 relative of the torch path's."""
    torch.manual_seed(0)
    ours = LFQ(**kw).to(device)
    assert ours.training and ours.entropy_loss_weight > 0
    x = (torch.randn(*shape, generator=torch.Generator().manual_seed(2)) * 0.05).to(device)
    out = {}
    for backend in ("torch", "triton"):
        xv = x.clone().requires_grad_()
        leaves = [xv] + [p for p in ours.project_in.parameters()]
        ret, _ = _call(ours, xv, backend=backend)
        out[backend] = ret.entropy_aux_loss, torch.autograd.grad(ret.entropy_aux_loss, leaves)
    (lt, gt), (lk, gk) = out["torch"], out["triton"]
    assert relative_error(lk, lt) <= 1e-5
    assert len(gk) == len(gt) == 1 + len(list(ours.project_in.parameters()))
    for i, (a, b) in enumerate(zip(gk, gt, strict=True)):
        assert b.abs().max() > 0
        err = relative_error(a, b)
        assert err <= 1e-5, f"leaf {i}: relative error {err:.2e}"


@pytest.mark.parametrize("kw,shape", [(dict(codebook_size=2 ** 6), (2, 5)),
                                      (dict(dim=8, codebook_size=2 ** 4, num_codebooks=2), (2, 3, 3, 2)),
                                      (dict(codebook_size=2 ** 5, spherical=True, orthogonal_rotation=True), (3, 4)),
                                      (dict(codebook_size=2 ** 6), (2, 3, 4))])
def test_indices_to_codes_matches_anchor(kw, shape):
    ref, ours = _pair(kw)
    idx = torch.randint(0, ref.codebook_size, shape)
    for project_out in (True, False):
        assert torch.equal(ours.indices_to_codes(idx, project_out=project_out),
                           ref.indices_to_codes(idx, project_out=project_out))


def test_roundtrip_indices_to_codes():
    ours = LFQ(codebook_size=2 ** 10).eval()
    x = torch.randn(2, 6, 10)
    out = ours(x)
    assert torch.equal(ours.indices_to_codes(out.indices), out.quantized)


def test_constructor_signature_and_state_dict_keys():
    sig_ref = inspect.signature(anchor.LFQ.__init__).parameters
    sig = inspect.signature(LFQ.__init__).parameters
    for name, p in sig_ref.items():
        assert name in sig, name
        if name not in ("self", "straight_through_activation"):
            assert sig[name].default == p.default, name
    assert set(sig) - set(sig_ref) == {"entropy_clamp_compat"}
    assert list(inspect.signature(LFQ.forward).parameters) == list(inspect.signature(anchor.LFQ.forward).parameters)
    for kw in (dict(codebook_size=2 ** 6, dim=16, orthogonal_rotation=True, cosine_sim_project_in=True),
               dict(codebook_size=2 ** 6, straight_through_activation=nn.PReLU())):
        ref, ours = _pair(kw)
        assert list(ours.state_dict()) == list(ref.state_dict())
    assert Return._fields == anchor.Return._fields and LossBreakdown._fields == anchor.LossBreakdown._fields


def test_module_attributes_and_dtype():
    ref, ours = _pair(dict(codebook_size=2 ** 6, dim=12))
    for attr in ("codebook_size", "codebook_dim", "dim", "num_codebooks", "keep_num_codebooks_dim", "has_projections"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert torch.equal(ours.codebook, ref.codebook)
    assert ours.dtype == ref.dtype == torch.float32
    assert ours.half().dtype == torch.float16


def test_bad_inputs():
    with pytest.raises(ValueError, match="power of 2"):
        LFQ(codebook_size=100)
    with pytest.raises(ValueError, match="dim or codebook_size"):
        LFQ()
    with pytest.raises(ValueError, match="frac_per_sample_entropy"):
        LFQ(codebook_size=16, frac_per_sample_entropy=0.)
    with pytest.raises(ValueError, match=r"soft_clamp_input_value \(0.5\) must be >= codebook_scale \(1.0\)"):
        LFQ(codebook_size=16, soft_clamp_input_value=0.5)   # the anchor asserts the same
    assert LFQ(codebook_size=16, soft_clamp_input_value=1.0, codebook_scale=1.0).soft_clamp_input_value == 1.0
    m = LFQ(codebook_size=2 ** 6)
    with pytest.raises(ValueError, match="expected dimension of 6 but received 5"):
        m(torch.randn(2, 3, 5))
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.randint(0, 3, (2, 3, 6)))
    with pytest.raises(ValueError, match="mask must have shape"):
        m(torch.randn(2, 3, 6), mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        m(torch.randn(2, 3, 6), mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="shape"):
        m(torch.randn(2, 6))
    with pytest.raises(TypeError, match="integer"):
        m.indices_to_codes(torch.randn(2, 3))


def test_torch_compile_fullgraph_training():
    torch._dynamo.reset()
    ours = LFQ(codebook_size=2 ** 8, dim=12, commitment_loss_weight=0.1)
    x = torch.randn(2, 10, 12, requires_grad=True)

    def step(x):
        ret, br = ours(x, return_loss_breakdown=True)
        return ret.quantized, ret.indices, ret.entropy_aux_loss, br.batch_entropy

    compiled = torch.compile(step, fullgraph=True)   # inductor
    with use_backend("torch"):
        got = compiled(x)
        want = step(x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert relative_error(got[2], want[2]) <= 1e-6
    g1 = torch.autograd.grad(got[0].sum() + got[2], x)[0]
    g2 = torch.autograd.grad(want[0].sum() + want[2], x)[0]
    assert relative_error(g1, g2) <= 1e-6


hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@hypothesis.settings(max_examples=25, deadline=None, derandomize=True)
@hypothesis.given(d=st.integers(1, 9), c=st.integers(1, 3), extra_dim=st.sampled_from([0, 3]),
                  spherical=st.booleans(), scale=st.sampled_from([1.0, 0.5, 2.0]), batch_mask=st.booleans(),
                  n=st.integers(1, 9), training=st.booleans(), commit=st.sampled_from([0.0, 0.3]),
                  seed=st.integers(0, 2 ** 16))
def test_random_configurations_match_anchor(d, c, extra_dim, spherical, scale, batch_mask, n, training, commit, seed):
    kw = dict(codebook_size=2 ** d, num_codebooks=c, spherical=spherical, codebook_scale=scale,
              commitment_loss_weight=commit)
    if extra_dim:
        kw["dim"] = d * c + extra_dim
    ref, ours = _pair(kw, seed=seed)
    ref.train(training)
    ours.train(training)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, n, ours.dim, generator=gen) * 0.2
    mask = torch.tensor([True, False, True]) if batch_mask else None
    (ra, la), (rb, lb) = _call(ref, x, mask=mask), _call(ours, x, mask=mask)
    assert torch.equal(rb.quantized, ra.quantized) and torch.equal(rb.indices, ra.indices)
    assert abs(lb.commitment.item() - la.commitment.item()) <= 1e-6
    assert relative_error(lb.batch_entropy, la.batch_entropy) <= 1e-5


def test_frac_per_sample_entropy_with_batch_mask_draws_like_anchor():
    ref, ours = _pair(dict(codebook_size=2 ** 6, frac_per_sample_entropy=0.4))
    x = torch.randn(4, 9, 6) * 0.05
    mask = torch.tensor([True, False, True, True])
    (_, la), (_, lb) = _call(ref, x, mask=mask, seed=7), _call(ours, x, mask=mask, seed=7)
    assert relative_error(lb.batch_entropy, la.batch_entropy) <= 1e-5
    assert abs(lb.per_sample_entropy.item() - la.per_sample_entropy.item()) <= 1e-5 + 2e-3 * la.per_sample_entropy.item()
    # a different draw gives a different subset (the sampling is live, not ignored)
    (_, lc) = _call(ours, x, mask=mask, seed=8)
    assert lc.batch_entropy.item() != lb.batch_entropy.item()


def test_torch_compile_channel_first_batch_one():
    """A channel-first (1, C·d, H, W) input reaches the quantize op as a permuted view; the torch path returns
    contiguous outputs, as the op's fake implementation promises (inductor asserts the strides)."""
    torch._dynamo.reset()
    m = LFQ(codebook_size=16, dim=8, num_codebooks=2)
    x = torch.randn(1, 8, 3, 5, requires_grad=True)

    def step(x):
        ret = m(x)
        return ret.quantized, ret.indices, ret.entropy_aux_loss

    compiled = torch.compile(step, fullgraph=True)   # inductor
    with use_backend("torch"):
        got, want = compiled(x), step(x)
        g1 = torch.autograd.grad(got[0].sum() + got[2], x)[0]
        g2 = torch.autograd.grad(want[0].sum() + want[2], x)[0]
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert relative_error(got[2], want[2]) <= 1e-6 and relative_error(g1, g2) <= 1e-6


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_dynamic_shapes_compile_once(backend, device):
    """Batches of new sizes and token counts (with (b, n) masks), compiled with ``dynamic=True``: one graph
    for all of them, never recompiled for a new size; quantized output, indices, losses and the gradient of
    x equal eager's bitwise. The first batch's sizes differ from each other and from the dims, so dynamo's
    duck sizing ties none of them."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    m = LFQ(codebook_size=2 ** 6, dim=16, num_codebooks=2, commitment_loss_weight=0.1).to(device)

    def step(x, mask):
        ret, br = m(x, mask=mask, return_loss_breakdown=True)
        return ret.quantized, ret.indices, ret.entropy_aux_loss, br.per_sample_entropy, br.batch_entropy

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend=counter)
    frames = []  # graphs compiled so far, after each batch
    for b, n in [(3, 7), (2, 13), (5, 4)]:
        x = torch.randn(b, n, 16, device=device, requires_grad=True)
        mask = torch.rand(b, n, device=device) > 0.3
        with use_backend(backend):
            got, want = compiled(x, mask), step(x, mask)
            g_got = torch.autograd.grad(got[0].sum() + got[2], x)[0]
            g_want = torch.autograd.grad(want[0].sum() + want[2], x)[0]
        for a, c in zip([*got, g_got], [*want, g_want]):
            assert torch.equal(a, c), ((b, n), (a - c).abs().max())
        frames.append(counter.frame_count)
    assert frames == frames[:1] * len(frames), f"recompiled for a new batch shape (graphs after each: {frames})"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_op_fakes_match_outputs_on_permuted_views(backend, device):
    """Every LFQ op on permuted (T, C, d) views: the fake implementations' shapes and strides match the backend's
    outputs, autograd included (torch.library.opcheck)."""
    xv = torch.randn(2, 4, 5).to(device).permute(2, 0, 1).requires_grad_()
    pos = torch.rand(2, 4, 5).to(device).permute(2, 0, 1).requires_grad_()
    neg = (1 - pos).detach().requires_grad_()
    assert not xv.is_contiguous() and not neg.is_contiguous()
    ops = torch.ops.fastsora
    with use_backend(backend):
        torch.library.opcheck(ops.lfq_quantize.default, (xv, 1.0, 100.0, True, True, None, None, backend))
        torch.library.opcheck(ops.lfq_codebook_entropy.default, (pos, neg, None, backend))
        torch.library.opcheck(ops.lfq_code_sums.default, (pos, neg, None, backend))



@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_channel_first_input_matches_anchor_bitwise(backend, device):
    """A channel-first input reaches project_in and the rotation as a contiguous (b, n, dim) copy, as the
    anchor's einops.pack makes it: a matmul over the permuted view sums in another order, which decides the
    sign of components within rounding of 0. Tokens along a column of the rotation rotate to exact zeros in
    every other component, whose signs (the indices) are then set by that rounding alone."""
    ref, ours = _pair(dict(codebook_size=2 ** 12, orthogonal_rotation=True, soft_clamp_input_value=3.0,
                           straight_through_activation=nn.PReLU(), commitment_loss_weight=1.0), device=device)
    x = (torch.randn(2, 12, 2, 2, 3) * 0.002).to(device)
    for i, (b, t, h, w) in enumerate([(0, 0, 0, 0), (0, 1, 1, 2), (1, 0, 1, 1), (1, 1, 0, 2)]):
        x[b, :, t, h, w] = 0.002 * (i + 1) * ours.orthogonal_rot[:, i]
    x.requires_grad_()
    (ra, _), (rb, _) = _call(ref, x), _call(ours, x, backend)
    assert torch.equal(rb.indices, ra.indices) and torch.equal(rb.quantized, ra.quantized)
    g = torch.randn_like(ra.quantized)
    for a, b in zip(torch.autograd.grad(ra.quantized, _leaves(ref, x), g),
                    torch.autograd.grad(rb.quantized, _leaves(ours, x), g), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape,dim", [((2, 18, 2, 3), None), ((1, 18, 2, 3, 2), None), ((2, 21, 2, 3), 21)],
                         ids=["image", "video", "image-projections"])
def test_spherical_channel_first_matches_anchor_bitwise(backend, shape, dim, device):
    """spherical (BSQ) on a channel-first input: the l2norm runs on a contiguous (b, n, c, d) copy as in the
    anchor, and its backward receives the gradient in the memory order the anchor's does (its straight-through
    add hands on the incoming gradient as it comes: channel-first for a contiguous cotangent, contiguous for one
    laid out like the output; through a projection out, as the matmul writes it): both reductions then round as
    the anchor's, so quantized outputs and straight-through gradients are bitwise equal whatever the
    cotangent's layout (they differed in the last bit; found by tests/test_lfq_fuzz.py)."""
    ref, ours = _pair(dict(codebook_size=2 ** 9, num_codebooks=2, spherical=True, codebook_scale=0.5,
                           soft_clamp_input_value=0.5, force_quantization_f32=False, commitment_loss_weight=0.25,
                           **({} if dim is None else dict(dim=dim))), seed=3, device=device)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=gen).to(device).requires_grad_()
    (ra, la), (rb, lb) = _call(ref, x, inv_temperature=37.0), _call(ours, x, backend, inv_temperature=37.0)
    assert torch.equal(rb.indices, ra.indices) and torch.equal(rb.quantized, ra.quantized)
    assert abs(lb.commitment.item() - la.commitment.item()) <= 1e-6
    for seed in range(4):
        g = torch.randn(ra.quantized.shape, generator=torch.Generator().manual_seed(seed)).to(device)
        if seed % 2:   # laid out like the (channel-first view) output, as torch.randn_like makes it
            g = torch.empty_like(ra.quantized).copy_(g)
            assert not g.is_contiguous()
        ga = torch.autograd.grad(ra.quantized, _leaves(ref, x), g, retain_graph=True)
        gb = torch.autograd.grad(rb.quantized, _leaves(ours, x), g, retain_graph=True)
        for a, b in zip(ga, gb, strict=True):
            assert torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize("activation", [nn.RReLU, nn.Dropout])
def test_random_activation_and_frac_sampling_draw_like_anchor(activation):
    """A random straight_through_activation runs before frac_per_sample_entropy's draw, as in the anchor: both
    use the global generator, so the same seed gives the anchor's token subset and activation noise."""
    torch.manual_seed(0)
    kw = dict(codebook_size=2 ** 4, frac_per_sample_entropy=0.5)
    ref = anchor.LFQ(straight_through_activation=activation(), **kw)
    ours = LFQ(straight_through_activation=activation(), entropy_clamp_compat=True, **kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = (torch.randn(2, 8, 4) * 0.05).requires_grad_()
    (ra, la), (rb, lb) = _call(ref, x, seed=1), _call(ours, x, seed=1)
    assert relative_error(lb.batch_entropy, la.batch_entropy) <= 1e-5
    tol = 1e-5 + 2e-3 * la.per_sample_entropy.item()
    assert abs(lb.per_sample_entropy.item() - la.per_sample_entropy.item()) <= tol
    g = torch.randn_like(ra.quantized)
    assert torch.equal(torch.autograd.grad(rb.quantized, x, g)[0], torch.autograd.grad(ra.quantized, x, g)[0])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_selection_gives_the_anchors_finite_gradients(backend, device):
    """A mask selecting no token makes the entropies and the aux loss NaN (as the anchor's); with
    experimental_softplus_entropy_loss the NaN also reaches the entropies' cotangents (softplus'(NaN)). The means
    have no terms, so x and every parameter still get the anchor's gradient: that of the quantized output."""
    kw = dict(dim=5, codebook_size=2 ** 4, experimental_softplus_entropy_loss=True, commitment_loss_weight=0.3)
    for mask in (torch.zeros(2, dtype=torch.bool, device=device), torch.zeros(2, 4, dtype=torch.bool, device=device)):
        ref, ours = _pair(kw, compat=False, device=device)
        x = (torch.randn(2, 4, 5) * 0.3).to(device).requires_grad_()
        (ra, _), (rb, _) = _call(ref, x, mask=mask), _call(ours, x, backend, mask=mask)
        assert torch.isnan(ra.entropy_aux_loss) and torch.isnan(rb.entropy_aux_loss)
        ga = torch.autograd.grad(ra.entropy_aux_loss + ra.quantized.sum(), _leaves(ref, x))
        gb = torch.autograd.grad(rb.entropy_aux_loss + rb.quantized.sum(), _leaves(ours, x))
        for a, b in zip(ga, gb, strict=True):
            assert torch.isfinite(b).all() and torch.equal(a, b)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_export_save_load_round_trip(backend, device, tmp_path):
    """torch.export of the module (eval: codes and indices; train: the losses and their breakdown) and of the
    functional op, saved and loaded: the loaded program gives the eager results and the same namedtuples (the
    anchor's Return cannot be saved: torch needs a serialized name for each namedtuple)."""
    from fastsora.ops.lfq import LFQOutput, lfq

    torch.manual_seed(0)
    m = LFQ(codebook_size=2 ** 6, dim=12, num_codebooks=2).to(device)
    x = torch.randn(2, 9, 12).to(device)
    for training in (False, True):
        m.train(training)
        with use_backend(backend):
            ep = torch.export.export(m, (x,), kwargs={"return_loss_breakdown": True})
            path = str(tmp_path / f"lfq-{training}.pt2")
            torch.export.save(ep, path)
            got = torch.export.load(path).module()(x, return_loss_breakdown=True)
            want = m(x, return_loss_breakdown=True)
        assert type(got[0]) is Return and type(got[1]) is LossBreakdown
        for a, b in zip((*got[0], *got[1]), (*want[0], *want[1])):
            assert torch.equal(a, b)

    class Functional(nn.Module):
        def forward(self, t):
            return lfq(t, 1.0, 100.0)

    t = torch.randn(7, 2, 5).to(device)
    with use_backend(backend):
        ep = torch.export.export(Functional(), (t,))
        torch.export.save(ep, str(tmp_path / "op.pt2"))
        got = torch.export.load(str(tmp_path / "op.pt2")).module()(t)
        want = lfq(t, 1.0, 100.0)
    assert type(got) is LFQOutput and all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_docs_example_runs_as_documented(backend, device):
    """docs/lfq.md's example, run as written (d=18, 2^18 codes): quantized/indices equal the anchor's with the
    same state_dict, the codes round-trip, and aux_loss is the documented mix of the breakdown's terms."""
    (example,) = doc_examples("docs/lfq.md")
    x = torch.randn(2, 7, 18).to(device)
    ns = {"x": x}
    with use_backend(backend), torch.device(device):
        exec(example, ns)
    quantizer, breakdown = ns["quantizer"], ns["breakdown"]
    theirs = anchor.LFQ(codebook_size=2 ** 18, dim=18, entropy_loss_weight=0.1, diversity_gamma=1.0).to(device)
    theirs.load_state_dict(quantizer.state_dict(), strict=True)
    want = theirs(x)
    assert torch.equal(ns["quantized"], want.quantized) and torch.equal(ns["indices"], want.indices)
    assert torch.equal(ns["codes"], ns["quantized"]) and torch.equal(ns["ret"].indices, ns["indices"])
    assert ns["quantized"].shape == x.shape and ns["indices"].shape == x.shape[:2]
    mix = 0.1 * (breakdown.per_sample_entropy - 1.0 * breakdown.batch_entropy) \
        + quantizer.commitment_loss_weight * breakdown.commitment
    assert relative_error(ns["aux_loss"], mix) <= 1e-6 and relative_error(ns["ret"].entropy_aux_loss, mix) <= 1e-6
