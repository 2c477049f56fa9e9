#!/usr/bin/env bash
# The few-step generation benchmark on one CUDA GPU (bf16 autocast in training, fp32 sampling):
# AR, MDM, UDLM and Duo of the 85m preset trained with the same tokens (context 1024, STEPS steps x
# 16 sequences each; Duo's curriculum the first half), the AR judge (seed 1, 2 x STEPS), SDTT of the
# MDM and DCD of Duo (5 rounds of DISTILL steps: 1024 -> 32 sampling steps), then the validation
# bounds (64 windows x 16 draws) and gen-PPL + entropy + seconds per sample at 8, 16, 32, 64, 128
# and 1024 steps, 16 samples of 1023 tokens, median of 3 repeats.
# Data: the embedded corpus (1.5M training tokens: the default 1000 steps are 11 epochs), or
# DATA=<folder from `unmask data prepare`> for a larger one (then raise STEPS).
# Results (JSON, Markdown, PNG, log, training metrics) go to $OUT.
#   OUT=runs/gpu-few-steps bash benchmarks/gpu_few_steps.sh [STEPS]
# PRESET, CONTEXT, DEVICE, SAMPLES, REPEATS, DISTILL, ROUNDS, DATA override the defaults
# (PRESET=tiny CONTEXT=64 DEVICE=cpu DISTILL=4 ROUNDS=2 SAMPLES=2 REPEATS=1 ... gpu_few_steps.sh 20: a dry run).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-few-steps}
STEPS=${1:-1000}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"; fi
$PY benchmarks/few_steps.py --out "$OUT" --runs "$OUT/runs" --device "$DEVICE" --preset "${PRESET:-85m}" --context "${CONTEXT:-0}" \
  --steps "$STEPS" --batch 16 --distill-rounds "${ROUNDS:-5}" --distill-steps "${DISTILL:-200}" --sampling-steps 8,16,32,64,128,1024 \
  --samples "${SAMPLES:-16}" --repeats "${REPEATS:-3}" --windows 64 --draws 16 ${DATA:+--data "$DATA"} 2>&1 \
  | tr '\r' '\n' | grep -v 'step/s' | tee "$OUT/few_steps.log"
for run in "$OUT"/runs/*; do cp "$run/metrics.jsonl" "$OUT/$(basename "$run").metrics.jsonl"; done
rm -rf "$OUT"/runs/*/checkpoints "$OUT"/runs/*/teachers   # keep the metrics, not the weights
