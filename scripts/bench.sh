#!/usr/bin/env bash
# The main job: sets up .venv (see setup_env.sh) and runs `fastsora bench` on this machine's device.
# Results (JSON + PNG) go to benchmarks/results/. Extra arguments go to `fastsora bench`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh" bench
cd "$root"
fastsora info
exec fastsora bench "$@"
