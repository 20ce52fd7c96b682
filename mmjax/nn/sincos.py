"""Fixed 2D sin-cos position encodings of a token grid (MAE, He et al., 2022; Qwen-VL)."""

import jax.numpy as jnp

from mmjax.nn.timestep import sinusoidal


def sincos_2d(height: int, width: int, dim: int, *, scale: float = 1.0) -> jnp.ndarray:
    """[height * width, dim] encodings of a grid in raster order: the first half of the
    channels encode the row, the second half the column (`sinusoidal` of each coordinate).

    Cell (i, j) sits at ((i + 0.5) * scale - 0.5, (j + 0.5) * scale - 0.5): with scale 1
    the integer coordinates; with scale = m / n, an n x n grid laid over an m x m one (cell
    centres where resizing the m x m table would put them), so grids of different sizes
    share one coordinate frame.
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos encodings need a width divisible by 4, got {dim}")
    rows = (jnp.arange(height, dtype=jnp.float32) + 0.5) * scale - 0.5
    cols = (jnp.arange(width, dtype=jnp.float32) + 0.5) * scale - 0.5
    rows, cols = jnp.meshgrid(rows, cols, indexing="ij")
    return jnp.concatenate(
        [sinusoidal(rows.reshape(-1), dim // 2), sinusoidal(cols.reshape(-1), dim // 2)], axis=-1
    )
