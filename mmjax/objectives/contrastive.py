"""Contrastive image-text objectives."""

import jax
import jax.numpy as jnp


def clip_loss(
    image_emb: jnp.ndarray, text_emb: jnp.ndarray, logit_scale: jnp.ndarray
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """Symmetric softmax InfoNCE over the batch (CLIP, Radford et al., 2021, Fig. 3).

    Embeddings are unit-norm [B, D]; pair i is the positive of row i and column i.
    """
    logits = logit_scale * jnp.einsum(
        "id,jd->ij", image_emb, text_emb, preferred_element_type=jnp.float32
    )
    labels = jnp.arange(logits.shape[0])
    i2t = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits, axis=1), labels[:, None], 1))
    t2i = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits, axis=0), labels[None, :], 0))
    loss = 0.5 * (i2t + t2i)
    metrics = {
        "loss": loss,
        "logit_scale": logit_scale,
        "i2t_accuracy": jnp.mean(jnp.argmax(logits, axis=1) == labels),
        "t2i_accuracy": jnp.mean(jnp.argmax(logits, axis=0) == labels),
    }
    return loss, metrics
