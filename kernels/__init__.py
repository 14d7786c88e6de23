"""fastsora's Triton kernels and their host launchers, one module per family (installed as fastsora.kernels).

No nn.Module lives here; the public API is fastsora.ops / fastsora.nn.
"""
import triton
import triton.language as tl  # noqa: F401


@triton.jit
def _interpreter_probe_kernel(x_ptr):
    pass


#: True when ``TRITON_INTERPRET=1`` was set before the kernels were created: they then run on CPU tensors.
KERNELS_INTERPRETED = not isinstance(_interpreter_probe_kernel, triton.runtime.jit.JITFunction)
