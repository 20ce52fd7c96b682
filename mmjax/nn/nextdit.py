"""Lumina-Next's diffusion transformer with cross-attention to a condition (NextDiT; Zhuo et
al., 2024), the generator of BLIP3-o (Chen et al., 2025), which denoises a grid of CLIP image
features conditioned on a frozen VLM's hidden states at its query tokens.

A block (official `LuminaNextDiTBlock` as BLIP3-o builds it through diffusers):
  scale_a, gate_a, scale_m, gate_m = Dense(SiLU(temb))
  n = RMSNorm(h) * (1 + scale_a)                      # no shift: "RMSNormZero"
  a = Attn(n, n) with q, k LayerNormed across heads and 2D RoPE on both
  c = tanh(gate_head) * Attn(n, RMSNorm(cond)), RoPE on the queries only, gates start at 0
  h = h + tanh(gate_a) * RMSNorm(Out(a + c))          # one output projection for both
  h = h + tanh(gate_m) * RMSNorm(SwiGLU(RMSNorm(h) * (1 + scale_m)))
temb = MLP(sinusoid(t)) + Dense(LayerNorm(mean of the projected condition tokens)); the
final layer is LayerNorm (no affine) * (1 + Dense(SiLU(temb))), then Dense to the patch.
Nothing is zero-initialised but the per-head cross-attention gates (official code): at
init the grid sees its condition only through the pooled temb.
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from mmjax import kernels
from mmjax.nn.attention import QKV_AXES
from mmjax.nn.axes import ACT
from mmjax.nn.dense import DenseGeneral, dtypes
from mmjax.nn.initializers import logical
from mmjax.nn.mlp import ACTIVATIONS, Mlp
from mmjax.nn.norms import LayerNorm, RMSNorm, plain_layer_norm
from mmjax.nn.patch_embed import patchify, unpatchify
from mmjax.nn.rope import axial_rope_angles, rotate
from mmjax.nn.timestep import TimestepEmbed
from mmjax.nn.transformer import remat_block, run_blocks


def grid_rope_angles(height: int, width: int, head_dim: int, theta: float) -> jnp.ndarray:
    """[1, height * width, head_dim / 2] 2D RoPE angles of a raster-ordered grid: half the
    frequencies turn by the row, half by the column (Lumina-Next interleaves the two axes'
    pairs; the same rotation up to a fixed order of a head's channels)."""
    rows, cols = jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing="ij")
    positions = jnp.stack([rows.reshape(-1), cols.reshape(-1)], axis=-1)
    return axial_rope_angles(positions, head_dim, theta)[None]


class NextDiTSettings(nn.Module):
    """The fields a NextDiTBlock is built from, shared by the NextDiT that stacks them."""

    num_heads: int
    mlp_dim: int
    norm_eps: float = 1e-5
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    def block_settings(self) -> dict:
        """The NextDiTSettings fields' values."""
        names = [f.name for f in dataclasses.fields(NextDiTSettings)]
        return {n: getattr(self, n) for n in names if n not in ("parent", "name")}


