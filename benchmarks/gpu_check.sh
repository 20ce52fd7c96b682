#!/usr/bin/env bash
# The GPU checks of the accelerators work, as one prepared run: under 10 minutes on one
# H100 or H200, one JSON line per measurement on stdout.
#   1. benchmarks/attention.py --backend gpu: mmjax's Triton kernel ("pallas"), what models
#      run ("auto": cuDNN for full / causal, Triton for the rest), cuDNN and JAX's Pallas
#      `mha`, at S = 4k and 16k, d = 128, bf16, 16 heads, every mask; forward and
#      forward + backward median times, TFLOP/s, compiled peak memory.
#   2. benchmarks/gpu_step.py: a Transfusion 1.4B training step (4 x 4,096 tokens) and its MFU.
# Needs mmjax with the gpu extra: pip install -e '.[gpu]'. Usage: bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
"$PY" -c "import jax; print(jax.devices()[0].device_kind, jax.__version__)" >&2
timeout 420 "$PY" benchmarks/attention.py --backend gpu --dtype bfloat16 --head_dim 128 \
    --heads 16 --seq 4096 16384 --repeats 5 --max_time_seq '{"xla": 4096}'
timeout 150 "$PY" benchmarks/gpu_step.py --config experiments/transfusion.py:1.4B --batch 4 \
    --steps 10
