#!/usr/bin/env bash
# GPU training-speed check on one CUDA device: bf16 tokens/s, MFU and peak memory for the small,
# 85m and 350m presets (MDM eager and compiled, AR compiled, FSDP compiled; the last preset also
# with activation checkpointing). Writes $OUT/train_scale_<presets>/results.{json,md}, log.txt
# and nvidia-smi.csv.
#   OUT=/some/folder bash benchmarks/gpu_train_scale.sh                    (all three presets, 13 rows)
#   OUT=/some/folder PRESETS=small,85m bash benchmarks/gpu_train_scale.sh  (a part, to fit a time limit)
# PYTHON: an interpreter with CUDA torch, numpy, tokenizers, safetensors and tqdm (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:?set OUT to an output folder}"
PY="${PYTHON:-python}"
PRESETS="${PRESETS:-small,85m,350m}"
DEST="$OUT/train_scale_${PRESETS//,/_}"
mkdir -p "$DEST"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" UNMASK_CACHE="${UNMASK_CACHE:-$OUT/cache}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$DEST/nvidia-smi.csv" 2>&1 || true
"$PY" benchmarks/train_scale.py --device cuda --presets "$PRESETS" --out "$DEST" 2>&1 | tee "$DEST/log.txt"
