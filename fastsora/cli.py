"""The ``fastsora`` command: info, check, compile, bench (see ``fastsora <command> --help``)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence


def _prepare_environment() -> None:
    """Before any kernel is created: without a CUDA device, run the Triton kernels in the interpreter."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _add_dtype_argument(parser: argparse.ArgumentParser, default_help: str) -> None:
    parser.add_argument("--dtype", nargs="*", choices=["float32", "float16", "bfloat16"], help=default_help)


def _dtypes(args) -> Optional[list]:
    """The torch dtypes named by ``--dtype`` (None when not given)."""
    import torch

    return [getattr(torch, d) for d in args.dtype] if args.dtype else None


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_info(args) -> int:
    import torch

    from fastsora.backend import get_backend, installed_interpreter_incompatibility, interpreter_active, select_backend
    from fastsora.bench import device_name, versions
    from fastsora.registry import KERNELS, OPS, load_all

    load_all()
    device = _device()
    for key, value in versions().items():
        print(f"{key:>16}: {value or 'not installed'}")
    print(f"{'device':>16}: {device_name(device)}")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        print(f"{'compute cap.':>16}: sm_{major}{minor}")
    interpreter = "off"
    if interpreter_active():
        problem = installed_interpreter_incompatibility()
        interpreter = "on (TRITON_INTERPRET=1)" + (f"; cannot run the kernels: {problem}" if problem else "")
    print(f"{'interpreter':>16}: {interpreter}")
    print(f"{'backend':>16}: {get_backend()} (FASTSORA_BACKEND / fastsora.use_backend)")
    print(f"{'kernels':>16}: {len(KERNELS)} kernels, {sum(len(e.configs) for e in KERNELS.values())} configs")
    rows = []
    for name in sorted(OPS):
        try:
            chosen = select_backend(name, device)
        except Exception as exc:
            chosen = f"error: {exc}"
        rows.append((name, OPS[name].family, device.type, chosen))
    print()
    print(_table(("op", "family", "device", "backend here"), rows) if rows else "no ops registered")
    return 0


def cmd_check(args) -> int:
    from fastsora.check import run_checks

    device = _device()

    def on_row(r):  # one line per row as it finishes, so a run cut short still says what it checked
        print(f"  {r.op} | {r.case} | {r.dtype}: {'ok' if r.ok else 'FAILED'}", file=sys.stderr, flush=True)
    try:
        rows = run_checks(device, args.ops, _dtypes(args), on_row=on_row)
    except ValueError as exc:
        raise SystemExit(f"fastsora check: {exc}") from None
    table = [(r.op, r.case, r.dtype, f"{r.max_rel_error:.2e}", f"{r.tolerance:.0e}",
              "ok" if r.ok else ("ERROR " + r.error if r.error else "MISMATCH")) for r in rows]
    print(f"parity against float64 references on {device.type}"
          f"{' (Triton interpreter)' if device.type == 'cpu' else ''}")
    print(_table(("op", "case", "dtype", "max rel err", "tol", "result"), table))
    bad = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} passed")
    return 1 if bad or not rows else 0


def cmd_compile(args) -> int:
    from fastsora.aot import ARCHS, compile_many
    from fastsora.registry import KERNELS, load_all

    load_all()
    unknown = [a for a in args.arch if a not in ARCHS]
    if unknown:
        print(f"unknown arch {unknown}; choose from {', '.join(ARCHS)}", file=sys.stderr)
        return 2
    families = set(args.families or [])
    def builds(config):
        # the config as registered and/or as the JIT builds it when every integer argument is a multiple of 16
        return {"off": [config], "also": [config, config.with_divisible_ints()],
                "only": [config.with_divisible_ints()]}[args.divisible_ints]

    jobs = [(entry, build, arch) for key, entry in sorted(KERNELS.items())
            if not families or entry.family in families for config in entry.configs for arch in args.arch
            if config.built_for(arch) for build in builds(config)]
    done = []

    def report(result):
        done.append(result)
        if args.verbose:
            _progress_bar(len(done), len(jobs), f"{result.kernel} [{result.config}] {result.arch}")

    import triton

    results = compile_many(jobs, args.jobs, on_result=report)
    known = [config.stack_frame_known(r.problems, triton.__version__) for r, (_, config, _) in zip(results, jobs)]
    rows = [(r.kernel, r.config, r.arch, r.registers, r.spill_bytes, r.shared_bytes,
             "wgmma" if r.wgmma else ("mma" if r.mma else "-"),
             ("known under this triton: " if k else "") + "; ".join(r.problems) or "ok")
            for r, k in zip(results, known)]
    print(_table(("kernel", "config", "arch", "regs", "spill B", "smem B", "tensor cores", "result"), rows)
          if rows else "no kernels registered")
    bad = [r for r, k in zip(results, known) if r.problems and not k]
    clean = sum(1 for r in results if not r.problems)
    print(f"\n{clean}/{len(results)} configs clean" + (f", {sum(known)} known stack frames under triton "
                                                       f"{triton.__version__}" if any(known) else ""))
    return 1 if bad or not results else 0


