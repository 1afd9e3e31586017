#!/usr/bin/env bash
# The device check of both GPU scripts in one call (docs/benchmarks.md, "GPU checks"). Run on the lent GPU machine from the
# repository root with the wheels in .whl (diffusers, segment-anything, pymatting, importlib-metadata and
# lazy-importer; see docs/benchmarks.md) carried; writes the JSON and logs under $OUT (default bench/results).
#   bash bench/gpu_run.sh [check-seconds] [engine-seconds] [engine-serial-seconds] [engine-fp32-seconds]
# A limit of 0 skips that run. The engine runs over 16 scenes (the count). The third (default 0) reruns
# the engine's end-to-end case with --no-cpu-overlap (CPU pre/post-processing in line, between GPU stages) and the
# fourth (default 0) with fp32 weights under bf16 autocast: baselines on the same card.
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
run "${2:-300}" gpu_engine python3 bench/gpu_engine.py
run "${3:-0}" gpu_engine_serial python3 bench/gpu_engine.py --cases e2e --no-cpu-overlap
run "${4:-0}" gpu_engine_fp32 python3 bench/gpu_engine.py --cases e2e --weights-dtype fp32
exit 0
