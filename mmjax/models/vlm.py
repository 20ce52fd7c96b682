"""Vision-language models: image encoder -> connector -> causal language model.

The connector's visual tokens reach the LM in one of two ways (`mode`):

- "prefix" (LLaVA, BLIP-2 stage 2, MiniGPT-4, Qwen-VL, MiniGPT-v2): the V visual tokens of a
  row's image replace the token embeddings at its `visual_positions`, and the LM reads them as
  part of its causal sequence.
- "flamingo" (Alayrac et al., 2022, Sec. 2.2, Fig. 4): the LM reads text only; a gated
  cross-attention-dense layer before every N-th LM block lets each token attend to the visual
  tokens of its media (`media_ids`), through tanh gates initialised at 0, so that at
  initialisation the model computes exactly its LM.

Parameters: `lm` (the LM alone, `VLM.language_model()`: models/causal_lm.py's CausalLM, whose
fields the VLM inherits, so a Llama, Qwen2 or Gemma-2 checkpoint imports into it), `vision` (a
models.vit.VisionTransformer), `connector` (models.resamplers.build_connector) and
`gated_xattn{i}` (the Flamingo layer before LM block i). Freezing `lm/**` and `vision/**` by
path leaves the new layers to train, and a pretrained LM's parameters slot into `lm` unchanged.

Batch (the VLM contract, built by mmjax.data): `tokens`, `segment_ids`, `positions` [B, L];
`images` [B, H, W, C] with `visual_positions` [B, V] (prefix; slots >= L are dropped), or
[B, M, H, W, C] with `media_ids` [B, L] (flamingo: 1-based media index per token, 0 = none).
With `decode`, batches are chunks written into the KV cache at `cache_offset`: the first
(the prompt) carries the images; later ones omit them (flamingo keeps the visual tokens in
the cache collection).
"""

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import freeze

from mmjax.models.causal_lm import BlockHook, LMFields
from mmjax.models.resamplers import build_connector
from mmjax.models.vit import VisionTransformer
from mmjax.nn import LayerNorm, Mlp, MultiHeadAttention
from mmjax.nn.axes import ACT
from mmjax.nn.dense import dtypes
from mmjax.nn.initializers import logical
from mmjax.nn.transformer import REMAT_POLICIES

MODES = ("prefix", "flamingo")


class GatedCrossAttentionDense(nn.Module):
    """Flamingo's gated xattn-dense layer (Alayrac et al., 2022, Sec. 2.2, Fig. 4):
    x + tanh(a_xattn) XAttn(LN(x), media), then x + tanh(a_dense) FFW(LN(x)); the scalar gates
    start at 0, so at initialisation the layer returns x exactly.

    Token i attends to the media tokens whose `media_index` equals its `media_ids[i]` (through
    the kernels' segment ids); id 0 attends to nothing, and its cross-attention adds 0.
    """

    num_heads: int
    mlp_dim: int
    norm_eps: float = 1e-5
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        media: jnp.ndarray,
        media_ids: jnp.ndarray,
        media_index: jnp.ndarray,
    ) -> jnp.ndarray:
        """x [B, L, D], media [B, S, D], media_ids [B, L], media_index [B, S] -> [B, L, D]."""
        kw = dtypes(self)

        def gate(name: str) -> jnp.ndarray:
            alpha = self.param(name, logical(nn.initializers.zeros_init()), (), self.param_dtype)
            return jnp.tanh(alpha).astype(self.dtype)

        y = LayerNorm(epsilon=self.norm_eps, name="norm_xattn", **kw)(x)
        y = MultiHeadAttention(
            self.num_heads, use_bias=False, impl=self.attention_impl, name="xattn", **kw
        )(y, media.astype(self.dtype), segment_ids=media_ids, kv_segment_ids=media_index)
        x = nn.with_logical_constraint(x + gate("xattn_gate") * y, ACT)
        y = LayerNorm(epsilon=self.norm_eps, name="norm_dense", **kw)(x)
        y = Mlp(self.mlp_dim, activation="gelu", name="dense", **kw)(y)
        return nn.with_logical_constraint(x + gate("dense_gate") * y, ACT)


