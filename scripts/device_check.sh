#!/usr/bin/env bash
# The GPU checks as one prepared, time-boxed run, for a lent GPU machine (the `device` tool: about 15 minutes
# of device time per session, 10 minutes per command, results only through $OUT, no network there).
#
# Usage:  bash scripts/device_check.sh [STAGE] [SECONDS]
#   STAGE    all (default) | bench | tests
#   SECONDS  wall-clock budget of the whole run (default 500: run it with the device tool's timeout_s=600,
#            which leaves time for the install and a margin)
# Beforehand, on the machine with network: `bash scripts/device_wheels.sh` (the LFQ anchor and its needs as
# wheels in .whl/), then name .whl in the device tool's `carry`. The copy there has no .git: put the commit in the
# command, `FASTSORA_GIT_COMMIT=<sha> bash scripts/device_check.sh all 500`, so the bench JSON records it.
#
# Stages, most important first, each with its share of the budget; every file lands in $OUT (the tool brings
# back at most 8): info.txt, check.log, bench.log, three bench-<device>-<date>.json (one per op), tests.log,
# summary.txt.
#   check  `fastsora check --dtype bfloat16`: every op against its float64 reference on CUDA at realistic shapes,
#          in bf16 only (the dtype the interpreter cannot run and the bench times: the two share compiled
#          kernels; fp32 and fp16 on CUDA are in the tests stage and `fastsora check` with no --dtype)
#   bench  `fastsora bench` of the issues' targets in bf16 (LFQ d=18 at 1k/16k tokens; conv at MAGVIT-v2,
#          CogVideoX and Open-Sora shapes, fwd and fwd+bwd, NCDHW and channels_last_3d against F.pad+cuDNN;
#          varlen at flash-attn's 16k-token protocol and a NaViT pack against torch varlen_attn and dense SDPA);
#          the JSON is rewritten after every point and points past the budget are rows 'skipped: time budget';
#          left out for time: conv's backward-only mode and streamed video, and the FlexAttention, flash-attn and
#          xformers rows (each flex case compiles), all in the full run, `bash scripts/bench.sh`
#   tests  the CUDA test suite (bf16 included; interpreter-only tests skip), gpu-marked tests first, one line
#          per test in tests.log so a run cut short still says what passed; without the files that touch no
#          GPU (AOT compile sweep, packaging, DDP over gloo on CPU), which CI runs; then the fuzz suites
#          (tests/test_*_fuzz.py, 8 cases each per dtype) in the same log, with a quarter of the budget kept for
#          them when the stage is `tests`
# The bench JSON goes to benchmarks/results/ in the commit that reports it, with the device name in its name.
set -uo pipefail
stage="${1:-all}"
total="${2:-500}"
case "$stage" in all | bench | tests) ;; *) echo "stage must be all, bench or tests; got $stage" >&2; exit 2 ;; esac
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${OUT:-$root/device-out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
start=$SECONDS
left() { echo $((total - (SECONDS - start))); }
note() { echo "$*" | tee -a "$out/summary.txt"; }

# install: no network there, so no index and no dependencies (torch, triton, pytest are on the machine)
if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fastsora-site \
    .whl/*.whl && export PYTHONPATH="/tmp/fastsora-site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$py" -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1; then
  note "install failed"; cat "$out/install.log"; exit 1
fi
rm -f "$out/install.log"
fastsora=("$py" -m fastsora.cli)
"${fastsora[@]}" info >"$out/info.txt" 2>&1
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem,power.limit --format=csv >>"$out/info.txt" 2>&1
note "== $(date -u +%FT%TZ) $(grep -m1 -i 'device' "$out/info.txt")"

if [ "$stage" = all ]; then
  budget_check=$((total / 8)); budget_bench=$((total * 4 / 10))
elif [ "$stage" = bench ]; then
  budget_check=0; budget_bench=$((total - 60))
else
  budget_check=0; budget_bench=0
fi

if [ "$budget_check" -gt 0 ]; then
  # one run per op, a third of the budget each: conv's first-call autotuning alone could fill all of it
  : >"$out/check.log"
  for ops in lfq varlen_attention "causal_conv3d causal_conv3d_stream"; do
    # shellcheck disable=SC2086  # the conv entry names two ops
    timeout $((budget_check / 3)) "${fastsora[@]}" check --ops $ops --dtype bfloat16 >>"$out/check.log" 2>&1
    echo "== $ops: exit $?" >>"$out/check.log"
  done
  note "check: after $((SECONDS - start)) s; $(grep '^== ' "$out/check.log" | tr '\n' ' ')"
fi

if [ "$budget_bench" -gt 0 ]; then
  cases='^D=18 tokens=(1024|16384)$'
  cases+='|^(magvit2 res 128|cogvideox 256|opensora 256) k3 '
  cases+='|^flash protocol L=(2048|16384) d128 h16( causal)?$|^flash protocol L=2048 d64 h32$'
  cases+='|^navit video 12288 \+ 10 images d72'
  # one run per op, a third of the budget each (so every issue gets rows); a point started before its budget
  # may still autotune and time for a while: the hard limit leaves room. fastsora's rows: the default layout
  # and conv's channels_last_3d (a target); other variants (varlen's qkvpacked) are in the full run
  per_op=$((budget_bench / 3))
  for op in lfq causal_conv3d varlen_attention; do
    timeout $((per_op + 40)) "${fastsora[@]}" bench --ops "$op" --dtype bfloat16 --modes fwd fwd+bwd \
      --cases "$cases" --budget-s "$((per_op - 20))" --impls "fastsora[triton]" "fastsora[triton,channels_last_3d]" \
      vector-quantize-pytorch "F.pad+F.conv3d" \
      "F.pad+F.conv3d[channels_last_3d]" torch_varlen_attn sdpa_dense --out "$out" >>"$out/bench.log" 2>&1
    echo "== $op: exit $?" >>"$out/bench.log"
  done
  rm -f "$out"/*.png   # the tool brings back at most 8 files; the JSONs hold every number
  note "bench: after $((SECONDS - start)) s; $(grep -c ': [0-9.]* ms$' "$out/bench.log") points timed;" \
    "$(grep '^== ' "$out/bench.log" | tr '\n' ' ')"
fi

if [ "$stage" != bench ] && [ "$(left)" -gt 60 ]; then
  limit=()
  if "$py" -c "import pytest_timeout" 2>/dev/null; then limit=(--timeout 300); fi
  : >"$out/tests.log"
  # gpu-marked tests first (the realistic CUDA shapes), then everything else that is not slow, except the
  # files that touch no GPU and that CI runs the same way (the AOT compile sweep, packaging, gloo DDP on CPU)
  cpu_only=(--ignore tests/test_compile.py --ignore tests/test_packaging.py --ignore tests/test_lfq_ddp.py)
  # the tests stage alone keeps a quarter of its budget for the fuzz suites below; `all` runs them if time is left
  reserve=0
  if [ "$stage" = tests ]; then reserve=$((total / 4)); fi
  for marks in "gpu and not slow" "not gpu and not slow"; do
    [ "$(left)" -gt $((40 + reserve)) ] || break
    echo "== pytest -m '$marks'" >>"$out/tests.log"
    timeout $(($(left) - 20 - reserve)) "$py" -m pytest -p no:cacheprovider -n 4 -v -m "$marks" "${limit[@]}" \
      "${cpu_only[@]}" -o console_output_style=classic tests 2>&1 | grep --line-buffered -v '^$' >>"$out/tests.log"
  done
  # the fuzz suites: random shapes and options against float64 oracles, bf16 included on CUDA (8 cases per
  # suite and dtype; the seed is in the log's header line, so a failure replays with FASTSORA_FUZZ_SEED)
  if [ "$(left)" -gt 60 ]; then
    echo "== pytest -m slow (fuzz suites, FASTSORA_FUZZ_CASES=8)" >>"$out/tests.log"
    FASTSORA_FUZZ_CASES=8 timeout $(($(left) - 20)) "$py" -m pytest -p no:cacheprovider -n 4 -v -m slow \
      "${limit[@]}" -o console_output_style=classic tests/test_*_fuzz.py 2>&1 |
      grep --line-buffered -v '^$' >>"$out/tests.log"
  fi
  count() { grep -c " $1" "$out/tests.log"; }
  note "tests: $(count PASSED) passed, $(count FAILED) failed, $(count SKIPPED) skipped, $(count ERROR) errors," \
    "$(count XFAIL) xfailed after $((SECONDS - start)) s"
fi
note "done after $((SECONDS - start)) s"
