#!/usr/bin/env bash
# Installs everything the tests need, then runs the whole suite (slow real-model tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# tests/test_browse.py opens the feature browser in a real headless Chromium (Debian's packages; CI runs as root).
# Without it that test fails, as it should: install it here rather than let any tool download a browser.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get install -y chromium chromium-driver || { apt-get update && apt-get install -y chromium chromium-driver; }
  else
    echo "scripts/test.sh: chromium/chromedriver missing and not root; tests/test_browse.py will fail" >&2
  fi
fi
# pytest exits 5 when it collects no test; with `set -e` that fails the run instead of passing silently.
# Two workers: many tests start real processes (CLIs, 2-process jobs) whose start-up and compiles are single-threaded
# (on this 2-core machine: 13 min instead of 18). `loadgroup` keeps the smoke runs on one worker (they share one
# command process and one fake corpus); the longest files start first (tests/conftest.py). `-n 0`: one process.
python -m pytest -q -n 2 --dist loadgroup tests "$@"