class VLM(LMFields, kw_only=True):
    """Encoder -> connector -> causal LM; `__call__(batch)` -> {"logits" [B, L, vocab] (f32),
    and where the batch has images "visual_tokens" [B, V, D] (prefix) or [B, M, V, D]}.

    `vision`: VisionTransformer fields (its patch tokens feed the connector; the CLS token is
    dropped unless `keep_cls`, as LLaVA does); `feature_layer`: read the ViT's hidden state
    of that index instead of its output (LLaVA-1.5: -2); `connector`: build_connector's
    config (its out_dim is the LM's `width`). The LM: models/causal_lm.py's LMFields (remat_policy
    and scan_layers are the LM's; the ViT's are in `vision`).
    Flamingo: a gated layer before LM blocks N-1, 2N-1, ... (N = `cross_attention_every`;
    Flamingo-3B N=1, 9B N=4, 80B N=7), its FFW `mlp_dim` wide; its layers run between the
    LM's blocks, inside the LM's scan when it scans.
    """

    vision: Mapping[str, Any]
    connector: Mapping[str, Any]
    mode: str = "prefix"
    cross_attention_every: int = 1
    feature_layer: int | None = None
    keep_cls: bool = False

    def __post_init__(self) -> None:
        # Frozen (hashable) configs, so that a VLM can be a static argument of jax.jit.
        object.__setattr__(self, "vision", freeze(dict(self.vision)))
        object.__setattr__(self, "connector", freeze(dict(self.connector)))
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        batch: Mapping[str, jnp.ndarray],
        *,
        train: bool = False,
        queries: jnp.ndarray | None = None,
        hidden: bool = False,
    ) -> dict:
        """`queries` [B, Q, width] replace the token embeddings at `query_positions` [B, Q]
        (BLIP3-o's learnable queries; a row may then have no image); `hidden` returns the LM's
        final normed hidden states [B, L, width] as "hidden" instead of "logits"."""
        self._check(batch, queries is not None)
        lm = self.language_model(name="lm")
        x = lm.embed(batch["tokens"])
        x = with_queries(x, batch, queries)
        visual = self._visual_tokens(batch, train) if "images" in batch else None
        out = {} if visual is None else {"visual_tokens": visual}
        before_block = None
        if self.mode == "prefix" and visual is not None:
            x = jax.vmap(scatter_tokens)(x, batch["visual_positions"], visual)
        elif self.mode == "flamingo":
            before_block = self._gated_layers(self._media(visual), batch["media_ids"])
        h = lm.hidden(
            x, batch["segment_ids"], batch["positions"], batch.get("cache_offset"), before_block
        )
        return out | lm.readout(h, hidden)

    def _check(self, batch: Mapping[str, jnp.ndarray], has_queries: bool) -> None:
        """Clear errors for a bad config or batch, before they fail deep inside."""
        if self.mode not in MODES:
            raise ValueError(f"unknown VLM mode {self.mode!r}; valid: {MODES}")
        if self.cross_attention_every < 1:
            raise ValueError(
                f"cross_attention_every must be >= 1, got {self.cross_attention_every}"
            )
        if "images" not in batch and not (self.decode or has_queries):
            raise ValueError(
                "a VLM batch needs images (decoding chunks after the prompt and rows of "
                "queries omit them)"
            )
        needed = "visual_positions" if self.mode == "prefix" else "media_ids"
        if needed not in batch and (self.mode == "flamingo" or "images" in batch):
            raise ValueError(f"a {self.mode} VLM batch needs {needed}")

    def _visual_tokens(self, batch: Mapping[str, jnp.ndarray], train: bool) -> jnp.ndarray:
        """Images -> the connector's visual tokens, [B, V, width] or [B, M, V, width]."""
        images = batch["images"]
        rank, layout = (4, "[B, H, W, C]") if self.mode == "prefix" else (5, "[B, M, H, W, C]")
        if images.ndim != rank:
            raise ValueError(
                f"{self.mode} mode takes images {layout}, got shape {tuple(images.shape)}"
            )
        kw = dtypes(self)
        vit = VisionTransformer(
            **{"attention_impl": self.attention_impl, **kw, **self.vision}, name="vision"
        )
        _, tokens = vit(images.reshape(-1, *images.shape[-3:]), feature_layer=self.feature_layer)
        if vit.pool == "cls" and not self.keep_cls:
            tokens = tokens[:, 1:]
        connector = {**self.connector, "out_dim": self.width}  # the LM's, imported or not
        visual = build_connector(connector, name="connector", **kw)(tokens, train=train)
        visual = visual.reshape(*images.shape[:-3], *visual.shape[1:])
        if self.mode == "prefix":
            slots = batch["visual_positions"].shape[-1]
            if slots != visual.shape[1]:
                raise ValueError(
                    f"the connector gives {visual.shape[1]} visual tokens per image but "
                    f"visual_positions has {slots} slots"
                )
        return visual

    def _media(self, visual: jnp.ndarray | None) -> jnp.ndarray:
        """Flamingo's media tokens [B, M, V, D]; when decoding, kept in the cache collection
        from the chunk with the images (the prompt) for the later chunks."""
        if visual is not None:
            if self.decode:
                self.put_variable("cache", "media", visual)
            return visual
        if not self.has_variable("cache", "media"):
            raise ValueError("the first decoding chunk of a flamingo VLM needs its images")
        return self.get_variable("cache", "media")

    def _gated_layers(self, media: jnp.ndarray, media_ids: jnp.ndarray) -> BlockHook:
        """The hook that runs `gated_xattn{i}` before LM block i, for i + 1 a multiple of N.

        A scanned LM calls the hook with a traced block index inside its scan: the gated
        layers' parameters (still `gated_xattn{i}`, the unscanned names) are stacked, the
        scan step picks its group's and runs the layer under `lax.cond` on the blocks that
        have one, so the LM's blocks stay one scan (Flamingo scanned by groups of N)."""
        b, m, v, d = media.shape
        media_index = jnp.broadcast_to(jnp.repeat(jnp.arange(1, m + 1), v), (b, m * v))
        media = media.reshape(b, m * v, d)
        every = self.cross_attention_every
        make = functools.partial(
            GatedCrossAttentionDense,
            self.num_heads,
            self.mlp_dim,
            norm_eps=self.norm_eps,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        gated = [i for i in range(self.depth) if (i + 1) % every == 0]
        if not self.scan_layers:
            layers = {i: make(name=f"gated_xattn{i}") for i in gated}

            def unrolled(i: int, x: jnp.ndarray) -> jnp.ndarray:
                return layers[i](x, media, media_ids, media_index) if i in layers else x

            return unrolled
        layer = make(parent=None)  # applied to each group's parameters inside the scan
        shapes = (x[:1, :1] for x in (media, media_ids, media_index))
        example = (jnp.zeros((1, 1, d), self.dtype), *shapes)
        params = [
            self.param(f"gated_xattn{i}", lambda rng: layer.init(rng, *example)["params"])
            for i in gated
        ]
        stacked = jax.tree.map(lambda *p: jnp.stack(p), *params)

        def run(group: jnp.ndarray | int, x: jnp.ndarray) -> jnp.ndarray:
            group_params = jax.tree.map(lambda p: p[group], stacked)
            return layer.apply({"params": group_params}, x, media, media_ids, media_index)

        policy = REMAT_POLICIES[self.remat_policy]
        if policy is not None:  # as the LM's blocks: else the scan keeps the layer's
            run = jax.checkpoint(run, policy=policy)  # activations for every block

        def scanned(i: jnp.ndarray | int, x: jnp.ndarray) -> jnp.ndarray:
            if isinstance(i, int):  # the last block, outside the scan
                return run(gated.index(i), x) if i in gated else x
            return jax.lax.cond((i + 1) % every == 0, run, lambda g, x: x, i // every, x)

        return scanned


def with_queries(
    x: jnp.ndarray, batch: Mapping[str, jnp.ndarray], queries: jnp.ndarray | None
) -> jnp.ndarray:
    """Embeddings x [B, L, D] with `queries` [B, Q, D] (BLIP3-o's learnable queries) written at
    the batch's `query_positions` [B, Q]; x itself without queries."""
    if queries is None:
        return x
    if "query_positions" not in batch:
        raise ValueError("queries need the batch's query_positions, their slots in the row")
    return jax.vmap(scatter_tokens)(x, batch["query_positions"], queries)


def scatter_tokens(x: jnp.ndarray, positions: jnp.ndarray, visual: jnp.ndarray) -> jnp.ndarray:
    """One row: writes visual [V, D] into x [L, D] at positions [V] (beyond L: dropped)."""
    return x.at[positions].set(visual.astype(x.dtype), mode="drop")


Model = VLM
