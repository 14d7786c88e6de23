"""Every causal_conv3d kernel config compiles for sm_80 and sm_90 with no spills, no stack frame (ptxas puts
spilled registers and call frames there even when LOCAL reads 0) and shared memory within limits. Slow: the
foundation's test_compile covers the spill/shared-memory rule in CI."""
import pytest

from fastsora.aot import ARCHS, compile_config
from fastsora.registry import KERNELS, load_all
from fastsora.testing import assert_compiles_clean

load_all()
POINTS = [pytest.param(key, i, arch, id=f"{key}[{cfg.label}]-{arch}")
          for key in sorted(KERNELS) if key.startswith("causal_conv3d.")
          for i, cfg in enumerate(KERNELS[key].configs) for arch in ARCHS if cfg.built_for(arch)]


def test_all_kernels_registered():
    names = {key.split(".", 1)[1] for key in KERNELS if key.startswith("causal_conv3d.")}
    assert names == {"_causal_conv3d_fwd_kernel", "_causal_conv3d_bwd_input_kernel",
                     "_causal_conv3d_bwd_weight_kernel", "_silu_bwd_kernel"}
    fwd = KERNELS["causal_conv3d._causal_conv3d_fwd_kernel"].configs
    assert {c.signature["x_ptr"] for c in fwd} == {"*fp16", "*bf16", "*fp32"}


@pytest.mark.slow
@pytest.mark.parametrize("key,index,arch", POINTS)
def test_config_compiles_without_stack(key, index, arch):
    entry = KERNELS[key]
    config = entry.configs[index]
    result = compile_config(entry, config, arch)
    if "silu" not in key and "fp32" not in config.label:
        assert result.mma, "the fp16/bf16 GEMM kernels use tensor cores (fp32 runs IEEE fp32 dots)"
    assert_compiles_clean(key, config, arch, result)  # a frame listed beside the tables for this release: xfail
    assert result.stack_bytes == 0, f"{result.stack_bytes} B of stack (spilled registers)"


def test_every_autotune_candidate_is_registered_for_its_arch():
    """`fastsora compile` builds each candidate of each architecture's table, for that architecture."""
    import fastsora.kernels.causal_conv3d as K

    names = {"fwd": "_causal_conv3d_fwd_kernel", "bwd_input": "_causal_conv3d_bwd_input_kernel",
             "bwd_weight": "_causal_conv3d_bwd_weight_kernel"}
    for arch, table in K._CONFIGS.items():
        for (kind, variant, klass), rows in table.items():
            configs = KERNELS[f"causal_conv3d.{names[kind]}"].configs
            for bm, bn, bk, nw, ns in rows:
                dtypes = ("fp16", "bf16") if klass == "lp" else ("fp32",)
                for t in dtypes:
                    label = f" {kind} {variant} {t} BM={bm} BN={bn} BK={bk} w{nw} s{ns}"
                    hits = [c for c in configs if c.label.endswith(label) and c.built_for(arch)]
                    assert len(hits) == 1, (arch, label)
