"""One training step of a paper preset on this machine's accelerator: step time and MFU.

  python benchmarks/gpu_step.py [--config experiments/transfusion.py:1.4B] [--batch 4] \
      [--steps 10] [key=value ...]

Builds the trainer's own jitted step (`Trainer.jit_train_step`: loss, grads, clipping,
AdamW, donated state) for the config on one device, feeds it `--batch` copies of a
synthetic example laid out by the config's own preprocessing (`mmjax.data.synthetic_example`:
4,096-token Transfusion sequences for the paper presets), compiles, warms up, and times
`--steps` steps. Prints one JSON line: median step seconds, tokens/s, model FLOPs per step
(the step's matmul FLOPs without recomputation: `mmjax.aot.model_flops`) and MFU
against the card's published dense bf16 peak (`mmjax.parallel.chips`; H100 / H200 SXM
989.5 TFLOP/s). `key=value` arguments override the config (e.g. `model.remat_policy=dots`).
Run by benchmarks/gpu_check.sh.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def _peak(device_kind: str, override: float) -> float:
    from mmjax.parallel.chips import CHIPS

    if override:
        return override * 1e12
    for key in ("h200", "h100"):
        if key in device_kind.lower():
            return CHIPS[key].peak_flops_bf16
    raise SystemExit(f"no published peak for {device_kind!r}: pass --peak_tflops")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/transfusion.py:1.4B")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="default: the card's")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = parser.parse_args()

    import flax.linen as nn
    import jax
    import numpy as np

    from mmjax import data as mmdata
    from mmjax.aot import model_flops
    from mmjax.train.config_cli import apply_overrides, load_config
    from mmjax.train.loop import Trainer

    config = load_config(args.config)
    apply_overrides(
        config, [f"batch_size={args.batch}", "mesh.data=1", "mesh.fsdp=1", *args.overrides]
    )
    tokenizer = mmdata.sized_tokenizer(config.data)
    trainer = Trainer(config, None, devices=jax.devices()[:1], tokenizer=tokenizer)
    example = mmdata.synthetic_example(config.data, tokenizer)
    batch = {k: np.stack([np.asarray(v)] * args.batch) for k, v in example.items()}
    state, shardings = trainer.init_state(batch)
    step = trainer.jit_train_step(shardings)
    with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
        flops = model_flops(trainer, state, batch, "cuda")
        t0 = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        batch = jax.device_put(batch)
        for _ in range(args.warmup):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    device = jax.devices()[0].device_kind
    tokens = args.batch * int(np.prod(example["tokens"].shape)) if "tokens" in example else None
    row = {
        "benchmark": "gpu_step",
        "config": args.config,
        "device": device,
        "batch": args.batch,
        "compile_s": round(compile_s, 1),
        "median_step_s": round(median, 4),
        "tokens_per_s": round(tokens / median) if tokens else None,
        "model_tflops_per_step": round(flops / 1e12, 2),
        "mfu": round(flops / median / _peak(device, args.peak_tflops), 4),
        "loss": float(metrics["loss"]),
    }
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
