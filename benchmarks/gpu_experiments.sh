#!/usr/bin/env bash
# The experiments on one CUDA GPU, in a few minutes: a short IsoFLOP grid (3 budgets x 3 sizes x MDM/AR,
# context 512, the shipped 4096-token tokenizer), then reverse curse, conditional generation and distribution
# shift at their defaults, and the reverse-curse ablation's base at a larger size (RCA_LIMIT seconds, default 1800).
# Results (results.json, results.md, PNGs, per-run result.json and metrics.jsonl) go to $OUT; checkpoints do not.
#   OUT=runs/gpu-experiments bash benchmarks/gpu_experiments.sh
# GRID (default experiments/grids/gpu-short.json; `gpu` is the full grid, hours), DEVICE, WORK (where the runs
# live; the same WORK resumes them), RC_ARGS, RCA_ARGS, CG_ARGS and SHIFT_ARGS (extra flags of those commands) override.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-experiments}
GRID=${GRID:-experiments/grids/gpu-short.json}
DEVICE=${DEVICE:-cuda}
WORK=${WORK:-runs/gpu-work}
mkdir -p "$OUT" "$WORK"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ "$DEVICE" != cpu ]; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"; fi
run() {  # name, time limit in seconds, command...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
}
run scaling 270 $PY -m unmask experiment scaling --grid "$GRID" --out "$WORK/scaling" --device "$DEVICE"
run reverse-curse 120 $PY -m unmask experiment reverse-curse --out "$WORK/reverse-curse" --device "$DEVICE" ${RC_ARGS:-}
# the reverse-curse ablation's base at GPT-2-small size (12 layers, width 768), packed facts alone, mixed with Shakespeare, and the
# plain template only, 10000 steps of 64 windows of 64 tokens each, with AR controls; resumable: a second call continues it
run reverse-curse-large "${RCA_LIMIT:-1800}" $PY -m unmask experiment reverse-curse-ablation --out "$WORK/reverse-curse-large" \
  --points base,mixed,paraphrases1 --ar-points base,mixed --n-layer 12 --n-embd 768 --n-head 12 --context-len 64 --batch-size 64 \
  --steps 10000 --device "$DEVICE" ${RCA_ARGS:-}
run conditional 120 $PY -m unmask experiment conditional --out "$WORK/conditional" --device "$DEVICE" ${CG_ARGS:-}
run shift 90 $PY -m unmask experiment shift --out "$WORK/shift" --device "$DEVICE" ${SHIFT_ARGS:-}
# everything but checkpoints and prepared data (a later call with the same WORK resumes where this one stopped)
(cd "$WORK" && find -L . -path '*/checkpoints' -prune -o -path '*/data' -prune -o -type f -print | tar cf - -T -) | tar xf - -C "$OUT"
