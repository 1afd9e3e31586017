#!/usr/bin/env bash
# The device check of both GPU scripts in one call (README: "GPU checks"). Run on the lent GPU machine from the
# repository root with the wheels in .whl (diffusers, segment-anything, pymatting, importlib-metadata and
# lazy-importer; see the README) carried; writes the JSON and logs under $OUT (default bench/results).
#   bash bench/gpu_run.sh [check-seconds] [engine-seconds]
set -u
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout "${1:-300}" python3 bench/gpu_check.py --out "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log"
timeout "${2:-250}" python3 bench/gpu_engine.py --scenes 8 --out "$OUT/gpu_engine.json" 2>&1 | tee "$OUT/gpu_engine.log"
exit 0
