"""The decoder block's features for the papers' LMs: grouped-query attention (its KV cache:
tests/test_scan.py) and biases on the q, k, v projections alone (Qwen)."""

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
