"""Pre-norm transformer blocks and stacks shared by the vision and text towers and decoders.

The defaults are ViT/CLIP's block (LayerNorm, GELU MLP, biases); `norm="rms"`, `gated_mlp`,
`activation="silu"`, `use_bias=False` and `rope_theta` give the Llama block that Transfusion
and the other decoders use.
"""

from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp

from mmjax.nn.attention import MultiHeadAttention
from mmjax.nn.mlp import Mlp
from mmjax.nn.norms import make_norm

ACT = ("batch", "length", "act_embed")


class TransformerBlock(nn.Module):
    """x + Attn(Norm(x)), then x + MLP(Norm(x))."""

    num_heads: int
    mlp_dim: int
    activation: str = "gelu"
    causal: bool = False
    norm: str = "layer"
    norm_eps: float = 1e-5
    gated_mlp: bool = False
    use_bias: bool = True
    rope_theta: float | None = None
    decode: bool = False
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        segment_ids: jnp.ndarray | None = None,
        span_ids: jnp.ndarray | None = None,
        positions: jnp.ndarray | None = None,
        cache_offset: jnp.ndarray | None = None,
        read_at: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        """x [B, L, width] -> [B, L, width]; with `read_at` (int [B]) only the token at that
        position is computed (its keys and values still come from every token): [B, 1, width]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = make_norm(self.norm, name="norm1", epsilon=self.norm_eps, **kw)(x)
        query = dict(segment_ids=segment_ids, span_ids=span_ids, positions=positions)
        kv = {}
        if read_at is not None:
            kv = dict(
                kv=y, kv_segment_ids=segment_ids, kv_span_ids=span_ids, kv_positions=positions
            )
            query = {k: _at(v, read_at) for k, v in query.items()}
            x, y = _at(x, read_at), _at(y, read_at)
        y = MultiHeadAttention(
            self.num_heads,
            use_bias=self.use_bias,
            rope_theta=self.rope_theta,
            decode=self.decode,
            impl=self.attention_impl,
            name="attn",
            **kw,
        )(y, causal=self.causal, cache_offset=cache_offset, query_offset=read_at, **query, **kv)
        x = nn.with_logical_constraint(x + y, ACT)
        y = make_norm(self.norm, name="norm2", epsilon=self.norm_eps, **kw)(x)
        y = Mlp(self.mlp_dim, activation=self.activation, gated=self.gated_mlp, name="mlp", **kw)(y)
        return nn.with_logical_constraint(x + y, ACT)


class Transformer(nn.Module):
    """`depth` TransformerBlocks; `remat` recomputes each block's activations in backward."""

    depth: int
    num_heads: int
    mlp_dim: int
    activation: str = "gelu"
    causal: bool = False
    norm: str = "layer"
    norm_eps: float = 1e-5
    gated_mlp: bool = False
    use_bias: bool = True
    rope_theta: float | None = None
    decode: bool = False  # KV cache (nn.attention.MultiHeadAttention)
    remat: bool = False
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        segment_ids: jnp.ndarray | None = None,
        span_ids: jnp.ndarray | None = None,
        positions: jnp.ndarray | None = None,
        cache_offset: jnp.ndarray | None = None,
        read_at: jnp.ndarray | None = None,
        before_block: Callable[[int, jnp.ndarray], jnp.ndarray] | None = None,
    ) -> jnp.ndarray:
        """x [B, L, width] -> [B, L, width]. `read_at` (int [B]): the caller reads only the
        token at that position (CLS or end-of-text pooling), so the last block computes only
        it and returns [B, 1, width]: the same values for about 1/depth less work.
        `before_block(i, x)`: the caller's layers run on x before block i (Flamingo's gated
        cross-attention inside a frozen LM)."""
        block = nn.remat(TransformerBlock) if self.remat else TransformerBlock
        last = self.depth - 1
        for i in range(self.depth):
            if before_block is not None:
                x = before_block(i, x)
            x = block(
                self.num_heads,
                self.mlp_dim,
                activation=self.activation,
                causal=self.causal,
                norm=self.norm,
                norm_eps=self.norm_eps,
                gated_mlp=self.gated_mlp,
                use_bias=self.use_bias,
                rope_theta=self.rope_theta,
                decode=self.decode,
                attention_impl=self.attention_impl,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"block{i}",
            )(x, segment_ids, span_ids, positions, cache_offset, read_at if i == last else None)
        return x


def llama_decoder(
    depth: int, num_heads: int, mlp_dim: int, *, norm_eps: float, rope_theta: float, **kw
) -> Transformer:
    """The causal Llama stack of the unified decoders (Transfusion Sec. 4.1, UniFluid): RMSNorm,
    bias-free SwiGLU, RoPE; `kw` passes decode, remat, attention_impl and dtypes."""
    return Transformer(
        depth,
        num_heads,
        mlp_dim,
        activation="silu",
        causal=True,
        norm="rms",
        norm_eps=norm_eps,
        gated_mlp=True,
        use_bias=False,
        rope_theta=rope_theta,
        **kw,
    )


def _at(x: jnp.ndarray | None, index: jnp.ndarray) -> jnp.ndarray | None:
    """Row b of x [B, L, ...] at position index[b] -> [B, 1, ...]."""
    if x is None:
        return None
    index = index.reshape(-1, 1, *([1] * (x.ndim - 2)))
    return jnp.take_along_axis(x, index, axis=1)
