"""fastsora's LFQ inside vector-quantize-pytorch's ResidualLFQ and GroupedResidualLFQ, as a user swaps the import
(the anchor builds its layers through the module-level name ``LFQ`` of ``vector_quantize_pytorch.residual_lfq``):
the anchor's state_dict loads strictly and quantized output, indices, codes, per-layer losses and all gradients
match, with each layer's codebook scale (2^-i), its halved soft clamp, token masks, quantizer dropout and
channel-first feature maps."""
import functools

import pytest
import torch

from fastsora import use_backend
from fastsora.nn import LFQ
from fastsora.testing import randn, relative_error

residual = pytest.importorskip("vector_quantize_pytorch.residual_lfq")

COMMON = dict(codebook_size=2 ** 5, entropy_loss_weight=0.3, diversity_gamma=2.0, commitment_loss_weight=0.25)
CONFIGS = [
    ("residual", "ResidualLFQ", dict(dim=12, num_quantizers=3, **COMMON), (2, 9, 12)),
    ("residual soft clamp", "ResidualLFQ", dict(dim=5, num_quantizers=4, soft_clamp_input_value=2.0, **COMMON),
     (3, 7, 5)),
    ("grouped", "GroupedResidualLFQ", dict(dim=16, groups=2, num_quantizers=2, **COMMON), (2, 6, 16)),
    ("grouped image", "GroupedResidualLFQ", dict(dim=10, groups=2, num_quantizers=2, accept_image_fmap=True,
                                                 **COMMON), (2, 10, 3, 4)),
]


def _pair(cls_name: str, kw: dict, device):
    """(anchor, the same class built with fastsora's LFQ and the anchor's weights). LFQ with
    ``entropy_clamp_compat=True``: the anchor's clamped codebook entropy."""
    cls = getattr(residual, cls_name)
    torch.manual_seed(0)
    ref = cls(**kw)
    saved = residual.LFQ
    residual.LFQ = functools.partial(LFQ, entropy_clamp_compat=True)
    try:
        ours = cls(**kw)
    finally:
        residual.LFQ = saved
    layers = _layers(ours)
    assert layers and len(layers) == len(_layers(ref)) and all(isinstance(m, LFQ) for m in layers)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.to(device), ours.to(device)


def _per_group(codes):
    """All codes as a tuple: GroupedResidualLFQ returns one tensor per group, ResidualLFQ one tensor."""
    return codes if isinstance(codes, tuple) else (codes,)


def _layers(module):
    """The LFQ layers (fastsora's or the anchor's) inside a residual quantizer."""
    return [m for m in module.modules() if isinstance(m, (LFQ, residual.LFQ))]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name,cls_name,kw,shape", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_residual_lfq_with_fastsora_layers_matches_anchor(name, cls_name, kw, shape, backend, device, poison):
    """Training mode: quantized output, indices and all codes bitwise the anchor's; each layer's loss (entropy +
    commitment) within 2e-3, and the gradients of x and every parameter through output and losses within 2e-3
    (the anchor clamps its per-sample entropy's log at 1e-5, fastsora does not)."""
    ref, ours = _pair(cls_name, kw, device)
    x = randn(*shape, device=device, requires_grad=True)
    cotangent = randn(*shape, device=device)
    with use_backend(backend):
        quantized, indices, losses, codes = ours(x, return_all_codes=True)
    ref_quantized, ref_indices, ref_losses, ref_codes = ref(x, return_all_codes=True)
    assert torch.equal(quantized, ref_quantized) and torch.equal(indices, ref_indices)
    assert all(torch.equal(c, r) for c, r in zip(_per_group(codes), _per_group(ref_codes), strict=True))
    assert relative_error(losses, ref_losses) <= 2e-3
    leaves = [x] + list(ref.parameters())
    grads = torch.autograd.grad((quantized * cotangent).sum() + losses.sum(), [x] + list(ours.parameters()))
    ref_grads = torch.autograd.grad((ref_quantized * cotangent).sum() + ref_losses.sum(), leaves)
    for i, (g, r) in enumerate(zip(grads, ref_grads, strict=True)):
        assert relative_error(g, r) <= 2e-3, f"gradient {i}"
    assert torch.equal(ours.get_output_from_indices(indices), ref.get_output_from_indices(indices))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mask_kind", ["batch", "tokens"])
def test_residual_lfq_masks_dropout_and_eval_match_anchor(mask_kind, backend, device, poison):
    """A (b,) or (b, n) mask reaches every layer; quantizer dropout with a fixed seed drops the same layers (-1
    indices, zero losses); eval mode returns zero losses. Indices and quantized output bitwise the anchor's; the
    losses within 2e-3 under a (b,) mask. Under a (b, n) mask the codebook entropy differs by design (the anchor's
    then equals its per-sample entropy; docs/lfq.md, Differences from the anchor), so only their zeros are
    compared."""
    kw = dict(dim=8, num_quantizers=4, quantize_dropout=True, **COMMON)
    ref, ours = _pair("ResidualLFQ", kw, device)
    x = randn(3, 11, 8, device=device)
    if mask_kind == "batch":
        mask = torch.tensor([True, False, True], device=device)
    else:
        mask = torch.rand(3, 11, device=device) < 0.6
        mask[:, 0] = True
    dropped = False
    for seed in range(4):
        with use_backend(backend):
            quantized, indices, losses = ours(x, mask=mask, rand_quantize_dropout_fixed_seed=seed)
        ref_quantized, ref_indices, ref_losses = ref(x, mask=mask, rand_quantize_dropout_fixed_seed=seed)
        assert torch.equal(indices, ref_indices) and torch.equal(quantized, ref_quantized), seed
        dropped |= bool((ref_indices == -1).any())
        assert torch.isfinite(losses).all() and torch.equal(losses == 0, ref_losses == 0), seed
        if mask_kind == "batch":
            assert relative_error(losses, ref_losses) <= 2e-3, seed
    assert dropped, "no seed dropped a layer: the dropout path was not exercised"
    ours.eval()
    ref.eval()
    with use_backend(backend):
        quantized, indices, losses = ours(x)
    ref_quantized, ref_indices, ref_losses = ref(x)
    assert torch.equal(indices, ref_indices) and torch.equal(quantized, ref_quantized)
    assert torch.equal(losses, torch.zeros_like(losses)) and torch.equal(ref_losses, torch.zeros_like(ref_losses))
