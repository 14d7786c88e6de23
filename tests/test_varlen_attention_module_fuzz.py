"""Fuzz suite for fastsora.nn.VarlenAttention on the Triton backend (the interpreter on CPU): random modules and
packs against the module's definition written out in float64 (fastsora.testing.varlen_attention_module_definition
on a float64 copy made after the module is cast to the test dtype: the same weights) - output and the gradients of
x, the context and every parameter.

Each case draws from its own seeded generator: head dims 8 to 72, GQA / MQA heads (at most 6 query heads), self- or
cross-attention (a context of its own width, key lengths of their own: 0, fewer or more than the queries), QK
RMSNorm (random weights, eps) or none (then the packed op: one gradient for the projection), causal, flash-attn
sliding windows, biases, a default or random ``softmax_scale``, ragged sequences of 0, 1 or more tokens, rows past
``cu_seqlens[-1]`` (attention output 0, so the projection's bias), strided x and context, ``validate`` on or off.
Every fourth case also runs the module under ``torch.compile(fullgraph=True, backend="aot_eager")`` and compares it
with the eager run.

fp32 within TOLERANCE of float64; fp16 / bf16 by flash-attn's rule against the torch backend's run of the same
module at the same precision (fastsora.testing.assert_module_parity).

Marked slow (CI deselects it). ``FASTSORA_FUZZ_CASES`` sets the number of cases (default 16 per dtype);
``FASTSORA_FUZZ_SEED`` (shown in pytest's header) reproduces a run:
``FASTSORA_FUZZ_SEED=<seed> pytest -m slow tests/test_varlen_attention_module_fuzz.py -k 'case<N>]'``."""
import copy
from typing import Any, Dict, List, Tuple

import pytest
import torch

from fastsora import use_backend
from fastsora.nn import VarlenAttention
from fastsora.testing import (assert_module_parity, fuzz_cases, fuzz_random, grads, noncontiguous, packed_offsets,
                              randn, to_float64, varlen_attention_module_definition)

pytestmark = pytest.mark.slow

HEAD_DIMS = (8, 16, 24, 40, 64, 72)


def _window_side(rng, longest: int) -> int:
    r = rng.random()
    return -1 if r < 0.3 else 0 if r < 0.5 else rng.randint(1, longest + 4)


def draw(case: int) -> Tuple[Dict[str, Any], str]:
    """The configuration of fuzz case ``case`` and the words that reproduce it."""
    rng, reproduce = fuzz_random(case)
    d = rng.choice(HEAD_DIMS)
    longest = 40 if d <= 40 else 24
    hkv = rng.choice((1, 1, 2, 3))
    group = rng.choice([g for g in (1, 2, 3, 4) if hkv * g <= 6])
    lq = [rng.choice((0, 1, rng.randint(2, longest), rng.randint(2, longest))) for _ in range(rng.randint(1, 4))]
    cross = rng.random() < 0.4
    cfg = dict(
        d=d, hq=hkv * group, hkv=hkv, lq=lq, cross=cross,
        lk=[rng.randint(0, longest) for _ in lq] if cross else list(lq),
        context_dim=rng.choice((8, 24, 40)) if cross else None,
        qk_norm=rng.random() < 0.5, norm_eps=rng.choice((1e-6, 1e-2)), causal=rng.random() < 0.5,
        window=(-1, -1) if rng.random() < 0.5 else (_window_side(rng, longest), _window_side(rng, longest)),
        bias=rng.random() < 0.6,
        scale=None if rng.random() < 0.5 else round(d ** -0.5 * 2 ** rng.uniform(-2, 1), 6),
        extra_q=0 if rng.random() < 0.7 else rng.randint(1, 3),
        extra_k=0 if rng.random() < 0.7 else rng.randint(1, 3),
        strided=rng.choice((None, None, 0, -1)), validate=rng.random() < 0.7, compile=case % 4 == 3,
        seed=rng.getrandbits(32),
    )
    return cfg, f"{reproduce}: {cfg}"


