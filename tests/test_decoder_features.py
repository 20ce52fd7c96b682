"""The decoder block's features for the papers' LMs: grouped-query attention (its KV cache:
tests/test_scan.py), biases on the q, k, v projections alone (Qwen), Gemma-2's block scanned
as unscanned (its parity with transformers: tests/test_convert_llm.py), RoPE scaling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import unbox

from mmjax.models.causal_lm import CausalLM

F32 = dict(dtype=jnp.float32, param_dtype=jnp.float32, attention_impl="xla")
LM = dict(vocab_size=40, width=32, depth=2, num_heads=4, mlp_dim=64, **F32)


def inputs(length: int = 10):
    tokens = jax.random.randint(jax.random.key(1), (2, length), 1, 40)
    segment_ids = jnp.ones_like(tokens)
    return tokens, segment_ids, jnp.broadcast_to(jnp.arange(length), (2, length))


def repeat_kv_heads(params: dict, groups: int) -> dict:
    """A GQA model's parameters as the multi-head model that computes the same: each key and
    value head repeated for the `groups` query heads that share it."""

    def one(path, x):
        names = [str(getattr(k, "key", k)) for k in path]
        if names[-1] in ("kernel", "bias") and names[-2] in ("key", "value"):
            axis = x.ndim - 2  # [..., heads, head_dim]
            return jnp.repeat(x, groups, axis=axis)
        return x

    return jax.tree_util.tree_map_with_path(one, params)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_grouped_query_attention_equals_multi_head_with_shared_kv_heads(scan_layers):
    tokens, segment_ids, positions = inputs()
    gqa = CausalLM(**LM, num_kv_heads=2, scan_layers=scan_layers)
    params = unbox(gqa.init(jax.random.key(0), tokens, segment_ids, positions)["params"])
    attn = params["decoder"]["last" if scan_layers else "block0"]["attn"]
    assert attn["key"]["kernel"].shape[-2:] == (2, 8)  # 2 kv heads of 8
    assert attn["query"]["kernel"].shape[-2:] == (4, 8)
    mha = CausalLM(**LM, scan_layers=scan_layers)
    want = mha.apply({"params": repeat_kv_heads(params, 2)}, tokens, segment_ids, positions)
    got = gqa.apply({"params": params}, tokens, segment_ids, positions)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_qkv_bias_adds_biases_to_q_k_v_and_not_to_the_output():
    tokens, segment_ids, positions = inputs()
    model = CausalLM(**LM, qkv_bias=True)
    params = unbox(model.init(jax.random.key(0), tokens, segment_ids, positions)["params"])
    attn = params["decoder"]["block0"]["attn"]
    assert all("bias" in attn[name] for name in ("query", "key", "value"))
    assert "bias" not in attn["out"]
    plain = CausalLM(**LM).init(jax.random.key(0), tokens, segment_ids, positions)["params"]
    assert "bias" not in plain["decoder"]["block0"]["attn"]["query"]
    shifted = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.5 if str(getattr(path[-1], "key", "")) == "bias" else x, params
    )
    before = model.apply({"params": params}, tokens, segment_ids, positions)
    after = model.apply({"params": shifted}, tokens, segment_ids, positions)
    assert not np.allclose(before, after, atol=1e-3)  # the biases are used


@pytest.mark.parametrize("depth", [3, 4])
def test_scanned_gemma2_block_with_alternating_windows_equals_unscanned(depth):
    from test_scan import GEMMA2_SMALL

    from mmjax.parallel.layout import to_layout
    from mmjax.train.stages import param_paths, replace_leaves

    tokens, segment_ids, positions = inputs(12)
    lm = dict(LM, depth=depth, num_kv_heads=2, **GEMMA2_SMALL)
    plain = CausalLM(**lm)
    params = unbox(plain.init(jax.random.key(0), tokens, segment_ids, positions)["params"])
    assert "lm_head" not in params and "post_norm2" in params["decoder"]["block0"]
    scanned = CausalLM(**lm, scan_layers=True)
    target = unbox(jax.eval_shape(scanned.init, jax.random.key(0), tokens, segment_ids, positions))
    stacked = replace_leaves(
        target["params"], to_layout(param_paths(params), param_paths(target["params"]))
    )
    want = plain.apply({"params": params}, tokens, segment_ids, positions)
    got = scanned.apply({"params": stacked}, tokens, segment_ids, positions)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(want).max() <= GEMMA2_SMALL["final_logit_softcap"]
    every_layer_local = CausalLM(**{**lm, "global_every": 0})
    other = every_layer_local.apply({"params": params}, tokens, segment_ids, positions)
    assert np.abs(other - want).max() > 1e-3


def test_llama3_rope_scaling_keeps_high_frequencies_and_divides_low_ones():
    from mmjax.nn.rope import rope_frequencies

    scaling = dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
    )
    plain = np.asarray(rope_frequencies(32, 500_000.0))
    scaled = np.asarray(rope_frequencies(32, 500_000.0, scaling))
    wavelength = 2 * np.pi / plain
    high, low = wavelength < 64 / 4, wavelength > 64 / 1
    assert high.any() and low.any() and not (high | low).all()
    np.testing.assert_allclose(scaled[high], plain[high])
    np.testing.assert_allclose(scaled[low], plain[low] / 8, rtol=1e-6)
    mid = ~(high | low)
    assert np.all(scaled[mid] < plain[mid]) and np.all(scaled[mid] > plain[mid] / 8)
    linear = np.asarray(rope_frequencies(32, 500_000.0, dict(rope_type="linear", factor=2.0)))
    np.testing.assert_allclose(linear, plain / 2, rtol=1e-6)
    with pytest.raises(ValueError, match="rope_scaling type 'yarn' is not supported"):
        rope_frequencies(32, 1e4, dict(rope_type="yarn", factor=2.0))
