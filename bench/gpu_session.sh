#!/usr/bin/env bash
# The GPU benchmark on a lent H200 in one device call.
#
# Here, once:   bash bench/gpu_session.sh fetch
#   downloads into .wheels-gpu/ (ignored by git) the wheels the device image lacks or has too old, at the
#   versions this checkout's .venv runs: transformers (the image has 5.17), llama-models (the Llama 3
#   tokenizer file), torchao (fp8).
# There:        bash bench/gpu_session.sh run [gpu_throughput.py options]     (device run, carry .wheels-gpu)
#   installs them into /tmp/site and runs bench/gpu_throughput.py --approx --quantize fp8 (bounded at 540 s
#   unless --max-seconds says otherwise); JSON and log land in $OUT (or here).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.wheels-gpu

case "${1:-}" in
fetch)
  PY=.venv/bin/python
  [ -x "$PY" ] || { echo "run bash scripts/setup.sh first" >&2; exit 2; }
  grep -qx "/$WHEELS/" .git/info/exclude 2>/dev/null || echo "/$WHEELS/" >> .git/info/exclude
  specs=()
  for pkg in transformers llama-models torchao; do
    specs+=("$pkg==$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$pkg")")
  done
  rm -rf "$WHEELS"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" "${specs[@]}" 2>&1 | grep -v "^WARNING: Location" || true
  ls -l "$WHEELS"
  du -sh "$WHEELS"
  ;;
run)
  shift
  ls "$WHEELS"/*.whl >/dev/null || { echo "no wheels in $WHEELS: run 'fetch' here and carry $WHEELS" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
  out="${OUT:-.}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
  set -o pipefail
  python3 bench/gpu_throughput.py --approx --quantize fp8 --out "$out/gpu_throughput.json" "$@" 2>&1 \
    | tee "$out/gpu_throughput.log"
  ;;
*)
  echo "usage: bash bench/gpu_session.sh fetch | run [gpu_throughput.py options]" >&2
  exit 2
  ;;
esac
