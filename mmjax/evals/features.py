"""Embedding a whole eval split with a two-tower model: the common first step of its evals."""

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmjax import data as mmdata
from mmjax.models.vae import LatentSpace
from mmjax.parallel import global_batch

# output name -> (model method, batch key it reads)
OUTPUTS = {
    "image_emb": ("encode_image", "image"),
    "text_emb": ("encode_text", "text"),
    "image_features": ("image_features", "image"),
}


class SplitEmbedder:
    """Runs model methods over an eval split in global batches; returns host arrays."""

    def __init__(self, model: nn.Module, mesh: Mesh):
        self.mesh = mesh
        replicated = NamedSharding(mesh, PartitionSpec())
        self._fns = {
            name: jax.jit(
                lambda p, x, method=method: model.apply({"params": p}, x, method=method),
                out_shardings=replicated,
            )
            for name, (method, _) in OUTPUTS.items()
        }
        # batch-sharded arrays gathered onto every device, so every process can read them
        self._replicate = jax.jit(lambda x: x, out_shardings=replicated)

    def encode_texts(self, params: Any, tokens: np.ndarray) -> np.ndarray:
        """Text embeddings of already tokenized prompts (replicated on every device)."""
        return np.asarray(self._fns["text_emb"](params, tokens))

    def __call__(
        self,
        params: Any,
        data_cfg: ml_collections.ConfigDict,
        tokenizer: mmdata.Tokenizer,
        split: str,
        batch_size: int,
        outputs: Sequence[str],
    ) -> dict[str, np.ndarray]:
        """{output: [N, ...]} for the N real examples of `split`, plus `label` and `text`."""
        collected: dict[str, list[np.ndarray]] = {k: [] for k in (*outputs, "label", "text")}
        batches = mmdata.eval_batches(
            data_cfg,
            tokenizer,
            split,
            batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        for local in batches:
            batch = global_batch(
                {k: local[k] for k in ("image", "text", "label", "mask")}, self.mesh
            )
            keep = np.asarray(self._replicate(batch["mask"])) > 0
            for name in outputs:
                key = OUTPUTS[name][1]
                collected[name].append(np.asarray(self._fns[name](params, batch[key]))[keep])
            for key in ("label", "text"):
                collected[key].append(np.asarray(self._replicate(batch[key]))[keep])
        return {k: np.concatenate(v) for k, v in collected.items()}


@dataclasses.dataclass
class EvalContext:
    """What every evaluator may use: the model, tokenizer, data config, mesh, workdir
    (where evals that generate write `samples/`; None when there is none) and the frozen VAE
    of a latent diffusion model (models/vae.py `LatentSpace`; None in pixel space)."""

    model: nn.Module
    tokenizer: mmdata.Tokenizer
    data_cfg: ml_collections.ConfigDict
    mesh: Mesh
    workdir: str | None = None
    latents: LatentSpace | None = None

    @functools.cached_property
    def embedder(self) -> SplitEmbedder:
        """Shared by the two-tower evals, so each model method compiles once."""
        return SplitEmbedder(self.model, self.mesh)


class SplitEval:
    """Base of the two-tower evals: holds the eval's config, the shared embedder, tokenizer
    and data."""

    def __init__(self, cfg: ml_collections.ConfigDict, ctx: EvalContext):
        self.cfg, self.embedder = cfg, ctx.embedder
        self.tokenizer, self.data_cfg = ctx.tokenizer, ctx.data_cfg

    def embed(self, params: Any, split: str, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """`SplitEmbedder` outputs for `split` in batches of `cfg.batch_size`."""
        return self.embedder(
            params, self.data_cfg, self.tokenizer, split, self.cfg.batch_size, outputs
        )
