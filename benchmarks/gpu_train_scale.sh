#!/usr/bin/env bash
# GPU training-speed check on one CUDA device: bf16 tokens/s, MFU and peak memory for the small,
# 85m and 350m presets (MDM eager and compiled, AR compiled, FSDP compiled; 350m also with
# activation checkpointing). Writes $OUT/train_scale/results.{json,md} and the log.
#   OUT=/some/folder bash benchmarks/gpu_train_scale.sh            (~8 min; PRESETS=85m,350m to trim)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:?set OUT to an output folder}"
PY="${PYTHON:-python}"
mkdir -p "$OUT/train_scale"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" UNMASK_CACHE="${UNMASK_CACHE:-$OUT/cache}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/train_scale/nvidia-smi.csv" 2>&1 || true
"$PY" benchmarks/train_scale.py --device cuda --presets "${PRESETS:-small,85m,350m}" --out "$OUT/train_scale" 2>&1 | tee "$OUT/train_scale/log.txt"
