#!/usr/bin/env bash
# All setup, then ruff and the whole test suite (about 10-12 minutes on 2 CPU cores, setup included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests bench
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
