"""Top-level pytest set-up: runs before any test module imports fastsora or a Triton kernel.

Without a CUDA device, Triton's interpreter is switched on so the kernels run on CPU tensors. TorchInductor
caches into a fresh directory per run.
"""
import atexit
import os
import random
import shutil
import tempfile

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
# torch.compile tests compile from scratch: a TorchInductor disk cache written by an older fastsora can replay a
# compiled backward that calls a custom op with its old arguments (seen with torch 2.11)
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastsora-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)
# the fuzz suites' seed (fastsora.testing.fuzz_random): drawn here once per run, before pytest-xdist starts its
# workers, which inherit it, so every worker draws the same cases
os.environ.setdefault("FASTSORA_FUZZ_SEED", str(random.SystemRandom().randrange(2 ** 31)))


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if CUDA:
    # fp32 references run through cuDNN on the GPU (nn.Conv3d, F.conv3d) must be fp32: torch lets cuDNN
    # convolutions use TF32 by default (~1e-3 relative error, above the fp32 tolerances)
    torch.backends.cudnn.allow_tf32 = False
#: bf16 is broken in Triton's interpreter (REFERENCE §4): covered by compilation and on GPUs.
DTYPES = (torch.float32, torch.float16, torch.bfloat16) if CUDA else (torch.float32, torch.float16)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_interpreter = pytest.mark.skip(reason="runs the Triton kernels on CPU tensors, which needs Triton's "
                                               "interpreter (off when CUDA is present; the gpu tests cover CUDA)")
    for item in items:
        if "gpu" in item.keywords and not CUDA:
            item.add_marker(skip_gpu)
        if "interpreter" in item.keywords and CUDA:
            item.add_marker(skip_interpreter)


def pytest_report_header(config):
    return f"fuzz suites (-m slow): FASTSORA_FUZZ_SEED={os.environ['FASTSORA_FUZZ_SEED']}"


@pytest.fixture(autouse=True)
def _release_cuda_cache():
    """On CUDA, a test that held many GiB (the tensors past 2^31 elements) hands them back to the driver after it:
    the caching allocator would keep them reserved for its worker, and four workers share one GPU."""
    yield
    if CUDA and torch.cuda.memory_reserved() > 4 * 2 ** 30:
        torch.cuda.empty_cache()


@pytest.fixture
def device() -> torch.device:
    """cuda when present, else cpu (the Triton kernels then run in the interpreter)."""
    return DEVICE


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def dtype(request) -> torch.dtype:
    """fp32 and fp16 (plus bf16 on CUDA)."""
    return request.param


@pytest.fixture
def poison():
    """Kernel outputs start as NaN inside this fixture's test (fastsora.kernels.utils.poisoned_outputs)."""
    from fastsora.testing import poisoned_outputs

    with poisoned_outputs():
        yield
