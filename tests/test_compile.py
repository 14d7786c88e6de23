"""Every registered kernel compiles for sm_80 and sm_90 without a GPU: no spills, shared memory within the
architecture's limit (what the interpreter cannot see).

The default run compiles every kernel at up to ``SAMPLE`` of its configs spread over its list (first and
last included), which keeps CI within its time; the ``slow`` sweep and ``fastsora compile`` build them all.
"""
import pytest

from fastsora.aot import compile_config
from fastsora.registry import KERNELS, load_all

load_all()
ARCHS = ("sm_80", "sm_90")
SAMPLE = 3


def _spread(n: int, k: int):
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _points(sample: bool):
    return [pytest.param(key, i, arch, id=f"{key}[{KERNELS[key].configs[i].label}]-{arch}")
            for key in sorted(KERNELS)
            for i in (_spread(len(KERNELS[key].configs), SAMPLE) if sample else range(len(KERNELS[key].configs)))
            for arch in ARCHS]


def test_every_family_registers_kernels():
    families = {entry.family for entry in KERNELS.values()}
    assert {"lfq", "causal_conv3d", "varlen_attention"} <= families, families


def _check(key: str, index: int, arch: str) -> None:
    entry = KERNELS[key]
    result = compile_config(entry, entry.configs[index], arch)
    assert result.problems == [], f"{key} [{entry.configs[index].label}] on {arch}: {result.problems}"


@pytest.mark.parametrize("key,index,arch", _points(sample=True))
def test_kernel_config_compiles_clean(key, index, arch):
    _check(key, index, arch)


@pytest.mark.slow
@pytest.mark.parametrize("key,index,arch", _points(sample=False))
def test_every_kernel_config_compiles_clean(key, index, arch):
    _check(key, index, arch)


def test_spread_keeps_first_and_last():
    assert _spread(2, 3) == [0, 1]
    assert _spread(10, 3) == [0, 4, 9] or _spread(10, 3) == [0, 5, 9]
    assert _spread(60, 3)[0] == 0 and _spread(60, 3)[-1] == 59
