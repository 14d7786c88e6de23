"""Ahead-of-time compilation of every registered kernel config for NVIDIA targets, without a GPU.

``triton.compile`` builds PTX and a cubin for a ``GPUTarget``; the ``cuobjdump`` shipped in Triton's wheel
reads registers, stack, spill (LOCAL) bytes and shared memory off the cubin. The compiler does not enforce
the shared-memory limit, so it is checked here against each architecture's per-block maximum.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import List, Optional

from fastsora.registry import KernelConfig, KernelEntry

#: Max dynamic shared memory per block (bytes) and the register file limit per thread.
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
        if self.shared_bytes is not None and self.shared_bytes > ARCHS[self.arch]["smem"]:
            found.append(f"shared memory {self.shared_bytes} B > {ARCHS[self.arch]['smem']} B")
        return found


def _jit_function(kernel, _memo=None):
    """The JITFunction behind ``kernel``.

    Under TRITON_INTERPRET=1 the decorator returned an InterpretedFunction, and so did the decorator of
    every ``@triton.jit`` helper it calls; AOT compilation needs real JITFunctions, so the Python function
    is rebuilt over a copy of its globals in which each interpreted helper is replaced the same way.
    """
    import types

    import triton

    if isinstance(kernel, triton.runtime.jit.JITFunction):
        return kernel
    fn = getattr(kernel, "fn", None)
    if fn is None:
        raise TypeError(f"{kernel!r} is not a Triton kernel")
    memo = {} if _memo is None else _memo
    if id(kernel) in memo:
        return memo[id(kernel)]
    interpreted = triton.runtime.interpreter.InterpretedFunction
    scope = dict(fn.__globals__)
    clone = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    clone.__qualname__, clone.__module__ = fn.__qualname__, fn.__module__
    jit = memo[id(kernel)] = triton.runtime.jit.JITFunction(clone)
    for name, value in fn.__globals__.items():
        if isinstance(value, interpreted):
            scope[name] = _jit_function(value, memo)
    return jit


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


def compile_config(entry: KernelEntry, config: KernelConfig, arch: str) -> CompileResult:
    """Compile one config of one kernel for ``arch`` ('sm_80' or 'sm_90') and read its resources."""
    import triton
    from triton.backends.compiler import GPUTarget

    result = CompileResult(kernel=f"{entry.family}.{entry.name}", config=config.label, arch=arch, ok=False)
    try:
        src = triton.compiler.ASTSource(fn=_jit_function(entry.kernel), signature=dict(config.signature),
                                        constexprs=dict(config.constexprs))
        compiled = triton.compile(src, target=GPUTarget("cuda", ARCHS[arch]["cc"], 32),
                                  options={"num_warps": config.num_warps, "num_stages": config.num_stages})
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
