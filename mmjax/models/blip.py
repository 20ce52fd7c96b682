"""BLIP (Li et al., 2022) and BLIP-2 stage 1 (Li et al., 2023): image-text pre-training of a
text transformer that reads the image, for objectives/blip.py (ITC + ITM + ITG).

- `Blip2` ("blip2"): a ViT (frozen in the paper: `optimizer.frozen=("vision/**",)`) whose
  tokens the Q-Former (models/resamplers.py) reads through its learned queries. One Q-Former
  pass per objective, each under its own self-attention mask (Sec. 3.2, Fig. 2): "unimodal"
  for ITC (the query outputs against the text's [CLS] output), "bidirectional" for ITM (the
  query outputs, classified and averaged), "multimodal_causal" for ITG (the text outputs).
  Stage 2 reuses the `vision` and `qformer` parameters (experiments/blip2.py).
- `Blip` ("blip"): a ViT and BLIP's multimodal mixture of encoder-decoder (Sec. 3.1): one BERT
  text transformer run as the unimodal text encoder (ITC), the image-grounded text encoder
  (ITM: cross-attention to every image token, an [ENC] first token) and the image-grounded
  text decoder (LM: causal self-attention of its own, a [DEC] first token); encoder and decoder
  share every parameter but the self-attention layers (Sec. 3.3).

Both take image-caption batches ({"image" [B, H, W, C], "text" [B, T], text framed as
[bos] + ids + [eos] + padding}) and return "image_tokens" (the image encoder's output),
unit-norm "image_emb" ([B, Q, E] for BLIP-2, [B, E] for BLIP) and "text_emb" [B, E],
"logit_scale" (1 / the learned temperature, initialised at 0.07 and clipped to [0.001, 0.5]
as both papers' code does), "itm_logits" [B, 2] of the matched pairs and "lm_logits"
[B, T, vocab] (f32). A batch {"image_tokens", "itm_text" [P, T]} returns only the
"itm_logits" [P, 2] of the pairs (image i, text i): the hard negatives, without running the
image encoder again.

Not implemented: BLIP's momentum encoders, queues and momentum distillation (ALBEF's);
BLIP-2's LayerNorm on the ViT features (the stage-2 VLM feeds its connector the bare ViT
features, and stage 1 reads them the same way so that the Q-Former carries over unchanged);
BLIP-2's [DEC] first token for ITG (all three Q-Former passes start from the caption's [bos];
their masks set them apart).
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax.core import freeze

from mmjax.models.resamplers import QFormer
from mmjax.models.vit import VisionTransformer
from mmjax.nn import LayerNorm, Mlp, MultiHeadAttention
from mmjax.nn.axes import ACT
from mmjax.nn.dense import DenseGeneral, dtypes
from mmjax.nn.initializers import logical
from mmjax.nn.mlp import ACTIVATIONS

BLIP_TEXT_MODES = ("text", "grounded", "decoder")


def _normalize(x: jnp.ndarray) -> jnp.ndarray:
    x = x.astype(jnp.float32)
    return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


class LMHead(nn.Module):
    """BERT's prediction head: Dense -> activation -> LayerNorm, then logits against the word
    embedding table (tied, as BERT ties its decoder) plus a bias; [B, T, D] -> [B, T, V] f32."""

    activation: str = "gelu"
    norm_eps: float = 1e-12
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, word_embedding: jnp.ndarray) -> jnp.ndarray:
        kw = dtypes(self)
        h = DenseGeneral((x.shape[-1],), ("embed", "proj"), name="transform", **kw)(x)
        h = LayerNorm(name="norm", epsilon=self.norm_eps, **kw)(ACTIVATIONS[self.activation](h))
        bias = self.param(
            "bias", logical(nn.initializers.zeros_init(), "vocab"), (word_embedding.shape[0],)
        )
        logits = jnp.einsum(
            "btd,vd->btv", h, word_embedding.astype(self.dtype), preferred_element_type=jnp.float32
        )
        return logits + bias


class _Stage1(nn.Module):
    """What BLIP and BLIP-2 share: the ViT, the heads and the output contract (module doc)."""

    vision: Mapping[str, Any]  # VisionTransformer fields
    vocab_size: int
    embed_dim: int = 256
    max_text_len: int = 512
    feature_layer: int | None = None  # VisionTransformer.feature_layer (BLIP-2: -2)
    temperature_init: float = 0.07
    temperature_range: tuple[float, float] = (0.001, 0.5)
    pad_id: int = 0
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    def __post_init__(self) -> None:
        # Frozen (hashable) configs, so that the model can be a static argument of jax.jit.
        object.__setattr__(self, "vision", freeze(dict(self.vision)))
        super().__post_init__()

    def _image_tokens(self, batch: Mapping[str, jnp.ndarray]) -> jnp.ndarray:
        """The ViT's tokens [B, N, D] (all of them, CLS included), or the batch's own."""
        vit = VisionTransformer(
            **{"attention_impl": self.attention_impl, **dtypes(self), **self.vision}, name="vision"
        )
        if "image_tokens" in batch:
            return batch["image_tokens"]
        _, tokens = vit(batch["image"], feature_layer=self.feature_layer)
        return tokens

    def _check_text(self, text: jnp.ndarray) -> jnp.ndarray:
        """The text's mask (1 for tokens, 0 for padding), after shape checks."""
        if text.ndim != 2 or not jnp.issubdtype(text.dtype, jnp.integer):
            raise ValueError(f"text must be integer [batch, length], got {text.dtype} {text.shape}")
        if text.shape[1] > self.max_text_len:
            raise ValueError(
                f"text of {text.shape[1]} tokens exceeds max_text_len {self.max_text_len}"
            )
        return (text != self.pad_id).astype(jnp.int32)

    def _embed(self, name: str, x: jnp.ndarray) -> jnp.ndarray:
        """The unit-norm ITC embedding of features x [..., D] (projection `name`)."""
        proj = DenseGeneral((self.embed_dim,), ("embed", "proj"), name=name, **dtypes(self))
        return _normalize(proj(x))

    def _logit_scale(self) -> jnp.ndarray:
        temperature = self.param(
            "temperature", logical(nn.initializers.constant(self.temperature_init)), ()
        )
        return 1.0 / jnp.clip(temperature, *self.temperature_range)

    def _itm_head(self) -> DenseGeneral:
        return DenseGeneral((2,), ("embed", None), name="itm_head", **dtypes(self))


