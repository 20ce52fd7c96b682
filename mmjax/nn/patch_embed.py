"""2D patch embedding: a strided convolution written as a reshape + dense."""

import einops
import flax.linen as nn
import jax.numpy as jnp

from mmjax.nn.dense import DenseGeneral


class PatchEmbed(nn.Module):
    """Splits [B, H, W, C] images into p x p patches (raster order) and projects each to `width`.

    Returns [B, (H/p)*(W/p), width] tokens in raster order.
    """

    patch_size: int
    width: int
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
        _, h, w, _ = images.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
        patches = einops.rearrange(images, "b (h p) (w q) c -> b (h w) (p q c)", p=p, q=p)
        return DenseGeneral(
            (self.width,),
            ("patch", "embed"),
            init="lecun_normal",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="proj",
        )(patches)
