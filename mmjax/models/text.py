"""Causal text transformer with end-of-text pooling (CLIP, Radford et al., 2021, Sec. 2.4)."""

import flax.linen as nn
import jax.numpy as jnp

from mmjax.nn import LayerNorm, TokenEmbed, Transformer
from mmjax.nn.axes import ACT
from mmjax.nn.dense import dtypes
from mmjax.nn.initializers import logical


def last_token_index(tokens: jnp.ndarray, pad_id: int = 0) -> jnp.ndarray:
    """Index of the last non-pad token of each row: the end-of-text token of CLIP's pooling."""
    return jnp.maximum(jnp.sum(tokens != pad_id, axis=-1) - 1, 0)


def pool_index(tokens: jnp.ndarray, pool: str, pad_id: int, eos_id: int | None) -> jnp.ndarray:
    """Per-row position of the pooled token.

    `eot`: last non-pad token (mmjax's tokenizers end every caption with end-of-text);
    `argmax`: the largest token id, OpenAI CLIP's end-of-text (open_clip's default);
    `eos`: the first `eos_id` (HF CLIP, where padding may repeat the end-of-text id);
    `last`: the final position (SigLIP, whose captions are padded to full length).
    """
    if pool == "eot":
        return last_token_index(tokens, pad_id)
    if pool == "argmax":
        return jnp.argmax(tokens, axis=-1)
    if pool == "eos":
        if eos_id is None:
            raise ValueError("text pool 'eos' needs eos_id")
        return jnp.argmax(tokens == eos_id, axis=-1)
    return jnp.full(tokens.shape[:1], tokens.shape[1] - 1)


POOLS = ("eot", "argmax", "eos", "last")


class TextTransformer(nn.Module):
    """Token ids [B, L] -> (pooled [B, width], tokens [B, L, width]).

    CLIP: causal, padding masked out, pooled at the end-of-text token (the last non-pad one).
    SigLIP: bidirectional, padding attended like any token, pooled at the last position.
    """

    vocab_size: int
    max_len: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    causal: bool = True
    pool: str = "eot"
    mask_padding: bool = True
    pad_id: int = 0
    eos_id: int | None = None
    activation: str = "gelu"
    norm_eps: float = 1e-5
    remat_policy: str = "none"  # nn.transformer.REMAT_POLICIES
    scan_layers: bool = False  # one nn.scan over the blocks (nn.transformer.Transformer)
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, tokens: jnp.ndarray, *, pooled_only: bool = False
    ) -> tuple[jnp.ndarray, jnp.ndarray | None]:
        """(pooled [B, width], tokens [B, L, width]); `pooled_only` computes the last block at
        the pooled token only (tokens: None)."""
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"text must be integer token ids [batch, length], got {tokens.dtype} {tokens.shape}"
            )
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"text length {tokens.shape[1]} exceeds max_len {self.max_len}")
        if self.pool not in POOLS:
            raise ValueError(f"unknown text pool {self.pool!r}; valid: {POOLS}")
        kw = dtypes(self)
        x = TokenEmbed(self.vocab_size, self.width, self.param_dtype, name="token_embedding")(
            tokens
        )
        pos = self.param(
            "pos_embedding",
            logical(nn.initializers.normal(0.01), "position", "embed"),
            (self.max_len, self.width),
            self.param_dtype,
        )
        x = (x + pos[: tokens.shape[1]]).astype(self.dtype)
        x = nn.with_logical_constraint(x, ACT)
        # segment id 0: padding sees and is seen by nothing
        segment_ids = (tokens != self.pad_id).astype(jnp.int32) if self.mask_padding else None
        index = pool_index(tokens, self.pool, self.pad_id, self.eos_id)
        x = Transformer(
            self.depth,
            self.num_heads,
            self.mlp_dim,
            activation=self.activation,
            causal=self.causal,
            norm_eps=self.norm_eps,
            remat_policy=self.remat_policy,
            scan_layers=self.scan_layers,
            attention_impl=self.attention_impl,
            name="encoder",
            **kw,
        )(x, segment_ids, read_at=index if pooled_only else None)
        x = LayerNorm(name="norm_final", epsilon=self.norm_eps, **kw)(x)
        if pooled_only:
            return x[:, 0], None
        return jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0], x
