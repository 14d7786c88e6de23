#!/usr/bin/env bash
# `fastsora compile` (every registered kernel config, AOT for sm_80 and sm_90, no GPU needed) under several
# Triton releases: register allocation differs between releases, and a config must compile without spills
# under every release we support (triton >= 3.4; the lent GPU machines run 3.6; known small stack frames are
# listed per release beside each family's config tables).
# Usage: bash scripts/compile_matrix.sh [TRITON_VERSION ...] [-- FASTSORA_COMPILE_ARGS ...]
#   (default versions: every release from 3.4, the pins of torch 2.8 to 2.15: 3.4.0 3.5.1 3.6.0 3.7.1 3.8.0 and
#    the newest, 3 to 8 minutes each on 2 cores; arguments after `--` go to `fastsora compile`, e.g.
#    `bash scripts/compile_matrix.sh 3.6.0 -- --divisible-ints` also builds the JIT's launch specialisation)
# Each version gets its own venv, .venv-triton-VERSION (CPU torch==2.13.0 + that triton + fastsora).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
versions=()
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do versions+=("$1"); shift; done
if [ "$#" -gt 0 ]; then shift; fi   # the `--`; what is left goes to `fastsora compile`
if [ "${#versions[@]}" -eq 0 ]; then versions=(3.4.0 3.5.1 3.6.0 3.7.1 3.8.0 ""); fi
status=0
for v in "${versions[@]}"; do
  venv="$root/.venv-triton-${v:-latest}"
  if [ ! -x "$venv/bin/python" ]; then "$python" -m venv "$venv"; fi
  "$venv/bin/python" -m pip install -q "torch==2.13.0" "triton${v:+==$v}" numpy setuptools wheel
  "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$root"
  echo "== triton $("$venv/bin/python" -c 'import triton; print(triton.__version__)')"
  (cd "$root" && "$venv/bin/fastsora" compile "$@") | grep -v ' ok *$' || status=1  # problems and the summary
done
exit $status