class Blip2(_Stage1):
    """BLIP-2 stage 1: ViT -> Q-Former with text (module docstring).

    `qformer`: QFormer fields (num_queries, width, depth, num_heads, mlp_dim,
    cross_attention_freq, ...); its vocab_size and max_text_len are the model's, and it has
    no output projection (the stage-2 connector adds one).
    """

    qformer: Mapping[str, Any] = freeze({})

    def __post_init__(self) -> None:
        object.__setattr__(self, "qformer", freeze(dict(self.qformer)))
        super().__post_init__()

    @nn.compact
    def __call__(self, batch: Mapping[str, jnp.ndarray], *, train: bool = False) -> dict:
        qformer = QFormer(
            None,
            vocab_size=self.vocab_size,
            max_text_len=self.max_text_len,
            **{"attention_impl": self.attention_impl, **dtypes(self), **self.qformer},
            name="qformer",
        )
        image_tokens = self._image_tokens(batch)
        itm_head = self._itm_head()

        def encode(text: jnp.ndarray, mask: str):
            mask_ids = self._check_text(text)
            return qformer.encode(image_tokens, text_ids=text, text_mask=mask_ids, mask=mask)

        def match(text: jnp.ndarray) -> jnp.ndarray:
            # Sec. 3.2: every query output is classified, the logits averaged over queries
            queries = encode(text, "bidirectional").queries
            return jnp.mean(itm_head(queries).astype(jnp.float32), axis=1)

        if "itm_text" in batch:
            return {"itm_logits": match(batch["itm_text"])}
        text = batch["text"]
        unimodal = encode(text, "unimodal")
        grounded = encode(text, "multimodal_causal").text
        lm_head = LMHead(norm_eps=qformer.norm_eps, name="lm_head", **dtypes(self))
        return {
            "image_tokens": image_tokens,
            "image_emb": self._embed("vision_proj", unimodal.queries),
            "text_emb": self._embed("text_proj", unimodal.text[:, 0]),  # the [CLS] output
            "logit_scale": self._logit_scale(),
            "itm_logits": match(text),
            "lm_logits": lm_head(grounded, qformer.word_embedding),
        }


