#!/usr/bin/env bash
# The main job: install, fetch the offline corpora, harvest SmolLM2 activations, train a seed ensemble, measure
# per-feature stability and ablate stable vs unstable latents, and write a report and a feature browser under
# results/pipeline/.
set -euo pipefail
cd "$(dirname "$0")/.."
# The pipeline's report states the whole command's wall time and the machine's load when it started.
export PIPELINE_MAIN_STARTED="${PIPELINE_MAIN_STARTED:-$(date +%s)}"
export PIPELINE_MAIN_LOAD="${PIPELINE_MAIN_LOAD:-$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || true)}"
bash scripts/install.sh
python -m lime_jax.corpora fetch
python -m experiments.pipeline "$@"
