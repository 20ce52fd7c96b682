"""M-RoPE (Qwen2-VL, Qwen2.5-VL): the sectioned rotation equals transformers' rotary embedding,
and the three position ids of mixed text, image and video sequences equal
`get_rope_index`'s, with Qwen2.5-VL's absolute-time temporal ids; clear errors."""

import functools
import types

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmjax.data.mrope import mrope_positions
from mmjax.nn.rope import apply_rope

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
qwen2_vl = pytest.importorskip("transformers.models.qwen2_vl.modeling_qwen2_vl")
qwen2_5_vl = pytest.importorskip("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")

SECTIONS = [4, 6, 6]  # head_dim 32, as Qwen2-VL's [16, 24, 24] of 128
MERGE = 2


def test_sectioned_rotation_equals_transformers():
    config = transformers.Qwen2VLConfig(
        text_config=dict(
            hidden_size=64,
            num_attention_heads=2,
            rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=SECTIONS),
        )
    ).text_config
    rotary = qwen2_vl.Qwen2VLRotaryEmbedding(config)
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 7, 3, 32)).astype(np.float32)  # [B, S, heads, head_dim]
    positions = rng.integers(0, 50, size=(3, 2, 7))
    cos, sin = rotary(torch.as_tensor(q), torch.as_tensor(positions))
    want, _ = qwen2_vl.apply_rotary_pos_emb(
        torch.as_tensor(q), torch.as_tensor(q), cos, sin, unsqueeze_dim=2
    )
    got = apply_rope(jnp.asarray(q), jnp.asarray(positions), 1e4, sections=SECTIONS)
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=2e-5)
    # equal ids in all three sections are plain 1-D RoPE
    same = np.broadcast_to(positions[0], (3, 2, 7))
    np.testing.assert_allclose(
        np.asarray(apply_rope(jnp.asarray(q), jnp.asarray(same), 1e4, sections=SECTIONS)),
        np.asarray(apply_rope(jnp.asarray(q), jnp.asarray(positions[0]), 1e4)),
        atol=1e-6,
    )


def reference(model_module, token_types, image_grids, video_grids, seconds=None, tps=2):
    """transformers' get_rope_index on one sequence (its ids [3, S] and delta)."""
    model_cls = getattr(
        model_module, "Qwen2_5_VLModel" if model_module is qwen2_5_vl else "Qwen2VLModel"
    )
    vision = types.SimpleNamespace(spatial_merge_size=MERGE, tokens_per_second=tps)
    fake = types.SimpleNamespace(config=types.SimpleNamespace(vision_config=vision))
    fake.get_vision_position_ids = functools.partial(model_cls.get_vision_position_ids, fake)
    ids = torch.zeros((1, len(token_types)), dtype=torch.long)
    kwargs = dict(
        mm_token_type_ids=torch.as_tensor([token_types], dtype=torch.int32),
        image_grid_thw=torch.as_tensor(image_grids) if image_grids else None,
        video_grid_thw=torch.as_tensor(video_grids) if video_grids else None,
    )
    if seconds is not None:
        kwargs["second_per_grid_ts"] = torch.as_tensor(seconds)
    positions, delta = model_cls.get_rope_index(fake, ids, **kwargs)
    return positions[:, 0].numpy(), int(delta[0, 0])


def layout(blocks):
    """token types and grids of [("text", n) | ("image"/"video", (t, h, w))] blocks."""
    token_types, images, videos, grids = [], [], [], []
    for kind, value in blocks:
        if kind == "text":
            token_types += [0] * value
            continue
        t, h, w = value
        token_types += [1 if kind == "image" else 2] * (t * (h // MERGE) * (w // MERGE))
        (images if kind == "image" else videos).append(list(value))
        grids.append(tuple(value))
    return token_types, images, videos, grids


def test_text_image_text_video_text_ids_equal_transformers():
    blocks = [("text", 3), ("image", (1, 4, 6)), ("text", 2), ("video", (2, 4, 4)), ("text", 4)]
    token_types, images, videos, grids = layout(blocks)
    want, want_delta = reference(qwen2_vl, token_types, images, videos)
    got, delta = mrope_positions(token_types, grids, MERGE)
    np.testing.assert_array_equal(got, want)
    assert delta == want_delta
    # the image block: temporal id constant, height and width ids over its merged 2x3 grid
    np.testing.assert_array_equal(got[:, 3:9], [[3] * 6, [3, 3, 3, 4, 4, 4], [3, 4, 5] * 2])
    assert got[0, 9] == 3 + 3  # the text after it continues at p + max(h, w) / merge


def test_qwen2_5_vl_absolute_time_ids_equal_transformers():
    blocks = [("text", 2), ("video", (3, 4, 4)), ("text", 2), ("image", (1, 2, 4)), ("text", 1)]
    token_types, images, videos, grids = layout(blocks)
    seconds, tps = [1.5], 2
    want, want_delta = reference(qwen2_5_vl, token_types, images, videos, seconds, tps)
    intervals = [tps * seconds[0] if g in map(tuple, videos) else 1.0 for g in grids]
    got, delta = mrope_positions(token_types, grids, MERGE, intervals)
    np.testing.assert_array_equal(got, want)
    assert delta == want_delta
    np.testing.assert_array_equal(np.unique(got[0, 2:14]), [2, 5, 8])  # 0, 3, 6 seconds apart


@st.composite
def sequences(draw):
    blocks = [("text", draw(st.integers(1, 4)))]
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["image", "video"]))
        t = 1 if kind == "image" else draw(st.integers(1, 4))
        h, w = (MERGE * draw(st.integers(1, 4)) for _ in range(2))
        blocks += [(kind, (t, h, w)), ("text", draw(st.integers(1, 4)))]
    return blocks


@settings(max_examples=40, deadline=None, database=None)
@given(sequences())
def test_any_mix_of_text_images_and_videos_equals_transformers(blocks):
    token_types, images, videos, grids = layout(blocks)
    want, want_delta = reference(qwen2_vl, token_types, images, videos)
    got, delta = mrope_positions(token_types, grids, MERGE)
    np.testing.assert_array_equal(got, want)
    assert delta == want_delta


def test_mismatched_blocks_and_grids_are_clear_errors():
    token_types, _, _, grids = layout([("text", 2), ("image", (1, 4, 4)), ("text", 1)])
    with pytest.raises(ValueError, match=r"block of 4 tokens does not match its grid \(1, 4, 6\)"):
        mrope_positions(token_types, [(1, 4, 6)], MERGE)
    with pytest.raises(ValueError, match="more visual blocks in the tokens than grids"):
        mrope_positions(token_types, [], MERGE)
    with pytest.raises(ValueError, match="more grids than visual blocks"):
        mrope_positions(token_types, [*grids, (1, 2, 2)], MERGE)
    with pytest.raises(ValueError, match="not divisible by the merge size 2"):
        mrope_positions(token_types, [(1, 3, 4)], MERGE)
    with pytest.raises(ValueError, match="must sum to head_dim / 2 = 16"):
        apply_rope(jnp.zeros((1, 2, 1, 32)), jnp.zeros((3, 1, 2)), sections=[4, 4, 4])
