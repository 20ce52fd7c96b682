"""UniFluid (Fan et al., 2025): one causal decoder for visual generation and understanding.

Text tokens are embedded and read out by an LM head (cross-entropy). Continuous visual tokens
(p x p patches of pixels or VAE latents, flattened) are generated autoregressively, one decoding
step of m tokens at a time, in raster or random order (Sec. 3.1, after Fluid / MAR): each token's
input is a linear projection of its value plus a learned embedding of its raster position, and
the slot that predicts a token also gets a learned embedding of that token's raster position
(the "target" position, so a random order tells the decoder which token comes next). The
decoder's output there conditions a per-token diffusion head (MAR's SimpleMLPAdaLN,
mmjax/nn/diffusion_head.py). For understanding, a ViT's patch tokens of the clean image are
projected into the sequence before the text (Sec. 3.2; bidirectional among themselves). The ViT
is models.vit.VisionTransformer (`vision_options` sets its other fields), so a CLIP or SigLIP
image tower's parameters load into `vit` unchanged (frozen or trained on; experiments/unifluid.py).
The decoder is models/causal_lm.py's CausalLM under `lm`: Gemma-2's (the paper's backbone) in the
2B/9B presets, so Gemma-2 weights load there (`init_from.format=hf_llm`).

Batch (built by mmjax.data.sequences kind "unifluid" and the objective): `tokens`,
`positions`, `segment_ids`, `span_ids` [B, L]; optional `visual_tokens` [B, P, D] in generation
order with `order` [B, P] (each one's raster index) and `image_positions` [B, P] (its slot);
optional `query_positions` [B, Q] with `query_order` [B, Q] (default `order`): the slots whose
hidden states predict the tokens of raster index `query_order`; optional `understand_images`
[B, H, W, C] with `feature_positions` [B, F]; optional `noised` [B, Q, K, D] and `timesteps`
[B, Q, K]: K noised copies of each queried token, whose predicted noise is returned as `eps`.
Positions >= L are unused slots (dropped). Optional `logit_positions` [B, K]: the LM head only
there. With `decode`, batches are chunks written into the KV cache at `cache_offset`, and
positions are relative to the chunk.
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import freeze

from mmjax.models.causal_lm import LMFields
from mmjax.models.vit import VisionTransformer
from mmjax.nn.dense import DenseGeneral, dtypes
from mmjax.nn.diffusion_head import DiffusionHead
from mmjax.nn.initializers import logical

POSITION_KEYS = ("image_positions", "query_positions", "feature_positions")


class UniFluid(LMFields, kw_only=True):
    """Unified decoder; `__call__(batch)` -> {"logits", and with the inputs for them "z"
    [B, Q, width] (the head's conditions) and "eps" [B, Q, K, D]}. The decoder is a CausalLM
    (`lm`, LMFields: Gemma-2's block in the paper presets) whose parameters a Gemma-2
    checkpoint provides."""

    image_shape: tuple[int, int, int]  # (H, W, C) of the generated image: pixels or latents
    patch_size: int = 2  # a visual token is a p x p patch of it
    head_width: int = 256  # diffusion head (MAR: 1,024)
    head_depth: int = 3
    # The understanding encoder: a ViT over vision_patch pixels (F = its patch tokens)
    vision_patch: int = 2
    vision_width: int = 64
    vision_depth: int = 2
    vision_heads: int = 4
    vision_mlp_dim: int = 128
    # Further VisionTransformer fields (pool, pre_norm, patch_bias, activation, norm_eps,
    # remat_policy, scan_layers): a CLIP/SigLIP tower's, to load its parameters; a CLS token
    # is dropped from the features.
    vision_options: Mapping[str, Any] = freeze({})
    # Channels the ViT takes (0: the images'): grey images are repeated to 3, as an RGB-trained
    # encoder saw them (the digits source gives CLIP grey digits as 3 equal channels).
    vision_channels: int = 0

    def __post_init__(self) -> None:
        # A frozen (hashable) mapping, so that the model can be a static argument of jax.jit.
        object.__setattr__(self, "vision_options", freeze(dict(self.vision_options)))
        super().__post_init__()

    @property
    def token_dim(self) -> int:
        """Values of one visual token: p * p * C."""
        return self.patch_size**2 * self.image_shape[2]

    @property
    def num_tokens(self) -> int:
        """Visual tokens per image, P."""
        h, w, _ = self.image_shape
        return (h // self.patch_size) * (w // self.patch_size)

    def setup(self) -> None:
        h, w, _ = self.image_shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image_shape {self.image_shape} is not divisible by patch_size")
        kw = dtypes(self)
        self.lm = self.language_model()
        # Modality-specific input projections (Sec. 3.1): visual tokens, image features.
        self.visual_in = DenseGeneral((self.width,), ("patch", "embed"), **kw)
        pos_init = logical(nn.initializers.normal(0.02), "position", "embed")
        shape = (self.num_tokens, self.width)
        self.visual_pos = self.param("visual_pos", pos_init, shape, self.param_dtype)
        self.target_pos = self.param("target_pos", pos_init, shape, self.param_dtype)
        self.vit = VisionTransformer(
            self.vision_patch,
            self.vision_width,
            self.vision_depth,
            self.vision_heads,
            self.vision_mlp_dim,
            **{"pool": "gap", "attention_impl": self.attention_impl, **kw, **self.vision_options},
        )
        self.feature_in = DenseGeneral((self.width,), (None, "embed"), **kw)
        # Modality-specific heads: text logits (the LM's), per-token diffusion (MAR).
        self.head = DiffusionHead(self.token_dim, self.head_width, self.head_depth, **kw)

    def _check(self, batch: dict) -> None:
        if "visual_tokens" in batch:
            got = tuple(batch["visual_tokens"].shape[2:])
            if got != (self.token_dim,):
                raise ValueError(
                    f"visual tokens have {got} values each, but the model was built for "
                    f"{self.token_dim} (patch_size {self.patch_size} of image_shape "
                    f"{tuple(self.image_shape)}): check the latent shape"
                )
        if "noised" in batch and "query_positions" not in batch:
            raise ValueError("noised visual tokens need query_positions (their predicting slots)")

    def _prepare(self, batch: dict) -> dict:
        """Drops the one-image axis of a data-pipeline row ([B, 1, ...], as the sizing call at
        init gets it) and, at init, adds zero visual tokens and noised copies to size them."""
        batch = dict(batch)
        for key in (*POSITION_KEYS, "understand_images"):
            if key in batch and batch[key].ndim == (5 if key == "understand_images" else 3):
                batch[key] = batch[key][:, 0]
        if self.is_initializing() and "visual_tokens" not in batch:
            b, p = batch["tokens"].shape[0], self.num_tokens
            batch["visual_tokens"] = jnp.zeros((b, p, self.token_dim), jnp.float32)
            batch["order"] = jnp.broadcast_to(jnp.arange(p), (b, p))
            batch.setdefault("image_positions", batch["order"])
            batch.setdefault("query_positions", batch["order"])
            batch["noised"] = jnp.zeros((b, p, 1, self.token_dim), jnp.float32)
        self._check(batch)
        return batch

    def hidden_states(self, batch: dict) -> jnp.ndarray:
        """The decoder's final (normed) hidden states [B, L, width] of a sequence or chunk."""
        batch = self._prepare(batch)
        x = self.lm.embed(batch["tokens"])
        if "visual_tokens" in batch:
            order = batch["order"]
            vis = self.visual_in(batch["visual_tokens"]) + self._table(self.visual_pos, order)
            x = jax.vmap(_scatter)(x, batch["image_positions"], vis)
        if "query_positions" in batch:
            target = self._table(self.target_pos, batch.get("query_order", batch.get("order")))
            x = jax.vmap(_scatter_add)(x, batch["query_positions"], target)
        if "understand_images" in batch:
            feats = self._features(batch["understand_images"])
            if feats.shape[1] != batch["feature_positions"].shape[-1]:
                raise ValueError(
                    f"the ViT gives {feats.shape[1]} features per image (vision_patch "
                    f"{self.vision_patch}) but feature_positions has "
                    f"{batch['feature_positions'].shape[-1]} slots"
                )
            x = jax.vmap(_scatter)(x, batch["feature_positions"], self.feature_in(feats))
        ids = (batch["segment_ids"], batch["positions"], batch.get("cache_offset"))
        return self.lm.hidden(x, *ids, span_ids=batch["span_ids"])

    def _features(self, images: jnp.ndarray) -> jnp.ndarray:
        """The ViT's patch tokens [B, F, vision width] of images [B, H, W, C]."""
        channels = images.shape[-1]
        if self.vision_channels and channels != self.vision_channels:
            if channels != 1:
                raise ValueError(
                    f"the ViT takes {self.vision_channels}-channel images but got {channels} "
                    "channels (only grey images are repeated to its channels)"
                )
            images = jnp.repeat(images, self.vision_channels, axis=-1)
        _, feats = self.vit(images)
        return feats[:, 1:] if self.vit.pool == "cls" else feats

    def _table(self, table: jnp.ndarray, index: jnp.ndarray) -> jnp.ndarray:
        return jnp.take(table.astype(self.dtype), index, axis=0, mode="clip")

    def denoise(self, x_t: jnp.ndarray, t: jnp.ndarray, z: jnp.ndarray) -> jnp.ndarray:
        """The diffusion head: noise predicted in x_t [..., D] at step t [...] given z."""
        return self.head(x_t, t, z)

    def __call__(self, batch: dict, *, train: bool = False) -> dict[str, jnp.ndarray]:
        del train  # no dropout
        batch = self._prepare(batch)
        x = self.hidden_states(batch)
        at = x if "logit_positions" not in batch else jax.vmap(_gather)(x, batch["logit_positions"])
        out = {"logits": self.lm.head(at)}
        if "query_positions" in batch:
            out["z"] = jax.vmap(_gather)(x, batch["query_positions"])
        if "noised" in batch:
            noised = batch["noised"]
            t = batch.get("timesteps", jnp.zeros(noised.shape[:-1], jnp.float32))
            z = jnp.broadcast_to(out["z"][:, :, None], (*noised.shape[:-1], out["z"].shape[-1]))
            out["eps"] = self.head(noised, t, z)
        return out


def _scatter(x: jnp.ndarray, positions: jnp.ndarray, values: jnp.ndarray) -> jnp.ndarray:
    """One row: x [L, D] with values [N, D] written at positions [N] (>= L: dropped)."""
    return x.at[positions].set(values.astype(x.dtype), mode="drop")


def _scatter_add(x: jnp.ndarray, positions: jnp.ndarray, values: jnp.ndarray) -> jnp.ndarray:
    """One row: x [L, D] plus values [N, D] at positions [N] (>= L: dropped)."""
    return x.at[positions].add(values.astype(x.dtype), mode="drop")


def _gather(x: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
    """One row: x [L, D] at positions [N] -> [N, D] (clipped; unused slots are masked)."""
    return jnp.take(x, positions, axis=0, mode="clip")


Model = UniFluid
