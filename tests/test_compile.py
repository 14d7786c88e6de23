"""Every registered kernel config compiles for sm_80 and sm_90 without a GPU: no spills (nor stack frames),
shared memory within the architecture's limit (what the interpreter cannot see). The same check as
``fastsora compile``, one test per (kernel, config, arch): about 3 minutes on 2 cores."""
import pytest

from fastsora.aot import compile_config
from fastsora.registry import KERNELS, load_all

load_all()
ARCHS = ("sm_80", "sm_90")
POINTS = [pytest.param(key, i, arch, id=f"{key}[{cfg.label}]-{arch}")
          for key in sorted(KERNELS) for i, cfg in enumerate(KERNELS[key].configs) for arch in ARCHS
          if cfg.built_for(arch)]


def test_every_family_registers_kernels():
    families = {entry.family for entry in KERNELS.values()}
    assert {"lfq", "causal_conv3d", "varlen_attention"} <= families, families


@pytest.mark.parametrize("key,index,arch", POINTS)
def test_kernel_config_compiles_clean(key, index, arch):
    entry = KERNELS[key]
    result = compile_config(entry, entry.configs[index], arch)
    assert result.problems == [], f"{key} [{entry.configs[index].label}] on {arch}: {result.problems}"


def test_configs_name_known_archs():
    """A config limited to some architectures names only architectures the compile check knows."""
    from fastsora.aot import ARCHS as KNOWN

    for key, entry in KERNELS.items():
        for cfg in entry.configs:
            assert cfg.archs is None or (cfg.archs and set(cfg.archs) <= set(KNOWN)), (key, cfg.label, cfg.archs)
