#!/usr/bin/env bash
# The decoding benchmark on one CUDA GPU (bf16): train the AR model at budget C and the MDM at C and
# 4C on the 85m preset, then the MDM-vs-AR table at batch 1 and 8, generation length 256.
# Results (JSON, Markdown, Pareto PNG, logs) go to $OUT (default runs/gpu-sampling).
#   OUT=runs/gpu-sampling bash benchmarks/gpu_sampling.sh [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-sampling}
STEPS=${1:-500}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
$PY benchmarks/train_sampling_pair.py --out /tmp/pair --preset 85m --steps "$STEPS" --batch-size 16 --multiples 1,4 --device cuda \
  2>&1 | grep -v 'step/s]' | tee "$OUT/train.log"
for run in /tmp/pair/*; do cp "$run/metrics.jsonl" "$OUT/$(basename "$run").metrics.jsonl"; done
$PY benchmarks/sampling.py --mdm /tmp/pair/mdm-85m-4x --ar /tmp/pair/ar-85m --device cuda --batches 1,8 --length 256 \
  --out "$OUT" 2>&1 | tee "$OUT/sampling.log"
