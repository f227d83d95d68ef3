#!/usr/bin/env bash
# The main job: install, fetch the offline corpora, harvest SmolLM2 activations, train a seed ensemble,
# evaluate it by splicing into the model, and write a report under results/pipeline/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python -m lime_jax.corpora fetch
python -m experiments.pipeline "$@"
