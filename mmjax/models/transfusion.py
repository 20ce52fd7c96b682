"""Transfusion (Zhou et al., 2024): one transformer over text tokens and continuous image patches.

A sequence is `text ... <BOI> patches <EOI> text ...` with any number of images. Text tokens
are embedded and read out by an LM head; each image (pixels or VAE latents) becomes a grid of
p x p patches, embedded with its diffusion timestep and 2D position added, and read out as the
noise (or velocity) prediction of its patches. The patch encoder is either a linear layer or
U-Net down blocks (with up blocks and skip connections to read out), both from Sec. 3.1.
Attention is causal over the sequence and bidirectional inside each image (Sec. 2.2: span
ids), through `mmjax.kernels.attention`. The decoder is Llama's block (RMSNorm, SwiGLU,
RoPE; Sec. 4.1).

Batch layout (built by mmjax.data.sequences): `tokens`, `positions`, `segment_ids`,
`span_ids` [B, L]; `images` [B, M, H, W, C] (noised by the objective) and their diffusion
`timesteps` [B, M] (absent: 0, clean images, as when an image is the context of a caption);
`image_positions` [B, M, P], the sequence position of each of an image's P patches (raster
order). Images whose `image_valid` is 0 are padding: their slots must be distinct positions
that no text target follows (a packer writes them into the row's padding). Optional
`logit_positions` [B, K]: compute the LM head only at these positions (training reads text
logits only where a text token comes next, about half of a sequence with an image).
"""

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn import RMSNorm, TimestepEmbed, TokenEmbed, llama_decoder
from mmjax.nn.axes import ACT
from mmjax.nn.conv import Conv, GroupNorm, ResnetBlock
from mmjax.nn.dense import DenseGeneral, dtypes
from mmjax.nn.initializers import logical
from mmjax.nn.patch_embed import patchify, unpatchify
from mmjax.nn.reshard import from_width_to_batch_split

PATCH_ENCODERS = ("linear", "unet")


class LinearPatches(nn.Module):
    """p x p patches <-> tokens by one dense layer each way (the read-out zero-initialised,
    so the first prediction is 0, as DiT's final layer)."""

    width: int
    patch_size: int
    out_channels: int
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        kw = dtypes(self)
        p = self.patch_size
        self.proj_in = DenseGeneral((self.width,), ("patch", "embed"), init="lecun_normal", **kw)
        self.norm_out = RMSNorm(**kw)
        self.proj_out = DenseGeneral(
            (p * p * self.out_channels,), ("embed", "patch"), init="zeros", **kw
        )

    def encode(self, images: jnp.ndarray, cond: jnp.ndarray) -> tuple[jnp.ndarray, tuple]:
        """[N, H, W, C] -> ([N, P, width], no skips); `cond` is unused."""
        del cond
        return self.proj_in(patchify(images, self.patch_size)), ()

    def decode(self, tokens: jnp.ndarray, skips: tuple, cond: jnp.ndarray, height: int):
        """[N, P, width] -> [N, H, W, C] in f32; `skips` and `cond` are unused."""
        del skips, cond
        out = self.proj_out(self.norm_out(tokens))
        return unpatchify(out.astype(jnp.float32), height, self.patch_size)


