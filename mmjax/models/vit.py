"""Vision Transformer (Dosovitskiy et al., 2021) as used by CLIP and SigLIP.

Pooling: `cls` token (CLIP), global average (`gap`) or attention pooling (`map`, SigLIP).
Position embeddings: learned (`learn`, CLIP) or fixed 2D sin-cos on the patches (`sincos2d`,
big_vision's ViT and MAE).
"""

import flax.linen as nn
import jax.numpy as jnp

from mmjax.nn import LayerNorm, PatchEmbed, Transformer
from mmjax.nn.axes import ACT
from mmjax.nn.dense import dtypes
from mmjax.nn.initializers import logical
from mmjax.nn.pooling import MAPHead
from mmjax.nn.sincos import sincos_2d

POOLS = ("cls", "gap", "map")
POSEMBS = ("learn", "sincos2d")


class VisionTransformer(nn.Module):
    """Images [B, H, W, C] -> (pooled [B, width], tokens [B, N, width])."""

    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    pool: str = "cls"
    posemb: str = "learn"
    pre_norm: bool = True  # CLIP's ln_pre before the encoder; SigLIP has none
    patch_bias: bool = True
    activation: str = "gelu"
    norm_eps: float = 1e-5
    remat_policy: str = "none"  # nn.transformer.REMAT_POLICIES
    scan_layers: bool = False  # one nn.scan over the blocks (nn.transformer.Transformer)
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, images: jnp.ndarray, *, pooled_only: bool = False, feature_layer: int | None = None
    ) -> tuple[jnp.ndarray | None, jnp.ndarray | None]:
        """Images [B, H, W, C] -> (pooled [B, width], tokens [B, N, width]); `pooled_only`
        skips the last block's other tokens under CLS pooling (tokens: None).

        `feature_layer` k returns (None, the encoder's hidden state k) indexed as HF's
        `hidden_states`: 0 the embeddings after norm_pre, depth (or -1) the last block's
        output, -2 the penultimate one that LLaVA-1.5 reads; no norm_post, and the blocks
        after it are neither run nor created (with `scan_layers`: only the last one may be left out,
        so k is 0, -2 or the last)."""
        if self.pool not in POOLS:
            raise ValueError(f"unknown pool {self.pool!r}; valid: {POOLS}")
        if self.posemb not in POSEMBS:
            raise ValueError(f"unknown posemb {self.posemb!r}; valid: {POSEMBS}")
        depth = self.depth
        if feature_layer is not None:
            if not -self.depth - 1 <= feature_layer <= self.depth:
                raise ValueError(
                    f"feature_layer {feature_layer} is outside [-{self.depth + 1}, {self.depth}] "
                    f"for a ViT of depth {self.depth}"
                )
            depth = range(self.depth + 1)[feature_layer]
        kw = dtypes(self)
        _check_images(images)
        x = PatchEmbed(
            self.patch_size, self.width, use_bias=self.patch_bias, name="patch_embed", **kw
        )(images)
        if self.posemb == "sincos2d":  # fixed, on the patches only: the CLS token has none
            grid = (images.shape[1] // self.patch_size, images.shape[2] // self.patch_size)
            x = x + sincos_2d(*grid, self.width)
        x = self._prepend_cls(x)
        if self.posemb == "learn":
            x = x + self._learned_posemb(x.shape[1], images.shape)
        x = x.astype(self.dtype)
        x = nn.with_logical_constraint(x, ACT)
        if self.pre_norm:
            x = LayerNorm(name="norm_pre", epsilon=self.norm_eps, **kw)(x)
        read_cls = pooled_only and self.pool == "cls" and feature_layer is None
        x = Transformer(
            self.depth,
            self.num_heads,
            self.mlp_dim,
            activation=self.activation,
            norm_eps=self.norm_eps,
            remat_policy=self.remat_policy,
            scan_layers=self.scan_layers,
            attention_impl=self.attention_impl,
            name="encoder",
            **kw,
        )(x, read_at=jnp.zeros(x.shape[:1], jnp.int32) if read_cls else None, num_blocks=depth)
        if feature_layer is not None:
            return None, x
        x = LayerNorm(name="norm_post", epsilon=self.norm_eps, **kw)(x)
        if self.pool == "cls":
            return x[:, 0], None if read_cls else x
        if self.pool == "gap":
            return x.mean(axis=1), x
        head = MAPHead(
            self.num_heads,
            self.mlp_dim,
            activation=self.activation,
            norm_eps=self.norm_eps,
            attention_impl=self.attention_impl,
            name="map_head",
            **kw,
        )
        return head(x), x

    def _prepend_cls(self, x: jnp.ndarray) -> jnp.ndarray:
        """The learned CLS token before the patches, under CLS pooling."""
        if self.pool != "cls":
            return x
        cls = self.param(
            "cls", logical(nn.initializers.normal(0.02), None, "embed"), (1, self.width)
        )
        return jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], *cls.shape)), x], axis=1)

    def _learned_posemb(self, tokens: int, image_shape: tuple[int, ...]) -> jnp.ndarray:
        """[tokens, width] learned position embeddings; a clear error for images of another
        size than the ones the parameters were built for."""
        if self.has_variable("params", "pos_embedding"):
            built = self.get_variable("params", "pos_embedding")
            built = getattr(built, "value", built).shape[0]  # unbox logical partitioning
            if built != tokens:
                raise ValueError(
                    f"images of {image_shape[1]}x{image_shape[2]} give {tokens} tokens "
                    f"(patch {self.patch_size}, pool {self.pool!r}), but this model was built "
                    f"for {built} tokens"
                )
        return self.param(
            "pos_embedding",
            logical(nn.initializers.normal(0.02), "position", "embed"),
            (tokens, self.width),
            self.param_dtype,
        )


def _check_images(images: jnp.ndarray) -> None:
    """Clear errors for what would otherwise fail deep inside the patch projection."""
    if images.ndim != 4:
        raise ValueError(f"images must be [batch, height, width, channels], got {images.shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(
            f"images must be floating point (normalised pixels), got {images.dtype}; "
            "convert uint8 images with mmjax.data image ops first"
        )
