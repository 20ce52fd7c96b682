"""Native dynamic resolution (Qwen2-VL, Qwen2.5-VL): mmjax's host-side processor equals
transformers' — smart_resize, the image and video processors' patchify (odd frame counts),
the vision position ids, per-frame cu_seqlens and Qwen2.5-VL's window index — and packing a
row (pack_row, build_row) keeps the placeholders, M-RoPE ids and padding consistent, with
clear UserErrors for bad input."""

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import vision_utils
from transformers.models.qwen2_vl import image_processing_qwen2_vl as hf_image
from transformers.models.qwen2_vl import video_processing_qwen2_vl as hf_video

from mmjax.data.mrope import mrope_positions
from mmjax.data.native_resolution import (
    PlaceholderIds,
    VisionGeometry,
    Visual,
    build_row,
    pack_row,
    patch_layout,
    patchify,
    preprocess,
    smart_resize,
)
from mmjax.errors import UserError

PATCH, MERGE, TEMPORAL, WINDOW = 14, 2, 2, 112
GEOMETRY = VisionGeometry()
WINDOWED = VisionGeometry(window_size=WINDOW)  # Qwen2.5-VL
IDS = PlaceholderIds(image=900, video=901)
SETTINGS = settings(max_examples=60, deadline=None, database=None)

grids_strategy = st.lists(
    st.tuples(
        st.integers(1, 3),
        st.integers(1, 12).map(lambda k: 2 * k),
        st.integers(1, 12).map(lambda k: 2 * k),
    ),
    min_size=1,
    max_size=3,
)


# --- smart_resize ---------------------------------------------------------------------------


@SETTINGS
@given(
    height=st.integers(1, 6000),
    width=st.integers(1, 6000),
    min_pixels=st.integers(0, 2_000_000),
    max_pixels=st.integers(1, 20_000_000),
    factor=st.sampled_from([28, 32]),
)
def test_smart_resize_equals_transformers(height, width, min_pixels, max_pixels, factor):
    assume(max(height, width) / min(height, width) <= 200)  # the reference refuses the rest
    want = hf_image.smart_resize(height, width, factor, min_pixels, max_pixels)
    if min(want) < factor:  # only with min_pixels 0: the reference returns a 0-sized image
        with pytest.raises(UserError, match="smaller than one merged patch"):
            smart_resize(height, width, factor, min_pixels, max_pixels)
        return
    got = smart_resize(height, width, factor, min_pixels, max_pixels)
    assert got == tuple(want)
    assert got[0] % factor == 0 and got[1] % factor == 0
    if min_pixels <= want[0] * want[1] <= max_pixels:
        assert min_pixels <= got[0] * got[1] <= max_pixels


def test_smart_resize_defaults_equal_the_image_processor():
    processor = hf_image.Qwen2VLImageProcessor()
    assert GEOMETRY.min_pixels == processor.size.shortest_edge
    assert GEOMETRY.max_pixels == processor.size.longest_edge
    assert (GEOMETRY.patch_size, GEOMETRY.merge_size, GEOMETRY.temporal_patch_size) == (
        processor.patch_size,
        processor.merge_size,
        processor.temporal_patch_size,
    )
    np.testing.assert_allclose(GEOMETRY.image_mean, processor.image_mean)
    np.testing.assert_allclose(GEOMETRY.image_std, processor.image_std)
    for size in [(1080, 1920), (20, 4000), (28, 28), (3000, 3000)]:
        assert smart_resize(*size) == tuple(hf_image.smart_resize(*size))


def test_an_image_smaller_than_one_merged_patch_is_scaled_up_to_min_pixels():
    """10x10 px rounds to 0x0 merged patches; like the reference, it is scaled up (56x56)."""
    assert smart_resize(10, 10) == tuple(hf_image.smart_resize(10, 10)) == (56, 56)
    assert smart_resize(1, 3) == tuple(hf_image.smart_resize(1, 3))
    patches, grid = preprocess(np.zeros((10, 10, 3), np.uint8), GEOMETRY)
    assert grid == (1, 4, 4) and patches.shape == (16, GEOMETRY.patch_dim)


