"""The drop-in claim end to end: magvit2-pytorch's ``VideoTokenizer`` built with fastsora's ``CausalConv3d`` (and
``LFQ``) in place of its own, as a user swaps the import, loads the anchor's state_dict strictly and gives the same
losses, parameter gradients, codes and decoded video.

Needs magvit2-pytorch and a torchvision built for the installed torch. The test extra leaves them out (PyPI's
torchvision does not import next to the CPU torch wheel), so CI skips this file; run it in an environment that has
them, e.g. ``pip install magvit2-pytorch`` next to torch 2.11 (README, Tests)."""
import copy
import functools
import math

import pytest
import torch

import fastsora
from fastsora.nn import LFQ, CausalConv3d
from fastsora.testing import randn, relative_error

try:
    import magvit2_pytorch.magvit2_pytorch as magvit
except Exception as exc:  # ImportError, or torchvision's RuntimeError when it was built for another torch
    pytest.skip(f"magvit2-pytorch is not importable here: {type(exc).__name__}: {exc}", allow_module_level=True)

#: a small tokenizer with every layer kind that holds a CausalConv3d (conv_in, conv_out, residual units) plus
#: spatial and causal time compression: 8x8 frames to 4x4 latents, 5 frames to 3
CONFIG = dict(image_size=8, init_dim=8, channels=3, layers=("residual", "compress_space", "residual", "compress_time"),
              input_conv_kernel_size=(3, 5, 5), residual_conv_kernel_size=3, codebook_size=2 ** 6, use_gan=False,
              perceptual_loss_weight=0.0, flash_attn=False)


def tokenizer(pad_mode: str, conv=None, lfq=None) -> torch.nn.Module:
    """A VideoTokenizer whose module-level CausalConv3d / LFQ names point at ``conv`` / ``lfq`` while it is built
    (None: magvit2-pytorch's own), which is what replacing the import does."""
    saved = magvit.CausalConv3d, magvit.LFQ
    magvit.CausalConv3d, magvit.LFQ = conv or saved[0], lfq or saved[1]
    try:
        return magvit.VideoTokenizer(pad_mode=pad_mode, **CONFIG)
    finally:
        magvit.CausalConv3d, magvit.LFQ = saved


def swapped_copy(anchor: torch.nn.Module, pad_mode: str, swap_lfq: bool) -> torch.nn.Module:
    """fastsora's modules in a tokenizer of the same config, holding ``anchor``'s weights (strict load). LFQ with
    ``entropy_clamp_compat=True``: the anchor's clamped codebook entropy (docs/lfq.md)."""
    lfq = functools.partial(LFQ, entropy_clamp_compat=True) if swap_lfq else None
    weight = anchor.conv_in.conv.weight
    mine = tokenizer(pad_mode, CausalConv3d, lfq).to(weight.device, weight.dtype)
    assert isinstance(mine.conv_in, CausalConv3d) and isinstance(mine.quantizers, LFQ) == swap_lfq
    mine.load_state_dict(anchor.state_dict(), strict=True)
    return mine


def training_step(model: torch.nn.Module, video: torch.Tensor):
    """(loss, its breakdown, {parameter name: gradient}) of the tokenizer's reconstruction + LFQ loss (fresh gradient
    tensors: the previous step's are set to None, not overwritten)."""
    model.zero_grad(set_to_none=True)
    loss, breakdown = model(video, return_loss=True)
    loss.backward()
    return loss, breakdown, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def gradient_errors(got: dict, ref: dict) -> dict:
    """{parameter name: ||g - g_ref|| / ||g_ref||} (the same parameters must have gradients); where the reference
    gradient is 0 (kernel taps that only ever see padding) the error is 0 for an exact 0, else inf; NaN is inf."""
    assert set(got) == set(ref), f"parameters with gradients differ: {sorted(set(got) ^ set(ref))}"
    errors = {}
    for name, r in ref.items():
        err, norm = (got[name].double() - r.double()).norm().item(), r.double().norm().item()
        ratio = err / norm if norm > 0 else (0.0 if err == 0 else math.inf)
        errors[name] = math.inf if math.isnan(ratio) else ratio
    return errors


