#!/usr/bin/env bash
# The device check of both GPU scripts in one call (docs/benchmarks.md, "GPU checks"). Run on the lent GPU machine from the
# repository root with the wheels in .whl (`bash bench/gpu_engine.sh wheels` fetches them) carried; writes the JSON
# and logs under $OUT (default bench/results).
#   bash bench/gpu_run.sh [check-seconds] [engine-seconds]
# A limit of 0 skips that run. The engine check is bench/gpu_engine.sh (the product's stages at real sizes over 16
# scenes at 1024 px, the count).
set -u
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
run() {  # run SECONDS NAME COMMAND...: skipped when SECONDS is 0
  local seconds=$1 name=$2
  shift 2
  if [ "$seconds" -gt 0 ]; then
    timeout "$seconds" "$@" --out "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log"
  else
    echo "skipped: $name"
  fi
}
run "${1:-300}" gpu_check python3 bench/gpu_check.py
if [ "${2:-540}" -gt 0 ]; then GPU_ENGINE_TIMEOUT=${2:-540} bash bench/gpu_engine.sh; else echo "skipped: gpu_engine"; fi
exit 0
