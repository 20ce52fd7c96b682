#!/usr/bin/env bash
# Runs an mmjax experiment on every worker of a Cloud TPU VM slice (multi-host).
#
#   launch/tpu_pod.sh NAME ZONE ACCELERATOR_TYPE -- --config experiments/clip.py:B/16 \
#       --workdir /gcs/my-bucket/clip_b16 --config.data.path=/gcs/my-bucket/shards
#
# Creates the slice if it does not exist (RUNTIME picks the TPU software version, SPOT=1 asks
# for spot capacity), copies this checkout to every worker (git archive of HEAD plus uncommitted
# changes of tracked files), installs it with the `tpu` extra in a venv, and runs
# `python -m mmjax.train` on all workers at once with `gcloud ... ssh --worker=all`.
# jax.distributed.initialize() discovers the other workers by itself on TPU VMs.
# Each worker logs to ~/mmjax/logs/<hostname>.log; LOGS_ONLY=1 just copies the logs of all
# workers into ./tpu_logs/. The workdir must be storage every worker sees (a gcsfuse mount
# or Filestore NFS): checkpoints are written by all workers together.
set -euo pipefail
if [ $# -lt 4 ] || [ "$4" != "--" ]; then
  echo "usage: $0 NAME ZONE ACCELERATOR_TYPE -- TRAIN_ARGS..." >&2
  exit 2
fi
name=$1 zone=$2 accelerator=$3
shift 4
runtime=${RUNTIME:-v2-alpha-tpuv5}
tpu=(gcloud compute tpus tpu-vm)

if [ "${LOGS_ONLY:-0}" = 1 ]; then
  mkdir -p tpu_logs
  "${tpu[@]}" scp --recurse "$name:~/mmjax/logs/*" tpu_logs/ --worker=all --zone "$zone"
  exit 0
fi

if ! "${tpu[@]}" describe "$name" --zone "$zone" >/dev/null 2>&1; then
  extra=()
  [ "${SPOT:-0}" = 1 ] && extra+=(--spot)
  "${tpu[@]}" create "$name" --zone "$zone" --accelerator-type "$accelerator" \
    --version "$runtime" "${extra[@]}"
fi

archive=$(mktemp -d)/mmjax.tar.gz
stash=$(git stash create)
git archive --format=tar.gz -o "$archive" "${stash:-HEAD}"
"${tpu[@]}" scp "$archive" "$name:~/mmjax.tar.gz" --worker=all --zone "$zone"
"${tpu[@]}" ssh "$name" --worker=all --zone "$zone" --command "
  set -e; rm -rf ~/mmjax && mkdir -p ~/mmjax/logs && tar xzf ~/mmjax.tar.gz -C ~/mmjax
  cd ~/mmjax && python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[tpu]'"

args=$(printf ' %q' "$@")
"${tpu[@]}" ssh "$name" --worker=all --zone "$zone" --command "
  cd ~/mmjax && MMJAX_DISTRIBUTED=1 .venv/bin/python -m mmjax.train$args \
    > logs/\$(hostname).log 2>&1; status=\$?; tail -n 3 logs/\$(hostname).log; exit \$status"
