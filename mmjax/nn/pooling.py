"""Pooling a token sequence into one vector."""

import flax.linen as nn
import jax.numpy as jnp

from mmjax.nn.attention import MultiHeadAttention
from mmjax.nn.dense import dtypes
from mmjax.nn.initializers import logical
from mmjax.nn.mlp import Mlp
from mmjax.nn.norms import LayerNorm


class MAPHead(nn.Module):
    """Multihead attention pooling: a learned probe attends over the tokens, then a residual
    MLP (Zhai et al., 2022, "Scaling Vision Transformers", Sec. 3.2; SigLIP's image head)."""

    num_heads: int
    mlp_dim: int
    activation: str = "gelu"
    norm_eps: float = 1e-5
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kw = dtypes(self)
        width = x.shape[-1]
        probe = self.param(
            "probe", logical(nn.initializers.xavier_uniform(), None, None, "embed"), (1, 1, width)
        )
        probe = jnp.broadcast_to(probe, (x.shape[0], 1, width)).astype(self.dtype)
        y = MultiHeadAttention(self.num_heads, impl=self.attention_impl, name="attn", **kw)(
            probe, x
        )
        y_norm = LayerNorm(name="norm", epsilon=self.norm_eps, **kw)(y)
        y = y + Mlp(self.mlp_dim, activation=self.activation, name="mlp", **kw)(y_norm)
        return y[:, 0]
