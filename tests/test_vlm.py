"""VLM (models/vlm.py, sampling/vlm.py): Flamingo's zero gates leave the LM exact, a token
attends only to its media, the KV cache equals the full pass, a tiny model learns to name an
image's colour and answers it by generation, and bad inputs are clear errors."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmjax.models import build_model
from mmjax.models.vit import VisionTransformer
from mmjax.models.vlm import VLM, GatedCrossAttentionDense
from mmjax.sampling.transfusion import empty_cache, run_cached
from mmjax.sampling.vlm import generate

# 8x8 images in 4x4 patches: 4 patch tokens (the CLS token is dropped), so V = 4.
VISION = dict(patch_size=4, width=16, depth=2, num_heads=2, mlp_dim=32)
LM = dict(vocab_size=16, width=32, depth=2, num_heads=4, mlp_dim=64)
V = 4
PAD, BOS, EOS, IMAGE, QUESTION = 0, 1, 2, 3, 4
FIRST_WORD = 5  # ids 5.. are words (colour names in the training task)


def make(mode: str = "prefix", connector: str = "mlp", **kw) -> VLM:
    kw = {"dtype": jnp.float32, **LM, **kw}
    return VLM(vision=VISION, connector=dict(type=connector), mode=mode, **kw)


def prefix_batch(rng: np.random.Generator, batch: int = 2, length: int = 12) -> dict:
    """<bos> <image> x V words...: the visual tokens at slots 1..V."""
    tokens = rng.integers(FIRST_WORD, LM["vocab_size"], (batch, length), dtype=np.int32)
    tokens[:, 0], tokens[:, 1 : 1 + V] = BOS, IMAGE
    return dict(
        tokens=tokens,
        segment_ids=np.ones_like(tokens),
        positions=np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape),
        images=rng.uniform(-1, 1, (batch, 8, 8, 3)).astype(np.float32),
        visual_positions=np.broadcast_to(np.arange(1, 1 + V, dtype=np.int32), (batch, V)),
    )


def flamingo_batch(rng: np.random.Generator, batch: int = 2, length: int = 12) -> dict:
    """<bos> w w <image> w w w <image> w ...: media ids 0, 0, 0, 1, ..., 1, 2, ..., 2."""
    tokens = rng.integers(FIRST_WORD, LM["vocab_size"], (batch, length), dtype=np.int32)
    tokens[:, 0], tokens[:, 3], tokens[:, 7] = BOS, IMAGE, IMAGE
    return dict(
        tokens=tokens,
        segment_ids=np.ones_like(tokens),
        positions=np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape),
        images=rng.uniform(-1, 1, (batch, 2, 8, 8, 3)).astype(np.float32),
        media_ids=np.cumsum(tokens == IMAGE, axis=1, dtype=np.int32),
    )


BATCHES = {"prefix": prefix_batch, "flamingo": flamingo_batch}
TOKEN_KEYS = ("tokens", "segment_ids", "positions")  # CausalLM's arguments


def init(model: nn.Module, batch: dict, seed: int = 0) -> dict:
    return nn.meta.unbox(jax.jit(model.init)(jax.random.key(seed), batch)["params"])


def set_gates(params: dict, value: float) -> dict:
    """Every Flamingo tanh gate (`*_gate`) set to `value`."""

    def one(path, x):
        return jnp.full_like(x, value) if path[-1].key.endswith("_gate") else x

    return jax.tree_util.tree_map_with_path(one, params)


# bf16 runs op by op: compiled, XLA keeps excess precision inside fusions (bf16 rounding
# elided), so differently fused programs differ by bf16 noise; each op alone rounds the same.
@pytest.mark.parametrize(
    "dtype, compiled, every",
    [(jnp.float32, True, 1), (jnp.float32, True, 2), (jnp.bfloat16, False, 2)],
)
@pytest.mark.slow
def test_flamingo_at_initialisation_is_exactly_the_language_model(dtype, compiled, every):
    model = make("flamingo", cross_attention_every=every, dtype=dtype)
    batch = flamingo_batch(np.random.default_rng(0))
    params = init(model, batch)
    gated = sorted(k for k in params if k.startswith("gated_xattn"))
    assert gated == [f"gated_xattn{i}" for i in range(LM["depth"]) if (i + 1) % every == 0]
    compile_or_not = jax.jit if compiled else (lambda f: f)
    lm, vlm = (compile_or_not(m.apply) for m in (model.language_model(), model))
    with jax.disable_jit(not compiled):
        alone = lm({"params": params["lm"]}, *(batch[k] for k in TOKEN_KEYS))
        np.testing.assert_array_equal(vlm({"params": params}, batch)["logits"], alone)
        opened = vlm({"params": set_gates(params, 0.5)}, batch)["logits"]
    assert float(jnp.max(jnp.abs(opened - alone))) > 1e-2


@functools.cache
def gated_layer() -> tuple:
    layer = GatedCrossAttentionDense(num_heads=2, mlp_dim=32, dtype=jnp.float32)
    x, media = jnp.zeros((1, 10, 16)), jnp.zeros((1, 3 * V, 16))
    ids, index = jnp.zeros((1, 10), jnp.int32), jnp.repeat(jnp.arange(1, 4), V)[None]
    params = set_gates(nn.meta.unbox(layer.init(jax.random.key(0), x, media, ids, index)), 0.7)
    return jax.jit(functools.partial(layer.apply, params, media_index=index))


@settings(max_examples=25, deadline=None, database=None)
@given(
    ids=st.lists(st.integers(0, 3), min_size=10, max_size=10),
    perturbed=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_a_token_attends_only_to_its_own_media(ids, perturbed, seed):
    apply = gated_layer()
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(1, 10, 16)), jnp.float32)
    media = rng.normal(size=(1, 3, V, 16)).astype(np.float32)
    other = media.copy()
    other[:, perturbed - 1] += rng.normal(size=(V, 16))
    ids = jnp.asarray([ids], jnp.int32)
    before = apply(x, media.reshape(1, 3 * V, 16), media_ids=ids)
    after = apply(x, other.reshape(1, 3 * V, 16), media_ids=ids)
    mine = np.asarray(ids[0] == perturbed)
    np.testing.assert_array_equal(before[0, ~mine], after[0, ~mine])
    assert np.all(np.abs(before[0, mine] - after[0, mine]).max(axis=-1) > 1e-4)


def test_flamingo_tokens_see_only_their_media_in_the_model():
    model = make("flamingo")
    batch = flamingo_batch(np.random.default_rng(1))
    params = set_gates(init(model, batch), 0.5)
    apply = jax.jit(model.apply)
    logits = apply({"params": params}, batch)["logits"]
    media_ids = batch["media_ids"]
    for m in (1, 2):
        images = batch["images"].copy()
        images[:, m - 1] = -images[:, m - 1]
        changed = apply({"params": params}, {**batch, "images": images})["logits"]
        # causal: tokens before media m's first token cannot see it through self-attention
        np.testing.assert_array_equal(changed[media_ids < m], logits[media_ids < m])
        assert np.all(np.abs(changed - logits)[media_ids == m].max(axis=-1) > 1e-4)


@pytest.mark.slow  # CI runs it
@pytest.mark.parametrize("mode", ["prefix", "flamingo"])
def test_kv_cached_decoding_equals_the_full_forward_pass(mode):
    batch = BATCHES[mode](np.random.default_rng(2), length=14)
    model, decoder = make(mode), make(mode, decode=True)
    params = init(model, batch)
    if mode == "flamingo":
        params = set_gates(params, 0.5)  # else the media would not matter
    full = jax.jit(model.apply)({"params": params}, batch)["logits"]
    run = jax.jit(functools.partial(run_cached, decoder))
    cache = empty_cache(decoder, {**batch, "cache_offset": 0})
    start = 9  # prompt: <bos>, the image(s) and a few words
    prompt = {
        k: v[:, :start] if v.ndim == 2 and k != "visual_positions" else v for k, v in batch.items()
    }
    out, cache = run(params, cache, {**prompt, "cache_offset": 0})
    cached = [out["logits"]]
    step_keys = ("tokens", "segment_ids", "positions", "media_ids")
    for i in range(start, batch["tokens"].shape[1]):
        chunk = {k: batch[k][:, i : i + 1] for k in step_keys if k in batch}
        out, cache = run(params, cache, {**chunk, "cache_offset": jnp.full((2,), i)})
        assert "visual_tokens" not in out  # later chunks carry no images
        cached.append(out["logits"])
    np.testing.assert_allclose(jnp.concatenate(cached, axis=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # CI runs it
def test_feature_layer_reads_the_vit_hidden_state():
    vit = VisionTransformer(**VISION, dtype=jnp.float32)
    images = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    variables = vit.init(jax.random.key(1), images)
    _, state = vit.apply(variables, images, capture_intermediates=True)
    block0 = state["intermediates"]["encoder"]["block0"]["__call__"][0]
    for layer in (-2, 1):  # the penultimate of depth 2: block 0's output
        pooled, tokens = vit.apply(variables, images, feature_layer=layer)
        assert pooled is None
        np.testing.assert_array_equal(tokens, block0)
    part = vit.init(jax.random.key(1), images, feature_layer=-2)["params"]
    assert sorted(part["encoder"]) == ["block0"] and "norm_post" not in part
    with pytest.raises(ValueError, match="feature_layer 3 is outside"):
        vit.apply(variables, images, feature_layer=3)
    model = make(feature_layer=-2)
    batch = prefix_batch(np.random.default_rng(3))
    assert sorted(init(model, batch)["vision"]["encoder"]) == ["block0"]


COLOURS = np.array([[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]], np.float32)


def colour_batch(rng: np.random.Generator, batch: int) -> tuple[dict, np.ndarray]:
    """`<bos> <image> x V <question> colour <eos>`, the loss on the answer and <eos>."""
    colour = rng.integers(0, len(COLOURS), batch)
    images = COLOURS[colour][:, None, None] + 0.3 * rng.normal(size=(batch, 8, 8, 3))
    row = [BOS, *[IMAGE] * V, QUESTION, 0, EOS]
    tokens = np.tile(np.asarray(row, np.int32), (batch, 1))
    tokens[:, V + 2] = FIRST_WORD + colour
    targets = np.concatenate([tokens[:, 1:], np.full((batch, 1), PAD, np.int32)], 1)
    loss_mask = np.zeros(tokens.shape, np.float32)
    loss_mask[:, V + 1 : V + 3] = 1.0
    inputs = dict(
        tokens=tokens,
        segment_ids=np.ones_like(tokens),
        positions=np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape),
        images=np.clip(images, -1, 1).astype(np.float32),
        visual_positions=np.broadcast_to(np.arange(1, 1 + V, dtype=np.int32), (batch, V)),
    )
    return {**inputs, "targets": targets, "loss_mask": loss_mask}, colour


def test_a_tiny_prefix_vlm_learns_to_name_the_colour_and_answers_it():
    model = make()
    rng = np.random.default_rng(4)
    params = init(model, colour_batch(rng, 2)[0])
    optimizer = optax.adam(3e-3)

    def loss_fn(params, batch):
        logits = model.apply({"params": params}, batch)["logits"]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        return jnp.sum(nll * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])

    @jax.jit
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = optimizer.init(params)
    losses = []
    for _ in range(40):
        params, opt_state, loss = train_step(params, opt_state, colour_batch(rng, 32)[0])
        losses.append(float(loss))
    assert np.mean(losses[-5:]) < 0.25 * np.mean(losses[:5]), losses

    batch, colour = colour_batch(rng, 16)
    prompts = [[BOS, *[IMAGE] * V, QUESTION]] * 16
    answers = generate(
        make(decode=True),
        params,
        batch["images"],
        prompts,
        image_id=IMAGE,
        eos_id=EOS,
        pad_id=PAD,
        max_new_tokens=4,
    )
    assert np.mean(answers[:, 0] == FIRST_WORD + colour) >= 0.9, (answers, colour)
    assert np.all(answers[:, 1] == EOS) and np.all(answers[:, 2:] == PAD)


def greedy_reference(model, params, images, prompt, eos_id, steps) -> list[int]:
    """Greedy answer by full forward passes over the growing sequence (no cache, no left
    padding; the sequence is right-padded to one length, which causal attention ignores).
    Image slots and media ids come from the prompt, as generated ids are never images."""
    length = len(prompt) + steps
    media = np.cumsum(np.asarray(prompt) == IMAGE, dtype=np.int32)
    batch = dict(
        segment_ids=np.ones((1, length), np.int32),
        positions=np.arange(length, dtype=np.int32)[None],
        images=images[None],
        visual_positions=np.flatnonzero(np.asarray(prompt) == IMAGE)[None].astype(np.int32),
        media_ids=np.pad(media, (0, steps), mode="edge")[None],
    )
    batch.pop("media_ids" if model.mode == "prefix" else "visual_positions")
    apply = jax.jit(model.apply)
    ids = list(prompt)
    for _ in range(steps):
        tokens = np.asarray([ids + [PAD] * (length - len(ids))], np.int32)
        logits = apply({"params": params}, {**batch, "tokens": tokens})["logits"]
        ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
        if ids[-1] == eos_id:
            break
    return ids[len(prompt) :]


@pytest.mark.parametrize("mode", ["prefix", "flamingo"])
@pytest.mark.slow
def test_generation_matches_greedy_full_passes_and_stops_at_eos(mode):
    rng = np.random.default_rng(5)
    batch = BATCHES[mode](rng)
    model, decoder = make(mode), make(mode, decode=True)
    params = set_gates(init(model, batch), 0.5)
    images = batch["images"]
    words = list(rng.integers(FIRST_WORD, LM["vocab_size"], 6))
    if mode == "prefix":  # prompts of different lengths: left padding
        prompts = [[BOS, *[IMAGE] * V, *words[:1]], [BOS, *words[:3], *[IMAGE] * V, *words[3:]]]
    else:
        prompts = [[BOS, IMAGE, *words[:1]], [BOS, *words[:2], IMAGE, *words[2:4], IMAGE]]
    steps = 6
    run = functools.partial(
        generate,
        decoder,
        params,
        images,
        prompts,
        image_id=IMAGE,
        pad_id=PAD,
        max_new_tokens=steps,
    )
    free = run(eos_id=-1)  # no eos: every step decoded
    for row, prompt in enumerate(prompts):
        want = greedy_reference(model, params, images[row], prompt, -1, steps)
        np.testing.assert_array_equal(free[row], want)
    eos = int(free[0, 2])  # row 0 then ends at its third token, row 1 at its first eos if any
    stopped = run(eos_id=eos)
    for row, prompt in enumerate(prompts):
        want = greedy_reference(model, params, images[row], prompt, eos, steps)
        np.testing.assert_array_equal(stopped[row], want + [PAD] * (steps - len(want)))
    assert list(stopped[0, 3:]) == [PAD] * (steps - 3)
    # nucleus sampling keeps only the most likely token when top_p is tiny
    np.testing.assert_array_equal(run(eos_id=-1, temperature=1.0, top_p=1e-6), free)
    first, again = (run(eos_id=-1, temperature=1.0, rng=jax.random.key(0)) for _ in range(2))
    np.testing.assert_array_equal(first, again)


# Every connector type (models/resamplers.py) with its visual token count V for 2x2 patches.
CONNECTOR_CASES = [
    ("prefix", dict(type="linear"), 4),  # LLaVA
    ("prefix", dict(type="mlp"), 4),  # LLaVA-1.5
    ("prefix", dict(type="concat", group=2), 2),  # MiniGPT-v2
    ("prefix", dict(type="qformer", num_queries=3, width=16, depth=2, num_heads=2, mlp_dim=32), 3),
    ("prefix", dict(type="cross_attn", num_queries=4, num_heads=2), 4),  # Qwen-VL
    ("flamingo", dict(type="perceiver", num_latents=3, depth=1, num_heads=2, head_dim=8), 3),
]


@pytest.mark.parametrize("mode, connector, count", CONNECTOR_CASES)
def test_every_connector_feeds_the_decoder(mode, connector, count):
    model = VLM(vision=VISION, connector=connector, mode=mode, **LM)
    batch = BATCHES[mode](np.random.default_rng(8))
    if mode == "prefix":
        batch["visual_positions"] = batch["visual_positions"][:, :count]
    variables = jax.eval_shape(model.init, jax.random.key(0), batch)
    out = jax.eval_shape(model.apply, variables, batch)
    assert out["logits"].shape == (2, 12, LM["vocab_size"])
    media = () if mode == "prefix" else (2,)
    assert out["visual_tokens"].shape == (2, *media, count, LM["width"])
    assert {"lm", "vision", "connector"} <= set(variables["params"])


def test_the_model_is_registered():
    model = build_model(dict(name="vlm", vision=VISION, connector=dict(type="linear"), **LM))
    params = init(model, prefix_batch(np.random.default_rng(6)))
    assert {"lm", "vision", "connector"} == set(params)


def test_bad_inputs_are_clear_errors():
    rng = np.random.default_rng(7)
    batch = prefix_batch(rng)
    three = {**batch, "visual_positions": batch["visual_positions"][:, :3]}
    with pytest.raises(ValueError, match="4 visual tokens per image but visual_positions has 3"):
        make().init(jax.random.key(0), three)
    with pytest.raises(ValueError, match=r"prefix mode takes images \[B, H, W, C\], got shape"):
        make().init(jax.random.key(0), {**batch, "images": batch["images"][:, None]})
    fl = flamingo_batch(rng)
    with pytest.raises(ValueError, match=r"flamingo mode takes images \[B, M, H, W, C\]"):
        make("flamingo").init(jax.random.key(0), {**fl, "images": fl["images"][:, 0]})
    with pytest.raises(ValueError, match="needs media_ids"):
        make("flamingo").init(jax.random.key(0), {k: v for k, v in fl.items() if k != "media_ids"})
    with pytest.raises(ValueError, match="needs images"):
        make().init(jax.random.key(0), {k: v for k, v in batch.items() if k != "images"})
    with pytest.raises(ValueError, match="unknown VLM mode 'interleaved'"):
        make("interleaved").init(jax.random.key(0), batch)


@pytest.mark.parametrize("every, remat_policy", [(1, "none"), (2, "full")])
def test_a_scanned_flamingo_lm_equals_the_unrolled_one(every, remat_policy):
    """The LM's blocks in one scan with the gated layers run inside it under lax.cond (their
    parameters keep the unrolled names): the same logits and gradients, the LM's blocks
    converted between layouts (mmjax.parallel.layout)."""
    from flax.traverse_util import flatten_dict, unflatten_dict

    from mmjax.parallel.layout import to_layout

    depth = 4
    batch = flamingo_batch(np.random.default_rng(2))
    kw = dict(cross_attention_every=every, depth=depth, remat_policy=remat_policy)
    plain = make("flamingo", **kw)
    scanned = make("flamingo", **kw, scan_layers=True)
    params = set_gates(init(plain, batch), 0.5)  # open gates: the layers matter
    shapes = nn.meta.unbox(jax.eval_shape(scanned.init, jax.random.key(0), batch)["params"])
    gated = {k for k in shapes if k.startswith("gated_xattn")}
    assert gated == {f"gated_xattn{i}" for i in range(depth) if (i + 1) % every == 0}

    def convert(tree: dict) -> dict:
        flat = to_layout(flatten_dict(tree, sep="/"), flatten_dict(shapes, sep="/"))
        return unflatten_dict(flat, sep="/")

    def loss(model: VLM):
        return lambda p: jnp.mean(jax.nn.log_softmax(model.apply({"params": p}, batch)["logits"]))

    want, want_grads = jax.jit(jax.value_and_grad(loss(plain)))(params)
    got, got_grads = jax.jit(jax.value_and_grad(loss(scanned)))(convert(params))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for path, g in flatten_dict(convert(want_grads), sep="/").items():
        error = float(jnp.max(jnp.abs(flatten_dict(got_grads, sep="/")[path] - g)))
        assert error <= 1e-5 * max(1.0, float(jnp.max(jnp.abs(g)))), (path, error)


@pytest.mark.slow
def test_a_scanned_flamingo_decodes_as_its_full_pass():
    """Generation through the scanned LM's KV cache equals greedy full passes."""
    rng = np.random.default_rng(6)
    batch = flamingo_batch(rng)
    model = make("flamingo", cross_attention_every=2, depth=4, scan_layers=True)
    decoder = make("flamingo", cross_attention_every=2, depth=4, scan_layers=True, decode=True)
    params = set_gates(init(model, batch), 0.5)
    words = list(rng.integers(FIRST_WORD, LM["vocab_size"], 4))
    prompts = [[BOS, IMAGE, *words[:1]], [BOS, *words[:2], IMAGE, *words[2:4], IMAGE]]
    out = generate(
        decoder, params, batch["images"], prompts, image_id=IMAGE, pad_id=PAD, max_new_tokens=4,
        eos_id=-1,
    )  # fmt: skip
    for row, prompt in enumerate(prompts):
        want = greedy_reference(model, params, batch["images"][row], prompt, -1, 4)
        np.testing.assert_array_equal(out[row], want)
