#!/usr/bin/env bash
# The whole GPU check in one command, on a lent GPU machine (see ../shared/gpu/README.md and README "GPU").
#
#   here, once:          bash ../shared/gpu/prepare.sh          (copies the wheels, tiny-cuda-nn and data into .gpu/)
#   on the GPU machine:  bash scripts/gpu_check.sh [--quick]    (with .gpu/ carried along; about 6-8 min, --quick ~3)
#
# Steps, each in its own process (a crash in one, e.g. a tiny-cuda-nn segfault, does not stop the others), each
# with a time limit; the log says the exit status of each. Results go to $OUT (or gpu_results/): gpu_check.log
# (everything) and the benchmarks' JSON files. Environment: SECONDS_PER_CONTENDER (fit bench, default 5),
# FIT_ITERATIONS (ns train, default 1000), NO_TCNN=1 (skip building tiny-cuda-nn).
set -u
cd "$(dirname "$0")/.."
out=${OUT:-gpu_results}
mkdir -p "$out"
log="$out/gpu_check.log"
quick=0; [ "${1:-}" = "--quick" ] && quick=1
seconds=${SECONDS_PER_CONTENDER:-$([ $quick = 1 ] && echo 2 || echo 5)}
iterations=${FIT_ITERATIONS:-$([ $quick = 1 ] && echo 300 || echo 1000)}
data=.gpu/data/c60
[ -d "$data" ] || data=${DATA:-../../shared/data/c60}  # DATA=... elsewhere

exec > >(tee -a "$log") 2>&1
echo "== gpu_check $(date -u +%FT%TZ) quick=$quick"
if [ -f .gpu/device-env.sh ]; then
  if [ "${NO_TCNN:-0}" = 1 ]; then . .gpu/device-env.sh; else . .gpu/device-env.sh --tcnn; fi
else
  echo "no .gpu/device-env.sh: run 'bash ../shared/gpu/prepare.sh' here first (using the current environment)"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
py=python3
train="ns train"; command -v ns >/dev/null || train=ns-train  # device-env.sh puts `ns` on PATH
bench="$py -m gridinr_nerfstudio.scripts.bench.cli"

step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  echo; echo "== $name: $*"
  local started=$(date +%s)
  timeout "$limit" "$@"
  local rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - started )) s$([ $rc = 139 ] && echo ' (SEGFAULT)')$([ $rc = 124 ] && echo ' (TIMEOUT)')"
  return $rc
}

have_tcnn=$($py -c "from gridinr_nerfstudio.fields.hash_grid._backend import tcnn_available as t; print(int(t()))" 2>/dev/null || echo 0)
echo "tiny-cuda-nn importable: $have_tcnn"

# 1. Correctness: the compiled Triton kernels and tcnn vs the torch backend (tcnn alone first: build or wrapper?).
step cuda_tests 300 $py -X faulthandler -m pytest -q -p no:cacheprovider tests/test_hash_grid_cuda.py -k "not tcnn"
if [ "$have_tcnn" = 1 ]; then
  step tcnn_alone 120 $py -X faulthandler -m pytest -q -p no:cacheprovider tests/test_hash_grid_cuda.py -k tcnn_encoding_alone \
    && step tcnn_vs_torch 180 $py -X faulthandler -m pytest -q -p no:cacheprovider tests/test_hash_grid_cuda.py -k "tcnn and not alone"
fi
[ $quick = 1 ] || step triton_interpreter 300 env TRITON_INTERPRET=1 $py -m pytest -q -p no:cacheprovider tests/test_hash_grid_triton.py \
  tests/test_hash_grid_triton_fused.py

# 2. Encoding alone (16 x 2, table 2^19, batch 2^20): triton, torch, torch.compile, nerfstudio; tcnn separately.
#    With triton also field inference: fused Triton kernel vs encoding + torch MLP (2 x 64, 2^16 and 2^20 points).
step bench_encoding 300 $bench encoding --device cuda --backends triton,torch $([ $quick = 1 ] || echo --compile) \
  --json "$out/encoding.json"
[ "$have_tcnn" = 1 ] && step bench_encoding_tcnn 120 $bench encoding --device cuda --backends tcnn --no-nerfstudio \
  --json "$out/encoding_tcnn.json"

# 3. Stage-1 fitting at equal time on c60: backends, dense vs lazy table optimizer, float16 decoder (ours_mixed),
#    PSNR over time (45 dB in 5 s?).
step bench_fit 400 $bench fit --data "$data" --device cuda --seconds "$seconds" --curve 1,2,3 \
  --contenders ours,ours_mixed,ours_torch,ours_dense,nerfstudio_torch --json "$out/fit.json"
[ "$have_tcnn" = 1 ] && step bench_fit_tcnn 200 $bench fit --data "$data" --device cuda --seconds "$seconds" --curve 1,2,3 \
  --contenders ours_tcnn,ours_triton --json "$out/fit_tcnn.json"

# 4. ns train end to end (timed), then the render benchmark on that run.
runs=/tmp/gpu_check_runs
rm -rf "$runs"
step ns_train 400 $train gridinr-fit --data "$data" --vis tensorboard --viewer.quit-on-train-completion True \
  --output-dir "$runs" --timestamp fit --max-num-iterations "$iterations"
# The same run with batches made on the host (prefetched in a thread, pinned copies): compare its step time.
step ns_train_pinned 400 $train gridinr-fit --data "$data" --vis tensorboard --viewer.quit-on-train-completion True \
  --output-dir "$runs" --timestamp pinned --max-num-iterations "$iterations" --pipeline.datamanager.device-resident off
config=$(ls "$runs"/*/gridinr-fit/fit/config.yml 2>/dev/null | head -1)
if [ -n "$config" ]; then
  step bench_render 300 $bench render --load-config "$config" --device cuda --backends triton,torch --json "$out/render.json"
fi
echo; echo "== done $(date -u +%FT%TZ); results in $out"; ls -la "$out"
