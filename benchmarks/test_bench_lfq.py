import pytest
import torch

from fastsora.bench import bench_plan, pytest_benchmark

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PLAN = bench_plan(DEVICE, ops=["lfq"])


@pytest.mark.parametrize("item", PLAN, ids=str)
def test_lfq(benchmark, item):
    pytest_benchmark(benchmark, item, DEVICE)
