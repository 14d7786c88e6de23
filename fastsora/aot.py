"""Ahead-of-time compilation of every registered kernel config for NVIDIA targets, without a GPU.

``triton.compile`` builds PTX and a cubin for a ``GPUTarget``; the ``cuobjdump`` shipped in Triton's wheel
reads registers, stack, spill (LOCAL) bytes and shared memory off the cubin. The compiler does not enforce
the shared-memory limit, so it is checked here against each architecture's per-block maximum.
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

from fastsora.registry import KernelConfig, KernelEntry

#: Per-architecture limits: the most shared memory one block may use (bytes, dynamic + static).
ARCHS = {
    "sm_80": {"cc": 80, "smem": 163 * 1024, "name": "A100"},
    "sm_90": {"cc": 90, "smem": 227 * 1024, "name": "H100"},
}


@dataclass
class CompileResult:
    kernel: str
    config: str
    arch: str
    ok: bool
    registers: Optional[int] = None
    spill_bytes: Optional[int] = None
    stack_bytes: Optional[int] = None
    shared_bytes: Optional[int] = None
    mma: bool = False
    wgmma: bool = False
    error: str = ""

    @property
    def problems(self) -> List[str]:
        if not self.ok:
            return [f"compile failed: {self.error}"]
        found = []
        if self.spill_bytes:
            found.append(f"spills {self.spill_bytes} B")
        if self.stack_bytes:
            # ptxas keeps spilled registers in the stack frame, where LOCAL can still read 0
            found.append(f"stack frame {self.stack_bytes} B (spilled registers)")
        if self.shared_bytes is not None and self.shared_bytes > ARCHS[self.arch]["smem"]:
            found.append(f"shared memory {self.shared_bytes} B > {ARCHS[self.arch]['smem']} B")
        return found


def _kernel_address(kernel) -> tuple:
    """(module, name) of the Python function behind a @triton.jit kernel, to find it in another process."""
    fn = getattr(kernel, "fn", None)
    if fn is None:
        raise TypeError(f"{kernel!r} is not a Triton kernel")
    return fn.__module__, fn.__name__


def _is_interpreted(kernel) -> bool:
    import triton

    return not isinstance(kernel, triton.runtime.jit.JITFunction)


def _child_init() -> None:
    # The compiler must not see the interpreter: under TRITON_INTERPRET=1 triton.language lowers through
    # the interpreter's builder, so kernels are imported afresh in a process without it.
    os.environ.pop("TRITON_INTERPRET", None)


def _compile_by_address(family: str, module: str, name: str, config: KernelConfig, arch: str) -> "CompileResult":
    import importlib

    kernel = getattr(importlib.import_module(module), name)
    if _is_interpreted(kernel):
        raise RuntimeError(f"{module}.{name} was imported under TRITON_INTERPRET=1 in the compile process "
                           "(by the __main__ script?); import kernels inside functions, not at script top level")
    return _compile(family, kernel, config, arch)


_pool = None


def _executor(workers: int = 1):
    """A process pool whose workers import kernels without the interpreter (spawned, TRITON_INTERPRET unset)."""
    import concurrent.futures
    import multiprocessing

    global _pool
    if workers == 1 and _pool is not None:
        return _pool
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=workers, initializer=_child_init,
                                                  mp_context=multiprocessing.get_context("spawn"))
    if workers == 1:
        import atexit

        _pool = pool
        atexit.register(pool.shutdown)
    return pool


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {k: int(v) for k, v in usage.items()}


_SASS_INSTRUCTION = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s*(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")
#: the opcodes that touch a thread's local memory, where ptxas keeps a stack frame's spilled registers
LOCAL_MEMORY_OPCODES = ("LDL", "STL")


def _sass_instructions(sass: str) -> List[Tuple[int, str, str]]:
    """[(address, opcode without modifiers, line)] of a ``cuobjdump -sass`` listing."""
    return [(int(m.group(1), 16), m.group(2).split(".")[0], line)
            for line in sass.splitlines() if (m := _SASS_INSTRUCTION.match(line))]


def _loop_bodies(code: List[Tuple[int, str, str]]) -> List[Tuple[int, int]]:
    """[(first address, last address)] of every span a backward branch of ``code`` jumps over."""
    found = []
    for addr, op, line in code:
        target = re.search(r"BRA\s+0x([0-9a-f]+)", line) if op == "BRA" else None
        if target and int(target.group(1), 16) < addr:
            found.append((int(target.group(1), 16), addr))
    return found


def sass_loops(sass: str) -> List[Tuple[int, int, "collections.Counter[str]"]]:
    """[(first address, last address, Counter of opcodes)] of every loop body (the span a backward branch jumps
    over) of a ``cuobjdump -sass`` listing, for ``scripts/sass_loops.py``."""
    code = _sass_instructions(sass)
    return [(lo, hi, collections.Counter(o for a, o, _ in code if lo <= a <= hi)) for lo, hi in _loop_bodies(code)]


def local_memory_outside_loops(sass: str) -> "collections.Counter[str]":
    """The local loads and stores (LDL/STL) of a ``cuobjdump -sass`` listing that lie in no loop body: a stack
    frame used only there costs a few instructions per program, not per iteration."""
    code = _sass_instructions(sass)
    bodies = _loop_bodies(code)
    return collections.Counter(op for addr, op, _ in code
                               if op in LOCAL_MEMORY_OPCODES and not any(lo <= addr <= hi for lo, hi in bodies))


def compile_config(entry: KernelEntry, config: KernelConfig, arch: str) -> CompileResult:
    """Compile one config of one kernel for ``arch`` ('sm_80' or 'sm_90') and read its resources.

    Interpreted kernels (TRITON_INTERPRET=1) are compiled in a helper process that imports them compiled.
    """
    if _is_interpreted(entry.kernel):
        return _executor().submit(_compile_by_address, entry.family, *_kernel_address(entry.kernel),
                                  config, arch).result()
    return _compile(entry.family, entry.kernel, config, arch)


def compile_many(jobs: Sequence[Tuple[KernelEntry, KernelConfig, str]], workers: Optional[int] = None,
                 on_result: Callable[[CompileResult], None] = lambda r: None) -> List[CompileResult]:
    """Compile (entry, config, arch) jobs on ``workers`` processes (default: all cores); results in order."""
    workers = workers or os.cpu_count() or 1
    with _executor(workers) as pool:
        futures = [pool.submit(_compile_by_address, e.family, *_kernel_address(e.kernel), c, a) for e, c, a in jobs]
        results = []
        for f in futures:
            results.append(f.result())
            on_result(results[-1])
    return results


def _alignment_attrs(kernel, config: KernelConfig) -> dict:
    """The divisibility-by-16 hints Triton's JIT would attach at launch (see KernelConfig.divisible_by_16)."""
    names = config.aligned_args()
    unknown = [n for n in names if n not in config.signature or config.signature[n] == "constexpr"]
    if unknown:
        raise ValueError(f"divisible_by_16 names {unknown}, which are not runtime arguments of the kernel")
    return {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in names}


