"""Generation and understanding evals of a BLIP3-o model on held-out shapes.

`evals.NAME = dict(type="blip3o", split, num_samples, loss, num_steps, cfg_scale,
clip_workdir, backbone_sequence, backbone_tasks)`, `loss` being the objective's kwargs.
Reports `compositional_accuracy` (and its parts) of the images drawn for the first
`num_samples` held-out captions (generated features or latents, rendered by the feature
space's decoder), `clip_cosine`: the mean cosine between each rendered image's CLIP patch
features and its real image's (the tower of the clip_decoder run `clip_workdir`; default: the
run's own feature space when it is one), and `heldout_diffusion_loss` on fixed noise. With
`backbone_sequence` (the backbone run's VLM `data.sequence`), the backbone is judged as its
own run's vlm eval judges it, on `backbone_tasks` (default caption and vqa): `backbone_*`
metrics such as `backbone_caption_accuracy`, to compare with that run's (sequential training
leaves them unchanged; joint training moves them).
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax.data.sequences import SEQUENCE_DEFAULTS
from mmjax.errors import UserError
from mmjax.evals.features import EvalContext
from mmjax.evals.transfusion import JudgedEval
from mmjax.evals.vlm import VlmEval
from mmjax.models.clip_decoder import ClipDecoder
from mmjax.objectives.blip3o import make_blip3o_loss
from mmjax.sampling.blip3o import (
    flow_settings,
    generate,
    prompt_rows,
)


class Blip3oEval(JudgedEval):
    """The evaluator (module docstring)."""

    def __init__(self, cfg: ml_collections.ConfigDict, ctx: EvalContext):
        super().__init__(cfg, ctx)
        self.prompts = prompt_rows(ctx.tokenizer, self.captions, ctx.data_cfg.sequence)
        self.heldout = self.prompts | {"images": self.encode(self.pixels[:, None])}
        apply_fn = lambda p, b, rng: ctx.model.apply({"params": p}, b)  # noqa: E731
        kwargs = {**cfg.get("loss", {}), "cond_drop": 0.0}  # every condition kept
        self.loss_fn = jax.jit(make_blip3o_loss(apply_fn, **kwargs))
        self.clip = self._clip_features(cfg.get("clip_workdir", ""))
        self.real_features = self.clip(self.pixels)
        self.backbone_eval = self._backbone_eval(cfg.get("backbone_sequence") or {})

    def _backbone_eval(self, sequence: Any) -> VlmEval | None:
        """The vlm eval of the backbone as a stand-alone VLM on its own row layout."""
        if not sequence:
            return None
        ctx, cfg = self.ctx, self.cfg
        data = ml_collections.ConfigDict(ctx.data_cfg.to_dict())
        data.sequence = ml_collections.ConfigDict({**SEQUENCE_DEFAULTS, **dict(sequence)})
        tasks = tuple(cfg.get("backbone_tasks", ("caption", "vqa")))
        vlm_cfg = dict(
            name=f"{cfg.name}_backbone", split=cfg.split, tasks=tasks,
            num_samples=cfg.num_samples, batch_size=cfg.get("batch_size", 64),
        )  # fmt: skip
        backbone = EvalContext(
            ctx.model.backbone_model(), ctx.tokenizer, data, ctx.mesh, ctx.workdir
        )
        return VlmEval(ml_collections.ConfigDict(vlm_cfg), backbone)

    def _clip_features(self, workdir: str):
        """Images [N, H, W, C] -> CLIP patch features [N, h, w, width], jitted."""
        if workdir:
            from mmjax.train.latents import read_autoencoder

            where = f"evals.{self.cfg.name}.clip_workdir {workdir!r}"
            tower, params, _ = read_autoencoder(workdir, where, self.ctx.mesh)
        else:
            tower, params = self.latents.autoencoder, self.latents.params
        if not isinstance(tower, ClipDecoder):
            raise UserError(
                f"evals.{self.cfg.name}.clip_workdir: the CLIP cosine needs a clip_decoder run's "
                "tower; this run's feature space is not one, so name one"
            )
        return jax.jit(lambda x: tower.apply({"params": params}, x, method=ClipDecoder.features))

    def __call__(self, params: Any) -> dict[str, float]:
        cfg, ctx = self.cfg, self.ctx
        rng = jax.random.key(cfg.get("seed", 0))
        settings = flow_settings(cfg, cfg.get("loss", {}))
        drawn = generate(ctx.model, params, self.prompts, rng, settings)
        metrics = self.judge(drawn, None)
        if self.backbone_eval is not None:
            understanding = self.backbone_eval(params["backbone"])
            metrics |= {f"backbone_{k}": v for k, v in understanding.items()}
        rendered = np.asarray(self.decode(drawn))
        metrics["clip_cosine"] = float(_mean_cosine(self.clip(rendered), self.real_features))
        _, heldout = self.loss_fn(params, self.heldout, rng)
        metrics["heldout_diffusion_loss"] = float(heldout["diffusion_loss"])
        return metrics


def _mean_cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    """The cosine of each pair of feature vectors [..., D], averaged."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    dot = jnp.sum(a * b, -1)
    return jnp.mean(
        dot / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-8)
    )
