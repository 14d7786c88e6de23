"""What every fastsora custom op shares beyond its backend choice (fastsora.backend): its body runs without
autocast, and its backward op refuses to be differentiated again with a message that names the public op."""
from __future__ import annotations

import contextlib
import functools
import inspect

import torch

_AUTOCAST_DEVICES = ("cuda", "cpu")


def without_autocast(fn):
    """Decorator for a custom op's body: run it with autocast off, so that it computes in its inputs' dtypes on
    either backend, as its fake implementation says. Autocast casts nothing at a fastsora op (they have no
    autocast rule), but it would reach the torch path's convolutions and matmuls, and a launcher's host-side
    reductions, inside the body and change their dtypes (the Triton path would not)."""

    @functools.wraps(fn)
    def body(*args, **kwargs):
        enabled = [d for d in _AUTOCAST_DEVICES if torch.is_autocast_enabled(d)]
        if not enabled:
            return fn(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            for device_type in enabled:
                stack.enter_context(torch.autocast(device_type, enabled=False))
            return fn(*args, **kwargs)

    body.__signature__ = inspect.signature(fn, eval_str=True)  # torch.library reads the op's schema from it
    return body


def refuse_double_backward(backward_op, public_name: str) -> None:
    """Give ``backward_op`` (a custom op computing another op's gradients) an autograd formula that raises:
    a gradient of the gradient (create_graph=True, then a second backward: a gradient penalty) then fails with
    a sentence naming ``public_name`` instead of torch's advice to register one."""

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise NotImplementedError(
            f"{public_name}: double backward (the gradient of its gradient, e.g. a gradient penalty) is not "
            "supported on either backend; compute that term with plain torch ops")

    backward_op.register_autograd(backward, setup_context=setup_context)
