#!/usr/bin/env bash
# Build mmguard-mini v1 from scratch: data (permissive train split) -> training -> weights -> eval.
# v1 is no longer the bundled default (mini v2, make mini, is): its weights go to build/, not the package.
# Usage: scripts/make_mini_v1.sh [DATASETS_DIR] [WORK_DIR]     (make mini-v1; make mini builds v2)
# Deterministic given SEED with the same thread count, unless MAX_MINUTES cuts the run short.
set -euo pipefail
DATASETS=${1:-${DATASETS:-shared/datasets}}
WORK=${2:-${WORK:-build/mini-v1}}
SEED=${SEED:-0}
STEPS=${STEPS:-10000}
MAX_MINUTES=${MAX_MINUTES:-52}
PY=${PY:-.venv/bin}
ASSET=${ASSET:-$WORK/model}

mkdir -p "$WORK"
if [ ! -f "$WORK/data/train.jsonl" ]; then
  "$PY/mmguard" data build --datasets "$DATASETS" --out "$WORK/data" --max-per-source 6000 --no-noncommercial --seed "$SEED" \
    --typographic 4000 --response-with-image 600
fi
"$PY/mmguard" train --data "$WORK/data/train.jsonl" --init mini --out "$WORK/run" \
  --steps "$STEPS" --lr 2e-3 --batch-size 8 --augment 0.15 --max-seq-len 768 --seed "$SEED" --threads 2 \
  --save-every 1000 --log-every 100 --unsafe-repeat 3 --save-dtype bfloat16 --max-minutes "$MAX_MINUTES"
mkdir -p "$ASSET"
# No tokenizer files (17 MB): the engine falls back to the identical Llama 3 tokenizer built from llama-models.
rm -f "$ASSET"/*.json "$ASSET"/*.safetensors
for f in config.json generation_config.json model.safetensors preprocessor_config.json training_summary.json; do
  [ -f "$WORK/run/$f" ] && cp "$WORK/run/$f" "$ASSET/"
done
chmod a+r "$ASSET"/*  # the trainer writes the weights owner-only; the package must be readable by all
SIZE=$(du -cb "$ASSET"/* | tail -1 | cut -f1)
echo "mmguard-mini: $SIZE bytes"
[ "$SIZE" -le $((30 * 1024 * 1024)) ] || { echo "error: mmguard-mini exceeds 30 MiB" >&2; exit 1; }
if [ "${EVAL:-1}" = "1" ]; then
  "$PY/mmguard" eval --data "$WORK/data/test.jsonl" --guard "mini=local:$ASSET" --out "$WORK/eval" --no-plots
fi
