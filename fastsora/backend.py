"""Backend choice, in one place.

``FASTSORA_BACKEND=auto|triton|torch`` sets the process default; ``fastsora.use_backend(name)`` overrides it
for the current context (thread / asyncio task) inside a ``with`` block (or decorated function), and
``fastsora.set_backend(name)`` for the rest of it. Every public op calls :func:`select_backend` and nothing else
decides between Triton and torch:

* ``auto``: Triton for CUDA tensors, the torch reference path for CPU tensors.
* ``triton``: the Triton kernels. CUDA tensors run compiled kernels; CPU tensors run them in Triton's
  interpreter, which must be switched on (``TRITON_INTERPRET=1``) before fastsora is imported.
* ``torch``: the plain-PyTorch reference path on any device.

A Triton path never falls back to torch: when the Triton kernels cannot take an input, the error says why
and which backend can.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import re
import warnings
from typing import Optional, Tuple

import torch

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "FASTSORA_BACKEND"

_override: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("fastsora_backend", default=None)


class BackendError(RuntimeError):
    """The requested backend cannot run this call; the message says why and what would."""


def _validate(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


def get_backend() -> str:
    """The backend requested here: the request of the innermost open ``use_backend`` block or the last
    ``set_backend`` of this context, whichever came later, or else ``$FASTSORA_BACKEND`` (default auto)."""
    name = _override.get()
    if name is not None:
        return name
    return _validate(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)


class use_backend(contextlib.ContextDecorator):
    """Request backend ``name`` ('auto', 'triton' or 'torch') inside a ``with`` block or a decorated function,
    over ``$FASTSORA_BACKEND``, for the current context only (thread / asyncio task)::

        with fastsora.use_backend("torch"):    # the previous request comes back at the end of the block
            ...

        @fastsora.use_backend("torch")
        def f(...): ...

    It takes effect when entered, not when made: torch's checkpoint may make it in the forward (``context_fn``)
    and enter it in the backward, on another thread. To set the backend for the rest of a thread without a
    block, call :func:`set_backend`. Made and never entered nor used as a decorator, it warns when dropped (a
    bare ``fastsora.use_backend("torch")`` call changes nothing).
    """

    def __init__(self, name: str) -> None:
        self.name = _validate(name, "use_backend(name)")
        self._tokens: list = []  # one per entry still open: a decorated function may recurse
        self._used = False

    def __enter__(self) -> str:
        self._used = True
        self._tokens.append(_override.set(self.name))
        return self.name

    def __exit__(self, *exc_info) -> None:
        _override.reset(self._tokens.pop())

    def __call__(self, func):
        self._used = True
        return super().__call__(func)

    def __del__(self) -> None:
        if not getattr(self, "_used", True) and warnings is not None:  # (None at interpreter shutdown)
            warnings.warn(f"fastsora.use_backend({self.name!r}) was never entered, so it changed nothing: use it as "
                          f"`with fastsora.use_backend({self.name!r}):` or a decorator, or call "
                          f"fastsora.set_backend({self.name!r}) to set the backend for the rest of the thread",
                          RuntimeWarning, stacklevel=2)

    def __repr__(self) -> str:
        return f"use_backend({self.name!r})"


def set_backend(name: Optional[str]) -> None:
    """Request backend ``name`` ('auto', 'triton' or 'torch') for the rest of the current context (thread /
    asyncio task), over ``$FASTSORA_BACKEND``; ``None`` clears the request (the variable applies again). A
    ``use_backend`` block restores the request it found when it ends, so a ``set_backend`` inside one lasts until
    the block ends."""
    _override.set(None if name is None else _validate(name, "set_backend(name)"))


def _tracing_a_graph() -> bool:
    """True where torch's checkpoint takes only dispatch-mode contexts from ``context_fn``: under torch.compile
    or export, including AOTAutograd's tracing of a checkpointed region, where torch calls ``context_fn``
    (torch 2.13's ``torch.compiler.is_compiling()`` is True there, 2.11's and 2.8's only while Dynamo traces).
    Asks torch's checkpoint its own test (a proxy dispatch mode in 2.11+, a functional one in 2.8), or looks
    for either mode where a release lacks it."""
    if torch.compiler.is_compiling():
        return True
    from torch.utils import checkpoint

    checkpoint_test = getattr(checkpoint, "_is_compiling", None)
    if checkpoint_test is not None:
        return bool(checkpoint_test(None, (), {}))
    modes = (torch._C._TorchDispatchModeKey.PROXY, torch._C._TorchDispatchModeKey.FUNCTIONAL)
    return any(torch._C._get_dispatch_mode(mode) is not None for mode in modes)


def checkpoint_context() -> tuple:
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint(fn, ..., use_reentrant=False,
    context_fn=fastsora.checkpoint_context)``: the recomputed forward runs under the backend request of the
    original one. Without it the recompute reads the request where it runs, during the backward (on a CUDA
    backward, autograd's own thread, where a ``use_backend`` block does not reach). Under torch.compile the
    traced ops already carry their request, and torch takes only dispatch-mode contexts there: plain
    recomputation."""
    if _tracing_a_graph():
        from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

        def recompute(ctx, op, *args, **kwargs):
            return CheckpointPolicy.PREFER_RECOMPUTE

        return create_selective_checkpoint_contexts(recompute)
    recompute = use_backend(get_backend())
    recompute._used = True  # torch enters it only when a backward recomputes: unentered is no mistake here
    return contextlib.nullcontext(), recompute


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_active() -> bool:
    """True when fastsora's Triton kernels were created in Triton's interpreter (run on CPU tensors)."""
    if not triton_available():
        return False
    from fastsora.kernels import KERNELS_INTERPRETED

    return KERNELS_INTERPRETED


def _release(version: str) -> Tuple[int, ...]:
    """(major, minor) of a version string such as '3.6.0', '2.4.0rc1' or '3.7.0+git1a2b'."""
    return tuple(int(m) for m in re.findall(r"\d+", version)[:2])


def interpreter_incompatibility(triton_version: str, numpy_version: str) -> Optional[str]:
    """Why this Triton release's interpreter cannot run fastsora's kernels with this numpy, or None.

    Triton < 3.7's interpreter turns a 1-element array into a Python int (a runtime size in a loop bound),
    which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars").
    """
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter cannot run them with numpy {numpy_version} (Triton < 3.7 "
                "needs numpy < 2.4 there); install numpy<2.4 or triton>=3.7")
    return None


@functools.lru_cache(maxsize=None)
def installed_interpreter_incompatibility() -> Optional[str]:
    """:func:`interpreter_incompatibility` of the installed Triton and numpy (cached)."""
    import numpy
    import triton

    return interpreter_incompatibility(triton.__version__, numpy.__version__)


def backend_request() -> str:
    """:func:`get_backend` as a public op reads it to hand to its custom ops (forward and backward).

    Under ``torch.compile`` it is read once, when the function is traced, and becomes a constant of the graph
    (dynamo cannot read a ContextVar): the compiled forward and backward both use the request in effect at
    trace time, and graphs traced under different requests never share a compile-cache entry.
    """
    return get_backend()


# What torch.compiler.assume_constant_result(backend_request) does, without importing torch._dynamo (and with
# it triton, before a process can unset TRITON_INTERPRET) when fastsora is imported; tests/test_backend.py
# checks that the decorator still sets exactly this.
backend_request._dynamo_marked_constant = True


def interpreter_dtype_reason(t: torch.Tensor) -> Optional[str]:
    """The Triton kernels' reason to refuse ``t`` because of its dtype on CPU (None otherwise): CPU tensors run
    in Triton's interpreter, whose bfloat16 arithmetic is wrong (tl.dot returns values near 1e9, and
    x + (q - x) is not rounded per operation), so its results would be silent garbage."""
    if t.device.type == "cpu" and t.dtype == torch.bfloat16:
        return "bfloat16 inputs on CPU (Triton's interpreter computes bfloat16 wrongly; use float16 or float32)"
    return None


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. a checkpointed forward being recomputed)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def select_backend(op: str, device: torch.device, unsupported: Optional[str] = None,
                   requested: Optional[str] = None, *, forward: bool = False) -> str:
    """Resolve the backend for one call of ``op`` on ``device``: returns 'triton' or 'torch'.

    ``unsupported`` is the Triton kernels' own reason for refusing this input (None when they take it);
    it is raised, never silently routed to torch, whenever the Triton path was chosen. ``requested``
    (default :func:`get_backend`) is what the public op read with :func:`backend_request` and handed to its
    forward and backward ops, so the backward resolves as the forward did even where ``use_backend`` does not
    reach (autograd runs CUDA backwards on its own threads, and a ``with`` block may have closed before
    ``.backward()``). A forward op (``forward=True``) also checks that request against the one in effect now:
    they differ when ``torch.compile`` traced the call under another request (or a direct
    ``torch.ops.fastsora`` call passed another), and running that backend would ignore the current request
    silently, so it raises (not inside a backward pass, where a recomputed forward may run on a thread
    ``use_backend`` does not reach).
    """
    requested = get_backend() if requested is None else _validate(requested, "requested")
    if forward and not _in_backward():
        current = get_backend()
        if current != requested:
            raise BackendError(
                f"{op}: this call carries the backend request {requested!r}, but {current!r} is requested now. "
                "Under torch.compile a call keeps the request in effect when it was traced: call "
                "torch.compiler.reset() after changing the backend (compiling the function again reuses its "
                "traced graph). A torch.export program keeps the request it was exported under: run it under "
                "that request (fastsora.use_backend / set_backend), or export under 'auto'. Calling "
                "torch.ops.fastsora.* directly, pass fastsora.backend.get_backend()")
    if requested == "torch":
        return "torch"
    if requested == "auto" and device.type != "cuda":
        return "torch"
    if not triton_available():
        raise BackendError(f"{op}: backend {requested!r} needs Triton, which is not installed; "
                           "install triton or use backend 'torch'")
    if device.type == "cpu":
        if not interpreter_active():
            raise BackendError(
                f"{op}: backend 'triton' got CPU tensors, which only Triton's interpreter can run; set "
                "TRITON_INTERPRET=1 before importing fastsora, move the tensors to a CUDA device, or use "
                "backend 'torch'")
        problem = installed_interpreter_incompatibility()
        if problem:
            raise BackendError(f"{op}: backend 'triton' runs CPU tensors in Triton's interpreter, and {problem}")
    elif device.type == "cuda":
        if interpreter_active():
            raise BackendError(
                f"{op}: the Triton kernels were built for the interpreter (TRITON_INTERPRET=1), which runs "
                "CPU tensors only; unset TRITON_INTERPRET to run CUDA tensors, or use backend 'torch'")
    else:
        raise BackendError(f"{op}: the Triton kernels run on CUDA devices (or CPU in the interpreter), "
                           f"not on {device.type!r}; use backend 'torch'")
    if unsupported:
        raise BackendError(f"{op}: the Triton kernels do not support this input: {unsupported}; "
                           "use backend 'torch' for it")
    return "triton"
