"""Connectors: how an image encoder's tokens reach a language model.

Every connector maps image tokens [B, N, D_in] to visual tokens [B, M, out_dim] for the
decoder, and is built from a config dict by `build_connector(dict(type=..., out_dim=...,
...))`:

- `linear`: one projection (LLaVA, Liu et al., 2023).
- `mlp`: Linear -> GELU -> Linear (LLaVA-1.5, Liu et al., 2023b, Sec. 3.1).
- `concat`: each 4 neighbouring tokens concatenated into one, then one projection: N / 4
  visual tokens (MiniGPT-v2, Chen et al., 2023, Sec. 3).
- `qformer`: the Querying Transformer, 32 learned queries that cross-attend to the image
  every other layer (BLIP-2, Li et al., 2023, Sec. 3.1), then one projection to the LM width
  (BLIP-2 Sec. 3.3; MiniGPT-4). `QFormer.encode` also reads text under the three stage-1
  masks and returns query and text outputs for the ITC / ITM / ITG objectives.
- `perceiver`: the Perceiver Resampler, learned latents attending to [media; latents]
  (Flamingo, Alayrac et al., 2022, Sec. 2.1 and App. A.1.1; BLIP-3 / xGen-MM's perceiver
  sampler with 128 latents); [B, T, N, D_in] input carries T frames with learned time
  embeddings.
- `cross_attn`: one cross-attention layer with 256 learned queries and 2D absolute sin-cos
  positions on queries and keys (Qwen-VL, Bai et al., 2023, Sec. 2.1).
"""

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from mmjax.nn.attention import MultiHeadAttention
from mmjax.nn.axes import ACT
from mmjax.nn.dense import DenseGeneral, dtypes
from mmjax.nn.initializers import logical
from mmjax.nn.mlp import ACTIVATIONS, Mlp
from mmjax.nn.norms import LayerNorm
from mmjax.nn.sincos import sincos_2d

RANK_NAMES = {3: "[batch, tokens, dim]", 4: "[batch, frames, tokens, dim]"}


def _check_rank(image_tokens: jnp.ndarray, kind: str, ranks: tuple[int, ...] = (3,)) -> None:
    if image_tokens.ndim not in ranks:
        wanted = " or ".join(RANK_NAMES[r] for r in ranks)
        raise ValueError(
            f"the {kind} connector takes image tokens {wanted}, got shape {image_tokens.shape}"
        )


def _project(out_dim: int, x: jnp.ndarray, **kw: Any) -> jnp.ndarray:
    """The final linear layer of a connector ("proj", inside the caller's compact method)."""
    y = DenseGeneral((out_dim,), (None, "embed"), name="proj", **kw)(x)
    return nn.with_logical_constraint(y, ACT)


class LinearProjector(nn.Module):
    """Image tokens [B, N, D_in] -> [B, N, out_dim] by one linear layer (LLaVA)."""

    out_dim: int
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, image_tokens: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        _check_rank(image_tokens, "linear")
        kw = dtypes(self)
        y = DenseGeneral((self.out_dim,), (None, "embed"), name="proj", **kw)(image_tokens)
        return nn.with_logical_constraint(y, ACT)


class MlpProjector(nn.Module):
    """Image tokens [B, N, D_in] -> Linear -> GELU -> Linear -> [B, N, out_dim] (LLaVA-1.5)."""

    out_dim: int
    activation: str = "gelu"  # a name of mmjax.nn.mlp.ACTIVATIONS
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, image_tokens: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        _check_rank(image_tokens, "mlp")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; valid: {sorted(ACTIVATIONS)}"
            )
        kw = dtypes(self)
        h = DenseGeneral((self.out_dim,), ("embed", "mlp"), name="fc1", **kw)(image_tokens)
        h = ACTIVATIONS[self.activation](h)
        y = DenseGeneral((self.out_dim,), ("mlp", "embed"), name="fc2", **kw)(h)
        return nn.with_logical_constraint(y, ACT)


