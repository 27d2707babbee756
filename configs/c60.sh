#!/usr/bin/env bash
# C60 electron density: most of the volume is low, diffuse density; the "C60 Glow" preset shows the atoms.
set -euo pipefail
BIN=${BIN:-.venv/bin}
DATA=${DATA:-../shared/data/c60}
"$BIN/ns-train" gridinr-fit --vis tensorboard --timestamp c60 --viewer.quit-on-train-completion True \
  --pipeline.datamanager.dataparser.data "$DATA" \
  --pipeline.datamanager.dataparser.render.preset "C60 Glow" "$@"
CONFIG=outputs/c60/gridinr-fit/c60/config.yml
"$BIN/ns-eval" --load-config "$CONFIG" --output-path outputs/c60/fit_eval.json
# Stage 2: make it look like the prompt (needs CLIP weights in the cache; see README), keeping lam_pix * MSE.
if [ "${EDIT:-0}" = 1 ]; then
  "$BIN/ns-train" gridinr-edit --vis tensorboard --timestamp c60-edit --viewer.quit-on-train-completion True \
    --pipeline.stage1-config "$CONFIG" --pipeline.model.prompt "a glowing orange molecule"
fi
