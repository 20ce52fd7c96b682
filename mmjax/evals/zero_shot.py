"""Zero-shot classification (CLIP, Sec. 3.1.2): nearest prompt-ensemble class embedding."""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmjax import data as mmdata
from mmjax.errors import UserError
from mmjax.parallel import global_batch


def class_embeddings(
    encode_text,
    params: Any,
    tokenizer,
    names: Sequence[str],
    templates: Sequence[str],
    max_len: int,
) -> jnp.ndarray:
    """[num_classes, D]: per class, the renormalised mean of its prompts' unit embeddings."""
    prompts = [t.format(n) for n in names for t in templates]
    emb = encode_text(params, jnp.asarray(tokenizer.tokenize(prompts, max_len)))
    emb = emb.reshape(len(names), len(templates), -1).mean(axis=1)
    return emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)


class ZeroShotClassifier:
    """Accuracy of labelling `split` images with their nearest class prompt ensemble."""

    def __init__(
        self,
        cfg: ml_collections.ConfigDict,
        model: nn.Module,
        tokenizer,
        data_cfg: ml_collections.ConfigDict,
        mesh: Mesh,
    ):
        self.cfg, self.tokenizer, self.data_cfg, self.mesh = cfg, tokenizer, data_cfg, mesh
        self.names = mmdata.class_names(data_cfg)
        if not self.names:
            raise UserError(
                f"evals.{cfg.name}: data source {data_cfg.source!r} has no class names for "
                "zero-shot classification (set data.class_names)"
            )
        self.templates = list(cfg.get("templates", ()) or mmdata.prompt_templates(data_cfg))
        replicated = NamedSharding(mesh, PartitionSpec())
        self._encode_text = jax.jit(
            lambda p, t: model.apply({"params": p}, t, method="encode_text"),
            out_shardings=replicated,
        )

        def correct(params, batch, classes):
            img = model.apply({"params": params}, batch["image"], method="encode_image")
            pred = jnp.argmax(img @ classes.T, axis=-1)
            return jnp.sum((pred == batch["label"]) * batch["mask"]), jnp.sum(batch["mask"])

        self._correct = jax.jit(correct, out_shardings=(replicated, replicated))

    def __call__(self, params: Any) -> dict[str, float]:
        classes = class_embeddings(
            self._encode_text,
            params,
            self.tokenizer,
            self.names,
            self.templates,
            self.data_cfg.max_text_len,
        )
        hits = total = 0.0
        batches = mmdata.eval_batches(
            self.data_cfg,
            self.tokenizer,
            self.cfg.split,
            self.cfg.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        for local in batches:
            batch = global_batch({k: local[k] for k in ("image", "label", "mask")}, self.mesh)
            h, n = self._correct(params, batch, classes)
            hits, total = hits + float(h), total + float(n)
        return {f"{self.cfg.get('prefix', '')}zero_shot_accuracy": hits / max(total, 1.0)}
