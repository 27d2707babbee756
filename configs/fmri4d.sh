#!/usr/bin/env bash
# Functional MRI, second time step, anisotropic voxels (2, 2, 2.2 mm): the scene box keeps the aspect ratio.
set -euo pipefail
BIN=${BIN:-.venv/bin}
DATA=${DATA:-../shared/data/fmri4d}
"$BIN/ns-train" gridinr-fit --vis tensorboard --timestamp fmri4d-t2 --viewer.quit-on-train-completion True \
  --pipeline.datamanager.dataparser.data "$DATA" \
  --pipeline.datamanager.dataparser.timestep 2 \
  --pipeline.datamanager.dataparser.render.preset "fMRI BOLD" "$@"
"$BIN/ns-eval" --load-config outputs/fmri4d/gridinr-fit/fmri4d-t2/config.yml --output-path outputs/fmri4d/fit_eval_t2.json
