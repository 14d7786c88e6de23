"""Every registered kernel config compiles for sm_80 and sm_90 without a GPU: no spills (nor stack frames),
shared memory within the architecture's limit (what the interpreter cannot see). The same check as
``fastsora compile``, one test per (kernel, config, arch). On 2 cores the CI part (995 builds) took 10 min 20 s
with an empty Triton cache (``~/.triton/cache``, where ptxas's results are kept) and 16 s with it warm (at cc7d103).

The same sweep with every integer argument divisible by 16 (``fastsora compile --divisible-ints``, the JIT's
launch specialisation of power-of-two shapes) runs as ``slow`` tests (``pytest -m slow tests/test_compile.py``),
as long again: CI deselects them. So do the varlen attention kernels' window variant (330 builds, which took CI
past 20 minutes on 2 cores) except its fp16 D = 128 tiles, one slot of each kernel on both archs; the whole
variant was built under triton 3.4, 3.6 and 3.9 when it was added (docs/varlen_attention.md)."""
import pytest
import triton

from fastsora.aot import compile_config
from fastsora.registry import KERNELS, load_all
from fastsora.testing import assert_compiles_clean

load_all()
ARCHS = ("sm_80", "sm_90")


def _in_ci(label: str) -> bool:
    """Every config but the window variant's outside its fp16 D = 128 slot (see above)."""
    return " window" not in label or "fp16 D=128 " in label


POINTS = [pytest.param(key, i, arch, id=f"{key}[{cfg.label}]-{arch}",
                       marks=() if _in_ci(cfg.label) else pytest.mark.slow)
          for key in sorted(KERNELS) for i, cfg in enumerate(KERNELS[key].configs) for arch in ARCHS
          if cfg.built_for(arch)]
DIVISIBLE_INT_POINTS = [pytest.param(key, i, arch, id=f"{key}[{cfg.label}]-{arch}-ints16", marks=pytest.mark.slow)
                        for key in sorted(KERNELS) for i, cfg in enumerate(KERNELS[key].configs) for arch in ARCHS
                        if cfg.built_for(arch)]


def test_every_family_registers_kernels():
    families = {entry.family for entry in KERNELS.values()}
    assert {"lfq", "causal_conv3d", "varlen_attention"} <= families, families


@pytest.mark.parametrize("key,index,arch", POINTS)
def test_kernel_config_compiles_clean(key, index, arch):
    entry = KERNELS[key]
    config = entry.configs[index]
    assert_compiles_clean(key, config, arch, compile_config(entry, config, arch))


@pytest.mark.parametrize("key,index,arch", DIVISIBLE_INT_POINTS)
def test_kernel_config_compiles_clean_with_divisible_ints(key, index, arch):
    """The build Triton's JIT makes when every integer argument of the launch is a multiple of 16."""
    entry = KERNELS[key]
    config = entry.configs[index].with_divisible_ints()
    assert_compiles_clean(key, config, arch, compile_config(entry, config, arch))


def test_configs_name_known_archs():
    """A config limited to some architectures names only architectures the compile check knows."""
    from fastsora.aot import ARCHS as KNOWN

    for key, entry in KERNELS.items():
        for cfg in entry.configs:
            assert cfg.archs is None or (cfg.archs and set(cfg.archs) <= set(KNOWN)), (key, cfg.label, cfg.archs)


