#!/usr/bin/env bash
# The test suite: sets up .venv (see setup_env.sh) and runs pytest on 2 workers.
# Without a CUDA GPU the Triton kernels run in Triton's interpreter (conftest.py switches it on).
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m slow`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh" test
cd "$root"
if [ "$#" -eq 0 ]; then set -- -m "not slow"; fi
exec python -m pytest -n 2 -q "$@"