class NextDiTBlock(NextDiTSettings):
    """One Lumina-Next block (module docstring): x [B, S, width], the condition [B, N, width]
    and its mask [B, N] (1 valid, 0 padding), temb [B, T], RoPE angles [1, S, head_dim/2]."""

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        cond: jnp.ndarray,
        cond_mask: jnp.ndarray,
        temb: jnp.ndarray,
        angles: jnp.ndarray,
    ) -> jnp.ndarray:
        kw = dtypes(self)
        width = x.shape[-1]
        head_dim = width // self.num_heads
        rms = lambda name: RMSNorm(self.norm_eps, **kw, name=name)  # noqa: E731
        mod = DenseGeneral((4, width), (None, None, "embed"), name="modulation", **kw)
        scale_a, gate_a, scale_m, gate_m = jnp.moveaxis(mod(nn.silu(temb)), -2, 0)[:, :, None]
        n = rms("norm1")(x) * (1 + scale_a)
        ones = jnp.ones(x.shape[:2], jnp.int32)

        def attend(prefix: str, q_in, kv_in, kv_mask, rope_keys: bool) -> jnp.ndarray:
            def proj(name: str, inputs: jnp.ndarray) -> jnp.ndarray:
                y = DenseGeneral((width,), ("embed", "mlp"), use_bias=False, name=name, **kw)
                return y(inputs)

            def heads(y: jnp.ndarray) -> jnp.ndarray:
                return nn.with_logical_constraint(
                    y.reshape(*y.shape[:2], self.num_heads, head_dim), QKV_AXES
                )

            # q and k LayerNormed across all heads ("layer_norm_across_heads")
            q = LayerNorm(1e-5, **kw, name=f"{prefix}_norm_q")(proj(f"{prefix}_query", q_in))
            k = LayerNorm(1e-5, **kw, name=f"{prefix}_norm_k")(proj(f"{prefix}_key", kv_in))
            q, k, v = heads(q), heads(k), heads(proj(f"{prefix}_value", kv_in))
            q = rotate(q, angles)
            k = rotate(k, angles) if rope_keys else k
            return kernels.attention(
                q, k, v, segment_ids=ones, kv_segment_ids=kv_mask, impl=self.attention_impl
            )

        self_out = attend("self", n, n, ones, True)
        cond = rms("norm_cond")(cond)
        cross = attend("cross", n, cond, cond_mask.astype(jnp.int32), False)
        gate = self.param(
            "cross_gate", logical(nn.initializers.zeros_init(), "heads"), (self.num_heads,),
            self.param_dtype,
        )  # fmt: skip
        mixed = self_out + jnp.tanh(gate).astype(self.dtype)[:, None] * cross
        out = DenseGeneral(
            (width,), ("heads", "kv", "embed"), num_in=2, use_bias=False, name="out", **kw
        )(mixed)
        x = x + jnp.tanh(gate_a) * rms("norm2")(out)
        h = rms("ffn_norm1")(x) * (1 + scale_m)
        h = Mlp(self.mlp_dim, "silu", gated=True, use_bias=False, name="mlp", **kw)(h)
        x = x + jnp.tanh(gate_m) * rms("ffn_norm2")(h)
        return nn.with_logical_constraint(x, ACT)


class NextDiT(NextDiTSettings, kw_only=True):
    """`__call__(x [B, H, W, C], t [B], cond [B, N, D], cond_mask [B, N] | None)` -> the
    prediction [B, H, W, C] (f32): patches of `patch_size` embedded linearly, `depth`
    NextDiTBlocks, the adaptive final layer. `timestep_scale` multiplies t before the
    sinusoid (BLIP3-o feeds sigma x 1000)."""

    width: int
    depth: int
    patch_size: int = 1
    time_width: int = 1024  # min(width, 1024), as Lumina-Next sizes its temb
    timestep_scale: float = 1000.0
    rope_theta: float = 10_000.0
    remat_policy: str = "none"
    scan_layers: bool = False

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        t: jnp.ndarray,
        cond: jnp.ndarray,
        cond_mask: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        kw = dtypes(self)
        _, height, width_px, channels = x.shape
        p = self.patch_size
        if height % p or width_px % p:
            raise ValueError(f"a {height}x{width_px} grid is not divisible by patch {p}")
        if self.width % self.num_heads or (self.width // self.num_heads) % 4:
            raise ValueError(
                f"width {self.width} / num_heads {self.num_heads} must be a head_dim divisible "
                "by 4 (2D RoPE)"
            )
        if cond_mask is None:
            cond_mask = jnp.ones(cond.shape[:2], jnp.int32)
        h = DenseGeneral((self.width,), ("patch", "embed"), name="patch_embed", **kw)(
            patchify(x, p)
        )
        # PixArt's caption projection: Dense, GELU (tanh), Dense
        c = DenseGeneral((self.width,), (None, "embed"), name="cond_fc1", **kw)(cond)
        c = DenseGeneral((self.width,), ("mlp", "embed"), name="cond_fc2", **kw)(
            ACTIVATIONS["gelu_tanh"](c)
        )
        time_width = min(self.width, self.time_width)
        weights = cond_mask.astype(jnp.float32)[..., None]
        pooled = (c * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
        pooled = LayerNorm(1e-5, **kw, name="pool_norm")(pooled)
        temb = TimestepEmbed(time_width, **kw, name="time_embed")(t * self.timestep_scale)
        temb = temb + DenseGeneral((time_width,), ("embed", None), name="pool_fc", **kw)(pooled)
        angles = grid_rope_angles(
            height // p, width_px // p, self.width // self.num_heads, self.rope_theta
        )
        block = remat_block(NextDiTBlock, self.remat_policy, self.scan_layers)
        fields = self.block_settings()
        h = run_blocks(block, fields, self.depth, self.scan_layers, h, c, cond_mask, temb, angles)
        scale = DenseGeneral((self.width,), (None, "embed"), name="final_modulation", **kw)(
            nn.silu(temb)
        )
        h = plain_layer_norm(h, 1e-6) * (1 + scale[:, None])
        out = DenseGeneral((p * p * channels,), ("embed", "patch"), name="final", **kw)(h)
        return unpatchify(out.astype(jnp.float32), height, p)
