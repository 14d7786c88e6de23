#!/usr/bin/env bash
# The interpreter test suite on CPU under another torch + triton pair, by default the lent GPU machines'
# stack (torch 2.11, triton 3.6). The host code (custom ops, torch.compile, autocast, checkpointing) meets
# torch APIs that change between releases, and CI runs only the newest: run this after changing it.
# Usage: bash scripts/stack_suite.sh [TORCH_VERSION TRITON_VERSION] [-- PYTEST_ARGS ...]
#   (default: 2.11.0 3.6.0 -- -m "not slow")
#   PYTEST_ARGS replace the default, so add -m "not slow" to them to keep the slow tests out.
# The venv is .venv-torch-TORCH-triton-TRITON; triton < 3.7 gets numpy < 2.4 (its interpreter fails with
# numpy >= 2.4, see README "The torch and triton releases the suite passes under"). TorchInductor's on-disk
# cache is a fresh directory per run, removed after it, so no compiled graph of another torch release or
# fastsora version is replayed.
# EXTRA_PIP: more requirements for that venv, e.g. the magvit2-pytorch swap test (tests/test_magvit2_tokenizer.py)
# needs EXTRA_PIP="torchvision==0.26.0 magvit2-pytorch" (the torchvision of torch 2.11).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
usage='usage: bash scripts/stack_suite.sh [TORCH_VERSION TRITON_VERSION] [-- PYTEST_ARGS ...]'
version='^[0-9]+(\.[0-9]+)+$'
torch_version="2.11.0"
triton_version="3.6.0"
if [ "$#" -gt 0 ] && [ "$1" != "--" ]; then
  if [ "$#" -lt 2 ] || ! [[ "$1" =~ $version ]] || ! [[ "$2" =~ $version ]]; then
    echo "$usage (versions like 2.11.0 3.6.0; got: $*)" >&2; exit 2
  fi
  torch_version="$1"; triton_version="$2"; shift 2
fi
if [ "$#" -gt 0 ]; then
  if [ "$1" != "--" ]; then echo "$usage (pytest arguments go after --; got: $*)" >&2; exit 2; fi
  shift
fi
if [ "$#" -eq 0 ]; then set -- -m "not slow"; fi

numpy_pin="numpy"
if "$python" -c "import sys; v = tuple(int(p) for p in sys.argv[1].split('.')[:2]); sys.exit(0 if v < (3, 7) else 1)" \
    "$triton_version"; then
  numpy_pin="numpy<2.4"
fi
venv="$root/.venv-torch-$torch_version-triton-$triton_version"
if [ ! -x "$venv/bin/python" ]; then "$python" -m venv "$venv"; fi
# shellcheck disable=SC2086  # EXTRA_PIP is a list of requirements
"$venv/bin/python" -m pip install -q "torch==$torch_version" "triton==$triton_version" "$numpy_pin" setuptools wheel \
  ${EXTRA_PIP:-}
"$venv/bin/python" -m pip install -q --no-build-isolation -e "$root[test]"
"$venv/bin/python" -c 'import torch, triton, numpy; print(f"== torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}")'
cache="$(mktemp -d)"
trap 'rm -rf "$cache"' EXIT
cd "$root"
TORCHINDUCTOR_CACHE_DIR="$cache" "$venv/bin/python" -m pytest -n 2 --dist worksteal -q -p no:cacheprovider "$@"
