"""CLI: sample from the latest checkpoint of a workdir whose family has a sampler
(mmjax/families.py: Transfusion, UniFluid, BAGEL).

  python -m mmjax.sample --workdir DIR --prompt "a red circle left of a blue square" --num 16
  python -m mmjax.sample --workdir DIR --caption 16        # caption 16 held-out test images
  python -m mmjax.sample --workdir DIR --edit scene.png --prompt "make the red circle blue"

`--edit IMAGE` (BAGEL) edits the image (resized to the run's data.image_size) as the prompt
instructs and writes the source and its `--num` edits to `DIR/samples/edit_<prompt>.png`.

Text -> image writes a PNG grid to `DIR/samples/<prompt>.png`; image -> text prints one
caption per line and writes the captioned grid to `DIR/samples/captions.png`. Sampler
defaults come from the run's eval config of its family when it has one (else
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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from mmjax.errors import UserError


def sample(args: argparse.Namespace, overrides: Sequence[str]) -> list[str]:
    """Runs the requested sampling; returns the paths it wrote."""
    import flax.linen as nn
    import jax

    from mmjax import families
    from mmjax.data import check_sequence_config
    from mmjax.models.vae import LatentSpace
    from mmjax.sampling.sampler import SampleContext
    from mmjax.train.build import load_trained

    trained = load_trained(args.workdir, overrides)  # parameters only: no optimizer state
    config, bundle = trained.config, trained.bundle
    sampler = bundle.family.sampler
    if sampler is None:
        with_one = sorted(f.name for f in families.FAMILIES.values() if f.sampler is not None)
        raise UserError(
            f"{args.workdir} holds a {bundle.family.name!r} run, which has no sampler; "
            f"the families with one are {with_one}"
        )
    seq, size = config.data.sequence, int(config.data.image_size)
    latents = bundle.latents or LatentSpace.pixels(int(seq.channels))
    defaults = sampler.defaults
    settings = {**defaults, **_eval_settings(config, bundle.family.evaluators, defaults)}
    settings.update({k: v for k, v in vars(args).items() if k in defaults and v is not None})
    ctx = SampleContext(
        decoder=bundle.model.clone(decode=True),
        params=trained.params,
        tokenizer=bundle.tokenizer,
        seq=seq,
        num_patches=check_sequence_config(seq, size),
        image_shape=latents.latent_shape((size, size)),
        objective=dict(config.objective.get("kwargs", {})),
        latents=latents,
        rng=jax.random.key(args.seed),
    )
    out_dir = os.path.join(args.workdir, "samples")
    with jax.set_mesh(bundle.mesh), nn.logical_axis_rules(bundle.rules):
        if args.edit is not None:
            return _edit(args, config, sampler, ctx, settings, out_dir)
        if args.prompt is not None:
            images = sampler.draw(ctx, [args.prompt] * args.num, settings)
            return _write(args, config, latents, out_dir, images, None)
        return _write(
            args, config, latents, out_dir, None, lambda x: sampler.caption(ctx, x, settings)
        )


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


def _edit(args, config, sampler, ctx, settings, out_dir: str) -> list[str]:
    """`--edit IMAGE --prompt INSTRUCTION`: the source and `--num` edits, as one grid."""
    import jax
    import numpy as np

    from mmjax.data.image_ops import image_preprocessor, read_image_file
    from mmjax.evals.generation import write_sample_grid

    if sampler.edit is None:
        raise UserError(
            f"{args.workdir} holds a run whose family does not edit images (BAGEL does)"
        )
    if not args.prompt:
        raise UserError("--edit needs --prompt: the edit instruction")
    if args.caption is not None:
        raise UserError("--edit and --caption are two requests: give one")
    pixels = image_preprocessor(config.data)(read_image_file(args.edit, "--edit"))
    pixels = pixels[..., : int(config.data.sequence.channels)]
    latents = sampler.edit(ctx, np.stack([pixels] * args.num), [args.prompt] * args.num, settings)
    edited = np.asarray(jax.jit(ctx.latents.decode)(latents))
    slug = re.sub(r"[^a-z0-9]+", "_", args.prompt.lower()).strip("_")[:60] or "edit"
    path = os.path.join(out_dir, f"edit_{slug}.png")
    write_sample_grid(
        path, np.concatenate([pixels[None], edited]), ["source", *[args.prompt] * args.num]
    )
    return [path]


def _eval_settings(
    config: ml_collections.ConfigDict, evaluators: Sequence[str], defaults: Mapping[str, Any]
) -> dict:
    """The sampler settings of the run's first eval of its family's evaluators."""
    for cfg in config.get("evals", {}).values():
        if cfg.get("type") in evaluators:
            return {k: cfg[k] for k in defaults if k in cfg}
    return {}


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m mmjax.sample", description=__doc__)
    parser.add_argument("--workdir", required=True)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--prompt", help="text -> image: the caption to draw")
    what.add_argument("--caption", type=int, help="image -> text: caption N test images")
    parser.add_argument("--edit", metavar="IMAGE", help="BAGEL: edit this image as --prompt says")
    parser.add_argument("--num", type=int, default=16, help="images to generate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampler", choices=("ddim", "ddpm", "euler"))
    parser.add_argument("--num_steps", type=int)
    parser.add_argument("--cfg_scale", type=float)
    parser.add_argument("--clip_x0", type=float)
    parser.add_argument("--temperature", type=float, help="UniFluid: per-token noise scale")
    parser.add_argument("--order", choices=("raster", "random"), help="UniFluid: token order")
    parser.add_argument("--top_p", type=float, help="UniFluid: nucleus sampling of captions")
    parser.add_argument("--text_scale", type=float, help="BAGEL: text guidance scale")
    parser.add_argument("--image_scale", type=float, help="BAGEL: image guidance scale (edits)")
    parser.add_argument("--timestep_shift", type=float, help="BAGEL: flow timestep shift")
    overrides = [a[len("--config.") :] for a in argv if a.startswith("--config.")]
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    if args.prompt is None and args.caption is None and args.edit is None:
        parser.error("one of --prompt, --caption or --edit IMAGE --prompt is required")
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
