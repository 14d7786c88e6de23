"""Packaging: kernels/ installs as fastsora.kernels (editable and wheel installs); the CLI entry point."""
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fastsora_kernels_maps_to_top_level_kernels_folder():
    import fastsora.kernels

    assert os.path.realpath(os.path.dirname(fastsora.kernels.__file__)) == os.path.realpath(
        os.path.join(ROOT, "kernels"))


def test_wheel_contains_kernels_as_subpackage(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), ROOT], capture_output=True, text=True, timeout=600)
    if out.returncode != 0 and "No module named" in out.stderr:
        pytest.skip(f"wheel build tooling missing: {out.stderr.strip().splitlines()[-1]}")
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("fastsora-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastsora/kernels/__init__.py" in names
    assert "fastsora/kernels/utils.py" in names
    assert not any(n.startswith("kernels/") for n in names), "kernels/ must not install as a top-level package"
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert entry and "fastsora = fastsora.cli:main" in zipfile.ZipFile(wheel).read(entry[0]).decode()


def test_readme_example_runs_and_matches_the_torch_backend(device):
    """The README's example, run as written on the Triton kernels, gives what the torch path gives."""
    import torch

    from fastsora import use_backend
    from fastsora.testing import assert_close, doc_examples

    (example,) = doc_examples("README.md")
    ns = {"latents": torch.randn(2, 6, 18, device=device), "chunk": torch.randn(1, 128, 3, 5, 6, device=device),
          "tokens": torch.randn(11, 1152, device=device),
          "cu_seqlens": torch.tensor([0, 4, 11], dtype=torch.int32, device=device)}
    conv_part, attn_part = example.split("\nattn = ")   # both parts name their output y
    with use_backend("triton"), torch.device(device), torch.no_grad():
        exec(conv_part, ns)
        conv_y = ns["y"]
        exec("attn = " + attn_part, ns)
    with use_backend("torch"), torch.no_grad():
        want_lfq = ns["quantizer"](ns["latents"])
        want_conv = ns["conv"](ns["chunk"], cache=None, return_cache=True)
        want_attn = ns["attn"](ns["tokens"], ns["cu_seqlens"])
    assert torch.equal(ns["quantized"], want_lfq.quantized) and torch.equal(ns["indices"], want_lfq.indices)
    assert_close(ns["aux_loss"], want_lfq.entropy_aux_loss, torch.float32, "aux_loss")
    assert_close([conv_y, ns["cache"]], list(want_conv), torch.float32, "conv output and cache")
    assert_close(ns["y"], want_attn, torch.float32, "attention output")
