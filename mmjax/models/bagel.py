"""BAGEL (Deng et al., 2025): a Mixture-of-Transformers decoder for understanding and generation.

One sequence interleaves text, ViT tokens of images to understand and VAE-latent tokens of
images to generate (or to condition on, clean, when editing). Text and ViT tokens go through
the understanding expert, latent tokens through the generation expert (nn/mot.py); the
attention is shared, causal over the sequence and bidirectional inside each image
(`span_ids`), and every token of an image block (its markers included) shares one RoPE
position (official `prepare_vae_latent`). Understanding: a SigLIP-style ViT
(models/vit.py), a two-layer GELU-tanh MLP connector and fixed 2D sin-cos positions
(`vit_pos_embed`). Generation: 2x2 patches of VAE latents through `vae2llm`, plus the
timestep embedding and 2D sin-cos positions (`latent_pos_embed`); the velocity is read out
by `llm2vae`, initialised to zero (official `_init_weights`). `latent_encoder="unet"` swaps
the two linear maps for Transfusion's U-Net down/up path around the patch grid
(models/transfusion.UNetPatches): at a width of 128 a linear map per 2x2 patch is what limits
the images (README, BAGEL).

Batch (mmjax.data.bagel_tasks): `tokens`, `positions`, `segment_ids`, `span_ids` [B, L];
`images` [B, M, h, w, c] latents (noised by the objective) at `image_positions` [B, M, P]
with flow `timesteps` [B, M] (0: clean conditioning); `vit_images` [B, K, H, W, C] pixels at
`vit_positions` [B, K, F]. Positions >= L are unused slots (dropped). Optional
`logit_positions` [B, K']: the LM head only there. With `decode`, batches are chunks written
into the KV cache at `cache_offset`; a chunk may leave out either kind of image.
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import freeze

from mmjax.models.transfusion import UNetPatches
from mmjax.models.vit import VisionTransformer
from mmjax.nn import TimestepEmbed, TokenEmbed
from mmjax.nn.axes import ACT
from mmjax.nn.dense import DenseGeneral, dtypes
from mmjax.nn.experts import TOKENS, route
from mmjax.nn.initializers import logical
from mmjax.nn.mlp import ACTIVATIONS
from mmjax.nn.mot import MoTDecoder, expert_counts
from mmjax.nn.patch_embed import patchify, unpatchify
from mmjax.nn.sincos import sincos_2d

LATENT_ENCODERS = ("linear", "unet")
LATENT_POSITIONS = ("sincos", "learned")


class Bagel(nn.Module):
    """`__call__(batch)` -> {"logits" [B, L or K', V], and with latents "velocity"
    [B, M, h, w, c] (f32)}."""

    vocab_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    image_shape: tuple[int, int, int]  # (h, w, c) of the VAE latents
    image_size: int = 32  # pixels of the ViT's input images
    num_kv_heads: int | None = None
    head_dim: int | None = None
    experts: str = "mot"  # nn.mot.EXPERT_LAYOUTS: dense | moe | mot
    qk_norm: bool = True
    qkv_bias: bool = True  # Qwen2's q, k, v biases
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    patch_size: int = 2  # latent patches (BAGEL: 2x2 of the f = 8 FLUX VAE)
    # What the timestep embedding sees of flow time t in [0, 1]: the official code embeds t
    # itself (1.0); DiT's convention, t x 1000, gives a small model sharper time features.
    timestep_scale: float = 1.0
    latent_encoder: str = "linear"  # LATENT_ENCODERS: BAGEL's linear maps | Transfusion's U-Net
    unet_channels: int = 32  # U-Net width (latent_encoder="unet")
    # LATENT_POSITIONS: the official fixed 2D sin-cos table | a trainable table started from it
    # (on a 4x4 latent grid the sin-cos table varies by a tenth of a token's norm)
    latent_positions: str = "sincos"
    vision_patch: int = 8
    vision_width: int = 64
    vision_depth: int = 2
    vision_heads: int = 4
    vision_mlp_dim: int = 128
    vision_options: Mapping[str, Any] = freeze({})  # further VisionTransformer fields
    decode: bool = False
    remat_policy: str = "none"
    scan_layers: bool = False
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    def __post_init__(self) -> None:
        object.__setattr__(self, "vision_options", freeze(dict(self.vision_options)))
        super().__post_init__()

    @property
    def num_patches(self) -> int:
        """Latent tokens per image, P."""
        h, w, _ = self.image_shape
        return (h // self.patch_size) * (w // self.patch_size)

    @property
    def num_features(self) -> int:
        """ViT tokens per image, F."""
        return (self.image_size // self.vision_patch) ** 2

    def setup(self) -> None:
        h, w, c = self.image_shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image_shape {self.image_shape} is not divisible by patch {p}")
        if self.image_size % self.vision_patch:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by vision_patch {self.vision_patch}"
            )
        expert_counts(self.experts)
        if self.latent_encoder not in LATENT_ENCODERS:
            raise ValueError(
                f"unknown latent_encoder {self.latent_encoder!r}; valid: {LATENT_ENCODERS}"
            )
        if self.latent_positions not in LATENT_POSITIONS:
            raise ValueError(
                f"unknown latent_positions {self.latent_positions!r}; valid: {LATENT_POSITIONS}"
            )
        kw = dtypes(self)
        self.token_embedding = TokenEmbed(self.vocab_size, self.width, self.param_dtype)
        self.decoder = MoTDecoder(
            self.num_heads, self.mlp_dim, depth=self.depth, experts=self.experts,
            num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, qk_norm=self.qk_norm,
            qkv_bias=self.qkv_bias, rope_theta=self.rope_theta, norm_eps=self.norm_eps,
            decode=self.decode, remat_policy=self.remat_policy, scan_layers=self.scan_layers,
            attention_impl=self.attention_impl, **kw,
        )  # fmt: skip
        self.lm_head = DenseGeneral((self.vocab_size,), ("embed", "vocab"), use_bias=False, **kw)
        self.vit = VisionTransformer(
            self.vision_patch, self.vision_width, self.vision_depth, self.vision_heads,
            self.vision_mlp_dim,
            **{"pool": "gap", "pre_norm": False, "activation": "gelu_tanh",
               "attention_impl": self.attention_impl, **kw, **self.vision_options},
        )  # fmt: skip
        self.connector_fc1 = DenseGeneral((self.width,), (None, "embed"), **kw)
        self.connector_fc2 = DenseGeneral((self.width,), ("mlp", "embed"), **kw)
        self.time_embed = TimestepEmbed(self.width, **kw)
        if self.latent_encoder == "unet":
            self.latent_unet = UNetPatches(self.width, p, c, self.unet_channels, **kw)
        else:
            self.vae2llm = DenseGeneral((self.width,), ("patch", "embed"), **kw)
            self.llm2vae = DenseGeneral((p * p * c,), ("embed", "patch"), init="zeros", **kw)
        table = sincos_2d(h // p, w // p, self.width)
        if self.latent_positions == "learned":
            table = self.param(
                "latent_pos_embed",
                logical(lambda *_: table, "position", "embed"),
                table.shape,
                self.param_dtype,
            )
        self.latent_pos_table = table

    def embed_latents(self, latents: jnp.ndarray, timesteps: jnp.ndarray) -> tuple:
        """Latents [B, M, h, w, c] at flow times [B, M] -> (tokens [B, M, P, width], what
        `read_latents` needs: the U-Net's skip activations and timestep embedding)."""
        b, m = latents.shape[:2]
        if tuple(latents.shape[2:]) != tuple(self.image_shape):
            raise ValueError(
                f"latents have shape {tuple(latents.shape[2:])} but the model was built for "
                f"image_shape {tuple(self.image_shape)}"
            )
        flat = latents.reshape(b * m, *latents.shape[2:])
        t = self.time_embed(timesteps.reshape(b * m) * self.timestep_scale).astype(self.dtype)
        if self.latent_encoder == "unet":
            x, skips = self.latent_unet.encode(flat, t)
        else:
            x, skips = self.vae2llm(patchify(flat, self.patch_size)), ()
        x = x + t[:, None] + jnp.asarray(self.latent_pos_table, self.dtype)
        return x.reshape(b, m, *x.shape[1:]), (skips, t)

    def read_latents(self, hidden: jnp.ndarray, context: tuple) -> jnp.ndarray:
        """Latent-token hidden states [B, M, P, width] -> velocities [B, M, h, w, c] (f32)."""
        b, m = hidden.shape[:2]
        flat = hidden.reshape(b * m, *hidden.shape[2:])
        if self.latent_encoder == "unet":
            v = self.latent_unet.decode(flat, *context, self.image_shape[0])
        else:
            v = unpatchify(
                self.llm2vae(flat).astype(jnp.float32), self.image_shape[0], self.patch_size
            )
        return v.reshape(b, m, *self.image_shape)

    def embed_vit(self, images: jnp.ndarray) -> jnp.ndarray:
        """Pixels [B, K, H, W, C] -> connector tokens [B, K, F, width]."""
        b, k = images.shape[:2]
        _, feats = self.vit(images.reshape(b * k, *images.shape[2:]))
        x = self.connector_fc2(ACTIVATIONS["gelu_tanh"](self.connector_fc1(feats)))
        side = self.image_size // self.vision_patch
        x = x + sincos_2d(side, side, self.width).astype(self.dtype)
        return x.reshape(b, k, *x.shape[1:])

    def hidden_states(self, batch: Mapping[str, jnp.ndarray]) -> tuple[jnp.ndarray, tuple]:
        """The decoder's final (normed) hidden states [B, L, width] of a sequence or chunk,
        and the latents' read-out context (`embed_latents`; () without latents)."""
        tokens = batch["tokens"]
        x = self.token_embedding(tokens).astype(self.dtype)
        expert_ids = jnp.zeros(tokens.shape, jnp.int32)
        context = ()
        if "vit_images" in batch:
            vit = self.embed_vit(batch["vit_images"])
            x = jax.vmap(_scatter)(x, batch["vit_positions"], vit)
        if "images" in batch:
            images = batch["images"]
            t = batch.get("timesteps", jnp.zeros(images.shape[:2], jnp.float32))
            latents, context = self.embed_latents(images, t)
            x = jax.vmap(_scatter)(x, batch["image_positions"], latents)
            ones = jnp.ones(batch["image_positions"].shape, jnp.int32)
            expert_ids = jax.vmap(_scatter)(expert_ids, batch["image_positions"], ones)
        x = nn.with_logical_constraint(x, ACT)
        routing = route(expert_ids, max(expert_counts(self.experts)))
        ids = (batch["segment_ids"], batch["span_ids"], batch["positions"])
        hidden = self.decoder(
            nn.with_logical_constraint(routing.sort(x), TOKENS), routing, *ids,
            batch.get("cache_offset"),
        )  # fmt: skip
        return nn.with_logical_constraint(routing.unsort(hidden), ACT), context

    def __call__(self, batch: Mapping[str, jnp.ndarray], *, train: bool = False) -> dict:
        del train  # no dropout
        x, context = self.hidden_states(batch)
        at = x if "logit_positions" not in batch else jax.vmap(_gather)(x, batch["logit_positions"])
        out = {"logits": self.lm_head(at).astype(jnp.float32)}
        if "images" in batch:
            b, m, p = batch["image_positions"].shape
            hidden = jax.vmap(_gather)(x, batch["image_positions"].reshape(b, m * p))
            out["velocity"] = self.read_latents(hidden.reshape(b, m, p, -1), context)
        return out


def _scatter(x: jnp.ndarray, positions: jnp.ndarray, values: jnp.ndarray) -> jnp.ndarray:
    """One row: x [L, ...] with values [..., N, ...] written at positions [..., N] (>= L:
    dropped)."""
    flat = positions.reshape(-1)
    return x.at[flat].set(values.reshape(flat.shape[0], *x.shape[1:]).astype(x.dtype), mode="drop")


def _gather(x: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
    """One row: x [L, D] at positions [N] -> [N, D] (clipped; unused slots are masked)."""
    return jnp.take(x, positions, axis=0, mode="clip")


Model = Bagel
