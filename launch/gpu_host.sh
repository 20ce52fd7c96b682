#!/usr/bin/env bash
# Runs an mmjax experiment on one host with N GPUs (a single JAX process sees them all).
#
#   launch/gpu_host.sh [--gpus 0,1,2,3] -- --config experiments/clip.py:B/32 --workdir runs/b32
#
# Creates .venv with the `gpu` extra on first use, pins the visible GPUs, lets XLA use most of
# their memory and logs to <workdir>/train.log as well as the terminal. The mesh comes from the
# config (`--config.mesh.fsdp=-1` spreads parameters over all visible GPUs).
set -euo pipefail
gpus=""
if [ "${1:-}" = "--gpus" ]; then
  gpus=$2
  shift 2
fi
if [ "${1:-}" != "--" ]; then
  echo "usage: $0 [--gpus 0,1,...] -- TRAIN_ARGS..." >&2
  exit 2
fi
shift
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[gpu]'
fi
[ -n "$gpus" ] && export CUDA_VISIBLE_DEVICES=$gpus
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
workdir=""
prev=""
for arg in "$@"; do
  [ "$prev" = "--workdir" ] && workdir=$arg
  case $arg in --workdir=*) workdir=${arg#--workdir=} ;; esac
  prev=$arg
done
if [ -z "$workdir" ]; then
  echo "error: pass --workdir DIR" >&2
  exit 2
fi
mkdir -p "$workdir"
set -o pipefail
.venv/bin/python -m mmjax.train "$@" 2>&1 | tee -a "$workdir/train.log"
