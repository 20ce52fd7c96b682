"""Instruction tuning of a VLM (LLaVA, Liu et al., 2023, Sec. 4.2): next-token cross-entropy
on the answer tokens only.

Batches are data.sequence kind "vlm" (mmjax/data/sequences.py): `targets` [B, L] is the next
token of each slot and `loss_mask` [B, L] is 1 where that target is part of an answer (its
<eos> included). The model returns `logits` [B, L, vocab] for every slot; the loss is their
cross-entropy averaged over the scored targets of the whole batch, so every answer token weighs
the same whatever the length of its row.
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mmjax.objectives.transfusion import masked_token_ce


def masked_token_accuracy(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
    """Weighted fraction of `labels` [B, K] that are the argmax of `logits` [B, K, V]."""
    hits = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return jnp.sum(hits * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def make_vlm_loss(apply_fn: Callable) -> Callable:
    """(params, batch, rng) -> (loss, metrics) with `loss` and `token_accuracy` over the
    scored answer tokens; `apply_fn(params, batch, rng)` returns {"logits": [B, L, V]}."""

    def loss_fn(params: Any, batch: Mapping[str, jax.Array], rng: jax.Array):
        logits = apply_fn(params, batch, rng)["logits"].astype(jnp.float32)
        weights = batch["loss_mask"].astype(jnp.float32)
        loss = masked_token_ce(logits, batch["targets"], weights)
        accuracy = masked_token_accuracy(logits, batch["targets"], weights)
        return loss, {"loss": loss, "token_accuracy": accuracy}

    return loss_fn
