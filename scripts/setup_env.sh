#!/usr/bin/env bash
# Shared set-up of the README's two commands: a virtual environment with torch and fastsora (+ extras).
# Usage: source scripts/setup_env.sh EXTRAS   (EXTRAS: "test" or "bench")
# - On a machine with a CUDA GPU whose system Python already has a CUDA torch, the venv sees it
#   (--system-site-packages) and fastsora installs without touching it.
# - Otherwise the CPU wheel torch==2.13.0 is installed first, so no CUDA wheels are ever downloaded.
set -euo pipefail
extras="${1:?extras (test or bench)}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FASTSORA_VENV:-$root/.venv}"
python="${PYTHON:-python3}"

system_cuda_torch=0
if "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  system_cuda_torch=1
fi

if [ ! -x "$venv/bin/python" ]; then
  if [ "$system_cuda_torch" = 1 ]; then
    "$python" -m venv --system-site-packages "$venv"
  else
    "$python" -m venv "$venv"
  fi
fi
vpy="$venv/bin/python"

if [ "$system_cuda_torch" = 1 ]; then
  # GPU machine: keep its torch/triton; install fastsora alone (works offline), extras best effort.
  "$vpy" -m pip install -q --no-build-isolation --no-deps -e "$root"
  "$vpy" -m pip install -q -e "$root[$extras]" 2>/dev/null || echo "note: extras [$extras] not installed (offline?)"
else
  if ! "$vpy" -c "import torch" >/dev/null 2>&1; then
    "$vpy" -m pip install -q "torch==2.13.0"
  fi
  "$vpy" -m pip install -q setuptools wheel
  "$vpy" -m pip install -q -e "$root[$extras]"
  if [ "$extras" = test ]; then
    # xformers' attn_bias classes for tests/test_varlen_attention_xformers.py (plain Python; its compiled part is
    # for one CUDA torch and is not needed). --no-deps: it must never replace the CPU torch. Best effort.
    "$vpy" -m pip install -q --no-deps "xformers==0.0.35" \
      || echo "note: xformers not installed; tests/test_varlen_attention_xformers.py will be skipped"
  fi
fi
export PATH="$venv/bin:$PATH"
