"""Generation and captioning evals of a Transfusion model on held-out records.

Text -> image: the captions of the first `num_samples` records of `split` prompt the model;
a judge trained on real data (mmjax.evals.generation) labels the generated images:
`generation_accuracy` on the digits, `compositional_accuracy` (every prompted shape, colour,
count and relation right) on the synthetic shapes. Image -> text: the same records' images
are captioned greedily; `caption_accuracy` is the fraction naming the right digit / scene.
A grid of the generations, framed green or red by the judge, goes to
`workdir/samples/<name>_<k>.png` for the k-th evaluation of the run.

A latent diffusion model (`config.latents`, a frozen VAE) generates latents, decoded to pixels
before the judge and the grid; the held-out and captioned images are encoded to latents.
"""

import os
from typing import Any

import jax
import ml_collections
import numpy as np

from mmjax.data.image_ops import image_preprocessor
from mmjax.data.kinds import check_sequence_config, sequence_example
from mmjax.data.sources import build_source
from mmjax.errors import UserError
from mmjax.evals import generation
from mmjax.evals.features import EvalContext
from mmjax.models.vae import LatentSpace
from mmjax.objectives.diffusion import make_schedule
from mmjax.objectives.transfusion import make_transfusion_loss
from mmjax.sampling.transfusion import caption_images, generate_images

SOURCES = ("digits", "shapes")


class JudgedEval:
    """What the generation evals of the unified models share: the first `num_samples` records
    of `cfg.split` (captions, pixels, their latents), the judges and the sample grids."""

    def __init__(self, cfg: ml_collections.ConfigDict, ctx: EvalContext):
        if ctx.data_cfg.source not in SOURCES:
            raise UserError(
                f"evals.{cfg.name}: generation is judged on {SOURCES}, not {ctx.data_cfg.source!r}"
            )
        self.cfg, self.ctx = cfg, ctx
        seq, size = ctx.data_cfg.sequence, int(ctx.data_cfg.image_size)
        self.num_patches = check_sequence_config(seq, size)
        self.latents = ctx.latents or LatentSpace.pixels(int(seq.channels))
        self.latent_shape = self.latents.latent_shape((size, size))
        source = build_source(ctx.data_cfg, cfg.split)
        records = [source[i] for i in range(min(int(cfg.num_samples), len(source)))]
        self.captions = [r["caption"] for r in records]
        self.pixels = np.stack([record_pixels(r, ctx.data_cfg) for r in records])
        key = jax.random.key(cfg.get("seed", 0))
        self.encode = jax.jit(lambda images: self.latents.encode(images, key))
        self.decode = jax.jit(self.latents.decode)
        self.image_latents = self.encode(self.pixels[..., : int(seq.channels)])  # to caption
        self.records = records
        self.step = 0

    def judge(self, generated: np.ndarray, captions: list[str] | None) -> dict[str, float]:
        """Metrics of generated latents [N, h, w, c] (decoded to pixels for the judge and the
        grid) for the records' captions, and of the `captions` written for their images (None:
        a model that does not caption here)."""
        generated = np.asarray(self.decode(generated))  # pixels
        if self.ctx.data_cfg.source == "digits":
            labels = [r["label"] for r in self.records]
            correct = generation.digit_judge().predict(generated) == np.asarray(labels)
            metrics = {"generation_accuracy": float(np.mean(correct))}
            if captions is not None:
                metrics["caption_accuracy"] = generation.caption_accuracy(captions, labels)
        else:
            verdicts = generation.compositional_verdicts(generated, self.captions)
            correct = np.asarray([v["all"] for v in verdicts])
            metrics = generation.compositional_metrics(generated, self.captions)
            if captions is not None:
                metrics["caption_accuracy"] = generation.shapes_caption_accuracy(
                    captions, self.records
                )
        self._write_grid(generated, correct)
        return metrics

    def heldout_batch(self, caption_first: float) -> dict:
        """The records as training sequences of the run's layout without caption dropout,
        caption first (1.0) or image first (0.0); images encoded to latents."""
        batch = heldout_sequences(self.records, self.pixels, self.ctx, caption_first)
        batch["images"] = self.encode(batch["images"])
        return batch

    def _write_grid(self, images: np.ndarray, correct: np.ndarray) -> None:
        if self.ctx.workdir is None or jax.process_index() != 0:
            return
        self.step += 1
        path = os.path.join(self.ctx.workdir, "samples", f"{self.cfg.name}_{self.step:03d}.png")
        n = min(len(images), 32)
        generation.write_sample_grid(path, images[:n], self.captions[:n], correct[:n])


