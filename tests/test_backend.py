"""Backend dispatch: FASTSORA_BACKEND, use_backend, select_backend and the interpreter switch."""
import contextvars
import os
import subprocess
import sys
import threading
import warnings

import pytest
import torch

import fastsora
from fastsora.backend import (BackendError, get_backend, interpreter_active, interpreter_incompatibility,
                              select_backend, use_backend)

CPU = torch.device("cpu")


def test_kernels_are_interpreted_without_cuda():
    if torch.cuda.is_available():
        assert not interpreter_active()
    else:
        import triton

        from fastsora.kernels import _interpreter_probe_kernel

        assert interpreter_active()
        assert isinstance(_interpreter_probe_kernel, triton.runtime.interpreter.InterpretedFunction)


def test_env_var_sets_default(monkeypatch):
    monkeypatch.setenv("FASTSORA_BACKEND", "torch")
    assert get_backend() == "torch"
    monkeypatch.setenv("FASTSORA_BACKEND", " Triton ")
    assert get_backend() == "triton"
    monkeypatch.delenv("FASTSORA_BACKEND")
    assert get_backend() == "auto"


def test_env_var_bad_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("FASTSORA_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTSORA_BACKEND must be one of auto, triton, torch; got 'cuda'"):
        get_backend()


def test_use_backend_overrides_env_and_nests(monkeypatch):
    monkeypatch.setenv("FASTSORA_BACKEND", "torch")
    with fastsora.use_backend("triton"):
        assert get_backend() == "triton"
        with use_backend("auto"):
            assert get_backend() == "auto"
        assert get_backend() == "triton"
    assert get_backend() == "torch"
    with pytest.raises(ValueError, match="use_backend"):
        with use_backend("gpu"):
            pass


def test_set_backend_sets_the_rest_of_the_context(monkeypatch):
    """set_backend holds for the rest of the context; a use_backend block inside restores it at its end; None
    clears it; a refused name changes nothing."""
    monkeypatch.setenv("FASTSORA_BACKEND", "auto")

    def body():
        fastsora.set_backend("torch")
        assert get_backend() == "torch"
        with use_backend("triton") as name:
            assert name == "triton" and get_backend() == "triton"
        assert get_backend() == "torch", "a with block restores the request it found"
        fastsora.set_backend(None)
        assert get_backend() == "auto"
        fastsora.set_backend("triton")
        return get_backend()

    assert contextvars.copy_context().run(body) == "triton"
    assert get_backend() == "auto", "the calls stayed in the context they ran in"
    with pytest.raises(ValueError, match=r"set_backend\(name\) must be one of auto, triton, torch; got 'cuda'"):
        fastsora.set_backend("cuda")
    assert get_backend() == "auto", "a refused name changes nothing"


def test_use_backend_is_lazy_a_decorator_and_warns_when_never_entered(monkeypatch):
    """use_backend takes effect when entered (made in one place, entered in another, even on another thread),
    decorates functions (recursion included), and a bare call, which changes nothing, warns instead of silently
    doing nothing."""
    monkeypatch.setenv("FASTSORA_BACKEND", "auto")
    made = use_backend("torch")
    assert get_backend() == "auto", "making it changes nothing"
    seen = []

    def worker():
        with made:
            seen.append(get_backend())
        seen.append(get_backend())

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == ["torch", "auto"] and get_backend() == "auto"

    @fastsora.use_backend("torch")
    def depth(n):
        return [get_backend()] + (depth(n - 1) if n else [])

    assert depth(2) == ["torch"] * 3 and get_backend() == "auto"
    with pytest.warns(RuntimeWarning, match=r"use_backend\('torch'\) was never entered, so it changed nothing.*"
                                            r"fastsora.set_backend\('torch'\)"):
        fastsora.use_backend("torch")
    assert get_backend() == "auto"


def test_checkpoint_context_sets_its_request_only_when_entered(monkeypatch):
    """torch's checkpoint calls context_fn in the forward and enters the recompute context in the backward, on
    autograd's thread for CUDA: making the contexts must not change this context's request, and entering the
    recompute context in another context must work (a request set when it was made could not be reset there)."""
    monkeypatch.setenv("FASTSORA_BACKEND", "auto")

    def make():
        with use_backend("torch"):
            return fastsora.checkpoint_context()

    forward_ctx, recompute_ctx = contextvars.copy_context().run(make)
    assert get_backend() == "auto"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        contextvars.copy_context().run(make)  # dropped unentered (no backward recomputed): no warning
    assert not [w for w in caught if "never entered" in str(w.message)], caught
    seen = []

    def recompute():
        with forward_ctx, recompute_ctx:
            seen.append(get_backend())
        seen.append(get_backend())

    worker = threading.Thread(target=recompute)
    worker.start()
    worker.join()
    assert seen == ["torch", "auto"]


