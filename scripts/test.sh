#!/usr/bin/env bash
# The test suite: sets up .venv (see setup_env.sh) and runs pytest on 2 workers.
# Without a CUDA GPU the Triton kernels run in Triton's interpreter (conftest.py switches it on).
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m slow`). The workers steal queued tests from each
# other (--dist worksteal): the suite's tests take from milliseconds to half a minute in the interpreter, and
# xdist's default fixed split left one worker idle for about a minute at the end (on 2 cores: 417 s -> 355 s).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh" test
cd "$root"
if [ "$#" -eq 0 ]; then set -- -m "not slow"; fi
exec python -m pytest -n 2 --dist worksteal -q "$@"