def worst_gradient_error(got: dict, ref: dict) -> float:
    return max(gradient_errors(got, ref).values())


@pytest.mark.parametrize("pad_mode", ["constant", "replicate"])
@pytest.mark.parametrize("clip", ["video", "image"])
def test_conv_swap_is_bitwise_on_torch_backend(pad_mode, clip):
    """float64 on the torch backend: fastsora's CausalConv3d is the anchor's pad + conv, so everything is bitwise
    equal. Images (4-D input, one frame: the short-clip fallback to zero padding) included."""
    torch.manual_seed(0)
    anchor = tokenizer(pad_mode).double()
    mine = swapped_copy(anchor, pad_mode, swap_lfq=False)
    video = randn(2, 3, *((5,) if clip == "video" else ()), 8, 8, dtype=torch.float64)
    with fastsora.use_backend("torch"):
        loss, breakdown, grads = training_step(mine, video)
    ref_loss, ref_breakdown, ref_grads = training_step(anchor, video)
    with fastsora.use_backend("torch"):
        codes = mine.tokenize(video)  # tokenize() leaves the model in eval mode: after the training steps
    assert torch.equal(loss, ref_loss) and torch.equal(breakdown.recon_loss, ref_breakdown.recon_loss)
    assert set(grads) == set(ref_grads) and all(torch.equal(grads[n], g) for n, g in ref_grads.items())
    assert torch.equal(codes, anchor.tokenize(video))


@pytest.mark.parametrize("pad_mode", ["constant", "replicate"])
def test_swap_on_triton_backend(pad_mode, device, poison):
    """fp32 on the Triton backend, CausalConv3d and LFQ swapped, against the anchor in float64: losses, gradients
    and decoded video within 4x the error of the anchor's own fp32 run (plus, for LFQ's per-sample entropy, the
    documented difference of its unclamped log); codes equal on every token whose bits are clear of 0."""
    torch.manual_seed(0)
    anchor = tokenizer(pad_mode).double().to(device)
    anchor32 = copy.deepcopy(anchor).float()
    mine = swapped_copy(anchor32, pad_mode, swap_lfq=True)
    video = randn(2, 3, 5, 8, 8, dtype=torch.float64, device=device)

    with fastsora.use_backend("triton"):
        loss, breakdown, grads = training_step(mine, video.float())
    ref_loss, ref_breakdown, ref_grads = training_step(anchor, video)
    loss32, breakdown32, grads32 = training_step(anchor32, video.float())
    ref_codes = anchor.tokenize(video)  # tokenize() leaves a model in eval mode: after the training steps
    with fastsora.use_backend("triton"):
        codes = mine.tokenize(video.float())
        decoded = mine.decode_from_code_indices(ref_codes)

    floor = 1e-6  # fp32 rounding of a value of order 1 that the anchor's fp32 run happens to get right
    assert abs(loss.item() - ref_loss.item()) <= 4 * abs(loss32.item() - ref_loss.item()) + 1e-5 * ref_loss.item()
    assert relative_error(breakdown.recon_loss, ref_breakdown.recon_loss) <= \
        4 * relative_error(breakdown32.recon_loss, ref_breakdown.recon_loss) + floor
    ours, theirs = breakdown.quantizer_loss_breakdown, ref_breakdown.quantizer_loss_breakdown
    ours32 = breakdown32.quantizer_loss_breakdown
    for name in ("batch_entropy", "commitment"):
        assert relative_error(getattr(ours, name), getattr(theirs, name)) <= \
            4 * relative_error(getattr(ours32, name), getattr(theirs, name)) + floor, name
    # the anchor clamps the per-sample entropy's log at 1e-5, fastsora does not: <= 2e-3 relative + 1e-5 absolute
    assert abs(ours.per_sample_entropy.item() - theirs.per_sample_entropy.item()) <= \
        2e-3 * theirs.per_sample_entropy.item() + 1e-5
    # the per-sample entropy's unclamped log moves the encoder's gradients by ~1e-5 relative at this size
    assert worst_gradient_error(grads, ref_grads) <= 4 * worst_gradient_error(grads32, ref_grads) + 1e-4
    decoded32 = anchor32.decode_from_code_indices(ref_codes)
    decoded64 = anchor.decode_from_code_indices(ref_codes)
    assert relative_error(decoded, decoded64) <= 4 * relative_error(decoded32, decoded64) + floor

    # codes: the sign of each bit of the quantizer's input; compared where every bit is clear of fp32 rounding
    with torch.no_grad():
        bits = anchor.quantizers.project_in(anchor.encode(video, quantize=False).movedim(1, -1))
    clear = (bits.abs() > 1e-3).all(-1)
    assert clear.float().mean() > 0.8, "too few tokens clear of 0 for the comparison to mean anything"
    assert torch.equal(codes[clear], ref_codes[clear])


