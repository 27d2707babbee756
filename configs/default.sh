#!/usr/bin/env bash
# Stage 1 + 2 on the built-in volume with the default transfer function.
set -euo pipefail
BIN=${BIN:-.venv/bin}
"$BIN/ns-train" gridinr-fit --vis tensorboard --timestamp default --viewer.quit-on-train-completion True "$@"
CONFIG=$(ls -d outputs/builtin-default/gridinr-fit/default/config.yml)
"$BIN/ns-eval" --load-config "$CONFIG" --output-path outputs/builtin-default/fit_eval.json
