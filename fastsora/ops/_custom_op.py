"""What every fastsora custom op shares beyond its backend choice (fastsora.backend): its body runs without
autocast, and its backward op refuses to be differentiated again with a message that names the public op; and
the namedtuples fastsora returns can be saved with torch.export."""
from __future__ import annotations

import functools
import inspect
import typing

import torch

#: device types whose autocast state fastsora reads (torch.is_autocast_enabled takes a device type)
AUTOCAST_DEVICES = ("cuda", "cpu")


def without_autocast(fn):
    """Decorator for a custom op's body: run it with autocast off, so that it computes in its inputs' dtypes on
    either backend, as its fake implementation says. Autocast casts nothing at a fastsora op (they have no
    autocast rule), but it would reach the torch path's convolutions and matmuls, and a launcher's host-side
    reductions, inside the body and change their dtypes (the Triton path would not)."""

    @functools.wraps(fn)
    def body(*args, **kwargs):
        enabled = [d for d in AUTOCAST_DEVICES if torch.is_autocast_enabled(d)]
        if not enabled:
            return fn(*args, **kwargs)
        # the flag alone (torch.autocast's context manager costs about 10 us a call)
        for device_type in enabled:
            torch.set_autocast_enabled(device_type, False)
        try:
            return fn(*args, **kwargs)
        finally:
            for device_type in enabled:
                torch.set_autocast_enabled(device_type, True)

    body.__signature__ = _resolved_signature(fn)  # torch.library reads the op's schema from it
    return body


def _resolved_signature(fn) -> inspect.Signature:
    """fn's signature with its string annotations (``from __future__ import annotations``) resolved in fn's
    module, as torch.library would resolve them there."""
    hints = typing.get_type_hints(fn)
    sig = inspect.signature(fn)
    params = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()]
    return sig.replace(parameters=params, return_annotation=hints.get("return", sig.return_annotation))


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


def register_namedtuples_for_export(*classes: type) -> None:
    """Give each namedtuple class a serialized name (its module and name), so ``torch.export.save`` can write a
    program that returns it (without one it raises "Can't serialize TreeSpec of namedtuple class"). torch has a
    public registration for dataclasses only; pytree's for namedtuples is used where the release has it, and a
    release without it saves as before."""
    register = getattr(torch.utils._pytree, "_register_namedtuple", None)
    if register is None:
        return
    for cls in classes:
        try:
            register(cls, serialized_type_name=f"{cls.__module__}.{cls.__qualname__}")
        except ValueError:  # registered already (the module was reloaded)
            pass
