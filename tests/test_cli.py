"""The registry-driven tools behind the CLI: check, compile, bench, info — on a tiny test kernel."""
import json
import math

import pytest
import torch
import triton
import triton.language as tl

from fastsora import cli
from fastsora.aot import ARCHS, compile_config
from fastsora.backend import select_backend
from fastsora.bench import peak_memory_bytes, run_bench, write_results
from fastsora.check import check_op
from fastsora.kernels.utils import new_output
from fastsora.registry import KERNELS, OPS, Case, KernelConfig, KernelEntry, OpSpec, register_kernel, register_op


@triton.jit
def scaled_add_kernel(x_ptr, y_ptr, out_ptr, alpha, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=m).to(tl.float32)
    tl.store(out_ptr + offs, (alpha * x + y).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def dot_kernel(a_ptr, out_ptr, BM: tl.constexpr, BK: tl.constexpr):
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BK)
    a = tl.load(a_ptr + rm[:, None] * BK + rk[None, :])
    acc = tl.dot(a, tl.trans(a))
    tl.store(out_ptr + rm[:, None] * BM + rm[None, :], acc)


@triton.jit
def normalise_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(out_ptr + offs, x / tl.sum(x, 0))


@triton.jit
def _double(x):
    return x * 2


@triton.jit
def calls_helper_kernel(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, _double(tl.load(x_ptr + offs)))


def scaled_add(x, y, alpha=0.5, buggy=False):
    backend = select_backend("test_scaled_add", x.device)
    if backend == "torch":
        return (alpha * x + y,)
    out = new_output(x.shape, x.dtype, x.device)
    n = x.numel() - (1 if buggy else 0)  # the buggy variant forgets the last element
    scaled_add_kernel[(triton.cdiv(n, 64),)](x, y, out, alpha, n, BLOCK=64)
    return (out,)


SPEC = OpSpec(
    name="test_scaled_add", family="test",
    run=scaled_add,
    reference=lambda x, y: (0.5 * x + y,),
    check_cases=lambda device: [Case("n=100", lambda d, t: (torch.randn(100, device=d, dtype=t),
                                                            torch.randn(100, device=d, dtype=t)))],
    tolerance={torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2},
    bench_cases=lambda device: [Case("n=4096", lambda d, t: (torch.randn(4096, device=d, dtype=t),
                                                            torch.randn(4096, device=d, dtype=t)),
                                     flops=2 * 4096, bytes=3 * 4096 * 4)],
    bench_impls={"fastsora": lambda args, mode: (lambda: scaled_add(*args)) if mode == "fwd" else None,
                 "reference": lambda args, mode: (lambda: 0.5 * args[0] + args[1])},
    bench_modes=("fwd", "fwd+bwd"),
)


