r"""FLOPs of a BAGEL train step: the Mixture-of-Transformers decoder against the dense one.

Routing sends each token through its own expert's weights by a grouped matmul
(`jax.lax.ragged_dot`, mmjax/nn/experts.py), so a MoT step should cost what the dense step of
the same active width costs. This compiles the loss and its gradient for each `experts` layout
(dense, moe, mot) on editing rows (text, ViT, clean and noised latent tokens interleaved) and
prints XLA's cost analysis, for a compile-only TPU chip (libtpu) and for the host CPU (whose
XLA expands a ragged dot into one dense matmul per expert):

  python benchmarks/mot_flops.py [--width 1024 --depth 2 --batch 8]

One JSON line: {"tpu": {"dense": F, "moe": F, "mot": F}, "cpu": {...}, "tpu_mot_over_dense":
r, "cpu_mot_over_dense": r, ...}. Attention runs the XLA reference so its FLOPs are counted.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.core import meta

from mmjax.data.bagel_tasks import bagel_row, edit_parts
from mmjax.data.sequences import SEQUENCE_DEFAULTS
from mmjax.data.tokenizer import ByteTokenizer, WithImageMarkers
from mmjax.models.bagel import Bagel
from mmjax.nn.mot import EXPERT_LAYOUTS
from mmjax.objectives.bagel import make_bagel_loss
from mmjax.sampling.bagel import stack_rows


def edit_batch(batch_size: int, image_size: int, max_len: int) -> dict:
    """Editing rows: 16-pixel latent patches and 16-pixel ViT patches of `image_size` images."""
    tok = WithImageMarkers(ByteTokenizer())
    seq = ml_collections.ConfigDict({**SEQUENCE_DEFAULTS, "kind": "bagel", "max_len": max_len,
                                     "patch_size": 16, "vit_patch_size": 16})  # fmt: skip
    image = np.zeros((image_size, image_size, 3), np.float32)
    instruction = tok.encode("make the red circle blue")
    row = bagel_row(edit_parts(image, instruction, image, tok), tok, seq, image_size)
    batch = stack_rows([row] * batch_size)
    # the model reads latents (an f = 8 VAE's 16 channels), not pixels
    side = image_size // 8
    batch["images"] = jnp.zeros((batch_size, 2, side, side, 16), jnp.float32)
    return batch


def step_flops(experts: str, args: argparse.Namespace, batch: dict, device) -> float:
    """XLA's FLOPs of loss + gradient compiled for `device`."""
    side = args.image_size // 8
    model = Bagel(
        vocab_size=32_000, width=args.width, depth=args.depth, num_heads=args.width // 128,
        mlp_dim=4 * args.width, image_shape=(side, side, 16), image_size=args.image_size,
        experts=experts, vision_patch=16, vision_width=args.width // 2, vision_depth=1,
        vision_heads=4, vision_mlp_dim=args.width, attention_impl="xla",
    )  # fmt: skip
    loss_fn = make_bagel_loss(lambda p, b, rng: model.apply({"params": p}, b))
    params = jax.eval_shape(lambda: meta.unbox(model.init(jax.random.key(0), batch)["params"]))
    sharding = jax.sharding.SingleDeviceSharding(device)
    place = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)  # noqa: E731
    grad = jax.jit(jax.grad(lambda p, b, r: loss_fn(p, b, r)[0]))
    compiled = grad.lower(
        jax.tree.map(place, params), jax.tree.map(place, batch), place(jax.random.key(0))
    ).compile()
    return float(compiled.cost_analysis()["flops"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--max_len", type=int, default=1024)
    parser.add_argument("--topology", default="v5e:2x2")
    args = parser.parse_args(argv)
    from jax.experimental.topologies import get_topology_desc

    batch = edit_batch(args.batch, args.image_size, args.max_len)
    devices = {
        "tpu": get_topology_desc(platform="tpu", topology_name=args.topology).devices[0],
        "cpu": jax.devices("cpu")[0],
    }
    out = {
        k: {e: step_flops(e, args, batch, d) for e in EXPERT_LAYOUTS} for k, d in devices.items()
    }
    for k in devices:
        out[f"{k}_mot_over_dense"] = round(out[k]["mot"] / out[k]["dense"], 4)
        out[f"{k}_moe_over_dense"] = round(out[k]["moe"] / out[k]["dense"], 4)
    gen = int(np.sum(np.asarray(batch["image_positions"]) < args.max_len))
    out |= {"gen_token_fraction": round(gen / int(np.sum(batch["segment_ids"])), 3), **vars(args)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
