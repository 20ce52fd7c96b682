"""Native dynamic resolution (Qwen2-VL, Wang et al., 2024, Sec. 2.1; Qwen2.5-VL, Bai et al.,
2025, Sec. 2.1): images and videos keep their own size, cut into 14-px patches and packed
into one ViT sequence per row, as transformers' Qwen2-VL processor lays them out.

  geometry = VisionGeometry(window_size=112)          # Qwen2.5-VL; None for Qwen2-VL
  patches, grid = preprocess(image_uint8, geometry)   # [t*h*w, C*2*14*14], (t, h, w)
  row = pack_row([patches, ...], [grid, ...], geometry, capacity)

- `smart_resize` picks each image's size: multiples of 28 (patch x merge) nearest its own,
  scaled into [min_pixels, max_pixels] keeping the aspect ratio.
- `patchify`: frames [T, H, W, C] -> patches in the processor's order (frame, merged row,
  merged column, then the merge x merge patches of that 2x2 group), each flattened as
  (C, temporal patch, 14, 14), the layout of the reference's Conv3d weights. An image is one
  frame repeated to the temporal patch (2); a video with an odd frame count repeats its last
  frame, as the reference does.
- `patch_layout`: per patch, its (row, column) on the grid (2D RoPE), its frame's segment id
  (the ViT attends within one frame of one image or video, transformers' cu_seqlens), and
  for window attention its window's id and the order that makes windows contiguous.
- `pack_row` concatenates a row's images into one sequence of `capacity` patches; the tail
  is padding (segment 0), never a per-image pad.
"""

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from mmjax.data.mrope import mrope_positions
from mmjax.errors import UserError

Grid = tuple[int, int, int]  # (t, h, w): temporal patches, patch rows, patch columns
# The reference's normalisation (OpenAI CLIP's mean and std)
QWEN_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
QWEN_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT = 200  # the reference refuses more elongated images