@pytest.fixture
def registered():
    register_kernel("test", scaled_add_kernel, [KernelConfig(
        "fp32 BLOCK=64", {"x_ptr": "*fp32", "y_ptr": "*fp32", "out_ptr": "*fp32", "alpha": "fp32", "n": "i32",
                          "BLOCK": "constexpr"}, {"BLOCK": 64})])
    register_op(SPEC)
    yield SPEC
    KERNELS.pop("test.scaled_add_kernel", None)
    OPS.pop(SPEC.name, None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter path")
@pytest.mark.interpreter
def test_check_passes_a_correct_kernel_and_catches_an_unwritten_element(registered):
    rows = check_op(registered, torch.device("cpu"))
    assert [r.dtype for r in rows] == ["float32", "float16"]
    assert all(r.ok for r in rows), rows
    buggy = OpSpec(**{**registered.__dict__, "run": lambda x, y: scaled_add(x, y, buggy=True)})
    rows = check_op(buggy, torch.device("cpu"))
    assert rows and not any(r.ok for r in rows), "a NaN-poisoned element the kernel skipped must fail"
    assert all(math.isinf(r.max_rel_error) for r in rows), "the skipped element holds the poison (NaN: error inf)"
    # a non-finite reference makes an output's error NaN: the row fails even when another output is exact
    two = OpSpec(**{**registered.__dict__, "run": lambda x, y: (scaled_add(x, y), x * 0 + 1),
                    "reference": lambda x, y: (registered.reference(x, y), x * float("nan"))})
    rows = check_op(two, torch.device("cpu"))
    assert rows and all(math.isnan(r.max_rel_error) and not r.ok for r in rows), rows


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_compile_reports_resources(arch):
    entry = KernelEntry("test", scaled_add_kernel, [])
    cfg = KernelConfig("fp16", {"x_ptr": "*fp16", "y_ptr": "*fp16", "out_ptr": "*fp16", "alpha": "fp32",
                                "n": "i32", "BLOCK": "constexpr"}, {"BLOCK": 1024})
    res = compile_config(entry, cfg, arch)
    assert res.ok, res.error
    assert res.registers and res.registers > 0
    assert res.spill_bytes == 0 and res.problems == []
    assert not res.mma


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_compile_reports_spills(arch):
    """Positive control of the spill / stack-frame check that every kernel config must pass: one warp holding
    8192 fp32 values across a reduction (256 a thread, past the 255 registers) is reported as a problem."""
    entry = KernelEntry("test", normalise_kernel, [])
    cfg = KernelConfig("one warp", {"x_ptr": "*fp32", "out_ptr": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 8192},
                       num_warps=1)
    res = compile_config(entry, cfg, arch)
    assert res.ok, res.error
    assert (res.spill_bytes or 0) > 0 or (res.stack_bytes or 0) > 0, res
    assert res.problems, res
    if res.spill_bytes:
        assert f"spills {res.spill_bytes} B" in res.problems, res
    if res.stack_bytes:
        assert f"stack frame {res.stack_bytes} B (spilled registers)" in res.problems, res


def test_each_resource_over_its_limit_is_a_problem():
    """Spilled (LOCAL) bytes, a stack frame and shared memory past the arch's per-block limit are each reported
    on their own, a failed build by its error; a build within every limit has no problem."""
    from fastsora.aot import CompileResult

    def problems(**fields):
        return CompileResult("k", "c", "sm_80", True, registers=64, **fields).problems
    limit = ARCHS["sm_80"]["smem"]
    assert problems(spill_bytes=0, stack_bytes=0, shared_bytes=limit) == []
    assert problems(spill_bytes=16) == ["spills 16 B"]
    assert problems(stack_bytes=8) == ["stack frame 8 B (spilled registers)"]
    assert problems(shared_bytes=limit + 1) == [f"shared memory {limit + 1} B > {limit} B"]
    assert CompileResult("k", "c", "sm_90", False, error="boom").problems == ["compile failed: boom"]


def test_compile_passes_the_alignment_the_jit_would_see():
    entry = KernelEntry("test", scaled_add_kernel, [])
    sig = {"x_ptr": "*fp16", "y_ptr": "*fp16", "out_ptr": "*fp16", "alpha": "fp32", "n": "i32", "BLOCK": "constexpr"}
    aligned = compile_config(entry, KernelConfig("aligned", sig, {"BLOCK": 1024}), "sm_90")
    unaligned = compile_config(entry, KernelConfig("unaligned", sig, {"BLOCK": 1024}, divisible_by_16=()), "sm_90")
    assert aligned.ok and unaligned.ok
    assert aligned.registers < unaligned.registers  # vectorised 16-byte loads need the alignment hint
    wrong = compile_config(entry, KernelConfig("bad", sig, {"BLOCK": 1024}, divisible_by_16=("BLOCK",)), "sm_90")
    assert not wrong.ok and "divisible_by_16" in wrong.error


def test_divisible_ints_marks_only_integer_runtime_arguments():
    from fastsora.aot import _alignment_attrs

    sig = {"x_ptr": "*fp16", "y_ptr": "*fp16", "out_ptr": "*fp16", "alpha": "fp32", "n": "i32", "BLOCK": "constexpr"}
    base = KernelConfig("fp16", sig, {"BLOCK": 1024}, known_stack_under=("3.4",))
    spec = base.with_divisible_ints()
    assert spec.divisible_by_16 == ("x_ptr", "y_ptr", "out_ptr", "n"), "pointers and ints; not floats, constexprs"
    assert spec.label == "fp16 [ints/16]" and spec.known_stack_under == ("3.4",) and spec.num_warps == base.num_warps
    assert sorted(_alignment_attrs(scaled_add_kernel, spec)) == [(0,), (1,), (2,), (4,)]
    # an explicit alignment list is kept (here: unaligned pointers), the ints are added
    assert KernelConfig("u", sig, {"BLOCK": 1024}, divisible_by_16=()).with_divisible_ints().divisible_by_16 == ("n",)
    flags = KernelConfig("f", {"p": "*fp32", "a": "i64", "b": "u32", "c": "i1", "s": "fp64"}, {})
    assert flags.with_divisible_ints().divisible_by_16 == ("p", "a", "b"), "bools are never marked divisible"
    res = compile_config(KernelEntry("test", scaled_add_kernel, []), spec, "sm_90")
    assert res.ok and res.problems == [] and res.config == "fp16 [ints/16]", res


def test_cli_compile_divisible_ints_option():
    parse = cli.build_parser().parse_args
    assert parse(["compile"]).divisible_ints == "off"
    assert parse(["compile", "--divisible-ints"]).divisible_ints == "also"
    assert parse(["compile", "--divisible-ints", "only", "--families", "lfq"]).divisible_ints == "only"


def test_compile_resolves_jit_helpers_the_kernel_calls():
    # under the interpreter both the kernel and its helper are InterpretedFunctions
    entry = KernelEntry("test", calls_helper_kernel, [])
    res = compile_config(entry, KernelConfig("64", {"x_ptr": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 64}), "sm_90")
    assert res.ok, res.error


def test_compile_sees_tensor_cores_and_shared_memory_limit():
    entry = KernelEntry("test", dot_kernel, [])
    small = KernelConfig("64x64", {"a_ptr": "*fp16", "out_ptr": "*fp32", "BM": "constexpr", "BK": "constexpr"},
                         {"BM": 64, "BK": 64})
    res90 = compile_config(entry, small, "sm_90")
    assert res90.ok and res90.mma and res90.wgmma and res90.problems == []
    res80 = compile_config(entry, small, "sm_80")
    assert res80.ok and res80.mma and not res80.wgmma
    bad = KernelConfig("bad", {"a_ptr": "*fp16", "out_ptr": "*fp32", "BM": "constexpr", "BK": "constexpr"},
                       {"BM": 48, "BK": 64})
    res = compile_config(entry, bad, "sm_90")
    assert not res.ok and res.problems and "compile failed" in res.problems[0]


def test_compile_flags_shared_memory_over_the_arch_limit(monkeypatch):
    entry = KernelEntry("test", dot_kernel, [])
    cfg = KernelConfig("128x128", {"a_ptr": "*fp16", "out_ptr": "*fp32", "BM": "constexpr", "BK": "constexpr"},
                       {"BM": 128, "BK": 128})
    res = compile_config(entry, cfg, "sm_80")
    assert res.ok and res.shared_bytes > 0
    monkeypatch.setitem(ARCHS, "sm_80", {**ARCHS["sm_80"], "smem": res.shared_bytes - 1})
    assert any("shared memory" in p for p in res.problems)


def test_peak_memory_counts_an_allocation():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n = 4 * 2**20

    def alloc():
        a = torch.ones(n, device=device)  # 16 MiB
        return (a * 2).sum()  # another 16 MiB while `a` is alive

    peak = peak_memory_bytes(alloc, device)
    assert 2 * n * 4 <= peak <= 3 * n * 4


def test_bench_runs_and_writes_json(registered, tmp_path):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = run_bench(device, ops=[registered.name], dtypes=[torch.float32], modes=["fwd", "fwd+bwd"])
    rows = report["results"]
    assert {(r["mode"], r["impl"]) for r in rows} == {
        (m, i) for m in ("fwd", "fwd+bwd") for i in ("reference", "fastsora[torch]" if device.type == "cpu"
                                                     else "fastsora[triton]")}
    na = [r for r in rows if r["status"] == "n/a"]
    assert [(r["mode"], r["impl"].startswith("fastsora")) for r in na] == [("fwd+bwd", True)]
    timed = [r for r in rows if r["status"] == "ok"]
    assert all(r["median_ms"] > 0 and r["tflops"] > 0 and r["gbps"] > 0 for r in timed)
    assert report["versions"]["torch"] == torch.__version__ and report["date"]
    paths = write_results(report, str(tmp_path))
    data = json.load(open(paths[0]))
    assert data["device"] == report["device"] and len(data["results"]) == len(rows)


def test_bench_rates_follow_from_the_median_and_the_case_counts(registered, monkeypatch):
    """TFLOP/s, GB/s and % of peak are the case's flops and bytes per mode (backward: BWD_FLOPS_FACTOR times
    the forward) over the median time: with the median and the peaks fixed, every rate is known exactly."""
    from fastsora import bench

    monkeypatch.setattr(bench, "median_ms", lambda fn, device: 2.5)
    monkeypatch.setattr(bench, "measured_peaks", lambda device, dtype: {"tflops": 1e-3, "gbps": 4.0})
    report = run_bench(torch.device("cpu"), ops=[registered.name], dtypes=[torch.float32], modes=["fwd", "fwd+bwd"],
                       impls=["reference"])
    flops, nbytes, k = 2 * 4096, 3 * 4096 * 4, bench.BWD_FLOPS_FACTOR
    want = {"fwd": 1.0, "fwd+bwd": 1.0 + k}
    rows = report["results"]
    assert sorted(r["mode"] for r in rows) == ["fwd", "fwd+bwd"]
    for r in rows:
        assert r["median_ms"] == 2.5
        assert math.isclose(r["tflops"], want[r["mode"]] * flops / 2.5e-3 / 1e12, rel_tol=1e-12)
        assert math.isclose(r["gbps"], want[r["mode"]] * nbytes / 2.5e-3 / 1e9, rel_tol=1e-12)
        assert math.isclose(r["pct_peak_flops"], 100 * r["tflops"] / 1e-3, rel_tol=1e-12)
        assert math.isclose(r["pct_peak_bw"], 100 * r["gbps"] / 4.0, rel_tol=1e-12)
    assert bench.MODE_FLOPS["bwd"](3.0, k) == 3.0 * k


def test_cpu_median_skips_the_warm_up_and_takes_the_median(monkeypatch):
    """On CPU, median_ms runs fn once untimed, then times at least min_runs calls and reports their median
    (a fake clock that only fn advances: warm-up 100 ms, then 5, 1 and 30 ms)."""
    from fastsora import bench

    now = [0.0]
    durations = iter([0.100, 0.005, 0.001, 0.030])
    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])

    def fn():
        now[0] += next(durations)
    assert bench.median_ms(fn, torch.device("cpu"), min_runs=3, budget_s=0.0) == pytest.approx(5.0)
    assert next(durations, None) is None   # four calls: the warm-up and three timed


