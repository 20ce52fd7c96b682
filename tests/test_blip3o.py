"""BLIP3-o: the prompt rows, the frozen backbone's condition at the queries, the flow and MSE
objectives training the generator while the backbone stays bit-identical, clear errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax.core import meta

from mmjax.data.blip3o_rows import (
    blip3o_example,
    blip3o_prompt,
    check_blip3o_config,
    understanding_sequence,
)
from mmjax.data.sequences import SEQUENCE_DEFAULTS, vlm_example
from mmjax.data.sources import ShapesSource
from mmjax.data.tokenizer import ByteTokenizer, WithVlmTokens
from mmjax.errors import UserError
from mmjax.models.blip3o import Blip3o
from mmjax.models.causal_lm import CausalLM
from mmjax.models.vlm import VLM
from mmjax.objectives.blip3o import make_blip3o_loss
from mmjax.train.config_cli import base_config
from mmjax.train.optimizer import make_optimizer
from mmjax.train.stages import stop_frozen_gradients

TOK = WithVlmTokens(ByteTokenizer())
SIZE, QUERIES = 8, 4
BACKBONE = dict(
    name="vlm", vocab_size=TOK.vocab_size, width=32, depth=2, num_heads=2, mlp_dim=64,
    vision=dict(patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32),
    connector=dict(type="linear"), dtype="float32",
)  # fmt: skip
DIT = dict(width=32, depth=2, num_heads=2, mlp_dim=64, time_width=32)


def seq_config(**overrides) -> ml_collections.ConfigDict:
    values = dict(kind="blip3o", max_len=32, num_queries=QUERIES, channels=3)
    return ml_collections.ConfigDict({**SEQUENCE_DEFAULTS, **values, **overrides})


def model(**kw) -> Blip3o:
    fields = dict(backbone=BACKBONE, dit=DIT, image_shape=(SIZE, SIZE, 3), num_queries=QUERIES)
    return Blip3o(**(fields | kw), dtype=jnp.float32)


def batch_of(captions, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    rows = [
        blip3o_example(rng.uniform(-1, 1, (SIZE, SIZE, 3)), TOK.encode(c), TOK, seq_config(), rng)
        for c in captions
    ]
    return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def test_a_row_is_the_prompt_then_the_query_slots():
    row = blip3o_example(np.zeros((SIZE, SIZE, 4)), [70, 71, 72], TOK, seq_config(), None)
    want = [TOK.bos_id, 70, 71, 72, TOK.image_id, *[TOK.pad_id] * QUERIES]
    np.testing.assert_array_equal(row["tokens"][: len(want)], want)
    np.testing.assert_array_equal(row["query_positions"], [5, 6, 7, 8])
    np.testing.assert_array_equal(row["segment_ids"], [1] * 9 + [0] * 23)
    assert row["images"].shape == (1, SIZE, SIZE, 3)  # the channels data.sequence keeps


def test_a_chat_template_row_wraps_the_caption_as_the_official_qwen_prompt():
    from mmjax.data.qwen_tasks import CHAT_PREFIX, CHAT_SUFFIX

    tok = WithVlmTokens(ByteTokenizer())
    tok.bos_id = -1  # Qwen's tokenizer has no BOS: none is written
    seq = seq_config(max_len=256, chat_template=True)
    row = blip3o_prompt([70, 71], tok, seq)
    instruction = "Please generate image based on the following caption: "
    want = [*tok.encode(CHAT_PREFIX + instruction), 70, 71, *tok.encode(CHAT_SUFFIX), tok.image_id]
    np.testing.assert_array_equal(row["tokens"][: len(want)], want)
    np.testing.assert_array_equal(row["query_positions"], len(want) + np.arange(QUERIES))
    assert tok.decode(row["tokens"][: len(want) - 1]).endswith("<|im_start|>assistant\n")


def test_bad_rows_give_one_clear_error():
    with pytest.raises(UserError, match="num_queries must be an integer >= 1"):
        check_blip3o_config(seq_config(num_queries=0), SIZE)
    with pytest.raises(UserError, match="max_len 6 cannot hold"):
        check_blip3o_config(seq_config(max_len=6), SIZE)
    with pytest.raises(UserError, match="a prompt of 30 tokens with 4 queries takes 36"):
        blip3o_prompt(list(range(65, 95)), TOK, seq_config())
    batch = batch_of(["a red circle"])
    m = model(num_queries=3)
    with pytest.raises(ValueError, match="query_positions has 4 slots but the model has 3"):
        m.init(jax.random.key(0), batch)


def test_the_condition_is_the_backbones_last_hidden_states_at_the_queries():
    batch = batch_of(["a red circle", "two blue squares"]) | {"timesteps": jnp.ones((2, 1))}
    m = model()
    params = meta.unbox(m.init(jax.random.key(0), batch)["params"])
    cond = m.apply({"params": params}, batch, method=Blip3o.condition)
    vlm = VLM(**{k: v for k, v in BACKBONE.items() if k != "name"})
    lm, lm_params = vlm.language_model(), {"params": params["backbone"]["lm"]}
    embeds = lm.apply(lm_params, batch["tokens"], method=CausalLM.embed)
    queries = jnp.broadcast_to(params["queries"], (2, QUERIES, 32))
    rows = jnp.arange(2)[:, None]
    x = embeds.at[rows, batch["query_positions"]].set(queries)
    # the same LM with the queries written as inputs: its hidden states at those slots
    hidden = lm.apply(
        lm_params, x, batch["segment_ids"], batch["positions"], method=CausalLM.hidden
    )
    np.testing.assert_allclose(cond, hidden[rows, batch["query_positions"]], atol=1e-6)
    # and the VLM's logits with queries are its head on those hidden states
    prompt = {k: v for k, v in batch.items() if k not in ("images", "timesteps")}
    logits = vlm.apply({"params": params["backbone"]}, prompt, queries=queries)["logits"]
    head = lm.apply(lm_params, hidden, method=CausalLM.head)
    np.testing.assert_allclose(logits, head, atol=1e-5)


QWEN_BACKBONE = dict(
    name="qwen_vl", vocab_size=TOK.vocab_size, width=32, depth=2, num_heads=2, num_kv_heads=1,
    mlp_dim=64, qkv_bias=True, mrope_sections=(2, 3, 3), dtype="float32",
    vision=dict(width=16, depth=2, num_heads=2, mlp_dim=32, norm="rms", gated_mlp=True,
                global_every=2),
)  # fmt: skip


def test_a_qwen_vl_backbone_reads_the_prompt_with_text_mrope_and_keeps_its_vision():
    batch = batch_of(["a red circle", "two blue squares"]) | {"timesteps": jnp.ones((2, 1))}
    m = model(backbone=QWEN_BACKBONE, backbone_image=(14, 3))
    params = meta.unbox(m.init(jax.random.key(0), batch)["params"])
    # the whole Qwen-VL exists under backbone/: a trained one's tree loads into it
    qwen = m.backbone_model()
    one = jnp.ones((1, 1), jnp.int32)
    blank = {
        "tokens": one, "positions": jnp.zeros((1, 3, 1), jnp.int32), "segment_ids": one,
        "visual_positions": 0 * one, "patches": jnp.zeros((1, 4, 3 * 2 * 14 * 14)),
        "patch_positions": jnp.array([[[0, 0], [0, 1], [1, 0], [1, 1]]]),
        "patch_segment_ids": jnp.ones((1, 4), jnp.int32),
        "patch_window_ids": jnp.ones((1, 4), jnp.int32), "patch_order": jnp.arange(4)[None],
    }  # fmt: skip
    own = meta.unbox(qwen.init(jax.random.key(1), blank)["params"])
    shapes = lambda tree: jax.tree.map(jnp.shape, tree)  # noqa: E731
    assert shapes(params["backbone"]) == shapes(own)
    # text-only M-RoPE (all 3 ids the token's position) is plain RoPE: the condition is the
    # hidden states of the LM fed [B, 3, L] ids
    cond = m.apply({"params": params}, batch, method=Blip3o.condition)
    queries = jnp.broadcast_to(params["queries"], (2, QUERIES, 32))
    prompt = {k: batch[k] for k in ("tokens", "segment_ids", "query_positions")}
    prompt["positions"] = jnp.repeat(batch["positions"][:, None], 3, axis=1)
    hidden = qwen.apply({"params": params["backbone"]}, prompt, queries=queries, hidden=True)
    rows = jnp.arange(2)[:, None]
    np.testing.assert_allclose(cond, hidden["hidden"][rows, batch["query_positions"]], atol=1e-6)
    assert not np.allclose(cond[0], cond[1], atol=1e-3)  # the prompts differ
    with pytest.raises(ValueError, match=r"backbone\.name 'clip' cannot be BLIP3-o"):
        model(backbone={**QWEN_BACKBONE, "name": "clip"}).init(jax.random.key(0), batch)


def test_a_dropped_condition_ignores_the_prompt():
    a, b = batch_of(["a red circle"]), batch_of(["two green triangles"])
    m = model()
    params = meta.unbox(m.init(jax.random.key(0), a | {"timesteps": jnp.ones((1, 1))}))
    params = params["params"]
    # the cross-attention gates start at 0: open them so the condition reaches every token
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: p + 1.0 if "gate" in jax.tree_util.keystr(path) else p, params
    )
    x = {"images": a["images"], "timesteps": jnp.full((1, 1), 0.5)}

    def predict(batch, keep):
        out = m.apply({"params": params}, batch | x | {"cond_keep": jnp.asarray([keep])})
        return np.asarray(out["prediction"])

    assert np.abs(predict(a, 1.0) - predict(b, 1.0)).max() > 1e-3
    np.testing.assert_array_equal(predict(a, 0.0), predict(b, 0.0))


@pytest.mark.parametrize("target", ["flow", "mse"])
def test_training_lowers_the_loss_and_leaves_the_frozen_backbone_bit_identical(target):
    batch = batch_of(["a red circle", "two blue squares", "a green triangle", "one circle"])
    m = model()
    params = meta.unbox(m.init(jax.random.key(0), batch | {"timesteps": jnp.ones((4, 1))}))
    params = params["params"]
    cfg = base_config().optimizer
    cfg.update(lr=3e-3, warmup_steps=1, frozen=("backbone/**",))
    tx, _ = make_optimizer(cfg, 40)
    loss = make_blip3o_loss(lambda p, b, r: m.apply({"params": p}, b), target=target, cond_drop=0.1)
    loss = stop_frozen_gradients(loss, cfg.frozen)

    @jax.jit
    def step(params, state, rng):
        (value, _), grads = jax.value_and_grad(loss, has_aux=True)(params, batch, rng)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    # a fresh DiT's first gradients are finite and moderate (all-zero inputs overflowed them)
    (_, _), grads = jax.value_and_grad(loss, has_aux=True)(params, batch, jax.random.key(0))
    assert float(optax.global_norm(grads)) < 1e3
    state, trained, losses = tx.init(params), params, []
    for i in range(40):
        trained, state, value = step(trained, state, jax.random.key(i))
        losses.append(float(value))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
    jax.tree.map(np.testing.assert_array_equal, trained["backbone"], params["backbone"])
    assert not np.array_equal(trained["queries"], params["queries"])  # the queries train


@pytest.mark.parametrize("logit_normal, std", [(False, np.pi / np.sqrt(3)), (True, 1.0)])
def test_flow_noise_levels_are_uniform_or_logit_normal(logit_normal, std):
    """logit(sigma) of U(0, 1) has the logistic's std pi / sqrt(3); SD3's logit-normal, 1."""
    seen = {}

    def apply_fn(params, batch, rng):
        seen["sigma"] = np.asarray(batch["timesteps"])[:, 0]
        return {"prediction": jnp.zeros_like(batch["images"])}

    loss = make_blip3o_loss(apply_fn, logit_normal=logit_normal)
    loss(None, {"images": jnp.zeros((20_000, 1, 1, 1))}, jax.random.key(0))
    logits = np.log(seen["sigma"]) - np.log1p(-seen["sigma"])
    assert ((seen["sigma"] > 0) & (seen["sigma"] <= 1)).all()
    assert abs(logits.mean()) < 0.05 and abs(logits.std() - std) < 0.05, logits.std()


def test_unknown_objective_settings_are_refused():
    with pytest.raises(ValueError, match="unknown blip3o objective target 'l1'"):
        make_blip3o_loss(lambda *a: None, target="l1")
    with pytest.raises(ValueError, match=r"cond_drop 1\.0 is not a probability"):
        make_blip3o_loss(lambda *a: None, cond_drop=1.0)


def test_joint_rows_add_the_backbones_own_task_and_its_answer_loss():
    und = dict(mode="prefix", visual_tokens=64, max_len=160, tasks=dict(caption=1.0))
    seq = seq_config(understanding=und)
    record = ShapesSource("train", 1)[0] | {"source": "shapes"}
    image = np.asarray(record["image"], np.float32) / 127.5 - 1.0  # 32x32
    ids = TOK.encode("a red circle")
    row = blip3o_example(image, ids, TOK, seq, np.random.default_rng(0), record)
    want = vlm_example(image, record, TOK, understanding_sequence(seq), np.random.default_rng(0))
    for key, value in want.items():
        np.testing.assert_array_equal(row[f"und_{key}"], value)
    batch = {k: jnp.asarray(v)[None] for k, v in row.items()}
    batch["images"] = batch["images"][:, :, :SIZE, :SIZE]  # the grid `model` generates
    m = model(backbone_image=(32, 3), backbone_visual_tokens=64)
    params = meta.unbox(m.init(jax.random.key(0), batch))["params"]
    apply_fn = lambda p, b, r: m.apply({"params": p}, b)  # noqa: E731
    rng = jax.random.key(1)
    _, joint = make_blip3o_loss(apply_fn, lm_weight=1.0)(params, batch, rng)
    sequential = {k: v for k, v in batch.items() if not k.startswith("und_")}
    _, alone = make_blip3o_loss(apply_fn)(params, sequential, rng)
    assert "lm_loss" not in alone and float(joint["lm_loss"]) > 0
    np.testing.assert_allclose(joint["loss"], alone["loss"] + joint["lm_loss"], rtol=1e-6)
