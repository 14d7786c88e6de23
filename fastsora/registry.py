"""What each kernel family registers once, and where the CLI, tests and benchmarks find it.

* ``register_kernel(family, kernel, configs)`` (from ``kernels/<family>.py``): the ``@triton.jit`` kernel and
  every config its launcher or autotuner may pick, each with a compile signature, so ``fastsora compile``
  can build it for sm_80/sm_90 without a GPU.
* ``register_op(OpSpec(...))`` (from ``fastsora/cases/<family>.py``): the public op, its float64 reference,
  check cases for ``fastsora check`` and benchmark cases (with baselines) for ``fastsora bench``.

``load_all()`` imports every module of ``fastsora.kernels`` and ``fastsora.cases``, so a new family is found
by dropping its files in those folders.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch


#: Triton signature types of integer arguments (``i1`` is a bool, which the JIT never marks divisible).
INT_TYPES = ("i8", "i16", "i32", "i64", "u8", "u16", "u32", "u64")
#: appended to the label of a config built by ``KernelConfig.with_divisible_ints()``
DIVISIBLE_INTS_TAG = " [ints/16]"


@dataclass(frozen=True)
class KernelConfig:
    """One compile-time configuration of a kernel.

    ``signature`` maps every argument of the kernel, in order, to a Triton type string ('*fp16', '*fp32',
    'i32', 'i64', 'fp32', ...) or 'constexpr'; ``constexprs`` gives the value of each constexpr argument
    (tile sizes, dtype switches). ``label`` names the config in tables (e.g. 'fwd fp16 D=64 BM=128 BN=64').

    ``divisible_by_16`` names the arguments compiled as multiples of 16, as Triton's JIT specialises them
    at launch (pointers 16-byte aligned, integers divisible by 16). None (the default) means every pointer
    argument, which is what the JIT sees for tensors torch allocated; list integer arguments (strides,
    head dims) the launcher guarantees too, or pass () to check the unaligned variant.

    ``with_divisible_ints()`` is the same config with every integer runtime argument (``i8``..``i64``,
    ``u8``..``u64``; not pointers, floats, bools or constexprs) added to ``divisible_by_16``: what the JIT
    builds for a launch whose integers (shapes, strides, head dims, flags equal to 0) are all multiples of 16,
    as in the power-of-two shapes of video models. ``fastsora compile --divisible-ints`` checks that build too.

    ``archs`` names the architectures ('sm_80', 'sm_90') whose launcher may pick the config; `fastsora
    compile` builds it for those only. None (the default) means every architecture.

    ``known_stack_under`` lists Triton releases ('3.4') under which the config is known to keep a small stack
    frame on its architectures (documented where the config is defined): the compile check reports that as
    known instead of failing, and only under those releases; anything else is still a failure.
    ``known_stack_with_divisible_ints`` does the same for the build ``with_divisible_ints()`` makes only (releases
    under which ptxas keeps a small stack frame when every integer argument is a multiple of 16, documented where
    the config is defined); the plain build is still checked strictly.
    """

    label: str
    signature: Dict[str, str]
    constexprs: Dict[str, Any]
    num_warps: int = 4
    num_stages: int = 2
    divisible_by_16: Optional[Tuple[str, ...]] = None
    archs: Optional[Tuple[str, ...]] = None
    known_stack_under: Tuple[str, ...] = ()
    known_stack_with_divisible_ints: Tuple[str, ...] = ()

    def aligned_args(self) -> Tuple[str, ...]:
        """The arguments compiled as multiples of 16 (``divisible_by_16``, default every pointer argument)."""
        if self.divisible_by_16 is not None:
            return tuple(self.divisible_by_16)
        return tuple(n for n, t in self.signature.items() if t.startswith("*"))

    def int_args(self) -> Tuple[str, ...]:
        """The integer runtime arguments (the ones Triton's JIT specialises on value at launch)."""
        return tuple(n for n, t in self.signature.items() if t in INT_TYPES)

    def with_divisible_ints(self) -> "KernelConfig":
        """This config with every integer runtime argument divisible by 16 as well (the JIT's specialisation of
        a launch whose ints are all multiples of 16), labelled with DIVISIBLE_INTS_TAG."""
        aligned = self.aligned_args()
        ints = tuple(n for n in self.int_args() if n not in aligned)
        known = tuple(dict.fromkeys(self.known_stack_under + self.known_stack_with_divisible_ints))
        return dataclasses.replace(self, label=self.label + DIVISIBLE_INTS_TAG, divisible_by_16=aligned + ints,
                                   known_stack_under=known, known_stack_with_divisible_ints=())

    def built_for(self, arch: str) -> bool:
        return self.archs is None or arch in self.archs

    def stack_frame_known(self, problems: Sequence[str], triton_version: str) -> bool:
        """True when ``problems`` are only stack frames and this Triton release is listed as keeping them."""
        release = ".".join(triton_version.split(".")[:2])
        return bool(problems) and release in self.known_stack_under and \
            all(p.startswith("stack frame") for p in problems)


@dataclass
class KernelEntry:
    family: str
    kernel: Any  # triton JITFunction (or InterpretedFunction under the interpreter)
    configs: List[KernelConfig]

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        return getattr(fn, "__name__", str(fn))


@dataclass
class Case:
    """One input configuration of an op.

    ``make(device, dtype)`` returns the positional arguments (fresh random tensors every call);
    ``flops`` / ``bytes`` (of the forward pass, optional) turn times into TFLOP/s and GB/s.
    """

    label: str
    make: Callable[[torch.device, torch.dtype], Tuple[Any, ...]]
    flops: Optional[float] = None
    bytes: Optional[float] = None
    meta: Dict[str, Any] = field(default_factory=dict)


@dataclass
class OpSpec:
    """A public op as the CLI sees it.

    ``run(*args)`` calls fastsora under the current backend; ``reference(*args)`` is the float64 oracle (it
    receives the same arguments with floating tensors upcast to float64 on CPU). Both return a tuple of
    tensors to compare (outputs and, where the op is differentiable, the gradients of a fixed random
    projection of them: the family decides). ``tolerance`` maps dtype to the allowed relative error
    (max |out - ref| / max |ref|). ``check_cases(device)`` is small on CPU (interpreter), realistic on CUDA.

    ``bench_cases(device)`` and ``bench_impls``: each impl maps (args, mode) to a zero-argument callable
    that runs one iteration of ``mode`` ('fwd', 'bwd' or 'fwd+bwd'), or to None when it does not apply or
    is unavailable here (a missing third-party library, an input it cannot take). One impl is named
    'fastsora'; baselines have descriptive names ('reference', 'F.pad+F.conv3d', 'sdpa_dense', ...).
    An impl may raise ``torch.OutOfMemoryError``/``MemoryError``: the runner records out-of-memory points.
    """

    name: str
    family: str
    run: Callable[..., Tuple[torch.Tensor, ...]]
    reference: Callable[..., Tuple[torch.Tensor, ...]]
    check_cases: Callable[[torch.device], Sequence[Case]]
    tolerance: Dict[torch.dtype, float]
    bench_cases: Callable[[torch.device], Sequence[Case]] = lambda device: ()
    bench_impls: Dict[str, Callable[[Tuple[Any, ...], str], Optional[Callable[[], Any]]]] = field(default_factory=dict)
    bench_modes: Tuple[str, ...] = ("fwd", "fwd+bwd")
    dtypes_cpu: Tuple[torch.dtype, ...] = (torch.float32, torch.float16)
    dtypes_cuda: Tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)


