#!/usr/bin/env bash
# All setup, then the main job: classify example conversations with the bundled default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/mmguard demo "$@"
