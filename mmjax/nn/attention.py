"""Multi-head (grouped-query) attention layer on top of `mmjax.kernels.attention`."""

import flax.linen as nn
import jax.numpy as jnp

from mmjax import kernels
from mmjax.nn.dense import DenseGeneral
from mmjax.nn.rope import apply_rope


class MultiHeadAttention(nn.Module):
    """Self- or cross-attention with `num_kv_heads` dividing `num_heads` (GQA).

    The mask comes from token metadata (segment/span ids, causal, window) exactly as
    `mmjax.kernels.attention` defines it; `impl` picks the kernel ("auto", "xla", ...).
    With `rope_theta`, q and k are rotated by the `positions` passed at call time.
    """

    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    use_bias: bool = True
    rope_theta: float | None = None
    impl: str = "auto"
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        kv: jnp.ndarray | None = None,
        *,
        segment_ids: jnp.ndarray | None = None,
        kv_segment_ids: jnp.ndarray | None = None,
        span_ids: jnp.ndarray | None = None,
        kv_span_ids: jnp.ndarray | None = None,
        causal: bool = False,
        window: int | None = None,
        positions: jnp.ndarray | None = None,
        kv_positions: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        width = x.shape[-1]
        if self.head_dim is None and width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        head_dim = self.head_dim or width // self.num_heads
        kv_heads = self.num_kv_heads or self.num_heads
        kv = x if kv is None else kv

        def project(name: str, inputs: jnp.ndarray, heads: int) -> jnp.ndarray:
            y = DenseGeneral(
                (heads, head_dim),
                ("embed", "heads", "kv"),
                use_bias=self.use_bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=name,
            )(inputs)
            return nn.with_logical_constraint(y, ("batch", "length", "act_heads", "kv"))

        q = project("query", x, self.num_heads)
        k = project("key", kv, kv_heads)
        v = project("value", kv, kv_heads)
        if self.rope_theta is not None:
            if positions is None:
                raise ValueError("attention with rope_theta needs token positions")
            kv_positions = positions if kv_positions is None else kv_positions
            q = apply_rope(q, positions, self.rope_theta)
            k = apply_rope(k, kv_positions, self.rope_theta)
        out = kernels.attention(
            q,
            k,
            v,
            segment_ids=segment_ids,
            kv_segment_ids=kv_segment_ids,
            span_ids=span_ids,
            kv_span_ids=kv_span_ids,
            causal=causal,
            window=window,
            impl=self.impl,
        )
        return DenseGeneral(
            (width,),
            ("heads", "kv", "embed"),
            num_in=2,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="out",
        )(out)
