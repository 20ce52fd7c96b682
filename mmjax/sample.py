"""CLI: sample from the latest checkpoint of a Transfusion workdir.

  python -m mmjax.sample --workdir DIR --prompt "a red circle left of a blue square" --num 16
  python -m mmjax.sample --workdir DIR --caption 16        # caption 16 held-out test images

Text -> image writes a PNG grid to `DIR/samples/<prompt>.png`; image -> text prints one
caption per line and writes the captioned grid to `DIR/samples/captions.png`. Sampler
defaults (DDIM, 250 steps, CFG scale 3, x0 clipping) come from the run's `transfusion`
eval config when it has one; flags override them. A run on VAE latents (`config.latents`)
generates latents, decoded to pixels for the grid, and captions the latents of the images.
"""

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence

import ml_collections

from mmjax.errors import UserError

DEFAULTS = dict(sampler="ddim", num_steps=250, cfg_scale=3.0, clip_x0=None)


def sample(args: argparse.Namespace, overrides: Sequence[str]) -> list[str]:
    """Runs the requested sampling; returns the paths it wrote."""
    import flax.linen as nn
    import jax
    import numpy as np

    from mmjax.data.sequences import check_sequence_config
    from mmjax.data.sources import build_source
    from mmjax.evals.generation import write_sample_grid
    from mmjax.evals.transfusion import record_pixels
    from mmjax.models.vae import LatentSpace
    from mmjax.objectives.diffusion import make_schedule
    from mmjax.sampling.transfusion import caption_images, generate_images
    from mmjax.train.restore import load_trained

    trained = load_trained(args.workdir, overrides)
    config, trainer = trained.config, trained.trainer
    seq = config.data.get("sequence", {})
    if config.model.name != "transfusion" or not seq.get("kind"):
        raise UserError(f"{args.workdir} holds a {config.model.name!r} run, not a Transfusion one")
    size = int(config.data.image_size)
    num_patches = check_sequence_config(seq, size)
    latents = trainer.latents or LatentSpace.pixels(int(seq.channels))
    settings = {**DEFAULTS, **_eval_settings(config)}
    settings.update({k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None})
    kwargs = dict(config.objective.get("kwargs", {}))
    out_dir = os.path.join(args.workdir, "samples")

    decoder = trainer.model.clone(decode=True)
    with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
        if args.prompt is not None:
            num_train_steps = int(kwargs.get("num_train_steps", 1000))
            schedule = None
            if settings["sampler"] != "euler":
                schedule = make_schedule(kwargs.get("schedule", "cosine"), num_train_steps)
            images = generate_images(
                decoder,
                trained.params,
                trainer.tokenizer,
                [args.prompt] * args.num,
                jax.random.key(args.seed),
                image_shape=latents.latent_shape((size, size)),
                num_patches=num_patches,
                max_len=int(seq.max_len),
                schedule=schedule,
                sampler=settings["sampler"],
                num_steps=int(settings["num_steps"]),
                cfg_scale=float(settings["cfg_scale"]),
                num_train_steps=num_train_steps,
                clip_x0=settings["clip_x0"],
            )
            images = np.asarray(jax.jit(latents.decode)(images))
            slug = re.sub(r"[^a-z0-9]+", "_", args.prompt.lower()).strip("_")[:60] or "prompt"
            path = os.path.join(out_dir, f"{slug}.png")
            write_sample_grid(path, images, [args.prompt] * args.num)
            return [path]
        source = build_source(config.data, "test")
        records = [source[i] for i in range(min(args.caption, len(source)))]
        images = np.stack([record_pixels(r, config.data) for r in records])[..., : seq.channels]
        encode = jax.jit(lambda x: latents.encode(x, jax.random.key(args.seed)))
        captions = caption_images(
            decoder,
            trained.params,
            trainer.tokenizer,
            encode(images),
            num_patches=num_patches,
            max_len=int(seq.max_len),
        )
        print("\n".join(captions))
        path = os.path.join(out_dir, "captions.png")
        write_sample_grid(path, images, captions)
        return [path]


def _eval_settings(config: ml_collections.ConfigDict) -> dict:
    for cfg in config.get("evals", {}).values():
        if cfg.get("type") == "transfusion":
            return {k: cfg[k] for k in DEFAULTS if k in cfg}
    return {}


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m mmjax.sample", description=__doc__)
    parser.add_argument("--workdir", required=True)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="text -> image: the caption to draw")
    what.add_argument("--caption", type=int, help="image -> text: caption N test images")
    parser.add_argument("--num", type=int, default=16, help="images to generate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampler", choices=("ddim", "ddpm", "euler"))
    parser.add_argument("--num_steps", type=int)
    parser.add_argument("--cfg_scale", type=float)
    parser.add_argument("--clip_x0", type=float)
    overrides = [a[len("--config.") :] for a in argv if a.startswith("--config.")]
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    logging.basicConfig(level=logging.WARNING)
    try:
        for path in sample(args, overrides):
            print(f"wrote {path}")
    except UserError as e:
        print(f"mmjax.sample: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
