"""Every registered kernel config compiles for sm_80 and sm_90 without a GPU: no spills (nor stack frames),
shared memory within the architecture's limit (what the interpreter cannot see). The same check as
``fastsora compile``, one test per (kernel, config, arch): about 3 minutes on 2 cores."""
import pytest

from fastsora.aot import compile_config
from fastsora.registry import KERNELS, load_all

load_all()
ARCHS = ("sm_80", "sm_90")
POINTS = [pytest.param(key, i, arch, id=f"{key}[{cfg.label}]-{arch}")
          for key in sorted(KERNELS) for i, cfg in enumerate(KERNELS[key].configs) for arch in ARCHS]


def test_every_family_registers_kernels():
    families = {entry.family for entry in KERNELS.values()}
    assert {"lfq", "causal_conv3d", "varlen_attention"} <= families, families


@pytest.mark.parametrize("key,index,arch", POINTS)
def test_kernel_config_compiles_clean(key, index, arch):
    entry = KERNELS[key]
    result = compile_config(entry, entry.configs[index], arch)
    assert result.problems == [], f"{key} [{entry.configs[index].label}] on {arch}: {result.problems}"
