"""BLIP (Li et al., 2022) and BLIP-2 stage 1 (Li et al., 2023) pre-training objectives.

Three losses on a batch of image-caption pairs, summed with equal weights (BLIP Sec. 3.2,
BLIP-2 Sec. 3.2) and reported separately:

- ITC, image-text contrastive: softmax InfoNCE over the batch with a learned temperature.
  BLIP scores one image embedding against one text embedding (CLIP's loss); BLIP-2 scores each
  of the Q query embeddings against the text embedding and keeps the highest.
- ITM, image-text matching: a binary classifier over the matched pairs and, for each image and
  each text, one hard negative drawn from the contrastive similarities (more similar, more
  likely; ALBEF, Li et al., 2021, Sec. 3.2). Pairs known to match (another caption of the
  same image, LAVIS's image-id mask) can be kept out of the negatives (`same_key`).
- ITG / LM: next-token cross-entropy on the caption, conditioned on the image.

The model (models/blip.py) is applied twice: once on the batch (ITC embeddings, ITM on the
matched pairs, ITG logits and the image encoder's tokens), and once on the negative pairs,
built from those image tokens (the image encoder is not run again) and the batch's texts.
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mmjax.objectives.contrastive import clip_loss_sharded
from mmjax.objectives.vlm import masked_token_accuracy

Metrics = dict[str, jax.Array]


def similarity(image_emb: jax.Array, text_emb: jax.Array) -> jax.Array:
    """Image-text similarities [B_image, B_text] in f32 of unit-norm embeddings.

    `image_emb` is [B, D] (BLIP) or [B, Q, D] (BLIP-2: the highest of the Q query-text
    similarities, Sec. 3.2); `text_emb` is [B, D].
    """
    if image_emb.ndim == 2:
        image_emb = image_emb[:, None]
    sims = jnp.einsum("iqd,jd->ijq", image_emb, text_emb, preferred_element_type=jnp.float32)
    return jnp.max(sims, axis=-1)


def itc_loss(
    image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array
) -> tuple[jax.Array, Metrics]:
    """Symmetric InfoNCE over the batch; `logit_scale` is 1 / temperature.

    One embedding per image is CLIP's loss (sharded over the batch axes); BLIP-2's query
    embeddings [B, Q, D] are scored by their best query, which is no dot product of two
    embeddings, so the cross-entropies are taken over the [B, B] similarity logits.
    """
    if image_emb.ndim == 2:
        loss, metrics = clip_loss_sharded(image_emb, text_emb, logit_scale)
        metrics["itc_loss"] = metrics.pop("loss")
        return loss, metrics
    logits = logit_scale * similarity(image_emb, text_emb)
    labels = jnp.arange(logits.shape[0])
    i2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    loss = 0.5 * (i2t + t2i)
    metrics = {
        "itc_loss": loss,
        "logit_scale": logit_scale,
        "i2t_accuracy": jnp.mean(jnp.argmax(logits, axis=1) == labels),
        "t2i_accuracy": jnp.mean(jnp.argmax(logits, axis=0) == labels),
    }
    return loss, metrics


def sample_hard_negatives(
    logits: jax.Array, rng: jax.Array, same: jax.Array | None = None
) -> jax.Array:
    """For each row i of the square `logits` [B, B], one column j != i drawn with probability
    softmax(logits[i])[j] renormalised over j != i (BLIP Sec. 3.2: the positive's weight is
    zeroed). `same` [B, B] (bool) marks more pairs that are no negatives, e.g. two captions of
    one image (LAVIS masks equal image ids); a row that `same` leaves without any column
    falls back to excluding the positive alone. Returns int32 [B]; no gradient flows back."""
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"hard negatives need square [B, B] logits, got {logits.shape}")
    if logits.shape[0] < 2:
        raise ValueError("hard negatives need a batch of at least 2 pairs")
    excluded = jnp.eye(logits.shape[0], dtype=bool)
    if same is not None:
        wider = excluded | same
        excluded = jnp.where(jnp.all(wider, axis=1, keepdims=True), excluded, wider)
    masked = jnp.where(excluded, -jnp.inf, jax.lax.stop_gradient(logits))
    return jax.random.categorical(rng, masked, axis=-1).astype(jnp.int32)


def itm_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean two-class cross-entropy of `logits` [P, 2] against `labels` [P] (1: matched),
    and the accuracy."""
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels
    ).mean()
    return loss, jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def itg_loss(
    logits: jax.Array, text: jax.Array, *, pad_id: int = 0, label_smoothing: float = 0.0
) -> tuple[jax.Array, jax.Array]:
    """Next-token cross-entropy of the caption: `logits` [B, T, V] at position t predict
    `text` [B, T] at t + 1, scored where that token is not `pad_id`; labels smoothed by
    `label_smoothing` (0.1 in BLIP and BLIP-2's Q-Former). Returns (loss, token accuracy)."""
    if logits.shape[:2] != text.shape:
        raise ValueError(f"logits {logits.shape} do not match the text {text.shape}")
    logits, labels = logits[:, :-1].astype(jnp.float32), text[:, 1:]
    weights = (labels != pad_id).astype(jnp.float32)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    ce = optax.softmax_cross_entropy(logits, targets)
    loss = jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    return loss, masked_token_accuracy(logits, labels, weights)


