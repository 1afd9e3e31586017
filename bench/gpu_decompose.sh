#!/usr/bin/env bash
# The decomposition-latency device check (docs/benchmarks.md, "GPU checks"): bench/gpu_check.py's inference cases only, with
# bf16 weights, comparing the settings base / cudnn (cuDNN autotuning) / cudnn+cl (plus the VAE and the alpha
# decoder channels-last), each decomposition with its stage breakdown. Run on the lent GPU machine from the
# repository root with the wheels in .whl (diffusers, importlib-metadata, zipp) carried; writes under $OUT.
#   bash bench/gpu_decompose.sh [seconds]
set -u
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout "${1:-420}" python3 bench/gpu_check.py --only vae bare_sample decompose --infer-dtypes bf16 \
  --infer-variants base cudnn cudnn+cl --out "$OUT/gpu_check_decompose.json" 2>&1 | tee "$OUT/gpu_check_decompose.log"
exit 0