def test_bench_selection_budget_and_partial_reports(registered):
    """--cases (regex on labels) and --impls select points; a time budget turns the points it cannot start
    into 'skipped' rows; the report is handed out after every point, partial until the last."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fast = "fastsora[torch]" if device.type == "cpu" else "fastsora[triton]"
    assert run_bench(device, ops=[registered.name], cases=r"^n=40", modes=["fwd"])["results"]
    assert run_bench(device, ops=[registered.name], cases="n=999", modes=["fwd"])["results"] == []
    report = run_bench(device, ops=[registered.name], modes=["fwd"], impls=["fastsora"])
    assert [r["impl"] for r in report["results"]] == [fast]
    seen = []
    report = run_bench(device, ops=[registered.name], modes=["fwd", "fwd+bwd"], budget_s=0.0,
                       on_report=lambda rep: seen.append((len(rep["results"]), rep["partial"])))
    assert seen == [(1, True), (2, True), (3, True), (4, False)]
    assert not report["partial"] and report["selection"]["budget_s"] == 0.0
    assert {r["status"] for r in report["results"]} == {"skipped: time budget"}
    assert all(r["median_ms"] is None for r in report["results"])


def test_bench_point_that_raises_is_a_row_and_the_run_goes_on(registered, monkeypatch, capsys):
    """A point whose impl raises (a baseline's own limits, a launch error) is a row 'error: ...' with the first
    line of the message, its traceback goes to stderr, and the next points still run."""
    import fastsora.bench as bench_mod

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    real, calls = bench_mod.median_ms, []

    def first_raises(fn, dev, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("not supported for this shape\nmore detail")
        return real(fn, dev, *args, **kwargs)

    monkeypatch.setattr(bench_mod, "measured_peaks", lambda device, dtype: {"tflops": 1.0, "gbps": 1.0})
    monkeypatch.setattr(bench_mod, "median_ms", first_raises)
    rows = run_bench(device, ops=[registered.name], modes=["fwd"])["results"]
    assert len(rows) > 1 and rows[0]["status"] == "error: ValueError: not supported for this shape"
    assert rows[0]["median_ms"] is None and all(r["status"] == "ok" and r["median_ms"] > 0 for r in rows[1:])
    assert "Traceback" in capsys.readouterr().err


def test_git_commit_from_the_environment(monkeypatch):
    """A copy of the tree without .git (a lent GPU machine) records the commit passed in $FASTSORA_GIT_COMMIT."""
    import fastsora.bench as bench_mod

    monkeypatch.setenv("FASTSORA_GIT_COMMIT", "0123abcd ")
    assert bench_mod.git_commit() == "0123abcd"
    monkeypatch.delenv("FASTSORA_GIT_COMMIT")
    assert bench_mod.git_commit() != "0123abcd"


def test_cli_bench_rewrites_one_json_per_run(registered, tmp_path, capsys, monkeypatch):
    """The results' path is fixed at the first report and the JSON rewritten there after every point: names are
    stamped to the second, so here each call of results_base gives a new one, as a run crossing a second would."""
    import fastsora.bench as bench

    calls = []
    real_base = bench.results_base

    def new_base_every_call(*args, **kwargs):
        calls.append(args)
        return f"{real_base(*args, **kwargs)}-call{len(calls)}"

    monkeypatch.setattr(bench, "results_base", new_base_every_call)
    assert cli.main(["bench", "--ops", registered.name, "--modes", "fwd", "--impls", "reference",
                     "--budget-s", "600", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("bench-*.json")
    data = json.load(open(path))
    assert not data["partial"] and [r["impl"] for r in data["results"]] == ["reference"]
    assert data["results"][0]["status"] == "ok" and not list(tmp_path.glob("*.tmp"))


def test_cli_info_and_check(registered, capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "interpreter" in out and "test_scaled_add" in out
    if not torch.cuda.is_available():
        assert cli.main(["check", "--ops", registered.name]) == 0
        out = capsys.readouterr().out
        assert "2/2 passed" in out
        assert cli.main(["check", "--ops", registered.name, "--dtype", "float16"]) == 0
        captured = capsys.readouterr()
        assert "1/1 passed" in captured.out and "| float16: ok" in captured.err and "float32" not in captured.err


def test_cli_check_refuses_a_dtype_the_op_is_not_checked_in(registered, capsys):
    """--dtype bfloat16 on CPU (Triton's interpreter mishandles bf16) ends the command before any row runs,
    naming the dtype, the op and the dtypes it is checked in; on CUDA bfloat16 is one of them."""
    if torch.cuda.is_available():
        assert check_op(registered, torch.device("cuda"), [torch.bfloat16])[0].dtype == "bfloat16"
        return
    with pytest.raises(SystemExit, match=r"dtype bfloat16: test_scaled_add is checked on cpu in float32, float16 "
                                         r"only \(bfloat16 is broken in Triton's interpreter\)"):
        cli.main(["check", "--ops", registered.name, "--dtype", "float32", "bfloat16"])
    assert "float32" not in capsys.readouterr().err, "no row runs before the refusal"


def test_cli_info_names_numpy_and_an_unusable_interpreter(monkeypatch, capsys):
    import numpy

    import fastsora.backend as backend

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"numpy: {numpy.__version__}" in out and "cannot run the kernels" not in out
    if not backend.interpreter_active():
        return
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    monkeypatch.setattr(backend, "interpreter_incompatibility",
                        lambda t, n: f"Triton {t}'s interpreter cannot run them with numpy {n}")
    backend.installed_interpreter_incompatibility.cache_clear()
    try:
        assert cli.main(["info"]) == 0
    finally:
        backend.installed_interpreter_incompatibility.cache_clear()
    out = capsys.readouterr().out
    assert "interpreter: on (TRITON_INTERPRET=1); cannot run the kernels: Triton" in out
    assert "with numpy 2.4.6" in out


def test_cli_check_unknown_op_is_an_error():
    with pytest.raises(SystemExit, match="unknown op"):
        cli.main(["check", "--ops", "no_such_op"])


def test_cli_bench_writes_results(registered, tmp_path, capsys):
    assert cli.main(["bench", "--ops", registered.name, "--modes", "fwd", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "1/2" in captured.err and "2/2" in captured.err
    (path,) = tmp_path.glob("bench-*.json")
    data = json.load(open(path))
    assert {r["impl"] for r in data["results"]} >= {"reference"}
    assert all(r["mode"] == "fwd" and r["status"] == "ok" for r in data["results"])
    assert f"wrote {path}" in captured.out


@torch.library.custom_op("fastsora_test::sum_of_temporary", mutates_args=())
def _sum_of_temporary(x: torch.Tensor) -> torch.Tensor:
    big = x.repeat(64)  # a temporary 64x the input, freed before returning
    return big.sum().reshape(1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU accounting")
def test_peak_memory_sees_temporaries_freed_inside_an_op():
    x = torch.randn(2**18)  # 1 MiB -> a 64 MiB temporary
    peak = peak_memory_bytes(lambda: _sum_of_temporary(x), torch.device("cpu"))
    assert peak >= 0.9 * 64 * x.numel() * 4, peak


def test_device_check_selects_target_cases_of_every_op():
    """scripts/device_check.sh times the issues' target points on a lent GPU by a case regex: it must select
    CUDA cases of every op (a renamed case would otherwise leave an op without rows in a rare GPU run), and its
    impl names must be ones the ops register."""
    import os
    import re
    import shlex

    from fastsora.registry import load_all, select_ops

    load_all()
    script = open(os.path.join(os.path.dirname(__file__), "..", "scripts", "device_check.sh")).read()
    pattern = "".join(shlex.split(m.group(2))[0] for m in re.finditer(r"^\s*cases(\+?)=(.*)$", script, re.M))
    impls = shlex.split(re.search(r"--impls (.*?) --out", script.replace("\\\n", " ")).group(1))
    regex = re.compile(pattern)
    registered = set()
    for spec in select_ops(["lfq", "causal_conv3d", "varlen_attention"], "test"):
        labels = [case.label for case in spec.bench_cases(torch.device("cuda"))]
        chosen = [label for label in labels if regex.search(label)]
        assert 2 <= len(chosen) < len(labels), (spec.name, chosen)
        registered |= {("fastsora[triton," + name[len("fastsora["):] if name.startswith("fastsora[") else
                        "fastsora[triton]" if name == "fastsora" else name) for name in spec.bench_impls}
    assert set(impls) <= registered, set(impls) - registered  # fastsora's as the CUDA rows are labelled
    assert {"fastsora[triton]", "fastsora[triton,channels_last_3d]"} <= set(impls)


def test_bench_versions_name_the_baselines():
    """The JSON's versions say which baselines ran: installed distributions by their metadata (the LFQ anchor has
    no __version__), None for what is not installed."""
    import importlib.metadata

    from fastsora.bench import _installed_version, versions

    pytest.importorskip("vector_quantize_pytorch")  # a test extra; a GPU machine may lack it
    got = versions()
    assert got["vector-quantize-pytorch"] == importlib.metadata.version("vector-quantize-pytorch")
    assert {"flash-attn", "xformers", "cudnn", "triton"} <= set(got)
    assert _installed_version("no-such-distribution-fastsora", "no_such_module_fastsora") is None


def test_bench_sets_up_fastsora_on_the_backend_it_times(monkeypatch):
    """Set-up work of a fastsora impl (e.g. the forward a backward-only point differentiates) runs under the
    backend its timed call uses, whatever FASTSORA_BACKEND or use_backend says around the run."""
    from fastsora import use_backend
    from fastsora.backend import get_backend
    from fastsora.bench import _impls

    seen = []

    def make(args, mode):
        seen.append(get_backend())
        return lambda: seen.append(get_backend())

    spec = OpSpec(name="test_backend_of_setup", family="test", run=scaled_add, reference=scaled_add,
                  check_cases=lambda device: [], tolerance={}, bench_impls={"fastsora": make})
    (name, make_fast), = _impls(spec, torch.device("cpu")).items()
    assert name == "fastsora[torch]"
    with use_backend("triton"):
        make_fast((), "bwd")()
    assert seen == ["torch", "torch"]


def test_sass_loops_find_loop_bodies_and_local_memory_outside_them():
    """scripts/sass_loops.py's reading of a ``cuobjdump -sass`` listing (fastsora.aot): a loop body is the span a
    backward branch jumps over; local loads/stores (a stack frame's spilled registers) in no body run once per
    program. A listing shaped like cuobjdump's, with a predicated store and a forward branch that is no loop."""
    from fastsora.aot import local_memory_outside_loops, sass_loops

    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   STL [R1], R2 ;
        /*0020*/                   IMAD R3, R4, R5, RZ ;
        /*0030*/                   LDL R6, [R1] ;
        /*0040*/                   HMMA.16816.F32 R8, R10, R12, R8 ;
        /*0050*/              @!P0 STL [R1+0x4], R7 ;
        /*0060*/               @P1 BRA 0x30 ;
        /*0070*/                   BRA 0x90 ;
        /*0080*/                   LDL R9, [R1+0x4] ;
        /*0090*/                   EXIT ;
    """
    loops = sass_loops(sass)
    assert [(lo, hi) for lo, hi, _ in loops] == [(0x30, 0x60)]
    body = loops[0][2]
    assert body == {"LDL": 1, "HMMA": 1, "STL": 1, "BRA": 1}, body
    assert local_memory_outside_loops(sass) == {"STL": 1, "LDL": 1}
    assert local_memory_outside_loops(sass.replace("BRA 0x30", "BRA 0xa0")) == {"STL": 2, "LDL": 2}, \
        "a forward branch makes no loop"
