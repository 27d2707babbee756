#!/usr/bin/env bash
# The smallest useful field: 8 levels x 1 feature and a linear decoder (the CPU default, 8 x 2 with a hidden layer
# of 16, is about 1.5x the cost per step and sample, and much better on a brain MRI: docs/cpu_profiles.md). It
# trains 1000 iterations in about 25 s and renders the INR itself (field cache off, below) cheaply; then measures
# it with ns-eval and gridinr-bench render.
set -euo pipefail
BIN=${BIN:-.venv/bin}
DATA=${DATA:-../shared/data/c60}
"$BIN/ns-train" gridinr-fit --vis tensorboard --timestamp compact --viewer.quit-on-train-completion True \
  --pipeline.datamanager.dataparser.data "$DATA" \
  --pipeline.model.field.num-levels 8 --pipeline.model.field.features-per-level 1 \
  --pipeline.model.field.num-hidden-layers 0 --pipeline.model.field-cache-resolution -1 "$@"
CONFIG=$(ls -d outputs/*/gridinr-fit/compact/config.yml | head -n 1)
"$BIN/ns-eval" --load-config "$CONFIG" --output-path "$(dirname "$CONFIG")/fit_eval.json"
"$BIN/gridinr-bench" render --load-config "$CONFIG" --json "$(dirname "$CONFIG")/bench_render.json"
