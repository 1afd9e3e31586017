#!/usr/bin/env bash
# The GPU check of issue 15 (docs/engine.md, "The neural stages on a GPU"): bench/gpu_engine.py at real model sizes,
# the product's stages over 16 synthetic scenes at 1024 px, on the lent GPU machine (Python 3.12, torch, transformers;
# no ray, boto3, diffusers, segment-anything, imagehash, PyWavelets or pymatting).
#   bash bench/gpu_engine.sh wheels        # here, once: the missing wheels for CPython 3.12 into .whl/ (git-ignored)
#   bash bench/gpu_engine.sh [ARGS...]     # there, with .whl carried: writes $OUT/gpu_engine_real.json and its log
# The driver runs from this source tree: reflade.engine and reflade.platform are linked under /tmp/reflade-src.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = wheels ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    diffusers==0.42.1 segment-anything==1.0 imagehash==4.3.2 PyWavelets==1.9.0 pymatting==1.1.16 \
    importlib-metadata==10.2.0 lazy-importer==0.1.0
  exit 0
fi
OUT=${OUT:-bench/results}
mkdir -p "$OUT" /tmp/reflade-src/reflade
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
for pkg in engine platform; do ln -sfn "$PWD/$pkg" "/tmp/reflade-src/reflade/$pkg"; done
export PYTHONPATH=/tmp/reflade-src:/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout "${GPU_ENGINE_TIMEOUT:-540}" python3 bench/gpu_engine.py --size real --scenes 16 --image-size 1024 \
  --weights-dir /tmp/random-weights --out "$OUT/gpu_engine_real.json" "$@" 2>&1 | tee "$OUT/gpu_engine_real.log"
