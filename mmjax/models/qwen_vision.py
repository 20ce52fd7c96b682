"""The Qwen2-VL and Qwen2.5-VL vision tower: a ViT over packed native-resolution patches.

Qwen2-VL (Wang et al., 2024, Sec. 2.1): a 3D patch embedding (a Conv3d over 2 frames x 14 x
14 pixels, here one dense layer over the flattened patch), 2D RoPE on the patch grid instead
of position embeddings, LayerNorm + QuickGELU blocks, and a merger: LayerNorm, then a 2-layer
MLP over each 2x2 group of neighbouring patches, out to the LM's width. Qwen2.5-VL (Bai et
al., 2025, Sec. 2.1): RMSNorm + SwiGLU blocks, and window attention (112-pixel windows, 8x8
patches) in every layer but every `global_every`-th (transformers' fullatt_block_indexes
7, 15, 23, 31).

Several images and videos of different sizes share one row of `patches` [B, N, D]: the
attention is block-diagonal through segment ids (`patch_segment_ids`, one per frame of each
image), so nothing is padded to a square and no image is looped over. Windows are segment
ids too (`patch_window_ids`): the patches are gathered into window order (`patch_order`),
so that each window is contiguous for the attention kernel's block skipping, and the merged
tokens are put back in the processor's order at the end. mmjax.data.native_resolution lays
these arrays out.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn import Transformer
from mmjax.nn.axes import ACT
from mmjax.nn.dense import DenseGeneral, dtypes
from mmjax.nn.mlp import ACTIVATIONS
from mmjax.nn.norms import make_norm
from mmjax.nn.rope import axial_rope_angles


class PatchMerger(nn.Module):
    """Norm, then each `merge`^2 consecutive patches (one 2x2 group) concatenated and mapped
    by Linear -> GELU -> Linear to `out_dim` (the reference's PatchMerger)."""

    out_dim: int
    merge: int = 2
    norm: str = "layer"
    norm_eps: float = 1e-6
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x [B, N, width] -> [B, N / merge^2, out_dim]."""
        kw = dtypes(self)
        x = make_norm(self.norm, name="norm", epsilon=self.norm_eps, **kw)(x)
        group = self.merge**2
        x = x.reshape(x.shape[0], x.shape[1] // group, group * x.shape[2])
        x = DenseGeneral((x.shape[-1],), ("embed", "mlp"), name="fc1", **kw)(x)
        x = ACTIVATIONS["gelu"](x)
        return DenseGeneral((self.out_dim,), ("mlp", "embed"), name="fc2", **kw)(x)


class QwenVisionTower(nn.Module):
    """Packed patches [B, N, C*T*P*P] -> merged visual tokens [B, N / merge^2, out_dim].

    Defaults are Qwen2-VL's block; Qwen2.5-VL sets norm="rms", gated_mlp=True,
    activation="silu" and global_every=8 with window ids.
    """

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    out_dim: int
    merge: int = 2
    norm: str = "layer"
    gated_mlp: bool = False
    activation: str = "quick_gelu"
    norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    global_every: int = 0  # with window ids: every N-th block attends to the whole frame
    remat_policy: str = "none"
    scan_layers: bool = False
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        patches: jnp.ndarray,
        positions: jnp.ndarray,
        segment_ids: jnp.ndarray,
        window_ids: jnp.ndarray | None = None,
        order: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        """patches [B, N, D] with, per patch, `positions` [B, N, 2] (row, column), the frame's
        `segment_ids` [B, N] (0: padding) and for window attention `window_ids` and the window
        `order` [B, N] -> merged tokens [B, N / merge^2, out_dim] in the patches' order."""
        self._check(patches, positions, segment_ids, window_ids, order)
        kw = dtypes(self)
        x = DenseGeneral(
            (self.width,), ("patch", "embed"), use_bias=False, name="patch_embed", **kw
        )(patches.astype(self.dtype))
        angles = axial_rope_angles(positions, self.width // self.num_heads, self.rope_theta)
        if order is not None:  # window order: each window contiguous
            x, angles, segment_ids, window_ids = (
                jnp.take_along_axis(a, order.reshape(*order.shape, *[1] * (a.ndim - 2)), axis=1)
                for a in (x, angles, segment_ids, window_ids)
            )
        x = nn.with_logical_constraint(x, ACT)
        x = Transformer(
            self.depth,
            self.num_heads,
            self.mlp_dim,
            activation=self.activation,
            norm=self.norm,
            norm_eps=self.norm_eps,
            gated_mlp=self.gated_mlp,
            use_bias=True,
            global_every=self.global_every if window_ids is not None else 0,
            remat_policy=self.remat_policy,
            scan_layers=self.scan_layers,
            attention_impl=self.attention_impl,
            name="encoder",
            **kw,
        )(x, segment_ids, rope_angles=angles, local_segment_ids=window_ids)
        merged = PatchMerger(
            self.out_dim, self.merge, self.norm, self.norm_eps, name="merger", **kw
        )(x)
        if order is None:
            return merged
        group = self.merge**2
        back = order[:, ::group] // group  # where each merged token sits in the patches' order
        return jax.vmap(lambda m, i: jnp.zeros_like(m).at[i].set(m))(merged, back)

    def _check(self, patches, positions, segment_ids, window_ids, order) -> None:
        """Clear errors for mismatched per-patch arrays."""
        b, n = patches.shape[:2]
        if patches.ndim != 3:
            raise ValueError(f"patches must be [batch, patches, values], got {patches.shape}")
        if n % (self.merge**2):
            raise ValueError(f"{n} patches per row is not a multiple of {self.merge**2} (merge)")
        if positions.shape != (b, n, 2):
            raise ValueError(f"patch positions must be {(b, n, 2)}, got {positions.shape}")
        for name, a in (("segment_ids", segment_ids), ("window_ids", window_ids), ("order", order)):
            if a is not None and a.shape != (b, n):
                raise ValueError(f"patch {name} must be {(b, n)}, got {a.shape}")
        if (window_ids is None) != (order is None):
            raise ValueError("window attention needs both patch window ids and their order")
        if (window_ids is not None) != bool(self.global_every):
            raise ValueError(
                "window attention (global_every) needs patch window ids and order, and only it "
                f"takes them: global_every={self.global_every}, window ids given: "
                f"{window_ids is not None}"
            )
