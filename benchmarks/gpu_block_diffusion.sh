#!/usr/bin/env bash
# The block-diffusion benchmark on one CUDA GPU (bf16 autocast in training): AR, the MDM and block
# models L' in {1, 4, 16, L} trained on the embedded corpus with the same tokens, then the bound vs
# block size and decoding quality vs speed. Results (JSON, Markdown, PNG, log) go to $OUT.
#   OUT=runs/gpu-bd3 bash benchmarks/gpu_block_diffusion.sh [STEPS]
# PRESET, CONTEXT, DEVICE, LENGTH, SAMPLES, WINDOWS override the defaults (DEVICE=cpu PRESET=tiny for a dry run);
# FLEX=1 trains the block models through FlexAttention instead of SDPA with a boolean mask.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-bd3}
STEPS=${1:-600}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"; fi
$PY benchmarks/block_diffusion.py --out "$OUT" --runs "$OUT/runs" --device "$DEVICE" --preset "${PRESET:-small}" \
  --context "${CONTEXT:-256}" --steps "$STEPS" --batch 32 --windows "${WINDOWS:-64}" --draws 16 --samples "${SAMPLES:-16}" \
  --length "${LENGTH:-240}" --repeats 3 ${FLEX:+--flex-attention} 2>&1 | tee "$OUT/block_diffusion.log"
rm -rf "$OUT/runs"/*/checkpoints   # keep the metrics, not the weights
