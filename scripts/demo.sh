#!/usr/bin/env bash
# Set up (scripts/install.sh) and run the demo on the bundled real model (SmolLM2-135M-Instruct).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python3}" scripts/demo.py --data-dir "${MOH_DATA_DIR:-../shared/data}" "$@"