def negative_pairs(
    image_tokens: jax.Array,
    text: jax.Array,
    logits: jax.Array,
    rng: jax.Array,
    same: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """The 2B negative ITM pairs of a batch: each image with a hard-negative text, then each
    text with a hard-negative image, drawn from the ITC `logits` [B_image, B_text] (`same`:
    `sample_hard_negatives`; symmetric)."""
    text_rng, image_rng = jax.random.split(rng)
    text_for_image = sample_hard_negatives(logits, text_rng, same)
    image_for_text = sample_hard_negatives(logits.T, image_rng, same)
    return {
        "image_tokens": jnp.concatenate([image_tokens, image_tokens[image_for_text]]),
        "itm_text": jnp.concatenate([text[text_for_image], text]),
    }


def make_blip_loss(
    apply_fn: Callable,
    *,
    pad_id: int = 0,
    label_smoothing: float = 0.1,
    same_key: str | None = None,
) -> Callable:
    """(params, batch, rng) -> (itc + itm + itg, metrics) for BLIP and BLIP-2 stage 1.

    `same_key`: a batch key whose equal values mark pairs that are never ITM negatives (an
    image id; "label" where captions name the label alone, as the digits' do).

    `apply_fn(params, batch, rng)` on the batch {"image", "text"} returns "image_tokens",
    "image_emb" ([B, D] or [B, Q, D], unit-norm), "text_emb" [B, D], "logit_scale",
    "itm_logits" [B, 2] of the matched pairs and "lm_logits" [B, T, V]; on
    {"image_tokens", "itm_text"} it returns the "itm_logits" of those pairs alone.
    """

    def loss_fn(params: Any, batch: Mapping[str, jax.Array], rng: jax.Array):
        model_rng, negatives_rng = jax.random.split(rng)
        out = apply_fn(params, batch, model_rng)
        itc, metrics = itc_loss(out["image_emb"], out["text_emb"], out["logit_scale"])
        logits = out["logit_scale"] * similarity(out["image_emb"], out["text_emb"])
        same = None
        if same_key is not None:
            if same_key not in batch:
                raise ValueError(f"same_key {same_key!r} is not in the batch: {sorted(batch)}")
            same = batch[same_key][:, None] == batch[same_key][None, :]
        pairs = negative_pairs(out["image_tokens"], batch["text"], logits, negatives_rng, same)
        negatives = apply_fn(params, pairs, jax.random.fold_in(model_rng, 1))["itm_logits"]
        batch_size = batch["text"].shape[0]
        labels = jnp.concatenate(
            [jnp.ones(batch_size, jnp.int32), jnp.zeros(2 * batch_size, jnp.int32)]
        )
        itm, itm_accuracy = itm_loss(jnp.concatenate([out["itm_logits"], negatives]), labels)
        itg, itg_accuracy = itg_loss(
            out["lm_logits"], batch["text"], pad_id=pad_id, label_smoothing=label_smoothing
        )
        loss = itc + itm + itg
        metrics.update(
            loss=loss,
            itm_loss=itm,
            itm_accuracy=itm_accuracy,
            itg_loss=itg,
            itg_accuracy=itg_accuracy,
        )
        return loss, metrics

    return loss_fn
