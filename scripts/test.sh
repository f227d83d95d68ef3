#!/usr/bin/env bash
# Installs everything the tests need, then runs the whole suite (slow real-model tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# pytest exits 5 when it collects no test; with `set -e` that fails the run instead of passing silently.
python -m pytest -q tests "$@"