def test_use_backend_is_context_local():
    seen = {}
    started, release = threading.Event(), threading.Event()

    def other_thread():
        started.set()
        release.wait(5)
        seen["other"] = get_backend()

    t = threading.Thread(target=other_thread)
    with use_backend("torch"):
        t.start()
        started.wait(5)
        release.set()
        t.join(5)
        seen["here"] = get_backend()
    assert seen == {"here": "torch", "other": "auto"}


def test_select_backend_rules():
    with use_backend("auto"):
        assert select_backend("op", CPU) == "torch"
    with use_backend("torch"):
        assert select_backend("op", CPU, unsupported="anything") == "torch"
    if interpreter_active():
        with use_backend("triton"):
            assert select_backend("op", CPU) == "triton"


def test_unsupported_input_raises_instead_of_falling_back():
    backend = "triton" if interpreter_active() else "auto"
    device = CPU if interpreter_active() else torch.device("cuda")
    with use_backend(backend), pytest.raises(BackendError, match="my_op: .*do not support.*head dim 300 > 256"):
        select_backend("my_op", device, unsupported="head dim 300 > 256")


def test_other_devices_are_refused_for_triton():
    with use_backend("triton"), pytest.raises(BackendError, match="'meta'"):
        select_backend("op", torch.device("meta"))


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    code = (
        "import torch, fastsora\n"
        "from fastsora.backend import select_backend, use_backend, BackendError\n"
        "with use_backend('triton'):\n"
        "    try:\n"
        "        select_backend('demo', torch.device('cpu'))\n"
        "    except BackendError as e:\n"
        "        print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR demo: backend 'triton' got CPU tensors" in out.stdout
    assert "TRITON_INTERPRET=1" in out.stdout


@pytest.mark.parametrize("triton_version,numpy_version,refused", [
    ("3.4.0", "2.4.6", True), ("3.6.0", "2.4.0rc1", True), ("3.6.0", "3.0.0", True),
    ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.6", False), ("3.9.0+git1a2b", "2.4.6", False),
    ("3.10.1", "2.4.6", False), ("3.4.0", "1.26.4", False),
])
def test_interpreter_incompatibility_rule(triton_version, numpy_version, refused):
    problem = interpreter_incompatibility(triton_version, numpy_version)
    assert (problem is not None) == refused
    if refused:
        assert f"Triton {triton_version}" in problem and f"numpy {numpy_version}" in problem
        assert "numpy<2.4" in problem and "triton>=3.7" in problem


def test_incompatible_interpreter_is_refused_with_the_reason(monkeypatch):
    if not interpreter_active():
        pytest.skip("needs Triton's interpreter (no CUDA)")
    import numpy
    import triton

    import fastsora.backend as backend

    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    backend.installed_interpreter_incompatibility.cache_clear()
    try:
        with use_backend("triton"), pytest.raises(BackendError, match="demo: .*interpreter.*numpy 2.4.6.*numpy<2.4"):
            select_backend("demo", CPU)
        with use_backend("auto"):
            assert select_backend("demo", CPU) == "torch"  # the torch path does not need the interpreter
    finally:
        backend.installed_interpreter_incompatibility.cache_clear()  # recomputed with the real versions


def test_launchers_make_their_inputs_cuda_device_current(monkeypatch):
    """Triton launches (and autotunes) on the current CUDA device: every public launcher makes its first tensor
    argument's device current, so a model on cuda:1 launches there; CPU tensors (the interpreter) run as they are.
    Checked with a tensor that reports cuda:1 and a recording stand-in for torch.cuda.device."""
    from fastsora.kernels import causal_conv3d, lfq, utils, varlen_attention

    entered = []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    class OnCuda1(torch.Tensor):
        @property
        def device(self):
            return torch.device("cuda:1")

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    on_cuda1 = torch.Tensor._make_subclass(OnCuda1, torch.randn(2))
    calls = []
    launcher = utils.on_input_device(lambda *a, **k: calls.append((a, k)) or "launched")
    assert launcher(3, on_cuda1, scale=2.0) == "launched" and entered == [torch.device("cuda:1")]
    assert calls[0][0][1] is on_cuda1 and calls[0][1] == {"scale": 2.0}
    assert launcher(torch.randn(2), on_cuda1) == "launched" and len(entered) == 1, "the first tensor decides"
    public = {causal_conv3d: ["causal_conv3d_fwd", "silu_backward", "causal_conv3d_bwd"],
              lfq: ["quantize_fwd", "quantize_bwd", "code_tables", "code_pair", "code_pair_bwd"],
              varlen_attention: ["forward", "backward"]}
    for module, names in public.items():
        for name in names:
            fn = getattr(module, name)
            assert fn.__code__ is utils.on_input_device(lambda: None).__code__, f"{module.__name__}.{name}"


def _family_case(family, device="cpu", dtype=torch.float64):
    """(differentiable inputs, a function of them returning a scalar) for one op family. float64 by default: the
    Triton kernels refuse it, so a backward that resolved backend 'triton' would raise."""
    gen = torch.Generator().manual_seed(7)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=dtype).to(device).requires_grad_()  # noqa: E731
    if family == "causal_conv3d":
        from fastsora.ops import causal_conv3d
        ins = (rnd(1, 3, 4, 5, 5), rnd(4, 3, 3, 3, 3), rnd(4))
        return ins, lambda x, w, b: causal_conv3d(x, w, b, pad_mode="replicate").square().sum()
    if family == "varlen_attention":
        from fastsora.ops import varlen_attention
        cu = torch.tensor([0, 3, 9], dtype=torch.int32, device=device)
        ins = (rnd(9, 2, 16), rnd(9, 1, 16), rnd(9, 1, 16))
        return ins, lambda q, k, v: varlen_attention(q, k, v, cu, cu, causal=True).square().sum()
    from fastsora.ops.lfq import lfq
    ins = (rnd(7, 2, 5),)
    def loss(x):   # the three losses by name: Dynamo of torch 2.8 fails on slicing any namedtuple (a torch bug)
        r = lfq(x * 0.01)
        return r.per_sample_entropy + r.codebook_entropy.sum() + r.commitment \
            + lfq(x, clamp_compat=True).codebook_entropy.sum()
    return ins, loss


