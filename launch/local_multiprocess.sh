#!/usr/bin/env bash
# Runs one command as N cooperating JAX processes on this machine (CPU devices, gloo
# collectives, coordinator on 127.0.0.1): the multi-host code path without a cluster.
#
#   launch/local_multiprocess.sh 2 4 python -m mmjax.train \
#       --config experiments/clip.py:tiny --workdir runs/clip_2proc
#
# NUM_PROCESSES processes with DEVICES_PER_PROCESS CPU devices each; process i logs to
# $LOG_DIR/process_i.log (default: the current directory) and process 0 also to the terminal.
# Exits with the first non-zero exit status of any process.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS COMMAND..." >&2
  exit 2
fi
num=$1 devices=$2
shift 2
port=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
log_dir=${LOG_DIR:-.}
mkdir -p "$log_dir"
pids=()
for ((i = 0; i < num; i++)); do
  (
    export JAX_PLATFORMS=cpu
    export JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
    export XLA_FLAGS="--xla_force_host_platform_device_count=$devices"
    export MMJAX_DISTRIBUTED=1
    export JAX_COORDINATOR_ADDRESS="127.0.0.1:$port"
    export JAX_NUM_PROCESSES=$num
    export JAX_PROCESS_ID=$i
    if [ "$i" -eq 0 ]; then
      "$@" 2>&1 | tee "$log_dir/process_$i.log"
    else
      "$@" >"$log_dir/process_$i.log" 2>&1
    fi
  ) &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || { rc=$?; [ "$status" -ne 0 ] || status=$rc; }
done
exit "$status"
