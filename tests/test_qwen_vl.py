"""Qwen2-VL and Qwen2.5-VL equal transformers' (imported through mmjax.convert): logits for
odd grids, mixed image sizes with text between, videos and partial windows; greedy KV-cached
decoding; the packed vision tower equals each image alone."""

import jax.numpy as jnp
import numpy as np
import pytest
import qwen_reference as ref
import torch

from mmjax.convert import from_hf_qwen2_5_vl, from_hf_qwen2_vl

KINDS = ("qwen2_vl", "qwen2_5_vl")


@pytest.fixture(scope="module", params=KINDS)
def pair(request):
    hf = ref.hf_model(request.param)
    convert = from_hf_qwen2_vl if request.param == "qwen2_vl" else from_hf_qwen2_5_vl
    return request.param, hf, convert(hf)


def _batch(r: dict) -> dict:
    keys = [k for k in r if k != "rope_delta"]
    return {k: jnp.asarray(r[k])[None] for k in keys} | {
        "segment_ids": jnp.ones((1, len(r["tokens"])), jnp.int32)
    }


def _cases(kind: str) -> dict:
    rng = np.random.default_rng(0)
    interval = 4.0 if kind == "qwen2_5_vl" else 1.0
    return {
        # merged 3 x 5: odd both ways, and not a multiple of Qwen2.5-VL's 4 x 4 windows
        "odd_grid": ([5, ref.IMAGE, 6, 7], [ref.visual(rng, (1, 6, 10))]),
        "two_images": (
            [5, ref.IMAGE, 8, 9, 10, ref.IMAGE, 11],
            [ref.visual(rng, (1, 4, 12)), ref.visual(rng, (1, 10, 6))],
        ),
        "video": ([5, ref.VIDEO, 12], [ref.visual(rng, (2, 4, 6), video=True, interval=interval)]),
        # 10 x 18 patches: 5 x 9 merged, windows of 4 x 4 leave a partial row and column
        "partial_windows": ([ref.IMAGE, 13], [ref.visual(rng, (1, 10, 18))]),
    }


@pytest.mark.parametrize("case", ["odd_grid", "two_images", "video", "partial_windows"])
def test_logits_equal_transformers(pair, case):
    kind, hf, imported = pair
    text, visuals = _cases(kind)[case]
    r = ref.row(text, visuals, imported.geometry, capacity=256)
    with torch.no_grad():
        want = hf(**ref.hf_inputs(r, visuals, kind)).logits[0].numpy()
    model = imported.module(dtype=jnp.float32, attention_impl="xla")
    got = model.apply({"params": imported.params}, _batch(r))["logits"][0]
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_kv_cached_greedy_decoding_equals_transformers(pair):
    """16 greedy steps after two images of different sizes with text between: each step's
    positions continue at the prompt's largest M-RoPE id + 1 (the rope delta)."""
    from mmjax.sampling.vlm import generate_batch

    kind, hf, imported = pair
    text, visuals = _cases(kind)["two_images"]
    r = ref.row(text, visuals, imported.geometry, capacity=256)
    steps, eos = 16, ref.TEXT["eos_token_id"]
    with torch.no_grad():
        out = hf.generate(
            **ref.hf_inputs(r, visuals, kind),
            max_new_tokens=steps,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        )
    want = out[0, len(r["tokens"]) :].numpy()
    assert len(want) == steps and eos not in want  # 16 real tokens to compare
    decoder = imported.module(dtype=jnp.float32, attention_impl="xla", decode=True)
    got = generate_batch(
        decoder,
        imported.params,
        {k: v for k, v in _batch(r).items()},
        eos_id=eos,
        pad_id=0,
        max_new_tokens=steps,
    )
    np.testing.assert_array_equal(got[0], want)


def test_packed_tower_equals_each_image_alone(pair):
    """Images and a video of different sizes in one row, at exactly their patch count (no
    padding anywhere), give each one's merged tokens as when it runs alone."""
    from mmjax.data.native_resolution import pack_row

    _, _, imported = pair
    rng = np.random.default_rng(1)
    grids = [(1, 6, 10), (2, 4, 6), (1, 12, 8), (1, 2, 2)]
    visuals = [ref.visual(rng, g, video=g[0] > 1) for g in grids]
    model = imported.module(dtype=jnp.float32, attention_impl="xla")
    tower = model.vision_tower(name=None)
    params = {"params": imported.params["vision"]}
    geometry = imported.geometry

    def run(chosen):
        n = sum(int(np.prod(v.grid)) for v in chosen)
        row = pack_row([v.patches for v in chosen], [v.grid for v in chosen], geometry, n)
        assert (row["patch_segment_ids"] > 0).all()  # every slot a real patch
        args = [row[k] for k in ("patches", "patch_positions", "patch_segment_ids")]
        args += [row.get(k) for k in ("patch_window_ids", "patch_order")]
        args = [None if a is None else jnp.asarray(a)[None] for a in args]
        return np.asarray(tower.apply(params, *args)[0])

    packed = run(visuals)
    sizes = [geometry.tokens(v.grid) for v in visuals]
    for visual, got in zip(visuals, np.split(packed, np.cumsum(sizes)[:-1]), strict=True):
        np.testing.assert_allclose(got, run([visual]), atol=1e-5, rtol=0)


def test_bad_batches_are_clear_errors(pair):
    kind, _, imported = pair
    text, visuals = _cases(kind)["odd_grid"]
    batch = _batch(ref.row(text, visuals, imported.geometry, capacity=64))
    model = imported.module(dtype=jnp.float32, attention_impl="xla")

    def fails(bad: dict, match: str) -> None:
        with pytest.raises(ValueError, match=match):
            model.apply({"params": imported.params}, bad)

    fails({**batch, "visual_positions": batch["visual_positions"][:, :-1]}, "do not match")
    fails({k: v for k, v in batch.items() if k != "patch_positions"}, "needs")
    fails({**batch, "positions": batch["positions"][:, 0]}, "positions")
    if kind == "qwen2_5_vl":  # window attention without the window layout
        fails({k: v for k, v in batch.items() if not k.startswith("patch_window")}, "window")
    else:
        order = jnp.arange(64, dtype=jnp.int32)[None]
        fails(
            {**batch, "patch_window_ids": batch["patch_segment_ids"], "patch_order": order},
            "window",
        )