def _grad_on_another_thread(loss, inputs):
    """torch.autograd.grad(loss, inputs) run on a new thread, as autograd runs CUDA backwards (a use_backend
    block of this thread does not reach it): the gradients, or the exception it raised."""
    out = []

    def run():
        try:
            out.append(torch.autograd.grad(loss, inputs))
        except Exception as e:  # noqa: BLE001 - returned to the test
            out.append(e)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    return out[0]


@pytest.mark.parametrize("family", ["causal_conv3d", "varlen_attention", "lfq"])
def test_backward_resolves_the_backend_its_forward_saw(family, monkeypatch):
    """Autograd runs CUDA backwards on its own threads, where a use_backend block of the forward's thread does not
    reach. The forward runs on 'torch' inside use_backend while $FASTSORA_BACKEND says 'triton'; the backward, run
    on another thread, must still take the torch path (the Triton path would refuse float64) and give its
    gradients."""
    ins, f = _family_case(family)
    with fastsora.use_backend("torch"):
        want = torch.autograd.grad(f(*ins), ins)
        loss = f(*ins)
    monkeypatch.setenv(fastsora.backend.ENV_VAR, "triton")
    got = _grad_on_another_thread(loss, ins)
    assert not isinstance(got, Exception), got
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_backend_request_is_what_assume_constant_result_marks():
    """backend.py marks backend_request for dynamo by hand (importing torch._dynamo at fastsora import would
    import triton before a process can unset TRITON_INTERPRET): the public decorator must still set just that."""
    from fastsora.backend import backend_request

    marked = torch.compiler.assume_constant_result(lambda: None)
    assert marked._dynamo_marked_constant is True and backend_request._dynamo_marked_constant is True


@pytest.mark.parametrize("family", ["causal_conv3d", "varlen_attention", "lfq"])
def test_compiled_call_keeps_its_traced_backend_or_refuses(family, device):
    """torch.compile cannot guard the use_backend context. The request in effect at trace time is an argument of
    every fastsora op in the graph (so graphs traced under different requests never share a compile-cache entry,
    and the compiled backward resolves as its forward), and a compiled call made under another request raises
    instead of running the traced backend's forward (the Triton path would silently ignore 'torch', or here
    refuse float64 with an unrelated message)."""
    ins, f = _family_case(family)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(f, backend=capture, fullgraph=True)
    with fastsora.use_backend("torch"):
        want = torch.autograd.grad(f(*ins), ins)
        got = torch.autograd.grad(compiled(*ins), ins)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    calls = [n for gm in graphs for n in gm.graph.nodes
             if n.op == "call_function" and "fastsora" in str(n.target)]
    assert calls and all("torch" in n.args for n in calls), [(n.target, n.args) for n in calls]
    with fastsora.use_backend("triton"), pytest.raises(BackendError, match="carries the backend request 'torch', "
                                                                              "but 'triton' is requested now"):
        compiled(*ins)
    torch._dynamo.reset()
    # after a reset the function is traced again, under the new request (fp32 on the device the Triton path runs on)
    ins32, f32 = _family_case(family, device, torch.float32)
    with fastsora.use_backend("triton"):
        assert torch.isfinite(torch.compile(f32, backend=capture, fullgraph=True)(*ins32))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("family", ["varlen_attention", "lfq"])
