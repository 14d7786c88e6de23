#!/usr/bin/env bash
# Wheels the lent GPU machine lacks (it has no network; see scripts/device_check.sh), downloaded here into
# .whl/ (git-ignored) for its Python 3.12 on x86-64: the LFQ anchor vector-quantize-pytorch (the parity tests
# and the anchor's bench rows need it) and the packages it needs that the machine does not have; xformers, whose
# attn_bias classes tests/test_varlen_attention_xformers.py passes to fastsora (its compiled part, built for
# another torch, is not used).
# Then name .whl in the device tool's `carry`; device_check.sh installs them.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
rm -rf "$root/.whl"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 any; do
  platforms+=(--platform "$p")
done
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$root/.whl" \
  vector-quantize-pytorch==1.32.0 einx==0.4.3 frozendict==2.5.1 loguru==0.7.3 torch-einops-utils==0.2.0 \
  xformers==0.0.35
ls -la "$root/.whl"
