#!/usr/bin/env bash
# Decoding and training speed on one CUDA GPU against the card's measured floors (bandwidth by a
# device-to-device copy, bf16 matmul peak): AR decoding at batch 1, MDM network calls at batch 1
# and 64, prefix/dual caches vs none, the sampler's overhead, eager vs compiled decoding (--compile's
# torch.compile + CUDA graphs), MDM vs AR training tokens/s and MFU
# at 85m and 350m (benchmarks/gpu_speed.py; goals in docs/benchmarks.md, 'GPU speed'). Sized for
# under 8 minutes on one H100, compilation included. Writes $OUT/results.{json,md}, log.txt and nvidia-smi.txt.
#   bash benchmarks/gpu_speed.sh                       (OUT defaults to benchmarks/results/gpu_speed)
#   OUT=/tmp/speed bash benchmarks/gpu_speed.sh --smoke  (every part on the CPU at tiny shapes, < 1 min)
# PYTHON: an interpreter with CUDA torch and unmask's dependencies (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "${1:-}" = "--smoke" ]; then
  OUT="${OUT:-$(mktemp -d)}"
  exec "$PY" benchmarks/gpu_speed.py --smoke --out "$OUT"
fi
OUT="${OUT:-benchmarks/results/gpu_speed}"
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
"$PY" benchmarks/gpu_speed.py --device cuda --compiled-decode --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
