"""LFQ under torch.distributed (2 gloo processes on CPU): per-rank halves of a batch give the exact global
codebook entropy of the whole batch, and DDP-averaged gradients equal the single-process gradients."""
import importlib
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastsora import use_backend
from fastsora.nn.lfq import LFQ
from fastsora.testing import relative_error

WORLD = 2
KW = dict(dim=10, codebook_size=2 ** 6, commitment_loss_weight=0.1)


def _model_and_batch():
    torch.manual_seed(0)
    model = LFQ(**KW)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 9, 10, generator=gen) * 0.05
    return model, x


def _step(model, x, backend, compiled=False):
    def forward(x):
        return model(x, return_loss_breakdown=True)

    if compiled:  # the all-reduces (the custom op fastsora::lfq_global_sum) are nodes of the compiled graph
        forward = torch.compile(forward, fullgraph=True, backend="aot_eager")
    with use_backend(backend):
        ret, br = forward(x)
        (ret.entropy_aux_loss + ret.quantized.square().mean()).backward()
    return br


def _worker(rank, init_file, out_dir, backend, compiled):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model, x = _model_and_batch()
        per = x.shape[0] // WORLD
        x = x[rank * per:(rank + 1) * per].clone().requires_grad_()
        br = _step(model, x, backend, compiled)
        grads = {}
        for name, p in model.named_parameters():   # what DDP does: average the parameter gradients
            g = p.grad.clone()
            dist.all_reduce(g)
            grads[name] = g / WORLD
        torch.save({"batch_entropy": br.batch_entropy.detach(), "per_sample": br.per_sample_entropy.detach(),
                    "x_grad": x.grad, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()   # no rank tears gloo down while the other still talks (an abort in teardown otherwise)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_ddp_halves_give_global_entropy_and_gradients(tmp_path, backend, compiled):
    """Also with each rank's step under torch.compile(fullgraph=True): the all-reduces stay in the graph."""
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), backend, compiled), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    model, x = _model_and_batch()
    x = x.requires_grad_()
    br = _step(model, x, "torch")
    for r in ranks:   # every rank sees the codebook entropy of all tokens
        assert relative_error(r["batch_entropy"], br.batch_entropy) <= 1e-5
    assert relative_error(sum(r["per_sample"] for r in ranks) / WORLD, br.per_sample_entropy) <= 1e-5
    for name, p in model.named_parameters():
        assert relative_error(ranks[0]["grads"][name], p.grad) <= 1e-5, name
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name])
    # the backward scales the local cotangent by WORLD: each rank's input gradient is WORLD x its slice of the
    # global one, as a summing (collective) backward would give
    per = x.shape[0] // WORLD
    for r, res in enumerate(ranks):
        assert relative_error(res["x_grad"], WORLD * x.grad[r * per:(r + 1) * per]) <= 1e-5


def _worker_empty_rank(rank, init_file, out_dir, backend):
    """Rank 1 selects no token: its losses are NaN (as the anchor's), with the softplus loss NaN cotangents too."""
    import datetime

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = LFQ(**KW, experimental_softplus_entropy_loss=True)
        x = (torch.randn(2, 9, 10, generator=torch.Generator().manual_seed(rank)) * 0.05).requires_grad_()
        mask = torch.zeros(2, dtype=torch.bool) if rank == 1 else None
        out = {}
        for round_ in ("skip", "all"):   # rank 1 skips its NaN loss's backward, then runs it
            with use_backend(backend):
                ret = model(x, mask=mask)
            loss = ret.entropy_aux_loss + ret.quantized.square().mean()
            if torch.isfinite(loss) or round_ == "all":
                out[round_] = torch.autograd.grad(loss, [x, *model.parameters()])
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_rank_with_empty_selection_neither_hangs_nor_poisons_the_others(tmp_path, backend):
    """The backward has no collective: a rank that skips its backward (a NaN loss) does not block the others,
    and a rank whose selection is empty sends no NaN to them (its own gradients are finite too)."""
    mp.spawn(_worker_empty_rank, args=(str(tmp_path / "init"), str(tmp_path), backend), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert "skip" in ranks[0] and "skip" not in ranks[1]
    for r in ranks:
        assert all(torch.isfinite(g).all() for g in r["all"])
    assert all(torch.isfinite(g).all() for g in ranks[0]["skip"])


def test_single_process_group_is_not_distributed(tmp_path, monkeypatch):
    """world_size 1: the local (fused, never materialised) path, not the all-reduced code sums (which would
    give the same values: the sum's entry point refuses here); same values as without a group."""
    lfq_ops = importlib.import_module("fastsora.ops.lfq")  # the attribute is the function of that name

    def refuse(*args):
        raise AssertionError("world_size 1 took the distributed path")

    model, x = _model_and_batch()
    want = _step(model, x, "torch").batch_entropy
    monkeypatch.setattr(lfq_ops, "_global_sum", refuse)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init1'}", rank=0, world_size=1)
    try:
        got = _step(model, x, "torch").batch_entropy
    finally:
        dist.destroy_process_group()
    assert relative_error(got, want) <= 1e-6
