"""Train-step throughput of an experiment under several meshes; prints one line of JSON.

  python benchmarks/train_step.py --config experiments/clip.py:tiny \
      --meshes data=1 fsdp=8 data=2,fsdp=2,tensor=2 --host_devices 8

Times the jitted step alone (one batch reused, so data loading is excluded): the median over
`--steps` steps after one compile step, per mesh, with the compile time. `--host_devices N`
splits the CPU into N devices (set before JAX starts) to compare sharded layouts on a CPU.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time


def parse_mesh(spec: str) -> dict[str, int]:
    """'data=2,fsdp=2' -> {'data': 2, 'fsdp': 2}."""
    return {k: int(v) for k, v in (item.split("=") for item in spec.split(","))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/clip.py:tiny")
    parser.add_argument("--meshes", nargs="+", default=["data=-1"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--host_devices", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args()
    if args.host_devices:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={args.host_devices}"
        )
    import flax.linen as nn
    import jax

    from mmjax import parallel
    from mmjax.train.config_cli import apply_overrides, load_config
    from mmjax.train.loop import Trainer

    results = []
    for spec in args.meshes:
        config = load_config(args.config)
        apply_overrides(config, args.overrides)
        config.mesh.update({"data": 1, "fsdp": 1, "tensor": 1, **parse_mesh(spec)})
        sizes = [v for k, v in config.mesh.items() if k != "rules"]
        num = len(jax.devices()) if -1 in sizes else math.prod(sizes)
        trainer = Trainer(config, workdir=None, devices=jax.devices()[:num])
        example = next(trainer.data_iterator())
        state, shardings = trainer.init_state(example)
        with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
            step = trainer.jit_train_step(shardings)
            batch = parallel.global_batch(example, trainer.mesh)
            t0 = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            compile_s = time.perf_counter() - t0
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                state, metrics = step(state, batch)
                jax.block_until_ready(metrics)
                times.append(time.perf_counter() - t0)
        median = statistics.median(times)
        results.append(
            {
                "mesh": dict(trainer.mesh.shape),
                "median_step_ms": round(1000 * median, 3),
                "examples_per_sec": round(config.batch_size / median, 1),
                "compile_s": round(compile_s, 2),
            }
        )
    base = results[0]["median_step_ms"]
    for r in results:
        r["time_vs_first"] = round(r["median_step_ms"] / base, 3)
    line = {"benchmark": "train_step", "config": args.config, "steps": args.steps}
    print(json.dumps({**line, "backend": jax.default_backend(), "results": results}))


if __name__ == "__main__":
    sys.exit(main())
