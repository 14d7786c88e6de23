"""``fastsora check``: numerical parity of every registered op against its float64 reference, here.

On CPU the Triton kernels run in the interpreter at the small check shapes, in fp32 and fp16; on CUDA the
compiled kernels run at realistic shapes in fp32, fp16 and bf16.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from fastsora.backend import use_backend
from fastsora.registry import OpSpec, select_ops
from fastsora.testing import poisoned_outputs, relative_error, to_float64


@dataclass
class CheckRow:
    op: str
    case: str
    dtype: str
    max_rel_error: float
    tolerance: float
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.max_rel_error <= self.tolerance


def _flat(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for item in out for t in _flat(item)]


def _checked_dtypes(spec: OpSpec, device: torch.device, dtypes: Optional[Sequence[torch.dtype]]
                    ) -> Sequence[torch.dtype]:
    """``dtypes`` (default: every dtype ``spec`` is checked in on ``device``); one it is not checked in there
    is refused by name (bfloat16 on CPU: Triton's interpreter mishandles it)."""
    supported = spec.dtypes_cuda if device.type == "cuda" else spec.dtypes_cpu
    if dtypes is None:
        return supported
    unsupported = [d for d in dtypes if d not in supported]
    if unsupported:
        names = ", ".join(str(d).removeprefix("torch.") for d in supported)
        why = " (bfloat16 is broken in Triton's interpreter)" if device.type == "cpu" else ""
        raise ValueError(f"dtype {', '.join(str(d).removeprefix('torch.') for d in unsupported)}: {spec.name} is "
                         f"checked on {device.type} in {names} only{why}")
    return dtypes


def check_op(spec: OpSpec, device: torch.device, dtypes: Optional[Sequence[torch.dtype]] = None,
             on_row: Callable[[CheckRow], None] = lambda row: None) -> List[CheckRow]:
    """Run every check case of ``spec`` on the Triton backend in each of ``dtypes`` (default: every dtype the
    op is checked in on ``device``) and compare with the float64 reference; ``on_row(row)`` is called as each
    row is done."""
    dtypes = _checked_dtypes(spec, device, dtypes)
    rows = []
    for case in spec.check_cases(device):
        for dtype in dtypes:
            tol = spec.tolerance[dtype]
            row = CheckRow(spec.name, case.label, str(dtype).removeprefix("torch."), float("nan"), tol)
            try:
                args = case.make(device, dtype)
                with use_backend("triton"), poisoned_outputs():
                    out = _flat(spec.run(*args))
                ref = _flat(spec.reference(*to_float64(args)))
                if len(out) != len(ref):
                    raise AssertionError(f"{len(out)} outputs but the reference gave {len(ref)}")
                errors = [float(relative_error(o, r)) for o, r in zip(out, ref)]
                # a NaN error (e.g. the reference itself not finite) fails the row; max() would drop it
                row.max_rel_error = math.nan if any(math.isnan(e) for e in errors) else max(errors, default=0.0)
            except Exception as exc:
                row.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
            rows.append(row)
            on_row(row)
    return rows


def run_checks(device: torch.device, ops: Optional[Sequence[str]] = None,
               dtypes: Optional[Sequence[torch.dtype]] = None,
               on_row: Callable[[CheckRow], None] = lambda row: None) -> List[CheckRow]:
    """Every check row of the selected ops (all registered ones by default), in ``dtypes`` (default: each op's
    dtypes on ``device``; every op must be checked in them, or nothing runs); ``on_row`` as in
    :func:`check_op`."""
    specs = select_ops(ops, "fastsora check")
    for spec in specs:
        _checked_dtypes(spec, device, dtypes)
    rows = []
    for spec in specs:
        rows.extend(check_op(spec, device, dtypes, on_row=on_row))
    return rows