class TransfusionEval(JudgedEval):
    """`evals.NAME = dict(type="transfusion", split, num_samples, sampler, num_steps,
    cfg_scale, clip_x0, loss)`, `loss` being the objective's kwargs.

    Also reports the held-out `heldout_diffusion_loss` and `heldout_lm_loss` of the same
    records laid out caption-first, with noise and timesteps from a fixed key, so runs and
    steps compare on equal draws (the paper's ablation metric, Sec. 4.3).
    """

    def __init__(self, cfg: ml_collections.ConfigDict, ctx: EvalContext):
        super().__init__(cfg, ctx)
        self.heldout = self.heldout_batch(caption_first=1.0)
        apply_fn = lambda p, b, rng: ctx.model.apply({"params": p}, b)  # noqa: E731
        self.loss_fn = jax.jit(make_transfusion_loss(apply_fn, **cfg.loss))

    def __call__(self, params: Any) -> dict[str, float]:
        cfg, ctx, seq = self.cfg, self.ctx, self.ctx.data_cfg.sequence
        decoder = ctx.model.clone(decode=True)
        loss = dict(cfg.loss)
        num_train_steps = int(loss.get("num_train_steps", 1000))
        schedule = None
        if cfg.sampler != "euler":
            schedule = make_schedule(loss.get("schedule", "cosine"), num_train_steps)
        generated = generate_images(
            decoder,
            params,
            ctx.tokenizer,
            self.captions,
            jax.random.key(cfg.get("seed", 0)),
            image_shape=self.latent_shape,
            num_patches=self.num_patches,
            max_len=int(seq.max_len),
            schedule=schedule,
            sampler=cfg.sampler,
            num_steps=int(cfg.num_steps),
            cfg_scale=float(cfg.cfg_scale),
            num_train_steps=num_train_steps,
            clip_x0=cfg.get("clip_x0"),
        )
        captions = caption_images(
            decoder, params, ctx.tokenizer, self.image_latents, num_patches=self.num_patches,
            max_len=int(seq.max_len),
        )  # fmt: skip
        metrics = self.judge(generated, captions)
        _, heldout = self.loss_fn(params, self.heldout, jax.random.key(cfg.get("seed", 0)))
        metrics["heldout_diffusion_loss"] = float(heldout["diffusion_loss"])
        metrics["heldout_lm_loss"] = float(heldout["lm_loss"])
        return metrics


def record_pixels(record: dict, data_cfg: ml_collections.ConfigDict) -> np.ndarray:
    """A record's image as the data pipeline prepares it: float [S, S, 3], normalised by
    data.image_mean / image_std ([-1, 1] by default)."""
    return image_preprocessor(data_cfg)(record["image"])


def heldout_sequences(
    records: list[dict], pixels: np.ndarray, ctx: EvalContext, caption_first: float
) -> dict:
    """The records as training sequences of `data.sequence` without caption dropout, caption
    first (1.0) or image first (0.0)."""
    seq = ml_collections.ConfigDict({**ctx.data_cfg.sequence, "caption_first": caption_first})
    seq.caption_drop = 0.0
    rng = np.random.default_rng(0)
    rows = [
        sequence_example(image, ctx.tokenizer.encode(r["caption"]), ctx.tokenizer, seq, rng)
        for r, image in zip(records, pixels, strict=True)
    ]
    return {k: jax.numpy.asarray(np.stack([row[k] for row in rows])) for k in rows[0]}