KERNELS: Dict[str, KernelEntry] = {}
OPS: Dict[str, OpSpec] = {}


def register_kernel(family: str, kernel: Any, configs: Sequence[KernelConfig]) -> Any:
    """Record ``kernel`` (a @triton.jit function) and its configs under ``family``; returns the kernel."""
    entry = KernelEntry(family, kernel, list(configs))
    if not entry.configs:
        raise ValueError(f"register_kernel: {entry.name} needs at least one KernelConfig")
    KERNELS[f"{family}.{entry.name}"] = entry
    return kernel


def register_op(spec: OpSpec) -> OpSpec:
    OPS[spec.name] = spec
    return spec


def load_all() -> None:
    """Import every kernel family and every op case module, filling KERNELS and OPS."""
    for package in ("fastsora.kernels", "fastsora.cases"):
        pkg = importlib.import_module(package)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_") and info.name != "utils":
                importlib.import_module(f"{package}.{info.name}")


def select_ops(names: Optional[Sequence[str]], command: str) -> List[OpSpec]:
    """The registered ops called ``names`` (all when empty), after loading every family; an unknown name
    ends ``command`` with the list of registered ones."""
    load_all()
    names = list(names) if names else sorted(OPS)
    unknown = [n for n in names if n not in OPS]
    if unknown:
        raise SystemExit(f"{command}: unknown op(s) {unknown}; registered: {sorted(OPS)}")
    return [OPS[n] for n in names]

