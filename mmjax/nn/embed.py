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

    @nn.compact
    def __call__(self, ids: jnp.ndarray) -> jnp.ndarray:
        table = self.param(
            "embedding",
            logical(nn.initializers.normal(0.02), "vocab", "embed"),
            (self.num_embeddings, self.features),
            self.param_dtype,
        )
        rows = jnp.take(table, ids, axis=0)
        return from_width_to_batch_split(rows, ACT)
