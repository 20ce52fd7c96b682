"""Generation and captioning evals of a UniFluid model, judged as Transfusion's are.

Text -> image: the captions of the first `num_samples` records of `split` prompt per-token
generation (mmjax.sampling.unifluid); the digit or shapes judge labels the images
(`generation_accuracy`, or `compositional_accuracy` and its parts). Image -> text: the same
records' images are captioned (`caption_accuracy`). Held out: `heldout_diffusion_loss` of the
records laid out for generation and `heldout_lm_loss` of them laid out for understanding, with
noise, timesteps and orders from a fixed key.
"""

from typing import Any

import jax
import ml_collections

from mmjax.evals.features import EvalContext
from mmjax.evals.transfusion import JudgedEval
from mmjax.objectives.diffusion import make_schedule
from mmjax.objectives.unifluid import make_unifluid_loss
from mmjax.sampling.unifluid import caption_images, generate_images


class UniFluidEval(JudgedEval):
    """`evals.NAME = dict(type="unifluid", split, num_samples, num_steps, temperature,
    cfg_scale, order, clip_x0, loss)`, `loss` being the objective's kwargs."""

    def __init__(self, cfg: ml_collections.ConfigDict, ctx: EvalContext):
        super().__init__(cfg, ctx)
        self.generation_rows = self.heldout_batch(caption_first=1.0)
        self.understanding_rows = self.heldout_batch(caption_first=0.0)
        apply_fn = lambda p, b, rng: ctx.model.apply({"params": p}, b)  # noqa: E731
        self.loss_fn = jax.jit(make_unifluid_loss(apply_fn, **cfg.loss))

    def __call__(self, params: Any) -> dict[str, float]:
        cfg, ctx = self.cfg, self.ctx
        seq = ctx.data_cfg.sequence
        decoder = ctx.model.clone(decode=True)
        loss = dict(cfg.loss)
        key = jax.random.key(cfg.get("seed", 0))
        generated = generate_images(
            decoder,
            params,
            ctx.tokenizer,
            self.captions,
            key,
            image_shape=self.latent_shape,
            num_tokens=self.num_patches,
            seq=seq,
            schedule=make_schedule(loss["schedule"], int(loss["num_train_steps"])),
            order=cfg.get("order", loss.get("order", "raster")),
            num_steps=int(cfg.num_steps),
            temperature=float(cfg.temperature),
            cfg_scale=float(cfg.cfg_scale),
            clip_x0=cfg.get("clip_x0"),
        )
        captions = caption_images(
            decoder,
            params,
            ctx.tokenizer,
            self.pixels[..., : int(seq.channels)],
            num_tokens=self.num_patches,
            seq=seq,
        )
        metrics = self.judge(generated, captions)
        _, gen = self.loss_fn(params, self.generation_rows, key)
        _, und = self.loss_fn(params, self.understanding_rows, key)
        metrics["heldout_diffusion_loss"] = float(gen["diffusion_loss"])
        metrics["heldout_lm_loss"] = float(und["lm_loss"])
        return metrics
