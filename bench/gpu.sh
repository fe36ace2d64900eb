#!/usr/bin/env bash
# The GPU path, measured in one run on a machine with an NVIDIA GPU (run from anywhere in the checkout):
#
#   bench/gpu.sh              # the full run: about 30 GB of disk for three 7.2 GB models and the outputs
#   bench/gpu.sh --dry-run    # the same steps without a GPU: tiny models, --backend torch instead of cuda
#
# Environment: PYTHON (an interpreter with mergesmith's dependencies and a CUDA build of torch; default
# python3), MERGEKIT (mergekit-yaml 0.1.5 to compare with; default: the one on PATH, none: skipped),
# RUNS (runs per tool and method, default 1), MERGESMITH_BENCH_CACHE (where the models go, default
# .bench-cache/ in the checkout).
#
# Steps, each printed as it starts:
#   1. the device: nvidia-smi, and torch must see CUDA;
#   2. the tests the GPU path shares with the CPU (compiled loops, torch backend, methods, memory limit);
#   3. bench/gpu_check.py: every merge of bench/identity.py on the CPU and on the GPU, compared
#      (up to float rounding; DARE's dropped entries identical);
#   4. bench/speed.py on three bf16 models of the Llama-3.2-3B shape (made there, once), for ties,
#      dare_ties and slerp: mergesmith on the CPU with one worker per core (--memory-limit 32G: few
#      chunks), mergesmith --device cuda (its output compared with the CPU one), and mergekit --cuda.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RUNS=${RUNS:-1}
MERGEKIT=${MERGEKIT-$(command -v mergekit-yaml || true)}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1

if ((DRY)); then
  DEVICE=cpu DEVICE_ARGS="--backend torch" SHAPE=llama-tiny MERGEKIT_ARGS=""
  export MERGESMITH_BENCH_CACHE=${MERGESMITH_BENCH_CACHE:-$(mktemp -d)/bench-cache}
else
  DEVICE=cuda DEVICE_ARGS="--device cuda" SHAPE=llama3b MERGEKIT_ARGS="--cuda"
fi
CORES=$(nproc)

echo "== 1. device"
if ((DRY)); then
  echo "dry run: no GPU used ($DEVICE_ARGS stands in for --device cuda)"
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c 'import sys, torch; ok = torch.cuda.is_available(); print("torch", torch.__version__, "CUDA", torch.version.cuda, "available:", ok); sys.exit(0 if ok else "torch sees no CUDA GPU: install a CUDA build of torch")'
fi
"$PY" -c 'import mergesmith, numba, numpy; print("mergesmith from", mergesmith.__file__)'

echo "== 2. tests the GPU path shares with the CPU"
"$PY" -m pytest tests/test_native.py tests/methods tests/test_memory_limit.py tests/test_prefetch.py -q -p no:warnings

echo "== 3. every merge on $DEVICE against the CPU"
if ((DRY)); then
  "$PY" bench/gpu_check.py --device cpu
else
  "$PY" bench/gpu_check.py --device cuda
fi

echo "== 4. speed: $SHAPE, ties dare_ties slerp; CPU ($CORES workers), $DEVICE_ARGS, mergekit ${MERGEKIT_ARGS:-(CPU)}"
SPEED=(bench/speed.py --shape "$SHAPE" --methods ties dare_ties slerp --runs "$RUNS"
  --mergesmith "$PY -m mergesmith" "--extra=--workers $CORES --memory-limit 32G" "--device-args=$DEVICE_ARGS")
if [[ -n "$MERGEKIT" ]]; then
  SPEED+=(--mergekit "$MERGEKIT")
  [[ -n "$MERGEKIT_ARGS" ]] && SPEED+=("--mergekit-args=$MERGEKIT_ARGS")
else
  SPEED+=(--mergekit "")
  echo "no mergekit-yaml found (set MERGEKIT): mergekit skipped"
fi
"$PY" "${SPEED[@]}"
echo "== done: the GPU figures go in docs/performance.md (GPU path)"
