"""Static cost of a registered kernel config: compile it ahead of time (no GPU), disassemble the cubin and print
the instructions of each loop body (a backward branch), with the most frequent opcodes and the local-memory
loads/stores (a stack frame's spilled registers) in each body and outside all of them.

    python scripts/sass_loops.py lfq._lfq_code_pair_kernel "mode=0 BLOCK_H=64 BLOCK_L=64" --arch sm_90
    python scripts/sass_loops.py causal_conv3d._causal_conv3d_fwd_kernel \
        "sm_80/sm_90 fwd plain bf16 BM=128 BN=64 BK=32 w8 s3" --unit-stride sxc syc scc src --divisible-ints

--unit-stride compiles the named integer arguments as the constant 1 and --divisible-ints marks every other
integer stride and channel count as a multiple of 16: what Triton's JIT specialises at launch for, e.g., a
channels_last_3d tensor with 16·k channels. Instruction counts per loop body times trip counts, divided by the
issue rate (4 warp instructions per cycle per SM), bound a kernel's time from below; they are not timings.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from fastsora import registry  # noqa: E402
from fastsora.aot import ARCHS, _alignment_attrs, _cuobjdump, _resource_usage  # noqa: E402
from fastsora.aot import LOCAL_MEMORY_OPCODES, local_memory_outside_loops, sass_loops  # noqa: E402
from fastsora.kernels.utils import LAUNCH_OPTIONS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kernel", help="registry key, e.g. lfq._lfq_code_pair_kernel")
    ap.add_argument("label", help="a substring of the config label (the first match is used)")
    ap.add_argument("--arch", default="sm_90", choices=sorted(ARCHS))
    ap.add_argument("--unit-stride", nargs="*", default=[], metavar="NAME")
    ap.add_argument("--divisible-ints", action="store_true")
    args = ap.parse_args()
    registry.load_all()
    entry = registry.KERNELS[args.kernel]
    config = next(c for c in entry.configs if args.label in c.label)
    signature = dict(config.signature)
    constexprs = dict(config.constexprs)
    for name in args.unit_stride:
        signature[name] = "constexpr"
        constexprs[name] = 1
    config = dataclasses.replace(config, signature=signature)
    if args.divisible_ints:
        config = config.with_divisible_ints()
    src = triton.compiler.ASTSource(fn=entry.kernel, signature=signature, constexprs=constexprs,
                                    attrs=_alignment_attrs(entry.kernel, config))
    compiled = triton.compile(src, target=GPUTarget("cuda", ARCHS[args.arch]["cc"], 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages,
                                       **LAUNCH_OPTIONS})  # the options every launch passes, as `fastsora compile`
    usage = _resource_usage(compiled.asm["cubin"])
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([_cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    print(f"{args.kernel} [{config.label}] {args.arch}, triton {triton.__version__}: "
          f"{usage.get('REG')} registers, stack {usage.get('STACK', 0)} B, {config.num_warps} warps")
    for lo, hi, ops in sass_loops(sass):
        top = ", ".join(f"{op} {n}" for op, n in ops.most_common(8))
        local = ", ".join(f"{op} {ops[op]}" for op in LOCAL_MEMORY_OPCODES if ops[op])
        print(f"  loop {lo:#06x}-{hi:#06x}: {sum(ops.values())} instructions ({top})"
              + (f"; local memory: {local}" if local else ""))
    # where a stack frame costs: local loads/stores in no loop body run once per program
    outside = local_memory_outside_loops(sass)
    if usage.get("STACK", 0) or outside:
        print("  local memory outside loops: " + (", ".join(f"{op} {n}" for op, n in sorted(outside.items()))
                                                  or "none"))


if __name__ == "__main__":
    main()