def build(cfg: Dict[str, Any], dtype, device) -> VarlenAttention:
    torch.manual_seed(cfg["seed"])
    m = VarlenAttention(cfg["hq"] * cfg["d"], cfg["hq"], num_kv_heads=cfg["hkv"], qk_norm=cfg["qk_norm"],
                        cross_attention_dim=cfg["context_dim"], causal=cfg["causal"], bias=cfg["bias"],
                        norm_eps=cfg["norm_eps"], softmax_scale=cfg["scale"], window_size=cfg["window"])
    with torch.no_grad():   # norm weights away from 1, so they and their gradients matter
        for p in (m.q_norm.weight, m.k_norm.weight) if cfg["qk_norm"] else ():
            p.copy_(torch.rand_like(p) + 0.5)
    return m.to(device, dtype)


def inputs(cfg: Dict[str, Any], dtype, device) -> List[torch.Tensor]:
    """x (and the context): fresh random gradient leaves, strided views when the case says so."""
    gen = torch.Generator().manual_seed(cfg["seed"])
    shapes = [(sum(cfg["lq"]) + cfg["extra_q"], cfg["hq"] * cfg["d"])]
    if cfg["cross"]:
        shapes.append((sum(cfg["lk"]) + cfg["extra_k"], cfg["context_dim"]))
    out = []
    for shape in shapes:
        t = randn(*shape, dtype=dtype, generator=gen).to(device)
        if cfg["strided"] is not None and t.shape[0] > 1:
            t = noncontiguous(t, cfg["strided"])
        out.append(t.requires_grad_(True))
    return out


def call(m, cfg: Dict[str, Any], leaves: List[torch.Tensor]) -> torch.Tensor:
    dev = leaves[0].device
    cu_q = packed_offsets(cfg["lq"], dev)
    if cfg["cross"]:
        return m(leaves[0], cu_q, leaves[1], packed_offsets(cfg["lk"], dev), validate=cfg["validate"])
    return m(leaves[0], cu_q, validate=cfg["validate"])


@pytest.mark.parametrize("case", fuzz_cases(), ids=lambda c: f"case{c}")
def test_varlen_attention_module_fuzz(case, dtype, device, poison):
    """A random VarlenAttention on the Triton backend against its float64 definition: output and the gradients of
    x, the context and every parameter (and, every fourth case, the compiled module against the eager one)."""
    cfg, where = draw(case)
    m = build(cfg, dtype, device)
    m64 = copy.deepcopy(m).to("cpu", torch.float64)
    leaves = inputs(cfg, dtype, device)
    params = list(m.parameters())
    names = ["x", "context"][:len(leaves)] + [n for n, _ in m.named_parameters()]

    def run(backend: str, module=m):
        with use_backend(backend):
            y = call(module, cfg, leaves)
            return y, grads(y, leaves + params, seed=cfg["seed"])
    y, got = run("triton")
    assert y.shape == leaves[0].shape and y.dtype == dtype, f"out {tuple(y.shape)} {y.dtype}; {where}"
    leaves64 = to_float64(leaves)
    context64 = leaves64[1] if cfg["cross"] else None
    ref = varlen_attention_module_definition(m64, leaves64[0], cfg["lq"], context64, cfg["lk"])
    want = grads(ref, leaves64 + list(m64.parameters()), seed=cfg["seed"])
    assert_module_parity(y, got, ref, want, names, dtype, lambda: run("torch"), where)

    if cfg["compile"]:
        torch._dynamo.reset()
        y_c, got_c = run("triton", torch.compile(m, fullgraph=True, backend="aot_eager"))
        assert torch.equal(y_c, y), f"compiled out differs from eager; {where}"
        for name, a, b in zip(names, got_c, got, strict=True):
            assert torch.equal(a, b), f"compiled d{name} differs from eager; {where}"