class BlipTextLayer(nn.Module):
    """One post-LN BERT layer of BLIP's text transformer: self-attention (the decoder's causal
    one has its own weights, Sec. 3.3), cross-attention to the image tokens (the grounded
    modes), feed-forward."""

    num_heads: int
    mlp_dim: int
    activation: str = "gelu"
    norm_eps: float = 1e-12
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        segment_ids: jnp.ndarray,
        image_tokens: jnp.ndarray | None,
        mode: str,
    ) -> jnp.ndarray:
        kw = dtypes(self)

        def add_norm(name: str, residual: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
            y = LayerNorm(name=f"{name}_norm", epsilon=self.norm_eps, **kw)(residual + y)
            return nn.with_logical_constraint(y, ACT)

        def attention(name: str) -> MultiHeadAttention:
            return MultiHeadAttention(self.num_heads, impl=self.attention_impl, name=name, **kw)

        causal = mode == "decoder"
        name = "decoder_self_attn" if causal else "self_attn"
        y = attention(name)(x, segment_ids=segment_ids, causal=causal)
        x = add_norm(name, x, y)
        if image_tokens is not None:
            image_ids = jnp.ones(image_tokens.shape[:2], jnp.int32)
            # Padding (segment 0) attends to nothing; every token sees every image token
            y = attention("cross_attn")(
                x, image_tokens, segment_ids=segment_ids, kv_segment_ids=image_ids
            )
            x = add_norm("cross_attn", x, y)
        y = Mlp(self.mlp_dim, activation=self.activation, name="mlp", **kw)(x)
        return add_norm("mlp", x, y)


class BlipText(nn.Module):
    """BLIP's text transformer: word + position embeddings (LayerNorm'd, as BERT's), `depth`
    BlipTextLayers; text [B, T] -> [B, T, width] in one of `BLIP_TEXT_MODES`. The grounded
    modes replace the first token's word embedding by a learned [ENC] / [DEC] one."""

    vocab_size: int
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    max_len: int = 512
    activation: str = "gelu"
    norm_eps: float = 1e-12
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        kw = dtypes(self)
        normal = nn.initializers.normal(0.02)
        self.word_embedding = self.param(
            "word_embedding", logical(normal, "vocab", "embed"), (self.vocab_size, self.width)
        )
        self.position_embedding = self.param(
            "position_embedding", logical(normal, "position", "embed"), (self.max_len, self.width)
        )
        # [ENC] and [DEC], the first tokens of the grounded encoder and the decoder (Sec. 3.1)
        self.mode_tokens = self.param(
            "mode_tokens", logical(normal, None, "embed"), (2, self.width)
        )
        self.embed_norm = LayerNorm(epsilon=self.norm_eps, **kw)
        self.layers = [
            BlipTextLayer(
                self.num_heads,
                self.mlp_dim,
                activation=self.activation,
                norm_eps=self.norm_eps,
                attention_impl=self.attention_impl,
                **kw,
            )
            for _ in range(self.depth)
        ]

    def __call__(
        self,
        text: jnp.ndarray,
        segment_ids: jnp.ndarray,
        image_tokens: jnp.ndarray | None = None,
        *,
        mode: str = "text",
    ) -> jnp.ndarray:
        if mode not in BLIP_TEXT_MODES:
            raise ValueError(f"unknown BLIP text mode {mode!r}; valid: {BLIP_TEXT_MODES}")
        if (mode == "text") != (image_tokens is None):
            raise ValueError(f"BLIP text mode {mode!r} needs image tokens unless it is 'text'")
        x = jnp.take(self.word_embedding, text, axis=0)
        if mode != "text":
            first = self.mode_tokens[BLIP_TEXT_MODES.index(mode) - 1]
            x = x.at[:, 0].set(first)
        x = x + self.position_embedding[: text.shape[1]]
        x = nn.with_logical_constraint(self.embed_norm(x.astype(self.dtype)), ACT)
        for layer in self.layers:
            x = layer(x, segment_ids, image_tokens, mode)
        return x


class Blip(_Stage1):
    """BLIP: ViT (CLS pooling) + BlipText (module docstring). `text`: BlipText fields (width,
    depth, num_heads, mlp_dim); its vocab_size and max_len are the model's."""

    text: Mapping[str, Any] = freeze({})

    def __post_init__(self) -> None:
        object.__setattr__(self, "text", freeze(dict(self.text)))
        super().__post_init__()

    @nn.compact
    def __call__(self, batch: Mapping[str, jnp.ndarray], *, train: bool = False) -> dict:
        if self.vision.get("pool", "cls") != "cls":
            raise ValueError("BLIP's ITC reads the ViT's CLS token: set vision.pool='cls'")
        text_model = BlipText(
            self.vocab_size,
            max_len=self.max_text_len,
            **{"attention_impl": self.attention_impl, **dtypes(self), **self.text},
            name="text",
        )
        image_tokens = self._image_tokens(batch)
        itm_head = self._itm_head()

        def run(text: jnp.ndarray, mode: str) -> jnp.ndarray:
            image = None if mode == "text" else image_tokens
            return text_model(text, self._check_text(text), image, mode=mode)

        def match(text: jnp.ndarray) -> jnp.ndarray:
            return itm_head(run(text, "grounded")[:, 0]).astype(jnp.float32)  # the [ENC] output

        if "itm_text" in batch:
            return {"itm_logits": match(batch["itm_text"])}
        text = batch["text"]
        lm_head = LMHead(norm_eps=text_model.norm_eps, name="lm_head", **dtypes(self))
        return {
            "image_tokens": image_tokens,
            "image_emb": self._embed("vision_proj", image_tokens[:, 0]),  # the CLS token
            "text_emb": self._embed("text_proj", run(text, "text")[:, 0]),  # the [CLS] output
            "logit_scale": self._logit_scale(),
            "itm_logits": match(text),
            "lm_logits": lm_head(run(text, "decoder"), text_model.word_embedding),
        }


def qformer_connector_load(
    depth: int, cross_attention_freq: int, *, dst: str = "connector", src: str = "qformer"
) -> dict[str, str]:
    """`init_from.load` {dst path: src path} that copies a stage-1 Q-Former's query path into
    a stage-2 connector (`dst`, a vocab_size=0 QFormer): the queries, the embedding norm and
    each layer's self-attention, cross-attention and query feed-forward. The text-only weights
    (word and position embeddings, text feed-forward) stay behind; the connector's output
    projection is new (BLIP-2 Sec. 3.3)."""
    pairs = {f"{dst}/{name}": f"{src}/{name}" for name in ("query_tokens", "embed_norm")}
    for i in range(depth):
        names = ["self_attn", "query_mlp"]
        if i % cross_attention_freq == 0:
            names.append("cross_attn")
        for name in names:
            for suffix in ("", "_norm"):
                path = f"layers_{i}/{name}{suffix}"
                pairs[f"{dst}/{path}"] = f"{src}/{path}"
    return pairs
