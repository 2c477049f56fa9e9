#!/usr/bin/env bash
# The decoding benchmark on one CUDA GPU (bf16): train the AR model at budget C and the MDM at C and
# 4C (85m preset by default), then the MDM-vs-AR table at batch 1 and 8, generation length 256.
# Results (JSON, Markdown, Pareto PNG, logs, training metrics) go to $OUT.
#   OUT=runs/gpu-sampling bash benchmarks/gpu_sampling.sh [STEPS]
# PRESET, DEVICE, LENGTH, BATCH_SIZE and REPEATS override the defaults (PRESET=tiny DEVICE=cpu for a dry run).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-sampling}
STEPS=${1:-500}
PRESET=${PRESET:-85m}
DEVICE=${DEVICE:-cuda}
PAIR=${PAIR:-/tmp/pair}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"; fi
$PY benchmarks/train_sampling_pair.py --out "$PAIR" --preset "$PRESET" --steps "$STEPS" --batch-size "${BATCH_SIZE:-16}" --multiples 1,4 \
  --device "$DEVICE" 2>&1 | tr '\r' '\n' | grep -v 'step/s' | tee "$OUT/train.log"
for run in "$PAIR"/*; do cp "$run/metrics.jsonl" "$OUT/$(basename "$run").metrics.jsonl"; done
$PY benchmarks/sampling.py --mdm "$PAIR/mdm-$PRESET-4x" --ar "$PAIR/ar-$PRESET" --device "$DEVICE" --batches 1,8 \
  --length "${LENGTH:-256}" --repeats "${REPEATS:-3}" --out "$OUT" 2>&1 | tee "$OUT/sampling.log"