def test_swap_under_fp16_autocast(device, poison):
    """A mixed-precision training step (accelerate's fp16: fp32 weights under autocast) on the Triton backend: each
    parameter's gradient is within 1.5x (+1e-3) of the anchor's own autocast error against its float64 step. fp16
    convolutions make that error large (tens of percent on some encoder gradients of this small model), so this
    checks that autocast reaches fastsora's modules as it does the anchor's, not fp32 accuracy."""
    torch.manual_seed(0)
    anchor = tokenizer("replicate").to(device)
    anchor64 = copy.deepcopy(anchor).double()
    mine = swapped_copy(anchor, "replicate", swap_lfq=True)
    video = randn(2, 3, 5, 8, 8, device=device)

    def amp_step(model):
        with torch.autocast(device.type, dtype=torch.float16):
            return training_step(model, video)

    dtypes = []
    mine.conv_in.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    with fastsora.use_backend("triton"):
        loss, _, grads = amp_step(mine)
    assert dtypes == [torch.float16], "autocast must reach fastsora's CausalConv3d as it does nn.Conv3d"
    ref_loss, _, ref_grads = training_step(anchor64, video.double())
    loss_amp, _, grads_amp = amp_step(anchor)
    assert abs(loss.item() - ref_loss.item()) <= 1.5 * abs(loss_amp.item() - ref_loss.item()) + 1e-3
    ours, theirs = gradient_errors(grads, ref_grads), gradient_errors(grads_amp, ref_grads)
    worse = {n: (ours[n], theirs[n]) for n in theirs if ours[n] > 1.5 * theirs[n] + 1e-3}
    assert not worse, f"gradients further from float64 than the anchor's under autocast: {worse}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_swapped_tokenizer_training_step_compiles_whole(backend, device, poison):
    """torch.compile(fullgraph=True) over the whole swapped tokenizer's training step: one graph, and the loss and
    every parameter gradient bitwise the eager step's (aot_eager: the custom ops' fakes and registered backwards
    as the compiled graph runs them, without inductor's own rounding)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    mine = swapped_copy(tokenizer("replicate").to(device), "replicate", swap_lfq=True)
    video = randn(2, 3, 5, 8, 8, device=device)
    counter = CompileCounterWithBackend("aot_eager")
    with fastsora.use_backend(backend):
        loss, _, grads = training_step(mine, video)
        compiled_loss, _, compiled_grads = training_step(torch.compile(mine, backend=counter, fullgraph=True), video)
    assert counter.frame_count == 1
    # the compiled wrapper names the parameters _orig_mod.<name>
    compiled_grads = {n.removeprefix("_orig_mod."): g for n, g in compiled_grads.items()}
    assert torch.equal(compiled_loss, loss)
    assert set(grads) == set(compiled_grads) and all(torch.equal(compiled_grads[n], g) for n, g in grads.items())
