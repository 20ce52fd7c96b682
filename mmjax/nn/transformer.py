"""Pre-norm transformer blocks and stacks shared by the vision and text towers."""

import flax.linen as nn
import jax.numpy as jnp

from mmjax.nn.attention import MultiHeadAttention
from mmjax.nn.mlp import Mlp
from mmjax.nn.norms import LayerNorm

ACT = ("batch", "length", "act_embed")


class TransformerBlock(nn.Module):
    """x + Attn(LN(x)), then x + MLP(LN(x)) (pre-norm, as ViT and CLIP)."""

    num_heads: int
    mlp_dim: int
    activation: str = "gelu"
    causal: bool = False
    norm_eps: float = 1e-5
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, segment_ids: jnp.ndarray | None = None) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = LayerNorm(name="norm1", epsilon=self.norm_eps, **kw)(x)
        y = MultiHeadAttention(self.num_heads, impl=self.attention_impl, name="attn", **kw)(
            y, segment_ids=segment_ids, causal=self.causal
        )
        x = nn.with_logical_constraint(x + y, ACT)
        y = LayerNorm(name="norm2", epsilon=self.norm_eps, **kw)(x)
        y = Mlp(self.mlp_dim, activation=self.activation, name="mlp", **kw)(y)
        return nn.with_logical_constraint(x + y, ACT)


class Transformer(nn.Module):
    """`depth` TransformerBlocks; `remat` recomputes each block's activations in backward."""

    depth: int
    num_heads: int
    mlp_dim: int
    activation: str = "gelu"
    causal: bool = False
    norm_eps: float = 1e-5
    remat: bool = False
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, segment_ids: jnp.ndarray | None = None) -> jnp.ndarray:
        block = nn.remat(TransformerBlock) if self.remat else TransformerBlock
        for i in range(self.depth):
            x = block(
                self.num_heads,
                self.mlp_dim,
                activation=self.activation,
                causal=self.causal,
                norm_eps=self.norm_eps,
                attention_impl=self.attention_impl,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"block{i}",
            )(x, segment_ids)
        return x
