"""Functional ops: torch.library custom ops with fake implementations and registered autograd.

Each family's op module dispatches through :func:`fastsora.backend.select_backend` to its Triton launcher
(``fastsora.kernels.<family>``) or to its torch reference (``fastsora.reference.<family>``).
"""
