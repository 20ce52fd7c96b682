"""Transfusion (Zhou et al., 2024): one transformer over text tokens and continuous image patches.

A sequence is `text ... <BOI> patches <EOI> text ...` with any number of images. Text tokens
are embedded and read out by an LM head; each image (pixels or VAE latents) is cut into p x p
patches, linearly embedded with its diffusion timestep and 2D position added (Sec. 3.1), and
read out as the noise (or velocity) prediction of its patches. Attention is causal over the
sequence and bidirectional inside each image (Sec. 2.2: span ids), through
`mmjax.kernels.attention`. The decoder is Llama's block (RMSNorm, SwiGLU, RoPE; Sec. 4.1).

Batch layout (built by mmjax.data.sequences): `tokens`, `positions`, `segment_ids`,
`span_ids` [B, L]; `images` [B, M, H, W, C] (noised by the objective) and their diffusion
`timesteps` [B, M] (absent: 0, clean images, as when an image is the context of a caption);
`image_positions` [B, M, P], the sequence position of each of an image's P patches (raster
order). Images whose `image_valid` is 0 are padding: their positions may be anything.
"""

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn import RMSNorm, TimestepEmbed, Transformer
from mmjax.nn.dense import DenseGeneral
from mmjax.nn.initializers import logical

ACT = ("batch", "length", "act_embed")
PATCH_ENCODERS = ("linear",)


class Transfusion(nn.Module):
    """Mixed-modal decoder; `__call__(batch)` -> {"logits" [B,L,V], "image_pred" [B,M,H,W,C]}."""

    vocab_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    image_shape: tuple[int, int, int]  # (H, W, C) of the diffused image: pixels or latents
    patch_size: int = 2
    patch_encoder: str = "linear"
    bidirectional_images: bool = True  # the Sec. 4.3 ablation sets False: causal patches
    rope_theta: float = 10_000.0
    decode: bool = False  # KV cache: batches are chunks written at `cache_offset`
    norm_eps: float = 1e-5
    remat: bool = False
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        h, w, c = self.image_shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image_shape {self.image_shape} is not divisible by patch {p}")
        if self.patch_encoder not in PATCH_ENCODERS:
            raise ValueError(
                f"unknown patch_encoder {self.patch_encoder!r}; valid: {PATCH_ENCODERS}"
            )
        self.num_patches = (h // p) * (w // p)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.token_embedding = nn.Embed(
            self.vocab_size,
            self.width,
            embedding_init=logical(nn.initializers.normal(0.02), "vocab", "embed"),
            param_dtype=self.param_dtype,
        )
        self.patch_in = DenseGeneral((self.width,), ("patch", "embed"), init="lecun_normal", **kw)
        self.patch_pos = self.param(
            "patch_pos",
            logical(nn.initializers.normal(0.02), "position", "embed"),
            (self.num_patches, self.width),
            self.param_dtype,
        )
        self.time_embed = TimestepEmbed(self.width, **kw)
        self.decoder = Transformer(
            self.depth,
            self.num_heads,
            self.mlp_dim,
            activation="silu",
            causal=True,
            norm="rms",
            norm_eps=self.norm_eps,
            gated_mlp=True,
            use_bias=False,
            rope_theta=self.rope_theta,
            decode=self.decode,
            remat=self.remat,
            attention_impl=self.attention_impl,
            **kw,
        )
        self.norm_final = RMSNorm(epsilon=self.norm_eps, **kw)
        self.lm_head = DenseGeneral((self.vocab_size,), ("embed", "vocab"), use_bias=False, **kw)
        self.patch_norm = RMSNorm(epsilon=self.norm_eps, **kw)
        # zero-initialised read-out: the first prediction is 0 (DiT, Peebles & Xie 2023)
        self.patch_out = DenseGeneral((p * p * c,), ("embed", "patch"), init="zeros", **kw)

    def _check(self, batch: dict) -> None:
        images, positions = batch["images"], batch["image_positions"]
        if tuple(images.shape[2:]) != tuple(self.image_shape):
            raise ValueError(
                f"images have shape {tuple(images.shape[2:])} but the model was built for "
                f"image_shape {tuple(self.image_shape)}"
            )
        if positions.shape[-1] != self.num_patches:
            raise ValueError(
                f"image_positions has {positions.shape[-1]} slots per image but "
                f"{self.image_shape} with patch {self.patch_size} has {self.num_patches} patches"
            )

    def embed_images(self, images: jnp.ndarray, timesteps: jnp.ndarray) -> jnp.ndarray:
        """[B, M, H, W, C] and [B, M] -> patch embeddings [B, M, P, width]."""
        p = self.patch_size
        patches = einops.rearrange(images, "b m (h p) (w q) c -> b m (h w) (p q c)", p=p, q=p)
        x = self.patch_in(patches) + self.patch_pos.astype(self.dtype)
        return x + self.time_embed(timesteps)[:, :, None, :].astype(self.dtype)

    def read_images(self, hidden: jnp.ndarray) -> jnp.ndarray:
        """Patch hidden states [B, M, P, width] -> image predictions [B, M, H, W, C] in f32."""
        h, w, _ = self.image_shape
        p = self.patch_size
        out = self.patch_out(self.patch_norm(hidden)).astype(jnp.float32)
        return einops.rearrange(
            out, "b m (h w) (p q c) -> b m (h p) (w q) c", h=h // p, w=w // p, p=p, q=p
        )

    def hidden_states(self, batch: dict) -> jnp.ndarray:
        """The decoder's final hidden states [B, L, width] for a mixed sequence (or, with
        `decode`, a chunk of one; a chunk without images may omit the image keys)."""
        tokens = batch["tokens"]
        x = self.token_embedding(tokens).astype(self.dtype)
        if "images" in batch:
            self._check(batch)
            images = batch["images"]
            timesteps = batch.get("timesteps", jnp.zeros(images.shape[:2], jnp.float32))
            patches = self.embed_images(images, timesteps)
            x = jax.vmap(_scatter)(x, batch["image_positions"], patches)
        x = nn.with_logical_constraint(x, ACT)
        span_ids = batch["span_ids"] if self.bidirectional_images else None
        x = self.decoder(
            x, batch["segment_ids"], span_ids, batch["positions"], batch.get("cache_offset")
        )
        return self.norm_final(x)

    def __call__(self, batch: dict, *, train: bool = False) -> dict[str, jnp.ndarray]:
        del train  # no dropout
        x = self.hidden_states(batch)
        out = {"logits": self.lm_head(x).astype(jnp.float32)}
        if "images" in batch:
            out["image_pred"] = self.read_images(jax.vmap(_gather)(x, batch["image_positions"]))
        return out


def _scatter(x: jnp.ndarray, positions: jnp.ndarray, patches: jnp.ndarray) -> jnp.ndarray:
    """One row: writes patches [M, P, D] into x [L, D] at positions [M, P] (beyond L: dropped)."""
    flat = positions.reshape(-1)
    return x.at[flat].set(patches.reshape(flat.shape[0], -1).astype(x.dtype), mode="drop")


def _gather(x: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
    """One row: x [L, D] at positions [M, P] -> [M, P, D] (clipped; padding images are masked)."""
    return jnp.take(x, positions, axis=0, mode="clip")


Model = Transfusion
