"""pytest-benchmark suite for causal_conv3d (one call: fwd/bwd/fwd+bwd vs F.pad+F.conv3d in NCDHW and
channels_last_3d) and causal_conv3d_stream (a chunked video vs a torch.cat frame cache)."""
import pytest
import torch

from fastsora.bench import bench_plan, pytest_benchmark

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PLAN = bench_plan(DEVICE, ops=["causal_conv3d", "causal_conv3d_stream"])


@pytest.mark.parametrize("item", PLAN, ids=str)
def test_causal_conv3d(benchmark, item):
    pytest_benchmark(benchmark, item, DEVICE)
