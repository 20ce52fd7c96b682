"""2D patch embedding: a strided convolution written as a reshape + dense."""

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn.dense import DenseGeneral


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """Images [B, H, W, C] -> their p x p patches [B, (H/p)*(W/p), p*p*C] in raster order."""
    _, h, w, _ = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {patch}")
    return einops.rearrange(images, "b (h p) (w q) c -> b (h w) (p q c)", p=patch, q=patch)


def unpatchify(tokens: jax.Array, height: int, patch: int) -> jax.Array:
    """Patches [B, (H/p)*(W/p), p*p*C] in raster order -> images [B, H, W, C] (H = `height`)."""
    _, n, d = tokens.shape
    rows, rest = divmod(height, patch)
    if rest or not rows or n % rows or d % (patch * patch):
        raise ValueError(
            f"{n} patches of {d} values do not form images of height {height} "
            f"cut into {patch}x{patch} patches"
        )
    return einops.rearrange(tokens, "b (h w) (p q c) -> b (h p) (w q) c", h=rows, p=patch, q=patch)


class PatchEmbed(nn.Module):
    """Splits [B, H, W, C] images into p x p patches (raster order) and projects each to `width`.

    Returns [B, (H/p)*(W/p), width] tokens in raster order.
    """

    patch_size: int
    width: int
    use_bias: bool = True  # OpenAI CLIP's patch convolution has none
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
        p = self.patch_size
        patches = patchify(images, p)
        built = self.variables.get("params", {}).get("proj", {}).get("kernel")
        built = getattr(built, "value", built)  # unbox logical partitioning
        if built is not None and built.shape[0] != p * p * images.shape[-1]:
            raise ValueError(
                f"images have {images.shape[-1]} channels, but this model was built for "
                f"{built.shape[0] // (p * p)}"
            )
        return DenseGeneral(
            (self.width,),
            ("patch", "embed"),
            use_bias=self.use_bias,
            init="lecun_normal",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="proj",
        )(patches)
