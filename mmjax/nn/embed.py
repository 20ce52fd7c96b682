"""Token embeddings whose lookup reshards cheaply on a data x fsdp x tensor mesh."""

import flax.linen as nn
import jax.numpy as jnp

from mmjax.nn.axes import ACT
from mmjax.nn.initializers import logical
from mmjax.nn.reshard import from_width_to_batch_split


class TokenEmbed(nn.Module):
    """ids [B, L] -> rows of a [vocab, width] table ("embedding", as flax's nn.Embed names it).

    The table is stored split over "vocab" and "embed" (fsdp), so the rows a lookup gathers
    come out split over fsdp on the width, where the batch wants them split over data x
    fsdp on the batch: `from_width_to_batch_split` takes them there without replicating.
    """

    num_embeddings: int
    features: int
    param_dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        self.embedding = self.param(
            "embedding",
            logical(nn.initializers.normal(0.02), "vocab", "embed"),
            (self.num_embeddings, self.features),
            self.param_dtype,
        )

    def __call__(self, ids: jnp.ndarray) -> jnp.ndarray:
        rows = jnp.take(self.embedding, ids, axis=0)
        return from_width_to_batch_split(rows, ACT)

    def attend(self, x: jnp.ndarray) -> jnp.ndarray:
        """x [..., width] -> x @ table.T [..., vocab] in x's dtype: the LM head of a model
        whose input and output embeddings are tied (Gemma, small Qwen2s)."""
        return jnp.einsum("...d,vd->...v", x, self.embedding.astype(x.dtype))
