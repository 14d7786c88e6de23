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