@dataclasses.dataclass(frozen=True)
class VisionGeometry:
    """How images become patches: the processor constants an importer records."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    window_size: int | None = None  # window attention, in pixels (Qwen2.5-VL: 112)
    image_mean: tuple[float, ...] = QWEN_IMAGE_MEAN
    image_std: tuple[float, ...] = QWEN_IMAGE_STD

    @property
    def factor(self) -> int:
        """Image sides are multiples of this: one merged patch."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Values per patch for 3-channel input: C x temporal x patch x patch."""
        return 3 * self.temporal_patch_size * self.patch_size**2

    def tokens(self, grid: Grid) -> int:
        """The LM tokens a (t, h, w) patch grid becomes after merging."""
        t, h, w = grid
        return t * (h // self.merge_size) * (w // self.merge_size)


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> tuple[int, int]:
    """The processor's target (height, width): multiples of `factor` closest to the image's,
    with height x width in [min_pixels, max_pixels] and the aspect ratio kept as well as
    possible (transformers' Qwen2-VL smart_resize). An image smaller than one merged patch is
    scaled up to min_pixels, as the reference does."""
    if height < 1 or width < 1:
        raise UserError(f"an image of {height}x{width} pixels has no pixels")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise UserError(
            f"an image of {height}x{width} pixels has an aspect ratio above {MAX_ASPECT}, which "
            "the Qwen2-VL processor refuses"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar < factor or w_bar < factor:
        raise UserError(
            f"an image of {height}x{width} pixels resizes to {h_bar}x{w_bar}, smaller than one "
            f"merged patch ({factor} px): raise min_pixels to at least {factor * factor}"
        )
    return h_bar, w_bar


def patchify(frames: np.ndarray, geometry: VisionGeometry) -> tuple[np.ndarray, Grid]:
    """Normalised frames [T, H, W, C] (H, W multiples of the factor) -> (patches
    [t*h*w, C*temporal*P*P] in the processor's order, the grid (t, h, w))."""
    if frames.ndim != 4:
        raise UserError(f"frames must be [T, H, W, C], got shape {frames.shape}")
    n, height, width, channels = frames.shape
    p, tp, m = geometry.patch_size, geometry.temporal_patch_size, geometry.merge_size
    if height % geometry.factor or width % geometry.factor:
        raise UserError(
            f"frames of {height}x{width} are not multiples of {geometry.factor} (patch x merge); "
            "resize them with smart_resize first"
        )
    if n == 0:
        raise UserError("a video needs at least one frame")
    if pad := -n % tp:  # the reference repeats the last frame (video_processing_qwen2_vl.py)
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
    t, h, w = frames.shape[0] // tp, height // p, width // p
    x = frames.reshape(t, tp, h // m, m, p, w // m, m, p, channels)
    # -> (t, merged row, merged col, row in group, col in group, C, temporal, P, P)
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    return np.ascontiguousarray(x.reshape(t * h * w, -1), np.float32), (t, h, w)


def preprocess(
    pixels: np.ndarray, geometry: VisionGeometry, *, video: bool = False
) -> tuple[np.ndarray, Grid]:
    """A uint8 image [H, W, C] (or a video [T, H, W, C] with `video`) -> (patches, grid):
    smart-resized (bicubic), scaled to [0, 1], normalised, patchified; an image is one frame
    repeated to the temporal patch."""
    frames = np.asarray(pixels)
    if frames.ndim != (4 if video else 3) or frames.shape[-1] != 3:
        layout = "[T, H, W, 3]" if video else "[H, W, 3]"
        what = "video" if video else "image"
        raise UserError(f"expected a uint8 {what} {layout}, got shape {frames.shape}")
    if not video:
        frames = np.repeat(frames[None], geometry.temporal_patch_size, axis=0)
    height, width = frames.shape[1:3]
    size = smart_resize(height, width, geometry.factor, geometry.min_pixels, geometry.max_pixels)
    if size != (height, width):
        resized = [Image.fromarray(f).resize(size[::-1], Image.Resampling.BICUBIC) for f in frames]
        frames = np.stack([np.asarray(f) for f in resized])
    x = frames.astype(np.float32) / 255.0
    mean, std = (np.asarray(v, np.float32) for v in (geometry.image_mean, geometry.image_std))
    x = (x - mean) / std
    return patchify(x, geometry)


def patch_layout(grids: Sequence[Grid], geometry: VisionGeometry) -> dict[str, np.ndarray]:
    """Per patch of the packed grids, in the processor's order: `patch_positions` [N, 2] (row,
    column on its grid), `patch_segment_ids` [N] (1 + the index of its frame among all the
    grids' frames); with a window size also `patch_window_ids` [N] (1 + the index of its
    window: window_size / patch_size patches a side, per frame, transformers'
    get_vision_window_index) and `patch_order` [N], the gather that lays the patches out
    window by window (within a window in their own order)."""
    m = geometry.merge_size
    # a text-only row has no grids: empty arrays, not a failed concatenate
    positions, frames, windows = [np.zeros((0, 2), int)], [np.zeros(0, int)], [np.zeros(0, int)]
    frame_base = window_base = 0
    unit = None if geometry.window_size is None else geometry.window_size // geometry.factor
    for t, h, w in grids:
        if h % m or w % m:
            raise UserError(f"patch grid {(t, h, w)} is not divisible by the merge size {m}")
        # processor order: frame, merged row, merged col, row in group, col in group
        f, r, c, i, j = np.meshgrid(
            np.arange(t),
            np.arange(h // m),
            np.arange(w // m),
            np.arange(m),
            np.arange(m),
            indexing="ij",
        )
        rows, cols, f = (r * m + i).ravel(), (c * m + j).ravel(), f.ravel()
        positions.append(np.stack([rows, cols], -1))
        frames.append(frame_base + f + 1)
        frame_base += t
        if unit is not None:
            per_row = -(-(w // m) // unit)
            local = (r.ravel() // unit) * per_row + c.ravel() // unit
            window = f * per_row * -(-(h // m) // unit) + local
            windows.append(window_base + window + 1)
            window_base += t * per_row * -(-(h // m) // unit)
    layout = {
        "patch_positions": np.concatenate(positions).astype(np.int32),
        "patch_segment_ids": np.concatenate(frames).astype(np.int32),
    }
    if unit is not None:
        window_ids = np.concatenate(windows)
        # windows are numbered frame by frame in raster order: sorting by id is window order
        layout["patch_window_ids"] = window_ids.astype(np.int32)
        layout["patch_order"] = np.argsort(window_ids, kind="stable").astype(np.int32)
    return layout


def pack_row(
    patches: Sequence[np.ndarray], grids: Sequence[Grid], geometry: VisionGeometry, capacity: int
) -> dict[str, np.ndarray]:
    """One row's images and videos packed into `capacity` patches: `patches` [capacity, D]
    and patch_layout's arrays, the tail padding (segment 0, window 0, its own order)."""
    layout = patch_layout(grids, geometry)
    n = len(layout["patch_segment_ids"])
    if n > capacity:
        raise UserError(
            f"the row's images have {n} patches, more than the capacity of {capacity}: lower "
            "max_pixels or raise the patch capacity"
        )
    unit = geometry.merge_size**2
    if capacity % unit:
        raise UserError(f"the patch capacity {capacity} is not a multiple of {unit} (merge groups)")
    dim = geometry.patch_dim
    flat = np.concatenate(patches) if patches else np.zeros((0, dim), np.float32)
    if flat.shape != (n, dim):
        raise UserError(f"patches of shape {flat.shape} do not match their grids ({n}, {dim})")
    pad = capacity - n
    out = {"patches": np.pad(flat, ((0, pad), (0, 0)))}
    for key, value in layout.items():
        if key == "patch_order":
            out[key] = np.concatenate([value, np.arange(n, capacity, dtype=np.int32)])
        else:
            out[key] = np.pad(value, [(0, pad)] + [(0, 0)] * (value.ndim - 1))
    return out


@dataclasses.dataclass(frozen=True)
class Visual:
    """One image or video of a row: its patches (patchify's order) and (t, h, w) grid;
    `time_interval` spaces its frames' temporal M-RoPE ids (1 for Qwen2-VL; Qwen2.5-VL:
    tokens_per_second x the seconds one temporal patch spans)."""

    patches: np.ndarray
    grid: Grid
    video: bool = False
    time_interval: float = 1.0


@dataclasses.dataclass(frozen=True)
class PlaceholderIds:
    """The token ids that stand for a whole image or video in the text (the chat template's
    `<|image_pad|>` / `<|video_pad|>`), each expanded into one per merged visual token."""

    image: int
    video: int


def build_row(
    tokens: Sequence[int],
    visuals: Sequence[Visual],
    placeholders: PlaceholderIds,
    geometry: VisionGeometry,
    capacity: int,
) -> dict[str, np.ndarray]:
    """One row for models.qwen_vl: `tokens` holding one placeholder per visual (in order)
    -> the placeholders expanded to their merged token count (the processor's rule), the
    M-RoPE `positions` [3, L], `rope_delta`, the packed patches (pack_row) and
    `visual_positions` [capacity / merge^2] (L for the padding's slots). A placeholder
    without its image, an image without its placeholder or a video where the text has an
    image (or the reverse) is a UserError, as are two placeholders of one kind with no text
    between them (M-RoPE could not tell the two apart)."""
    kinds = {placeholders.image: False, placeholders.video: True}
    out, types, count = [], [], 0
    for token in tokens:
        if token not in kinds:
            out.append(int(token))
            types.append(0)
            continue
        if count == len(visuals):
            raise UserError(f"the text has more image/video placeholders than the {count} given")
        visual = visuals[count]
        if visual.video != kinds[token]:
            what = "video" if kinds[token] else "image"
            raise UserError(
                f"placeholder {count} of the text is for a{'n' * (what == 'image')} "
                f"{what}, but visual {count} is not one"
            )
        kind = 2 if visual.video else 1
        if types and types[-1] == kind:  # mrope_positions would read both as one block
            raise UserError(
                f"placeholders {count - 1} and {count} of the text are adjacent: M-RoPE reads a "
                "run of visual tokens of one kind as one image or video, so put text between "
                "them (the chat template's <|vision_end|><|vision_start|>)"
            )
        n = geometry.tokens(visual.grid)
        out += [int(token)] * n
        types += [kind] * n
        count += 1
    if count != len(visuals):
        raise UserError(
            f"{len(visuals)} images/videos but {count} placeholders in the text: each needs one"
        )
    grids = [v.grid for v in visuals]
    positions, delta = mrope_positions(
        types, grids, geometry.merge_size, [v.time_interval for v in visuals]
    )
    row = pack_row([v.patches for v in visuals], grids, geometry, capacity)
    slots = np.flatnonzero(np.asarray(types) != 0).astype(np.int32)
    length = len(out)
    unit = geometry.merge_size**2
    row["visual_positions"] = np.pad(
        slots, (0, capacity // unit - len(slots)), constant_values=length
    )
    row.update(
        tokens=np.asarray(out, np.int32),
        positions=positions,
        rope_delta=np.int32(delta),
    )
    return row
