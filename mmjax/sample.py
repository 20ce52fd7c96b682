"""CLI: sample from the latest checkpoint of a Transfusion or UniFluid workdir.

  python -m mmjax.sample --workdir DIR --prompt "a red circle left of a blue square" --num 16
  python -m mmjax.sample --workdir DIR --caption 16        # caption 16 held-out test images

Text -> image writes a PNG grid to `DIR/samples/<prompt>.png`; image -> text prints one
caption per line and writes the captioned grid to `DIR/samples/captions.png`. Sampler
defaults come from the run's `transfusion` or `unifluid` eval config when it has one (else
Transfusion: DDIM, 250 steps, CFG scale 3; UniFluid: per-token DDPM, 100 steps, temperature 1,
CFG scale 3, raster order); flags override them. A run on VAE latents (`config.latents`)
generates latents, decoded to pixels for the grid; Transfusion captions the latents of the
images, UniFluid their pixels (its ViT's input). UniFluid captions greedily, or by nucleus
sampling with --top_p.
"""

import argparse
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from mmjax.errors import UserError

DEFAULTS = dict(sampler="ddim", num_steps=250, cfg_scale=3.0, clip_x0=None)
UNIFLUID_DEFAULTS = dict(num_steps=100, temperature=1.0, cfg_scale=3.0, clip_x0=None, order="")
FAMILIES = ("transfusion", "unifluid")


def sample(args: argparse.Namespace, overrides: Sequence[str]) -> list[str]:
    """Runs the requested sampling; returns the paths it wrote."""
    import flax.linen as nn
    import jax
    import numpy as np

    from mmjax.data.sequences import check_sequence_config
    from mmjax.models.vae import LatentSpace
    from mmjax.objectives.diffusion import make_schedule
    from mmjax.sampling.transfusion import caption_images, generate_images
    from mmjax.train.restore import load_trained

    trained = load_trained(args.workdir, overrides)
    config, trainer = trained.config, trained.trainer
    seq = config.data.get("sequence", {})
    family = config.model.name
    if family not in FAMILIES or not seq.get("kind"):
        raise UserError(f"{args.workdir} holds a {family!r} run, not one of {FAMILIES}")
    size = int(config.data.image_size)
    num_patches = check_sequence_config(seq, size)
    latents = trainer.latents or LatentSpace.pixels(int(seq.channels))
    defaults = UNIFLUID_DEFAULTS if family == "unifluid" else DEFAULTS
    settings = {**defaults, **_eval_settings(config, family, defaults)}
    settings.update({k: v for k, v in vars(args).items() if k in defaults and v is not None})
    kwargs = dict(config.objective.get("kwargs", {}))
    out_dir = os.path.join(args.workdir, "samples")

    decoder = trainer.model.clone(decode=True)
    model_args = (decoder, trained.params, trainer.tokenizer)
    prompts = ([args.prompt] * args.num, jax.random.key(args.seed))
    image_shape = latents.latent_shape((size, size))
    with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
        if family == "unifluid":
            from mmjax.sampling import unifluid

            images = None
            if args.prompt is not None:
                images = unifluid.generate_images(
                    *model_args,
                    *prompts,
                    image_shape=image_shape,
                    num_tokens=num_patches,
                    seq=seq,
                    schedule=make_schedule(kwargs["schedule"], int(kwargs["num_train_steps"])),
                    order=settings["order"] or kwargs.get("order", "raster"),
                    num_steps=int(settings["num_steps"]),
                    temperature=float(settings["temperature"]),
                    cfg_scale=float(settings["cfg_scale"]),
                    clip_x0=settings["clip_x0"],
                )

            def caption(pixels: np.ndarray) -> list[str]:
                return unifluid.caption_images(
                    *model_args,
                    pixels,
                    num_tokens=num_patches,
                    seq=seq,
                    rng=jax.random.key(args.seed),
                    temperature=0.0 if args.top_p is None else 1.0,
                    top_p=1.0 if args.top_p is None else args.top_p,
                )

            return _write(args, config, latents, out_dir, images, caption)
        if args.prompt is not None:
            num_train_steps = int(kwargs.get("num_train_steps", 1000))
            schedule = None
            if settings["sampler"] != "euler":
                schedule = make_schedule(kwargs.get("schedule", "cosine"), num_train_steps)
            images = generate_images(
                *model_args,
                *prompts,
                image_shape=image_shape,
                num_patches=num_patches,
                max_len=int(seq.max_len),
                schedule=schedule,
                sampler=settings["sampler"],
                num_steps=int(settings["num_steps"]),
                cfg_scale=float(settings["cfg_scale"]),
                num_train_steps=num_train_steps,
                clip_x0=settings["clip_x0"],
            )
            return _write(args, config, latents, out_dir, images, None)
        encode = jax.jit(lambda x: latents.encode(x, jax.random.key(args.seed)))

        def caption(pixels: np.ndarray) -> list[str]:
            return caption_images(
                *model_args,
                encode(pixels),
                num_patches=num_patches,
                max_len=int(seq.max_len),
            )

        return _write(args, config, latents, out_dir, None, caption)


def _write(
    args: argparse.Namespace,
    config: ml_collections.ConfigDict,
    latents: Any,
    out_dir: str,
    images: Any,
    caption: Callable[[Any], list[str]] | None,
) -> list[str]:
    """Writes generated latents `images` (decoded to pixels) as a grid, or captions test
    images with `caption(pixels) -> captions`, prints them and writes their grid."""
    import jax
    import numpy as np

    from mmjax.data.sources import build_source
    from mmjax.evals.generation import write_sample_grid
    from mmjax.evals.transfusion import record_pixels

    if images is not None:
        images = np.asarray(jax.jit(latents.decode)(images))
        slug = re.sub(r"[^a-z0-9]+", "_", args.prompt.lower()).strip("_")[:60] or "prompt"
        path = os.path.join(out_dir, f"{slug}.png")
        write_sample_grid(path, images, [args.prompt] * args.num)
        return [path]
    channels = int(config.data.sequence.channels)
    source = build_source(config.data, "test")
    records = [source[i] for i in range(min(args.caption, len(source)))]
    pixels = np.stack([record_pixels(r, config.data) for r in records])[..., :channels]
    captions = caption(pixels)
    print("\n".join(captions))
    path = os.path.join(out_dir, "captions.png")
    write_sample_grid(path, pixels, captions)
    return [path]


def _eval_settings(config: ml_collections.ConfigDict, family: str, defaults: dict) -> dict:
    for cfg in config.get("evals", {}).values():
        if cfg.get("type") == family:
            return {k: cfg[k] for k in defaults if k in cfg}
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
    parser.add_argument("--temperature", type=float, help="UniFluid: per-token noise scale")
    parser.add_argument("--order", choices=("raster", "random"), help="UniFluid: token order")
    parser.add_argument("--top_p", type=float, help="UniFluid: nucleus sampling of captions")
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