def _compile(family: str, kernel, config: KernelConfig, arch: str) -> CompileResult:
    import triton
    from triton.backends.compiler import GPUTarget

    from fastsora.kernels.utils import LAUNCH_OPTIONS

    result = CompileResult(kernel=f"{family}.{kernel.fn.__name__}", config=config.label, arch=arch, ok=False)
    try:
        src = triton.compiler.ASTSource(fn=kernel, signature=dict(config.signature),
                                        constexprs=dict(config.constexprs), attrs=_alignment_attrs(kernel, config))
        compiled = triton.compile(src, target=GPUTarget("cuda", ARCHS[arch]["cc"], 32),
                                  options={"num_warps": config.num_warps, "num_stages": config.num_stages,
                                           **LAUNCH_OPTIONS})
    except Exception as exc:  # report every failure as a row, the caller decides the exit code
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        return result
    usage = _resource_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    result.ok = True
    result.registers = usage.get("REG")
    result.spill_bytes = usage.get("LOCAL", 0)
    result.stack_bytes = usage.get("STACK", 0)
    # dynamic shared memory the launch reserves plus any static shared memory in the cubin
    result.shared_bytes = int(compiled.metadata.shared) + usage.get("SHARED", 0)
    result.wgmma = "wgmma" in ptx
    result.mma = "mma.sync" in ptx or result.wgmma
    return result
