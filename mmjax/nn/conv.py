"""Convolution blocks of the VAE and the U-Net patch encoder: conv, GroupNorm, ResNet block.

Parameters: the wide (width-sized) channel axis of each conv kernel and GroupNorm is the
logical axis `embed` (sharded by FSDP); image and latent channel axes are replicated.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from mmjax.nn.axes import ACT_IMAGE
from mmjax.nn.dense import DenseGeneral, dtypes
from mmjax.nn.initializers import logical


class Conv(nn.Module):
    """A 2D conv whose kernel [k, k, in, out] puts the logical axis `embed` on `wide` (in|out)."""

    features: int
    kernel_size: int = 3
    strides: int = 1
    padding: str | Sequence[tuple[int, int]] = "SAME"
    wide: str = "out"
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        axes_in, axes_out = ("embed", None) if self.wide == "in" else (None, "embed")
        k = self.kernel_size
        return nn.Conv(
            self.features,
            (k, k),
            strides=(self.strides, self.strides),
            padding=self.padding,
            kernel_init=logical(nn.initializers.lecun_normal(), None, None, axes_in, axes_out),
            bias_init=logical(nn.initializers.zeros_init(), axes_out),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )(x)


class GroupNorm(nn.Module):
    """GroupNorm over the channel axis (statistics in f32); scale/bias labelled `embed`."""

    num_groups: int
    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(f"{channels} channels are not divisible by {self.num_groups} groups")
        return nn.GroupNorm(
            num_groups=self.num_groups,
            epsilon=self.epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            scale_init=logical(nn.initializers.ones_init(), "embed"),
            bias_init=logical(nn.initializers.zeros_init(), "embed"),
            name="norm",
        )(x)


class ResnetBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))), with a 1x1 conv shortcut if widths differ.

    With a conditioning vector `cond` [B, D] (a diffusion timestep embedding), the second
    norm is adaptive: norm(h) * (1 + scale) + shift, both projected from silu(cond) (AdaGN,
    Dhariwal & Nichol 2021, Sec. 3), as in the U-Net of latent diffusion.
    """

    features: int
    norm_groups: int
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, cond: jnp.ndarray | None = None) -> jnp.ndarray:
        kw = dtypes(self)
        h = nn.silu(GroupNorm(self.norm_groups, name="norm1", **kw)(x))
        h = Conv(self.features, name="conv1", **kw)(h)
        h = GroupNorm(self.norm_groups, name="norm2", **kw)(h)
        if cond is not None:
            modulation = DenseGeneral(
                (2, self.features), ("embed", None, None), init="zeros", name="ada", **kw
            )(nn.silu(cond))
            scale, shift = modulation[:, None, None, 0], modulation[:, None, None, 1]
            h = h * (1 + scale) + shift
        h = nn.silu(h)
        h = Conv(self.features, name="conv2", **kw)(h)
        if x.shape[-1] != self.features:
            x = Conv(self.features, kernel_size=1, name="shortcut", **kw)(x)
        return nn.with_logical_constraint(x.astype(h.dtype) + h, ACT_IMAGE)