class UNetPatches(nn.Module):
    """U-Net down blocks to a patch grid and up blocks back (Transfusion Sec. 3.1, Fig. 3).

    log2(p) levels, each a timestep-conditioned ResNet block (AdaGN) then a stride-2 conv; a
    dense layer maps the (H/p, W/p) grid's channels to tokens. Reading out mirrors it with
    nearest-neighbour upsampling, the down path's activations as skip connections, and a
    final GroupNorm, SiLU and conv to the image channels.
    """

    width: int
    patch_size: int
    out_channels: int
    channels: int = 64
    norm_groups: int = 8
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        p = self.patch_size
        if p & (p - 1):
            raise ValueError(f"the U-Net patch encoder needs a power-of-2 patch size, got {p}")
        self.levels = p.bit_length() - 1
        kw = dtypes(self)
        ch, g = self.channels, self.norm_groups
        self.stem = Conv(ch, **kw)
        self.down = [ResnetBlock(ch, g, **kw) for _ in range(self.levels)]
        self.downsample = [Conv(ch, strides=2, **kw) for _ in range(self.levels)]
        self.mid_in = ResnetBlock(ch, g, **kw)
        self.to_tokens = DenseGeneral((self.width,), (None, "embed"), **kw)
        self.from_tokens = DenseGeneral((ch,), ("embed", None), **kw)
        self.mid_out = ResnetBlock(ch, g, **kw)
        self.upsample = [Conv(ch, **kw) for _ in range(self.levels)]
        self.up = [ResnetBlock(ch, g, **kw) for _ in range(self.levels)]
        self.norm_out = GroupNorm(g, **kw)
        self.conv_out = Conv(self.out_channels, wide="in", **kw)

    def encode(self, images: jnp.ndarray, cond: jnp.ndarray) -> tuple[jnp.ndarray, tuple]:
        h = self.stem(images)
        skips = []
        for block, down in zip(self.down, self.downsample, strict=True):
            h = block(h, cond)
            skips.append(h)
            h = down(h)
        h = self.mid_in(h, cond)
        return self.to_tokens(einops.rearrange(h, "n h w c -> n (h w) c")), tuple(skips)

    def decode(self, tokens: jnp.ndarray, skips: tuple, cond: jnp.ndarray, height: int):
        """[N, P, width] -> [N, H, W, C] in f32, through the up path with `skips`."""
        p = self.patch_size
        h = einops.rearrange(self.from_tokens(tokens), "n (h w) c -> n h w c", h=height // p)
        h = self.mid_out(h, cond)
        for block, upsample, skip in zip(self.up, self.upsample, reversed(skips), strict=True):
            h = upsample(jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2))
            h = block(jnp.concatenate([h, skip.astype(h.dtype)], axis=-1), cond)
        return self.conv_out(nn.silu(self.norm_out(h))).astype(jnp.float32)


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
    unet_channels: int = 64  # U-Net width (patch_encoder="unet")
    bidirectional_images: bool = True  # the Sec. 4.3 ablation sets False: causal patches
    rope_theta: float = 10_000.0
    decode: bool = False  # KV cache: batches are chunks written at `cache_offset`
    norm_eps: float = 1e-5
    remat_policy: str = "none"  # nn.transformer.REMAT_POLICIES
    scan_layers: bool = False  # one nn.scan over the blocks (nn.transformer.Transformer)
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
        kw = dtypes(self)
        self.token_embedding = TokenEmbed(self.vocab_size, self.width, self.param_dtype)
        if self.patch_encoder == "unet":
            self.patches = UNetPatches(self.width, p, c, self.unet_channels, **kw)
        else:
            self.patches = LinearPatches(self.width, p, c, **kw)
        self.patch_pos = self.param(
            "patch_pos",
            logical(nn.initializers.normal(0.02), "position", "embed"),
            (self.num_patches, self.width),
            self.param_dtype,
        )
        self.time_embed = TimestepEmbed(self.width, **kw)
        self.decoder = llama_decoder(
            self.depth,
            self.num_heads,
            self.mlp_dim,
            norm_eps=self.norm_eps,
            rope_theta=self.rope_theta,
            decode=self.decode,
            remat_policy=self.remat_policy,
            scan_layers=self.scan_layers,
            attention_impl=self.attention_impl,
            **kw,
        )
        self.norm_final = RMSNorm(epsilon=self.norm_eps, **kw)
        self.lm_head = DenseGeneral((self.vocab_size,), ("embed", "vocab"), use_bias=False, **kw)

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

    def embed_images(self, images: jnp.ndarray, timesteps: jnp.ndarray) -> tuple:
        """[B, M, H, W, C] and [B, M] -> (patch embeddings [B, M, P, width], what read_images
        needs: the encoder's skip activations and the timestep embedding)."""
        b, m = images.shape[:2]
        cond = self.time_embed(timesteps.reshape(b * m)).astype(self.dtype)
        cond = from_width_to_batch_split(cond, ("batch", "act_embed"))
        tokens, skips = self.patches.encode(images.reshape(b * m, *images.shape[2:]), cond)
        x = tokens + self.patch_pos.astype(self.dtype) + cond[:, None]
        return x.reshape(b, m, *x.shape[1:]), (skips, cond)

    def read_images(self, hidden: jnp.ndarray, context: tuple) -> jnp.ndarray:
        """Patch hidden states [B, M, P, width] -> image predictions [B, M, H, W, C] in f32."""
        b, m = hidden.shape[:2]
        skips, cond = context
        flat = hidden.reshape(b * m, *hidden.shape[2:])
        out = self.patches.decode(flat, skips, cond, self.image_shape[0])
        return out.reshape(b, m, *out.shape[1:])

    def hidden_states(self, batch: dict) -> tuple[jnp.ndarray, tuple | None]:
        """The decoder's final hidden states [B, L, width] for a mixed sequence (or, with
        `decode`, a chunk of one; a chunk without images may omit the image keys), and the
        image read-out context."""
        tokens = batch["tokens"]
        x = self.token_embedding(tokens).astype(self.dtype)
        context = None
        if "images" in batch:
            self._check(batch)
            images = batch["images"]
            timesteps = batch.get("timesteps", jnp.zeros(images.shape[:2], jnp.float32))
            patches, context = self.embed_images(images, timesteps)
            x = jax.vmap(_scatter)(x, batch["image_positions"], patches)
        x = nn.with_logical_constraint(x, ACT)
        span_ids = batch["span_ids"] if self.bidirectional_images else None
        x = self.decoder(
            x, batch["segment_ids"], span_ids, batch["positions"], batch.get("cache_offset")
        )
        return self.norm_final(x), context

    def __call__(self, batch: dict, *, train: bool = False) -> dict[str, jnp.ndarray]:
        del train  # no dropout
        x, context = self.hidden_states(batch)
        at = x if "logit_positions" not in batch else jax.vmap(_gather)(x, batch["logit_positions"])
        out = {"logits": self.lm_head(at).astype(jnp.float32)}
        if context is not None:
            patches = jax.vmap(_gather)(x, batch["image_positions"])
            out["image_pred"] = self.read_images(patches, context)
        return out


def _scatter(x: jnp.ndarray, positions: jnp.ndarray, patches: jnp.ndarray) -> jnp.ndarray:
    """One row: writes patches [M, P, D] into x [L, D] at positions [M, P] (beyond L: dropped)."""
    flat = positions.reshape(-1)
    return x.at[flat].set(patches.reshape(flat.shape[0], -1).astype(x.dtype), mode="drop")


def _gather(x: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
    """One row: x [L, D] at positions [...] -> [..., D] (clipped; padding images are masked)."""
    return jnp.take(x, positions, axis=0, mode="clip")


Model = Transfusion
