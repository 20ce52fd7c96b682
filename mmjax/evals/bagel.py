"""Generation, understanding and editing evals of a BAGEL model on held-out shapes.

`evals.NAME = dict(type="bagel", split, num_samples, num_edits, loss, num_steps,
timestep_shift, text_scale, image_scale, interval, renorm_min, renorm_type)`, `loss` being
the objective's kwargs. Reports `compositional_accuracy` (and its parts) of the images drawn
for the first `num_samples` captions, `caption_accuracy` of the greedy captions of their
images, `edit_accuracy` on `num_edits` held-out edit pairs (mmjax.data.edits: the judge finds
the target scene's every object, colour and relation in the edited image, so the edited
attribute changed as asked and the others stayed) with its per-kind parts, and held-out
`heldout_diffusion_loss` / `heldout_lm_loss` on fixed noise. Grids go to
`workdir/samples/<name>_<k>.png` and `<name>_edits_<k>.png` (source | edit, framed by the judge).
"""

import os
from typing import Any

import jax
import ml_collections
import numpy as np

from mmjax.data.bagel_tasks import bagel_row, caption_parts, edit_parts, t2i_parts
from mmjax.data.edits import EDIT_KINDS, heldout_edits
from mmjax.data.sources import build_source
from mmjax.evals import generation
from mmjax.evals.features import EvalContext
from mmjax.evals.transfusion import JudgedEval, record_pixels
from mmjax.objectives.bagel import make_bagel_loss
from mmjax.sampling.bagel import (
    caption_images,
    edit_contexts,
    flow_settings,
    generate,
    stack_rows,
    t2i_contexts,
)


class BagelEval(JudgedEval):
    """The evaluator (module docstring)."""

    def __init__(self, cfg: ml_collections.ConfigDict, ctx: EvalContext):
        super().__init__(cfg, ctx)
        data = ctx.data_cfg
        self.size = int(data.image_size)
        edits = heldout_edits(build_source(data, cfg.split), int(cfg.get("num_edits", 200)))
        self.edit_sources = np.stack([record_pixels(r, data) for r, _, _ in edits])
        self.edits = [e for _, _, e in edits]
        self.edit_targets = np.stack([t / 127.5 - 1.0 for _, t, _ in edits]).astype(np.float32)
        self.heldout = self._heldout_rows()
        apply_fn = lambda p, b, rng: ctx.model.apply({"params": p}, b)  # noqa: E731
        self.loss_fn = jax.jit(make_bagel_loss(apply_fn, **cfg.get("loss", {})))

    def _heldout_rows(self) -> dict:
        """Every record as a t2i and a caption row, and every edit pair as an edit row, all
        conditions kept; latents encoded."""
        tok, seq, size = self.ctx.tokenizer, self.ctx.data_cfg.sequence, self.size
        rows = []
        for record, pixels in zip(self.records, self.pixels, strict=True):
            ids = tok.encode(record["caption"])
            rows.append(bagel_row(t2i_parts(ids, pixels, tok), tok, seq, size))
            rows.append(bagel_row(caption_parts(pixels, ids, tok), tok, seq, size))
        for src, target, edit in zip(self.edit_sources, self.edit_targets, self.edits, strict=True):
            parts = edit_parts(src, tok.encode(edit.instruction), target, tok)
            rows.append(bagel_row(parts, tok, seq, size))
        batch = stack_rows(rows)
        batch["images"] = self.encode(batch["images"])
        return batch

    def __call__(self, params: Any) -> dict[str, float]:
        cfg, ctx = self.cfg, self.ctx
        decoder = ctx.model.clone(decode=True)
        seq, tok = ctx.data_cfg.sequence, ctx.tokenizer
        rng = jax.random.key(cfg.get("seed", 0))
        contexts = t2i_contexts(tok, self.captions, seq, self.size)
        drawn = generate(decoder, params, contexts, rng, image_shape=self.latent_shape,
                         settings=flow_settings(cfg), encode=self.encode)  # fmt: skip
        captions = caption_images(decoder, params, tok, self.pixels[..., : int(seq.channels)], seq)
        metrics = self.judge(drawn, captions)
        metrics |= self._edit_metrics(decoder, params, rng)
        _, heldout = self.loss_fn(params, self.heldout, rng)
        metrics["heldout_diffusion_loss"] = float(heldout["diffusion_loss"])
        metrics["heldout_lm_loss"] = float(heldout["lm_loss"])
        return metrics

    def _edit_metrics(self, decoder: Any, params: Any, rng: jax.Array) -> dict[str, float]:
        tok, seq = self.ctx.tokenizer, self.ctx.data_cfg.sequence
        instructions = [e.instruction for e in self.edits]
        contexts = edit_contexts(tok, self.edit_sources, instructions, seq)
        settings = flow_settings(self.cfg, edit=True)
        latents = generate(
            decoder, params, contexts, rng, image_shape=self.latent_shape, settings=settings,
            encode=self.encode,
        )  # fmt: skip
        edited = np.asarray(self.decode(latents))
        verdicts = generation.compositional_verdicts(edited, [e.caption for e in self.edits])
        right = np.asarray([v["all"] for v in verdicts])
        metrics = {"edit_accuracy": float(np.mean(right))}
        for kind in EDIT_KINDS:
            hits = [r for r, e in zip(right, self.edits, strict=True) if e.kind == kind]
            if hits:
                metrics[f"edit_{kind}_accuracy"] = float(np.mean(hits))
        self._write_edit_grid(edited, right)
        return metrics

    def _write_edit_grid(self, edited: np.ndarray, right: np.ndarray) -> None:
        if self.ctx.workdir is None or jax.process_index() != 0:
            return
        n = min(len(edited), 16)
        pairs = np.concatenate([self.edit_sources[:n], edited[:n]], axis=2)  # side by side
        path = os.path.join(
            self.ctx.workdir, "samples", f"{self.cfg.name}_edits_{self.step:03d}.png"
        )
        generation.write_sample_grid(
            path, pairs, [e.instruction for e in self.edits[:n]], right[:n]
        )