class ConcatProjector(nn.Module):
    """Image tokens [B, N, D_in] -> [B, N / group, out_dim]: each run of `group` neighbouring
    tokens (in the encoder's raster order) concatenated into one [group * D_in] token, then one
    linear layer (MiniGPT-v2, Sec. 3: 4 tokens, so the LLM reads 4x fewer visual tokens)."""

    out_dim: int
    group: int = 4
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, image_tokens: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        _check_rank(image_tokens, "concat")
        batch, n, dim = image_tokens.shape
        if n % self.group:
            raise ValueError(
                f"the concat connector merges {self.group} neighbouring tokens, but the "
                f"number of image tokens, {n}, is not divisible by {self.group}"
            )
        x = image_tokens.reshape(batch, n // self.group, self.group * dim)
        return _project(self.out_dim, x, **dtypes(self))


# ---------------------------------------------------------------------------------------
# Q-Former (BLIP-2)

QFORMER_MASKS = ("unimodal", "bidirectional", "multimodal_causal")


def qformer_mask(mode: str, num_queries: int, text_mask: jnp.ndarray) -> dict[str, Any]:
    """`mmjax.kernels.attention` mask keywords for self-attention over [queries; text].

    BLIP-2 Sec. 3.2 (Fig. 2, right); `text_mask` [B, T] is non-zero for text tokens and 0 for
    padding, which sees and is seen by nothing (segment id 0).
    - "bidirectional" (ITM): one segment, every token sees every token.
    - "unimodal" (ITC): queries and text in two segments, neither sees the other.
    - "multimodal_causal" (ITG): causal, with the queries one bidirectional span in front:
      queries see all queries and no text; text sees the queries and text up to itself.
    """
    if mode not in QFORMER_MASKS:
        raise ValueError(f"unknown Q-Former mask {mode!r}; valid: {QFORMER_MASKS}")
    text = (jnp.asarray(text_mask) != 0).astype(jnp.int32)
    queries = jnp.ones((text.shape[0], num_queries), jnp.int32)
    text_segment = 2 * text if mode == "unimodal" else text
    mask: dict[str, Any] = dict(segment_ids=jnp.concatenate([queries, text_segment], axis=1))
    if mode == "multimodal_causal":
        mask["span_ids"] = jnp.concatenate([queries, jnp.zeros_like(text)], axis=1)
        mask["causal"] = True
    return mask


class QFormerOutputs(NamedTuple):
    """What `QFormer.encode` returns: the last layer's outputs at the query and text positions."""

    queries: jnp.ndarray  # [B, num_queries, width]
    text: jnp.ndarray | None  # [B, T, width]; None when no text was given


class QFormerLayer(nn.Module):
    """One BERT layer of the Q-Former, post-LN: self-attention over [queries; text], then (when
    `cross_attention`) the queries cross-attend to the image, then separate feed-forward
    weights for query and text positions (BLIP-2 Sec. 3.1)."""

    num_queries: int
    num_heads: int
    mlp_dim: int
    activation: str
    norm_eps: float
    cross_attention: bool
    text: bool  # text feed-forward weights; without them the sequence holds queries only
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, image_tokens: jnp.ndarray, mask: Mapping[str, Any]
    ) -> jnp.ndarray:
        kw = dtypes(self)

        def add_norm(name: str, residual: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
            y = LayerNorm(name=name, epsilon=self.norm_eps, **kw)(residual + y)
            return nn.with_logical_constraint(y, ACT)

        def attention(name: str) -> MultiHeadAttention:
            return MultiHeadAttention(self.num_heads, impl=self.attention_impl, name=name, **kw)

        def mlp(name: str) -> Mlp:
            return Mlp(self.mlp_dim, activation=self.activation, name=name, **kw)

        x = add_norm("self_attn_norm", x, attention("self_attn")(x, **mask))
        queries, text = x[:, : self.num_queries], x[:, self.num_queries :]
        if self.cross_attention:
            y = attention("cross_attn")(queries, image_tokens)
            queries = add_norm("cross_attn_norm", queries, y)
        queries = add_norm("query_mlp_norm", queries, mlp("query_mlp")(queries))
        if not self.text:
            return queries
        text = add_norm("text_mlp_norm", text, mlp("text_mlp")(text))
        return jnp.concatenate([queries, text], axis=1)


class QFormer(nn.Module):
    """BLIP-2's Querying Transformer: image tokens [B, N, D_in] -> [B, num_queries, out_dim].

    `num_queries` learned queries go through `depth` post-LN BERT layers; every
    `cross_attention_freq`-th layer (0, f, 2f, ...) they cross-attend to the image tokens.
    The queries (and text) are LayerNorm'd first, as BERT normalises its embeddings.

    As a connector (`__call__`) it returns the query outputs projected to `out_dim` (the FC
    layer of BLIP-2 Sec. 3.3 / MiniGPT-4); `out_dim=None` skips the projection (the bare
    Q-Former of a Hugging Face `Blip2QFormerModel`). With `vocab_size > 0` it also reads text
    (stage 1): word and position embeddings and text feed-forward weights; `encode` returns
    the query and text outputs under one of `QFORMER_MASKS` for ITC, ITM and ITG.
    """

    out_dim: int | None
    num_queries: int = 32
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    cross_attention_freq: int = 2
    activation: str = "gelu"
    norm_eps: float = 1e-12
    vocab_size: int = 0  # 0: queries only (the stage-2 connector)
    max_text_len: int = 512
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        kw = dtypes(self)
        normal = nn.initializers.normal(0.02)
        self.query_tokens = self.param(
            "query_tokens",
            logical(normal, None, "embed"),
            (self.num_queries, self.width),
            self.param_dtype,
        )
        if self.vocab_size:
            self.word_embedding = self.param(
                "word_embedding",
                logical(normal, "vocab", "embed"),
                (self.vocab_size, self.width),
                self.param_dtype,
            )
            self.position_embedding = self.param(
                "position_embedding",
                logical(normal, "position", "embed"),
                (self.max_text_len, self.width),
                self.param_dtype,
            )
        self.embed_norm = LayerNorm(epsilon=self.norm_eps, **kw)
        self.layers = [
            QFormerLayer(
                self.num_queries,
                self.num_heads,
                self.mlp_dim,
                self.activation,
                self.norm_eps,
                cross_attention=i % self.cross_attention_freq == 0,
                text=bool(self.vocab_size),
                attention_impl=self.attention_impl,
                **kw,
            )
            for i in range(self.depth)
        ]
        if self.out_dim is not None:
            self.proj = DenseGeneral((self.out_dim,), (None, "embed"), **kw)

    def __call__(self, image_tokens: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        """Image tokens [B, N, D_in] -> visual tokens [B, num_queries, out_dim (or width)]."""
        queries = self.encode(image_tokens).queries
        if self.out_dim is None:
            return queries
        return nn.with_logical_constraint(self.proj(queries), ACT)

    def encode(
        self,
        image_tokens: jnp.ndarray,
        *,
        text_ids: jnp.ndarray | None = None,
        text_embeds: jnp.ndarray | None = None,
        text_mask: jnp.ndarray | None = None,
        mask: str = "bidirectional",
    ) -> QFormerOutputs:
        """The last layer's query outputs [B, Q, width] and text outputs [B, T, width].

        Text is `text_ids` [B, T] (embedded with the Q-Former's word and position tables) or
        `text_embeds` [B, T, width] (already embedded, e.g. by a shared table); `text_mask`
        [B, T] is 1 for tokens and 0 for padding (default: no padding). `mask` is one of
        `QFORMER_MASKS` (see `qformer_mask`); without text the queries see each other only.
        Text outputs at padding positions are meaningless.
        """
        _check_rank(image_tokens, "qformer")
        if mask not in QFORMER_MASKS:
            raise ValueError(f"unknown Q-Former mask {mask!r}; valid: {QFORMER_MASKS}")
        batch = image_tokens.shape[0]
        text, text_mask = self._text(batch, text_ids, text_embeds, text_mask)
        queries = jnp.broadcast_to(self.query_tokens, (batch, *self.query_tokens.shape))
        x = jnp.concatenate([queries.astype(self.dtype), text.astype(self.dtype)], axis=1)
        x = nn.with_logical_constraint(self.embed_norm(x), ACT)
        has_text = text.shape[1] > 0
        attention_mask = qformer_mask(mask, self.num_queries, text_mask) if has_text else {}
        for layer in self.layers:
            x = layer(x, image_tokens, attention_mask)
        q = self.num_queries
        return QFormerOutputs(queries=x[:, :q], text=x[:, q:] if has_text else None)

    def _text(
        self,
        batch: int,
        text_ids: jnp.ndarray | None,
        text_embeds: jnp.ndarray | None,
        text_mask: jnp.ndarray | None,
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Text embeddings [B, T, width] and mask [B, T]; T = 0 when no text is given."""
        if text_ids is not None and text_embeds is not None:
            raise ValueError("give the Q-Former text_ids or text_embeds, not both")
        if text_ids is None and text_embeds is None:
            if text_mask is not None:
                raise ValueError("text_mask was given without text_ids or text_embeds")
            return jnp.zeros((batch, 0, self.width), self.dtype), jnp.zeros((batch, 0), jnp.int32)
        if not self.vocab_size:
            raise ValueError("this Q-Former reads no text (vocab_size=0); set vocab_size > 0")
        if text_ids is not None:
            if text_ids.ndim != 2 or not jnp.issubdtype(text_ids.dtype, jnp.integer):
                raise ValueError(
                    f"text_ids must be integer [batch, length], got {text_ids.dtype} "
                    f"{text_ids.shape}"
                )
            if text_ids.shape[1] > self.max_text_len:
                raise ValueError(
                    f"text of {text_ids.shape[1]} tokens exceeds max_text_len {self.max_text_len}"
                )
            positions = self.position_embedding[: text_ids.shape[1]]
            text_embeds = jnp.take(self.word_embedding, text_ids, axis=0) + positions
        if text_embeds.ndim != 3 or (text_embeds.shape[0], text_embeds.shape[2]) != (
            batch,
            self.width,
        ):
            raise ValueError(
                f"text embeddings must be [batch={batch}, length, width={self.width}], "
                f"got {text_embeds.shape}"
            )
        shape = text_embeds.shape[:2]
        text_mask = jnp.ones(shape, jnp.int32) if text_mask is None else text_mask
        if text_mask.shape != shape:
            raise ValueError(f"text_mask must be shaped {shape}, got {text_mask.shape}")
        return text_embeds, text_mask


# ---------------------------------------------------------------------------------------
# Perceiver Resampler (Flamingo, xGen-MM)


class PerceiverBlock(nn.Module):
    """latents + Attn(q=LN(latents), kv=[LN(media); LN(latents)]), then + MLP(LN(latents))."""

    num_heads: int
    head_dim: int
    mlp_ratio: int
    norm_eps: float
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, media: jnp.ndarray, latents: jnp.ndarray) -> jnp.ndarray:
        kw = dtypes(self)
        media = LayerNorm(name="media_norm", epsilon=self.norm_eps, **kw)(media)
        normed = LayerNorm(name="latent_norm", epsilon=self.norm_eps, **kw)(latents)
        # Flamingo App. A.1.1: keys and values are the media concatenated with the latents
        y = MultiHeadAttention(
            self.num_heads,
            head_dim=self.head_dim,
            use_bias=False,
            impl=self.attention_impl,
            name="attn",
            **kw,
        )(normed, jnp.concatenate([media, normed], axis=1))
        latents = nn.with_logical_constraint(latents + y, ACT)
        y = LayerNorm(name="mlp_norm", epsilon=self.norm_eps, **kw)(latents)
        y = Mlp(self.mlp_ratio * latents.shape[-1], name="mlp", **kw)(y)
        return nn.with_logical_constraint(latents + y, ACT)


class PerceiverResampler(nn.Module):
    """Media tokens [B, N, D_in] or [B, T, N, D_in] (T frames) -> [B, num_latents, out_dim].

    Learned time embeddings (one per frame, up to `max_frames`) are added to the media tokens,
    which are then flattened; `num_latents` learned latents go through `depth` PerceiverBlocks
    at width D_in, a final LayerNorm and a projection to `out_dim`. Token order within a frame
    does not matter: the media tokens carry no positions (Flamingo Sec. 2.1).
    """

    out_dim: int
    num_latents: int = 64  # Flamingo; xGen-MM: 128
    depth: int = 6
    num_heads: int = 8
    head_dim: int = 64
    mlp_ratio: int = 4
    max_frames: int = 8
    norm_eps: float = 1e-5
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, image_tokens: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        _check_rank(image_tokens, "perceiver", ranks=(3, 4))
        kw = dtypes(self)
        media = image_tokens if image_tokens.ndim == 4 else image_tokens[:, None]
        batch, frames, n, dim = media.shape
        if frames > self.max_frames:
            raise ValueError(
                f"the perceiver connector got {frames} frames but has time embeddings for "
                f"max_frames={self.max_frames}"
            )
        time = self.param(
            "time_embedding",
            logical(nn.initializers.normal(0.02), None, "embed"),
            (self.max_frames, dim),
            self.param_dtype,
        )
        media = (media + time[:frames, None]).reshape(batch, frames * n, dim).astype(self.dtype)
        latents = self.param(
            "latents",
            logical(nn.initializers.normal(1.0), None, "embed"),
            (self.num_latents, dim),
            self.param_dtype,
        )
        x = jnp.broadcast_to(latents, (batch, *latents.shape)).astype(self.dtype)
        for i in range(self.depth):
            x = PerceiverBlock(
                self.num_heads,
                self.head_dim,
                self.mlp_ratio,
                self.norm_eps,
                attention_impl=self.attention_impl,
                name=f"block{i}",
                **kw,
            )(media, x)
        x = LayerNorm(name="norm", epsilon=self.norm_eps, **kw)(x)
        return _project(self.out_dim, x, **kw)


# ---------------------------------------------------------------------------------------
# Position-aware vision-language adapter (Qwen-VL)


def _square_side(count: int, what: str) -> int:
    side = math.isqrt(count)
    if side * side != count:
        raise ValueError(
            f"the cross_attn connector places {what} on a square grid, but {count} is not a "
            "square number"
        )
    return side


class CrossAttentionAdapter(nn.Module):
    """Image tokens [B, N, D_in] (a square grid) -> [B, num_queries, out_dim] (Qwen-VL Sec. 2.1).

    Image tokens are projected to the adapter `width` and LayerNorm'd; `num_queries` learned,
    LayerNorm'd queries (a sqrt(num_queries) grid) cross-attend to them once, with fixed 2D
    sin-cos positions added to queries and keys, the key grid laid over the query grid (as
    Qwen-VL resizes its position table to the image grid); then LayerNorm and a projection.
    """

    out_dim: int
    width: int | None = None  # None: out_dim (Qwen-VL's adapter runs at the LLM width)
    num_queries: int = 256
    num_heads: int = 32  # Qwen-VL: width / 128
    norm_eps: float = 1e-6
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, image_tokens: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        _check_rank(image_tokens, "cross_attn")
        kw = dtypes(self)
        batch, n, _ = image_tokens.shape
        side = _square_side(n, f"the image tokens (N={n})")
        query_side = _square_side(self.num_queries, f"num_queries={self.num_queries}")
        width = self.width or self.out_dim
        kv = DenseGeneral((width,), (None, "embed"), use_bias=False, name="kv_proj", **kw)(
            image_tokens
        )
        kv = LayerNorm(name="kv_norm", epsilon=self.norm_eps, **kw)(kv)
        queries = self.param(
            "queries",
            logical(nn.initializers.normal(0.02), None, "embed"),
            (self.num_queries, width),
            self.param_dtype,
        )
        queries = LayerNorm(name="query_norm", epsilon=self.norm_eps, **kw)(queries)
        queries = queries + sincos_2d(query_side, query_side, width).astype(self.dtype)
        keys = kv + sincos_2d(side, side, width, scale=query_side / side).astype(self.dtype)
        # Positions on the keys, not the values (Qwen-VL's resampler)
        y = MultiHeadAttention(self.num_heads, impl=self.attention_impl, name="attn", **kw)(
            jnp.broadcast_to(queries, (batch, *queries.shape)), keys, values=kv
        )
        y = LayerNorm(name="post_norm", epsilon=self.norm_eps, **kw)(y)
        return _project(self.out_dim, y, use_bias=False, **kw)


CONNECTORS: dict[str, type[nn.Module]] = {
    "linear": LinearProjector,
    "mlp": MlpProjector,
    "concat": ConcatProjector,
    "qformer": QFormer,
    "perceiver": PerceiverResampler,
    "cross_attn": CrossAttentionAdapter,
}


def build_connector(cfg: Mapping[str, Any], **kw: Any) -> nn.Module:
    """The connector `cfg["type"]` with the rest of `cfg` (and `kw`: dtypes, name) as fields."""
    cfg = dict(cfg)
    kind = cfg.pop("type", None)
    if kind not in CONNECTORS:
        raise ValueError(f"unknown connector type {kind!r}; valid: {sorted(CONNECTORS)}")
    return CONNECTORS[kind](**cfg, **kw)