def _progress_bar(done: int, total: int, line: str) -> None:
    """A progress bar on stderr (redrawn in place on a terminal, one line per point otherwise)."""
    width = 30
    filled = width * done // max(total, 1)
    text = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {line}"
    if sys.stderr.isatty():
        print("\r\033[K" + text[:150], end="\n" if done == total else "", file=sys.stderr, flush=True)
    else:
        print(text, file=sys.stderr, flush=True)


def cmd_bench(args) -> int:
    from fastsora.bench import results_base, run_bench, write_json, write_results

    device = _device()
    dtypes = _dtypes(args)
    base = []  # the files' path, fixed at the first row: the JSON is rewritten after every point

    def on_report(report):
        if not base:
            base.append(results_base(report, args.out))
        write_json(report, base[0] + ".json")
    report = run_bench(device, args.ops, dtypes, args.modes, progress=_progress_bar, cases=args.cases,
                       impls=args.impls, budget_s=args.budget_s, on_report=on_report)
    rows = [(r["op"], r["case"], r["dtype"], r["mode"], r["impl"],
             f"{r['median_ms']:.3f}" if r["median_ms"] is not None else r["status"],
             f"{r['tflops']:.2f}" if r["tflops"] is not None else "-",
             f"{r['gbps']:.1f}" if r["gbps"] is not None else "-",
             f"{r['peak_mem_bytes'] / 2**20:.1f}" if r["peak_mem_bytes"] is not None else "-")
            for r in report["results"]]
    print(f"{report['device']} | torch {report['versions']['torch']} | triton {report['versions']['triton']}")
    if report["interpreter_note"]:
        print(report["interpreter_note"])
    print(_table(("op", "case", "dtype", "mode", "impl", "median ms", "TFLOP/s", "GB/s", "peak MiB"), rows))
    for path in write_results(report, args.out, base[0] if base else None):
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastsora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, interpreter, backend per op").set_defaults(func=cmd_info)
    p = sub.add_parser("check", help="parity of every registered op against its float64 reference")
    p.add_argument("--ops", nargs="*", help="op names (default: all)")
    _add_dtype_argument(p, "default: float32, float16 and bfloat16 on CUDA; float32 and float16 on CPU")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("compile", help="compile every kernel config for NVIDIA archs without a GPU")
    p.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"])
    p.add_argument("--families", nargs="*", help="kernel families (default: all)")
    p.add_argument("--divisible-ints", nargs="?", choices=["off", "also", "only"], default="off", const="also",
                   help="also (bare flag) or only build every config with every integer runtime argument (shapes, "
                        "strides; not pointers, floats or constexprs) marked divisible by 16, as Triton's JIT "
                        "specialises a launch whose ints are multiples of 16; such rows are labelled '[ints/16]'")
    p.add_argument("-j", "--jobs", type=int, help="compile processes (default: all cores)")
    p.add_argument("-v", "--verbose", action="store_true", help="progress bar")
    p.set_defaults(func=cmd_compile)
    p = sub.add_parser("bench", help="time reference vs fastsora vs baselines; JSON + PNG in --out")
    p.add_argument("--ops", nargs="*", help="op names (default: all)")
    _add_dtype_argument(p, "default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--modes", nargs="*", choices=["fwd", "bwd", "fwd+bwd"])
    p.add_argument("--cases", help="regular expression searched in the case labels (default: every case)")
    p.add_argument("--impls", nargs="*", help="impls to time, e.g. fastsora torch_varlen_attn (default: all)")
    p.add_argument("--budget-s", type=float, help="start no point after this many seconds; the rest are rows "
                   "'skipped: time budget' (the JSON is rewritten after every point, so a killed run keeps its rows)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _prepare_environment()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