def test_known_stack_frames_are_excused_only_where_documented():
    from fastsora.registry import KernelConfig

    cfg = KernelConfig("x", {"a": "i32"}, {}, known_stack_under=("3.4",))
    frame = ["stack frame 8 B (spilled registers)"]
    assert cfg.stack_frame_known(frame, "3.4.0")
    assert not cfg.stack_frame_known(frame, "3.6.0"), "only the listed release"
    assert not cfg.stack_frame_known(frame + ["spills 8 B"], "3.4.0"), "never real spills or other problems"
    assert not cfg.stack_frame_known([], "3.4.0")
    assert not KernelConfig("y", {"a": "i32"}, {}).stack_frame_known(frame, "3.4.0")
    # plain builds: nothing under the releases the GPU machines and CI run (3.6, the newest); a few small frames
    # under the oldest supported release (3.4: exact-fp32 attention tiles) and those between (3.5, 3.7, 3.8: the
    # pins of torch 2.9, 2.12 and 2.14), each documented beside its family's table
    listed = [(key, c.label, c.known_stack_under) for key, e in KERNELS.items() for c in e.configs
              if c.known_stack_under]
    assert listed and all(set(releases) <= {"3.4", "3.5", "3.7", "3.8"} for _, _, releases in listed), listed
    assert all(key.startswith("varlen_attention.") and " fp32 " in label
               and (label.startswith("sm_90 ") or " window " in label)
               for key, label, releases in listed if "3.4" in releases), listed
    # frames documented for the launch specialisation only: the plain build stays strict
    ints = KernelConfig("z", {"a": "i32"}, {}, known_stack_with_divisible_ints=("3.6",))
    assert not ints.stack_frame_known(frame, "3.6.0"), "the plain build is checked strictly"
    assert ints.with_divisible_ints().stack_frame_known(frame, "3.6.0")
    assert not ints.with_divisible_ints().stack_frame_known(frame, "3.9.0"), "only the listed release"
    # documented in the family docs: under the releases the GPU machines and CI run (3.6, newest) only exact-fp32
    # attention tiles and LFQ's table backward; anything else only under 3.4 and the releases between
    listed = [(c.label, c.known_stack_with_divisible_ints) for e in KERNELS.values() for c in e.configs
              if c.known_stack_with_divisible_ints]
    assert all(" fp32 " in label or label.startswith("code table bwd ") or not {"3.6", "3.9"} & set(releases)
               for label, releases in listed), listed


def test_compile_builds_with_the_launch_options(monkeypatch):
    """``fastsora compile`` passes the options every launch passes (LAUNCH_OPTIONS), so it checks the binaries
    the launchers run, whatever Triton's defaults."""
    from fastsora import aot
    from fastsora.kernels.utils import LAUNCH_OPTIONS

    seen = []

    def record(src, target=None, options=None):
        seen.append(dict(options or {}))
        raise RuntimeError("recorded")

    monkeypatch.setattr(triton, "compile", record)
    key = sorted(KERNELS)[0]
    result = aot._compile(KERNELS[key].family, KERNELS[key].kernel, KERNELS[key].configs[0], "sm_90")
    assert result.error and seen and all(seen[0].get(k) == v for k, v in LAUNCH_OPTIONS.items()), seen
    assert LAUNCH_OPTIONS == {"enable_fp_fusion": True}, "FMA contraction pinned on (Triton 3.10 turns it off)"


@pytest.mark.interpreter
def test_every_launch_passes_the_launch_options(monkeypatch):
    """Every kernel launch of the three families (forward and backward) passes LAUNCH_OPTIONS: Triton 3.9 warns
    that its FMA-contraction default turns off in 3.10, and the launches must not depend on that default."""
    import torch
    from triton.runtime import interpreter

    from fastsora import use_backend
    from fastsora.kernels.utils import LAUNCH_OPTIONS
    from fastsora.nn import LFQ
    from fastsora.ops import causal_conv3d, varlen_attention
    from fastsora.testing import grads, packed_offsets

    launches = []
    original = interpreter.GridExecutor.__call__

    def spy(self, *args, **kwargs):
        launches.append((getattr(self.fn, "__name__", repr(self.fn)), {k: kwargs.get(k) for k in LAUNCH_OPTIONS}))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", spy)
    with use_backend("triton"):
        x = torch.randn(1, 3, 4, 5, 5, requires_grad=True)
        w = torch.randn(4, 3, 3, 3, 3, requires_grad=True)
        b = torch.randn(4, requires_grad=True)
        grads(causal_conv3d(x, w, b, activation="silu"), [x, w, b])
        for compat in (False, True):
            lfq = LFQ(codebook_size=2 ** 6, entropy_clamp_compat=compat)
            z = torch.randn(2, 5, 6, requires_grad=True)
            ret = lfq(z)
            grads(ret.quantized.sum() + ret.entropy_aux_loss, [z])
        q, k, v = (torch.randn(9, 2, 16, requires_grad=True) for _ in range(3))
        cu = packed_offsets([4, 5])
        grads(varlen_attention(q, k, v, cu, cu, causal=True), [q, k, v])
    names = {name for name, _ in launches}
    assert len(names) >= 12, names   # conv fwd/dx/dw/silu, lfq quantize/table/pair (+bwd), attention's four
    assert all(options == LAUNCH_OPTIONS for _, options in launches), [n for n, o in launches if o != LAUNCH_OPTIONS]