def test_autocast_does_not_reach_inside_the_ops(family, backend, device):
    """Autocast has no rule for these ops (flash-attn's and the anchor's quantizer take their inputs' dtypes),
    and must not reach the torch path's matmuls inside them either: under autocast the outputs and gradients
    are those computed without it, in float32, bit for bit, on both backends (these kernels have no atomics, and
    both calls share an autotuning key, so the same config)."""
    ins, f = _family_case(family, device, torch.float32)
    with fastsora.use_backend(backend):
        want = f(*ins)
        want_grads = torch.autograd.grad(want, ins)
        with torch.autocast(device.type, dtype=torch.float16):
            got = f(*ins)
        got_grads = torch.autograd.grad(got, ins)
    for a, b in zip((got, *got_grads), (want, *want_grads)):
        assert a.dtype == torch.float32
        assert torch.equal(a, b)


@pytest.mark.interpreter
@pytest.mark.parametrize("family", ["causal_conv3d", "varlen_attention", "lfq"])
def test_triton_refuses_bfloat16_in_the_interpreter(family):
    """Triton's interpreter computes bfloat16 wrongly (tl.dot returns values near 1e9): the Triton path refuses
    bfloat16 CPU tensors with the reason instead of returning garbage."""
    ins, f = _family_case(family)
    ins = tuple(t.detach().bfloat16() for t in ins)
    with fastsora.use_backend("triton"), pytest.raises(BackendError, match="bfloat16 inputs on CPU"):
        f(*ins)
    with fastsora.use_backend("torch"):
        assert torch.isfinite(f(*ins))


@pytest.mark.parametrize("family", ["causal_conv3d", "varlen_attention", "lfq"])
def test_double_backward_is_refused_by_name(family):
    """A gradient of the gradient (create_graph=True, then a second backward) is not supported: it raises a
    NotImplementedError naming the op, not torch's advice to register an autograd formula."""
    ins, f = _family_case(family)
    with fastsora.use_backend("torch"):
        grads = torch.autograd.grad(f(*ins), ins, create_graph=True)
        with pytest.raises(NotImplementedError, match=r"(causal_conv3d|varlen_attention|lfq_\w+): double backward"):
            torch.autograd.grad(sum(g.square().sum() for g in grads), ins)


@pytest.mark.parametrize("family", ["causal_conv3d", "varlen_attention", "lfq"])
def test_checkpoint_context_recomputes_under_the_forward_request(family, monkeypatch):
    """torch.utils.checkpoint recomputes the forward during the backward, which runs (here, as on CUDA) on another
    thread where the forward's use_backend block does not reach and $FASTSORA_BACKEND says 'triton'. With
    context_fn=fastsora.checkpoint_context the recompute takes the forward's request ('torch': the Triton path
    would refuse float64) and the gradients are those of the plain call; without it the recompute reads
    'triton' and refuses."""
    from torch.utils.checkpoint import checkpoint

    ins, f = _family_case(family)
    with fastsora.use_backend("torch"):
        want = torch.autograd.grad(f(*ins), ins)
    monkeypatch.setenv(fastsora.backend.ENV_VAR, "triton")
    with fastsora.use_backend("torch"):
        loss = checkpoint(f, *ins, use_reentrant=False, context_fn=fastsora.checkpoint_context)
    got = _grad_on_another_thread(loss, ins)
    assert not isinstance(got, Exception), got
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    with fastsora.use_backend("torch"):
        loss = checkpoint(f, *ins, use_reentrant=False)
    assert isinstance(_grad_on_another_thread(loss, ins), BackendError)


@pytest.mark.parametrize("family", ["causal_conv3d", "varlen_attention", "lfq"])
def test_checkpoint_context_under_torch_compile(family):
    """Compiled, torch takes only dispatch-mode contexts from a checkpoint's context_fn (the traced ops carry
    their backend request already): checkpoint_context then gives plain recomputation, with the eager
    gradients."""
    from torch.utils.checkpoint import checkpoint

    ins, f = _family_case(family)

    def g(*args):
        return checkpoint(f, *args, use_reentrant=False, context_fn=fastsora.checkpoint_context)

    torch._dynamo.reset()
    with fastsora.use_backend("torch"):
        want = torch.autograd.grad(f(*ins), ins)
        got = torch.autograd.grad(torch.compile(g, backend="aot_eager")(*ins), ins)
    torch._dynamo.reset()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