@pytest.mark.parametrize("size", [(10, 2001), (3000, 14), (1, 201)])
def test_smart_resize_refuses_an_aspect_ratio_above_200(size):
    with pytest.raises(ValueError, match="aspect ratio"):
        hf_image.smart_resize(*size)
    with pytest.raises(UserError, match=r"aspect ratio above 200"):
        smart_resize(*size)
    assert smart_resize(10, 2000) == tuple(hf_image.smart_resize(10, 2000))  # exactly 200: kept


@pytest.mark.parametrize("size", [(0, 10), (10, 0), (0, 0), (-3, 10)])
def test_smart_resize_refuses_an_image_without_pixels(size):
    with pytest.raises(UserError, match="has no pixels"):
        smart_resize(*size)


# --- patchify and preprocess ----------------------------------------------------------------


@SETTINGS
@given(
    batch=st.integers(1, 2),
    rows=st.integers(1, 4),
    cols=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_image_patchify_equals_the_image_processor(batch, rows, cols, seed):
    """An image is one frame repeated to the temporal patch (2), as preprocess does."""
    height, width = 28 * rows, 28 * cols
    images = np.random.default_rng(seed).normal(size=(batch, height, width, 3)).astype(np.float32)
    want, grid_h, grid_w = hf_image.Qwen2VLImageProcessor().patchify(
        torch.from_numpy(images).permute(0, 3, 1, 2),
        patch_size=PATCH,
        merge_size=MERGE,
        temporal_patch_size=TEMPORAL,
    )
    for image, expected in zip(images, want.numpy(), strict=True):
        got, grid = patchify(np.repeat(image[None], TEMPORAL, axis=0), GEOMETRY)
        assert grid == (1, grid_h, grid_w) == (1, height // PATCH, width // PATCH)
        assert got.shape == (grid_h * grid_w, GEOMETRY.patch_dim)
        np.testing.assert_array_equal(got, expected)


@SETTINGS
@given(
    frames=st.integers(1, 5),
    rows=st.integers(1, 3),
    cols=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_video_patchify_equals_the_video_processor(frames, rows, cols, seed):
    """Odd frame counts repeat the last frame, as the reference does."""
    height, width = 28 * rows, 28 * cols
    video = np.random.default_rng(seed).normal(size=(frames, height, width, 3)).astype(np.float32)
    want, *want_grid = hf_video.Qwen2VLVideoProcessor().patchify(
        torch.from_numpy(video).permute(0, 3, 1, 2)[None],
        patch_size=PATCH,
        merge_size=MERGE,
        temporal_patch_size=TEMPORAL,
    )
    got, grid = patchify(video, GEOMETRY)
    assert grid == tuple(want_grid) == (math.ceil(frames / 2), height // PATCH, width // PATCH)
    np.testing.assert_array_equal(got, want[0].numpy())


def test_video_of_three_frames_repeats_the_last():
    video = np.random.default_rng(0).normal(size=(3, 56, 28, 3)).astype(np.float32)
    got, grid = patchify(video, GEOMETRY)
    padded, _ = patchify(np.concatenate([video, video[-1:]]), GEOMETRY)
    assert grid == (2, 4, 2)
    np.testing.assert_array_equal(got, padded)


def test_patchify_refuses_bad_frames():
    with pytest.raises(UserError, match="multiples of 28"):
        patchify(np.zeros((2, 30, 28, 3), np.float32), GEOMETRY)
    with pytest.raises(UserError, match=r"\[T, H, W, C\]"):
        patchify(np.zeros((28, 28, 3), np.float32), GEOMETRY)
    with pytest.raises(UserError, match="at least one frame"):
        patchify(np.zeros((0, 28, 28, 3), np.float32), GEOMETRY)
    with pytest.raises(UserError, match=r"uint8 image \[H, W, 3\]"):
        preprocess(np.zeros((28, 28), np.uint8), GEOMETRY)


@pytest.mark.parametrize("size", [(10, 10), (37, 91), (300, 200), (56, 56), (480, 33)])
def test_preprocess_gives_the_image_processors_grid(size):
    """A uint8 image of any size: the reference's grid and patch count; the values differ only
    by the resize (PIL's bicubic here, torchvision's there), so they are compared loosely."""
    rng = np.random.default_rng(sum(size))
    # smooth content, so the two bicubic resizes agree closely
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(small).resize(size[::-1], Image.Resampling.BILINEAR))
    patches, grid = preprocess(image, GEOMETRY)
    reference = hf_image.Qwen2VLImageProcessor()(
        images=[Image.fromarray(image)], return_tensors="pt"
    )
    want_grid = tuple(reference["image_grid_thw"][0].tolist())
    height, width = smart_resize(*size)
    assert grid == want_grid == (1, height // PATCH, width // PATCH)
    assert patches.shape == tuple(reference["pixel_values"].shape)
    assert patches.shape == (math.prod(grid), GEOMETRY.patch_dim)
    difference = np.abs(patches - reference["pixel_values"].numpy())
    assert difference.mean() < 0.05, difference.mean()  # normalised units (std ~0.27 per 1.0)


def test_preprocess_of_an_image_already_on_the_grid_equals_the_reference_exactly():
    image = np.random.default_rng(1).integers(0, 256, size=(56, 84, 3), dtype=np.uint8)
    patches, grid = preprocess(image, GEOMETRY)
    reference = hf_image.Qwen2VLImageProcessor()(
        images=[Image.fromarray(image)], return_tensors="pt"
    )
    assert grid == tuple(reference["image_grid_thw"][0].tolist())
    np.testing.assert_allclose(patches, reference["pixel_values"].numpy(), atol=1e-5)


# --- patch_layout ---------------------------------------------------------------------------


@SETTINGS
@given(grids=grids_strategy)
def test_patch_layout_equals_transformers_vision_utils(grids):
    grid_thw = torch.tensor(grids)
    layout = patch_layout(grids, WINDOWED)
    n = sum(math.prod(g) for g in grids)

    want_positions = vision_utils.get_vision_position_ids(grid_thw, MERGE).numpy()
    np.testing.assert_array_equal(layout["patch_positions"], want_positions)
    np.testing.assert_array_equal(patch_layout(grids, GEOMETRY)["patch_positions"], want_positions)

    # one segment per frame, ids 1..F, changing exactly at cu_seqlens
    cu_seqlens = vision_utils.get_vision_cu_seqlens(grid_thw).numpy()
    segments = layout["patch_segment_ids"]
    frames = sum(t for t, _, _ in grids)
    assert segments.shape == (n,) and cu_seqlens[-1] == n
    np.testing.assert_array_equal(np.flatnonzero(np.diff(segments)) + 1, cu_seqlens[1:-1])
    np.testing.assert_array_equal(
        segments, np.repeat(np.arange(1, frames + 1), np.diff(cu_seqlens))
    )

    # window attention: the order over merged units is the reference's window_index
    window_index, cu_window_seqlens = vision_utils.get_vision_window_index(
        grid_thw, MERGE, WINDOW, PATCH
    )
    window_index, cu_window_seqlens = window_index.numpy(), cu_window_seqlens.numpy()
    order = layout["patch_order"]
    unit = MERGE * MERGE
    np.testing.assert_array_equal(np.sort(order), np.arange(n))
    np.testing.assert_array_equal(order[::unit] // unit, window_index)
    np.testing.assert_array_equal(
        order.reshape(-1, unit), window_index[:, None] * unit + range(unit)
    )
    # the window ids, read in window order, change exactly at cu_window_seqlens
    windows = layout["patch_window_ids"][order]
    assert windows[0] == 1 and np.all(np.diff(windows) >= 0)
    assert cu_window_seqlens[0] == 0 and cu_window_seqlens[-1] == n
    np.testing.assert_array_equal(np.flatnonzero(np.diff(windows)) + 1, cu_window_seqlens[1:-1])
    # a window never spans two frames
    assert np.all(np.diff(segments[order])[np.diff(windows) == 0] == 0)


def test_patch_layout_without_windows_has_no_window_arrays():
    layout = patch_layout([(1, 4, 6)], GEOMETRY)
    assert set(layout) == {"patch_positions", "patch_segment_ids"}
    with pytest.raises(UserError, match="merge size"):
        patch_layout([(1, 3, 4)], GEOMETRY)


# --- pack_row -------------------------------------------------------------------------------


def random_patches(grids, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(math.prod(g), GEOMETRY.patch_dim)).astype(np.float32) for g in grids]


@SETTINGS
@given(grids=grids_strategy, spare=st.integers(0, 3))
def test_pack_row_pads_the_tail(grids, spare):
    patches = random_patches(grids)
    n = sum(len(p) for p in patches)
    capacity = n + 4 * spare
    row = pack_row(patches, grids, WINDOWED, capacity)
    layout = patch_layout(grids, WINDOWED)
    assert row["patches"].shape == (capacity, GEOMETRY.patch_dim)
    np.testing.assert_array_equal(row["patches"][:n], np.concatenate(patches))
    np.testing.assert_array_equal(row["patches"][n:], 0)
    for key in ["patch_positions", "patch_segment_ids", "patch_window_ids"]:
        assert len(row[key]) == capacity
        np.testing.assert_array_equal(row[key][:n], layout[key])
    np.testing.assert_array_equal(row["patch_segment_ids"][n:], 0)
    np.testing.assert_array_equal(row["patch_window_ids"][n:], 0)
    order = row["patch_order"]
    np.testing.assert_array_equal(np.sort(order), np.arange(capacity))  # a permutation
    np.testing.assert_array_equal(order[:n], layout["patch_order"])
    np.testing.assert_array_equal(order[n:], np.arange(n, capacity))


def test_pack_row_refuses_bad_capacity_and_mismatched_patches():
    grids = [(1, 4, 4), (2, 2, 4)]
    patches = random_patches(grids)  # 16 + 16 patches
    with pytest.raises(UserError, match="more than the capacity of 28"):
        pack_row(patches, grids, GEOMETRY, 28)
    with pytest.raises(UserError, match="not a multiple of 4"):
        pack_row(patches, grids, GEOMETRY, 34)
    with pytest.raises(UserError, match="do not match their grids"):
        pack_row([patches[0], patches[1][:-4]], grids, GEOMETRY, 32)
    with pytest.raises(UserError, match="do not match their grids"):
        pack_row([patches[0]], grids, GEOMETRY, 32)
    with pytest.raises(UserError, match="do not match their grids"):
        pack_row([p[:, :-1] for p in patches], grids, GEOMETRY, 32)
    empty = pack_row([], [], GEOMETRY, 8)  # a text-only row: all padding
    np.testing.assert_array_equal(empty["patch_segment_ids"], 0)


# --- build_row ------------------------------------------------------------------------------

visual_strategy = st.tuples(
    st.booleans(),  # video
    st.integers(1, 3),
    st.integers(1, 5).map(lambda k: 2 * k),
    st.integers(1, 5).map(lambda k: 2 * k),
    st.sampled_from([1.0, 2.0, 25.0]),
)


@SETTINGS
@given(
    specs=st.lists(visual_strategy, min_size=0, max_size=3),
    text=st.lists(st.integers(1, 3), min_size=4, max_size=4),
    spare=st.integers(0, 2),
)
def test_build_row_expands_placeholders(specs, text, spare):
    visuals = [
        Visual(p, (t if video else 1, h, w), video, interval)
        for (video, t, h, w, interval), p in zip(
            specs, random_patches([(t if v else 1, h, w) for v, t, h, w, _ in specs]), strict=True
        )
    ]
    tokens = list(range(10, 10 + text[0]))
    for i, visual in enumerate(visuals):
        tokens.append(IDS.video if visual.video else IDS.image)
        tokens += list(range(20 + 10 * i, 20 + 10 * i + text[i + 1]))
    n = sum(len(v.patches) for v in visuals)
    capacity = n + 4 * spare
    row = build_row(tokens, visuals, IDS, WINDOWED, capacity)

    # each placeholder expanded in place to geometry.tokens(grid) copies
    want_tokens, want_types = [], []
    visual_iter = iter(visuals)
    for token in tokens:
        if token in (IDS.image, IDS.video):
            visual = next(visual_iter)
            count = WINDOWED.tokens(visual.grid)
            assert count == len(visual.patches) // 4
            want_tokens += [token] * count
            want_types += [2 if visual.video else 1] * count
        else:
            want_tokens.append(token)
            want_types.append(0)
    np.testing.assert_array_equal(row["tokens"], want_tokens)
    length = len(want_tokens)

    # visual_positions: exactly the placeholder slots, then L for the padding's merged slots
    slots = np.flatnonzero(np.isin(want_tokens, [IDS.image, IDS.video]))
    assert row["visual_positions"].shape == (capacity // 4,)
    np.testing.assert_array_equal(row["visual_positions"][: len(slots)], slots)
    np.testing.assert_array_equal(row["visual_positions"][len(slots) :], length)

    positions, delta = mrope_positions(
        want_types, [v.grid for v in visuals], MERGE, [v.time_interval for v in visuals]
    )
    np.testing.assert_array_equal(row["positions"], positions)
    assert int(row["rope_delta"]) == delta

    packed = pack_row([v.patches for v in visuals], [v.grid for v in visuals], WINDOWED, capacity)
    assert set(packed) <= set(row)
    for key, value in packed.items():
        np.testing.assert_array_equal(row[key], value)


def two_visuals():
    grids = [(1, 4, 4), (2, 2, 4)]
    image, video = random_patches(grids)
    return [Visual(image, grids[0]), Visual(video, grids[1], video=True)]


def test_build_row_refuses_mismatched_placeholders():
    visuals = two_visuals()
    image, video = IDS.image, IDS.video
    with pytest.raises(UserError, match="more image/video placeholders than the 2 given"):
        build_row([1, image, 2, video, 3, image, 4], visuals, IDS, GEOMETRY, 64)
    with pytest.raises(UserError, match="2 images/videos but 1 placeholders"):
        build_row([1, image, 2], visuals, IDS, GEOMETRY, 64)
    with pytest.raises(UserError, match="2 images/videos but 0 placeholders"):
        build_row([1, 2, 3], visuals, IDS, GEOMETRY, 64)
    with pytest.raises(UserError, match="placeholder 1 of the text is for an image"):
        build_row([1, image, 2, image, 3], visuals, IDS, GEOMETRY, 64)
    with pytest.raises(UserError, match="placeholder 0 of the text is for a video"):
        build_row([1, video, 2, video, 3], visuals, IDS, GEOMETRY, 64)
    with pytest.raises(UserError, match="more than the capacity"):
        build_row([1, image, 2, video, 3], visuals, IDS, GEOMETRY, 16)


def test_build_row_refuses_adjacent_placeholders_of_one_kind():
    """M-RoPE (transformers' get_rope_index) reads a run of same-kind visual tokens as one
    image, so two placeholders of one kind need text between them (the chat template's
    <|vision_end|><|vision_start|>)."""
    grids = [(1, 4, 4), (1, 2, 4)]
    visuals = [Visual(p, g) for p, g in zip(random_patches(grids), grids, strict=True)]
    with pytest.raises(UserError, match="adjacent"):
        build_row([1, IDS.image, IDS.image, 2], visuals, IDS, GEOMETRY, 32)
    row = build_row([1, IDS.image, 7, IDS.image, 2], visuals, IDS, GEOMETRY, 32)
    assert len(row["tokens"]) == 3 + 4 + 2
    # an image right before a video is two blocks already
    visuals = two_visuals()
    row = build_row([1, IDS.image, IDS.video, 2], visuals, IDS, GEOMETRY, 64)
    assert len(row["tokens"]) == 2 + 4 + 4
