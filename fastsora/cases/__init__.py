"""Check and benchmark cases of each op family, registered with fastsora.registry.register_op."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch


def step_thunk(fn: Callable[[], torch.Tensor], inputs: Sequence[torch.Tensor], mode: str) -> Callable[[], Any]:
    """One timed iteration of a benchmark of ``fn`` (which returns one tensor computed from ``inputs``).

    ``mode``: 'fwd' runs fn under no_grad; 'fwd+bwd' runs fn and the gradients of ``inputs``, returned rather
    than accumulated into ``.grad`` (which would add a read-modify-write); 'bwd' runs fn once here and times the
    gradients only (a random cotangent, the graph kept for the next iteration).
    """
    if mode == "fwd":
        def thunk():
            with torch.no_grad():
                return fn()
        return thunk
    if mode == "fwd+bwd":
        def thunk():
            out = fn()
            return torch.autograd.grad(out, inputs, torch.ones_like(out))
        return thunk
    if mode != "bwd":
        raise ValueError(f"mode must be 'fwd', 'bwd' or 'fwd+bwd'; got {mode!r}")
    out = fn()
    cot = torch.randn_like(out)

    def thunk():
        return torch.autograd.grad(out, inputs, cot, retain_graph=True)
    return thunk
