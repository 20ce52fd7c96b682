"""Compiled per-device memory of the contrastive losses as the global batch grows 8x.

  python benchmarks/contrastive_memory.py [--per_device_batch 512] [--dim 256]

Compiles jit(value_and_grad(loss)) (w.r.t. both embeddings, the scale and the bias) and
reads `compile().memory_analysis()` per device, with the per-device batch fixed:
- `sharded`: `siglip_loss_sharded` / `clip_loss_sharded` on 1 and on 8 host CPU devices
  (global batch b and 8b, sharded over "data");
- `reference`: the plain `siglip_loss` / `clip_loss` on one device at batch b and 8b;
- `reference_auto`: the plain losses jitted on 8 devices with the batch sharded over "data",
  leaving the partitioning to XLA (GSPMD).
Prints one JSON line: bytes of temp / argument / output buffers for each, and temp growth.
"""

import argparse
import json
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mmjax.objectives.contrastive import (
    clip_loss,
    clip_loss_sharded,
    siglip_loss,
    siglip_loss_sharded,
)
from mmjax.parallel import make_mesh
from mmjax.parallel.sharding import BATCH_AXES

LOSSES = {
    "sigmoid": (siglip_loss_sharded, siglip_loss, 2),
    "softmax": (clip_loss_sharded, clip_loss, 1),
}


def memory(fn, n_scalars: int, devices: int, batch: int, dim: int) -> dict[str, int]:
    """Per-device buffer bytes of jit(value_and_grad(fn)), batch sharded over `devices`."""
    mesh = make_mesh({"data": devices}, jax.devices()[:devices])
    shard, rep = NamedSharding(mesh, P(BATCH_AXES)), NamedSharding(mesh, P())
    argnums = tuple(range(2 + n_scalars))
    step = jax.jit(
        jax.value_and_grad(fn, argnums=argnums, has_aux=True),
        in_shardings=(shard, shard) + (rep,) * n_scalars,
    )
    emb = jax.ShapeDtypeStruct((batch, dim), jnp.float32)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    with jax.set_mesh(mesh):
        stats = step.lower(emb, emb, *(scalar,) * n_scalars).compile().memory_analysis()
    return {
        "temp": int(stats.temp_size_in_bytes),
        "argument": int(stats.argument_size_in_bytes),
        "output": int(stats.output_size_in_bytes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per_device_batch", type=int, default=512)
    parser.add_argument("--dim", type=int, default=256)
    args = parser.parse_args()
    b, dim = args.per_device_batch, args.dim
    result: dict = {"per_device_batch": b, "dim": dim, "global_batches": [b, 8 * b]}
    for name, (sharded, reference, n_scalars) in LOSSES.items():
        rows = {
            "sharded": [memory(sharded, n_scalars, d, d * b, dim) for d in (1, 8)],
            "reference": [memory(reference, n_scalars, 1, d * b, dim) for d in (1, 8)],
            "reference_auto": [memory(reference, n_scalars, d, d * b, dim) for d in (1, 8)],
        }
        for kind, (small, large) in list(rows.items()):
            rows[f"{kind}_temp_growth"] = round(large["temp"] / small["temp"], 2)
        result[name] = rows
    print(json.dumps(result))


if __name__ == "__main__":
    main()
