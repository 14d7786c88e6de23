"""Host-side helpers shared by the launchers: output allocation (NaN-poisoned under test), launch checks and
the record of the autotuners they build."""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Dict, Iterator, Sequence, TypeVar

import torch
import triton

_poison = False


@contextlib.contextmanager
def poisoned_outputs(enabled: bool = True) -> Iterator[None]:
    """Inside the block, every launcher output starts as NaN (floats) or -1 (integers).

    Tests use it so that an element the kernel forgot to write shows up as NaN instead of as a stale zero.
    """
    global _poison
    previous, _poison = _poison, enabled
    try:
        yield
    finally:
        _poison = previous


_Launcher = TypeVar("_Launcher", bound=Callable[..., Any])


def on_input_device(launcher: _Launcher) -> _Launcher:
    """Run ``launcher`` with the CUDA device of its first tensor argument current. Triton launches on the
    current device (and its autotuner times there), so without this a model on cuda:1 would launch on cuda:0
    with pointers into cuda:1. CPU tensors (the interpreter) run as they are."""
    @functools.wraps(launcher)
    def run(*args, **kwargs):
        t = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if t is None or t.device.type != "cuda":
            return launcher(*args, **kwargs)
        with torch.cuda.device(t.device):
            return launcher(*args, **kwargs)
    return run  # type: ignore[return-value]


def new_output(shape: Sequence[int], dtype: torch.dtype, device: torch.device, **kwargs) -> torch.Tensor:
    """Allocate a kernel output: ``torch.empty`` normally, NaN / -1 filled inside :func:`poisoned_outputs`.

    Extra keyword arguments (``memory_format``) go to ``torch.empty``.
    """
    out = torch.empty(tuple(shape), dtype=dtype, device=device, **kwargs)
    if _poison:
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


def new_output_like(t: torch.Tensor, **kwargs) -> torch.Tensor:
    return new_output(t.shape, kwargs.pop("dtype", t.dtype), t.device, **kwargs)


#: compile options every fastsora launch passes, and ``fastsora compile`` builds with: FMA contraction on, the
#: default of every Triton from 3.4 to 3.9. Triton 3.9 warns that its default turns off in 3.10; pinned here,
#: the kernels stay the binaries ``fastsora compile`` checks whatever the release or TRITON_DEFAULT_FP_FUSION
#: (TRITON_FORCE_DISABLE_FP_FUSION=1 still turns it off, for debugging).
LAUNCH_OPTIONS: Dict[str, Any] = {"enable_fp_fusion": True}


#: every autotuner a launcher built, by name (what `fastsora bench` reports the picks of)
AUTOTUNERS: Dict[str, Any] = {}


def autotuned(name: str, kernel, configs: Sequence[Any], key: Sequence[str], **options):
    """``triton.autotune(configs, key, **options)(kernel)``, recorded under ``name``."""
    tuner = triton.autotune(list(configs), key=list(key), **options)(kernel)
    AUTOTUNERS[name] = tuner
    return tuner


def launch_tuned(tuner, grid, *args, **kwargs) -> None:
    """``tuner[grid](*args, **kwargs, **LAUNCH_OPTIONS)``, except under
    ``torch.use_deterministic_algorithms(True)``: then the tuner's first candidate runs untimed. A pick by timing
    can differ between processes, and with it the tile and the accumulation order; a fixed tile makes results
    bit-reproducible across runs, not only within one (the first candidate of every table is a sound default for
    its slot)."""
    if torch.are_deterministic_algorithms_enabled():
        tuner.fn[grid](*args, **kwargs, **tuner.configs[0].all_kwargs(), **LAUNCH_OPTIONS)
    else:
        tuner[grid](*args, **kwargs, **LAUNCH_OPTIONS)


def autotune_picks() -> Dict[str, Dict[str, str]]:
    """{autotuner name: {tuning key: chosen config}} for every recorded autotuner that has tuned a key."""
    return {name: {str(k): str(cfg) for k, cfg in tuner.cache.items()}
            for name, tuner in sorted(AUTOTUNERS.items()) if getattr(tuner, "cache", None)}
