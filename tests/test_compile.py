"""Every registered kernel config compiles for sm_80 and sm_90 without a GPU: no spills, shared memory
within the architecture's limit (what the interpreter cannot see)."""
import pytest

from fastsora.aot import compile_config
from fastsora.registry import KERNELS, load_all

load_all()
POINTS = [pytest.param(key, i, arch, id=f"{key}[{cfg.label}]-{arch}")
          for key in sorted(KERNELS) for i, cfg in enumerate(KERNELS[key].configs) for arch in ("sm_80", "sm_90")]


def test_some_kernels_are_registered():
    families = {entry.family for entry in KERNELS.values()}
    assert families, "no kernel family registered"


@pytest.mark.parametrize("key,index,arch", POINTS)
def test_kernel_config_compiles_clean(key, index, arch):
    entry = KERNELS[key]
    result = compile_config(entry, entry.configs[index], arch)
    assert result.problems == [], f"{key} [{entry.configs[index].label}] on {arch}: {result.problems}"
