"""fastsora: Triton kernels behind drop-in nn.Modules for Sora-style video generation.

Modules live in :mod:`fastsora.nn`, functional ops in :mod:`fastsora.ops`; the backend (Triton or the torch
reference path) is chosen by ``FASTSORA_BACKEND``, :func:`use_backend` or :func:`set_backend` (see
:mod:`fastsora.backend`).
``fastsora.ops`` and ``fastsora.nn`` are imported on first use, so a program (or the ``fastsora`` CLI) can
still set ``TRITON_INTERPRET`` after ``import fastsora`` and before the kernels are created.
"""
import importlib

from .backend import BackendError, checkpoint_context, get_backend, set_backend, use_backend

__version__ = "0.1.0"
__all__ = ["BackendError", "checkpoint_context", "get_backend", "set_backend", "use_backend", "ops", "nn",
           "__version__"]


def __getattr__(name):
    if name in ("ops", "nn"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
