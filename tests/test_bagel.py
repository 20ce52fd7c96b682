"""BAGEL: token routing to modality experts, the interleaved rows, KV-cached decoding, the
objective and the guided sampler, and clear errors."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax.core import meta
from helpers import REPO, random_vae_run

from mmjax.data.bagel_tasks import (
    Part,
    bagel_example,
    bagel_row,
    caption_parts,
    check_bagel_config,
    edit_parts,
    packed_row,
    t2i_parts,
    text_parts,
)
from mmjax.data.sequences import SEQUENCE_DEFAULTS
from mmjax.data.sources import ShapesSource
from mmjax.data.tokenizer import ByteTokenizer, WithImageMarkers
from mmjax.errors import UserError
from mmjax.models.bagel import LATENT_ENCODERS, Bagel
from mmjax.nn.sincos import sincos_2d
from mmjax.objectives.bagel import make_bagel_loss
from mmjax.sampling.bagel import FlowSettings, edit_contexts, guide, stack_rows, t2i_contexts
from mmjax.sampling.transfusion import TOKEN_KEYS, empty_cache, run_cached

TOK = WithImageMarkers(ByteTokenizer())
SIZE = 16  # pixels; 8x8 patches: 4 latent and 4 ViT tokens an image


def seq_config(**overrides) -> ml_collections.ConfigDict:
    values = dict(kind="bagel", max_len=48, patch_size=8, vit_patch_size=8, channels=3)
    return ml_collections.ConfigDict({**SEQUENCE_DEFAULTS, **values, **overrides})


def tiny_model(experts: str = "mot", depth: int = 2, **kw) -> Bagel:
    return Bagel(
        vocab_size=TOK.vocab_size, width=32, depth=depth, num_heads=2, mlp_dim=64,
        image_shape=(SIZE, SIZE, 3), image_size=SIZE, patch_size=8, vision_patch=8,
        vision_width=16, vision_depth=1, vision_heads=2, vision_mlp_dim=32, experts=experts,
        timestep_scale=1000.0, dtype=jnp.float32, attention_impl="xla", **kw,
    )  # fmt: skip


def pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (SIZE, SIZE, 3)).astype(np.float32)


def edit_batch() -> dict:
    """Two edit rows: text and ViT tokens before, between and after latent tokens."""
    rows = [
        bagel_row(
            edit_parts(pixels(i), TOK.encode("make it"), pixels(i + 5), TOK),
            TOK,
            seq_config(),
            SIZE,
        )
        for i in range(2)
    ]
    batch = stack_rows(rows)
    batch["timesteps"] = batch["image_noised"] * 0.7
    return batch


def test_an_edit_row_lays_out_one_position_per_image_block():
    seq = seq_config()
    row = bagel_row(edit_parts(pixels(0), [65, 66], pixels(1), TOK), TOK, seq, SIZE)
    boi, eoi, pad = TOK.boi_id, TOK.eoi_id, TOK.pad_id
    image = [boi, pad, pad, pad, pad, eoi]
    want = [TOK.bos_id, *image, *image, 65, 66, *image]
    n = len(want)
    np.testing.assert_array_equal(row["tokens"][:n], want)
    # <bos> 0; ViT block 1; clean latents 2; text 3, 4; target block 5
    np.testing.assert_array_equal(row["positions"][:n], [0, *[1] * 6, *[2] * 6, 3, 4, *[5] * 6])
    np.testing.assert_array_equal(
        row["span_ids"][:n], [0, 0, 1, 1, 1, 1, 0, 0, 2, 2, 2, 2, 0, 0, 0, 0, 3, 3, 3, 3, 0]
    )
    np.testing.assert_array_equal(row["vit_positions"], [[2, 3, 4, 5]])
    np.testing.assert_array_equal(row["image_positions"], [[8, 9, 10, 11], [16, 17, 18, 19]])
    np.testing.assert_array_equal(row["image_noised"], [0, 1])
    np.testing.assert_array_equal(row["image_valid"], [1, 1])
    assert row["lm_mask"].sum() == 0  # edits train the flow only
    assert row["segment_ids"].sum() == n
    raster = bagel_row(
        edit_parts(pixels(0), [65, 66], pixels(1), TOK), TOK, seq_config(bagel_image_rope="raster"),
        SIZE,
    )  # fmt: skip
    np.testing.assert_array_equal(raster["positions"][:n], np.arange(n))
    np.testing.assert_array_equal(raster["tokens"], row["tokens"])


def test_caption_and_text_rows_train_on_the_text_and_t2i_rows_leave_slots_unused():
    seq = seq_config()
    cap = bagel_row(caption_parts(pixels(0), [65, 66], TOK), TOK, seq, SIZE)
    # <bos> <BOI> 4 slots <EOI> 65 66 <eos>: CE on 65, 66, <eos>
    np.testing.assert_array_equal(np.nonzero(cap["lm_mask"])[0], [7, 8, 9])
    np.testing.assert_array_equal(cap["image_positions"], np.full((2, 4), 48))
    gen = bagel_row(t2i_parts([65], pixels(0), TOK), TOK, seq, SIZE)
    np.testing.assert_array_equal(gen["vit_positions"], np.full((1, 4), 48))
    np.testing.assert_array_equal(gen["image_valid"], [1, 0])
    text = bagel_row(text_parts([65, 66], TOK), TOK, seq, SIZE)
    # <bos> 65 66 <eos>: CE on all but <bos>, no image
    np.testing.assert_array_equal(np.nonzero(text["lm_mask"])[0], [1, 2, 3])
    np.testing.assert_array_equal(text["image_valid"], [0, 0])


def test_a_packed_row_computes_what_its_segments_compute_alone():
    model = tiny_model()
    seq = seq_config()
    caption = caption_parts(pixels(0), [65, 66], TOK)
    t2i = t2i_parts([67, 68, 69], pixels(1), TOK)
    packed = stack_rows([packed_row([caption, t2i], TOK, seq, SIZE)])
    alone = stack_rows([bagel_row(caption, TOK, seq, SIZE), bagel_row(t2i, TOK, seq, SIZE)])
    # positions restart in the second segment; its ids are 2
    start = len(caption[0].ids) + 6 + len(caption[2].ids)
    np.testing.assert_array_equal(packed["positions"][0, start : start + 5], [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(packed["segment_ids"][0, start - 1 : start + 1], [1, 2])
    for batch in (packed, alone):
        batch["timesteps"] = batch["image_noised"] * 0.6
    params = meta.unbox(model.init(jax.random.key(0), packed)["params"])
    got = model.apply({"params": params}, packed)
    want = model.apply({"params": params}, alone)
    np.testing.assert_allclose(got["logits"][0, :start], want["logits"][0, :start], atol=1e-5)
    n = len(t2i[0].ids) + 6
    np.testing.assert_allclose(
        got["logits"][0, start : start + n], want["logits"][1, :n], atol=1e-5
    )
    np.testing.assert_allclose(got["velocity"][0, 0], want["velocity"][1, 0], atol=1e-5)


def test_packing_fills_rows_with_whole_tasks_on_the_scene():
    source = ShapesSource("train", 8)
    seq = seq_config(max_len=128, bagel_tasks=dict(t2i=2.0, caption=1.0, edit=1.0))
    rng = np.random.default_rng(0)
    segments = {False: [], True: []}
    for pack in segments:
        seq.bagel_pack = pack
        for i in range(200):
            record = source[i % 8]
            image = record["image"].astype(np.float32) / 127.5 - 1.0
            row = bagel_example(image, record, TOK, seq, rng)
            segments[pack].append(row["segment_ids"].max())
            assert row["tokens"].shape == (128,)
            # every segment whole: its images' slots inside it
            for slots in (*row["image_positions"][row["image_valid"] > 0], row["vit_positions"]):
                if slots.min() < 128:
                    assert len(set(row["segment_ids"][slots.reshape(-1)])) == 1
    assert max(segments[False]) == 1
    # byte-level t2i and caption rows of 16 + 16 tokens: most rows take a second task
    assert np.mean(np.asarray(segments[True]) > 1) > 0.5


def test_cfg_dropout_rates_are_the_configs():
    source = ShapesSource("train", 40)
    seq = seq_config(
        max_len=160, bagel_tasks=dict(edit=1.0), text_drop=0.1, vit_drop=0.5, vae_drop=0.2
    )
    rng = np.random.default_rng(0)
    kept = []
    for i in range(1500):
        record = source[i % 40]
        image = record["image"].astype(np.float32) / 127.5 - 1.0
        row = bagel_example(image, record, TOK, seq, rng)
        vit = row["vit_positions"][0, 0] < seq.max_len
        vae = row["image_valid"][0] == 1 and row["image_noised"][0] == 0
        target = row["image_positions"][int(np.argmax(row["image_noised"]))][0]
        before = row["tokens"][target - 2]  # the instruction's last token, or <EOI>, <bos>
        text = before not in (TOK.eoi_id, TOK.bos_id)
        kept.append((vit, vae, text))
    rates = 1.0 - np.mean(kept, axis=0)
    np.testing.assert_allclose(rates, [0.5, 0.2, 0.1], atol=0.04)


def test_bad_sequence_configs_and_long_rows_give_one_clear_error():
    with pytest.raises(UserError, match="bagel_tasks"):
        check_bagel_config(seq_config(bagel_tasks=dict(paint=1.0)), SIZE)
    with pytest.raises(UserError, match="vit_patch_size"):
        check_bagel_config(seq_config(vit_patch_size=5), SIZE)
    with pytest.raises(UserError, match="bagel_image_rope 'xy' is not one of"):
        check_bagel_config(seq_config(bagel_image_rope="xy"), SIZE)
    with pytest.raises(UserError, match="vae_drop"):
        check_bagel_config(seq_config(vae_drop=1.5), SIZE)
    with pytest.raises(UserError, match=r"exceeds data\.sequence\.max_len 48"):
        bagel_row(t2i_parts(TOK.encode("x" * 60), pixels(0), TOK), TOK, seq_config(), SIZE)


def _set_expert(params, expert: int, names: tuple[str, ...], seed: int):
    """Params with expert `expert`'s weights of the decoder modules `names` redrawn."""
    rng = np.random.default_rng(seed)

    def redraw(path, x):
        keys = [getattr(k, "key", "") for k in path]
        if "decoder" in keys and any(n in keys for n in names) and x.shape[0] == 2:
            return x.at[expert].set(rng.normal(size=x.shape[1:]).astype(x.dtype))
        return x

    return jax.tree_util.tree_map_with_path(redraw, params)


def test_a_token_reads_only_its_own_experts_weights_while_attention_mixes_modalities():
    model = tiny_model(depth=1)
    batch = edit_batch()
    params = meta.unbox(model.init(jax.random.key(0), batch)["params"])
    run = jax.jit(lambda p: model.apply({"params": p}, batch, method=model.hidden_states)[0])
    base = np.asarray(run(params))
    gen = np.zeros(batch["tokens"].shape, bool)
    for row, slots in enumerate(np.asarray(batch["image_positions"])):
        gen[row, slots.reshape(-1)] = True
    und = ~gen & (np.asarray(batch["segment_ids"]) > 0)
    # The generation expert's weights after the attention scores: text and ViT tokens
    # anywhere in the row (after latents too) are bit-identical; latent tokens are not
    after_attention = ("out", "norm2", "gate", "fc1", "fc2", "norm_final")
    other = np.asarray(run(_set_expert(params, 1, after_attention, 1)))
    np.testing.assert_array_equal(other[und], base[und])
    assert np.abs(other[gen] - base[gen]).max() > 1e-3
    # The understanding expert's: the latent tokens are bit-identical
    other = np.asarray(run(_set_expert(params, 0, after_attention, 2)))
    np.testing.assert_array_equal(other[gen], base[gen])
    # The generation expert's keys and values: text after the latents reads them
    other = np.asarray(run(_set_expert(params, 1, ("key", "value"), 3)))
    after = und & (np.arange(und.shape[1]) > np.asarray(batch["image_positions"])[:, :1, 0])
    assert np.abs(other[after] - base[after]).max() > 1e-3
    before = und & (np.arange(und.shape[1]) < np.asarray(batch["image_positions"])[:, :1, 0])
    np.testing.assert_array_equal(other[before], base[before])  # causal: not before them


@pytest.mark.parametrize("experts", ["dense", "moe", "mot"])
def test_parameter_layouts_duplicate_what_the_variant_says(experts):
    params = meta.unbox(tiny_model(experts).init(jax.random.key(0), edit_batch())["params"])
    block = params["decoder"]["block0"]
    g_attn = block["query"]["kernel"].shape[0]
    g_mlp = block["fc1"]["kernel"].shape[0]
    assert (g_attn, g_mlp) == {"dense": (1, 1), "moe": (1, 2), "mot": (2, 2)}[experts]


@pytest.mark.parametrize("experts", ["moe", "mot"])
def test_sharded_loss_and_gradients_equal_one_devices(experts):
    """On a data x fsdp x tensor mesh each device sorts its own rows' tokens (the routing is
    block-local) and the grouped matmuls run per block inside shard_map."""
    import flax.linen as nn

    from mmjax.parallel import DEFAULT_RULES, make_mesh

    model = tiny_model(experts)
    rows = [
        bagel_row(edit_parts(pixels(i), TOK.encode("make it"), pixels(i + 5), TOK), TOK,
                  seq_config(), SIZE)
        for i in range(4)
    ] + [bagel_row(caption_parts(pixels(i), TOK.encode("ab"), TOK), TOK, seq_config(), SIZE)
         for i in range(4)]  # fmt: skip
    batch = stack_rows(rows)
    params = meta.unbox(model.init(jax.random.key(0), batch)["params"])
    loss_fn = make_bagel_loss(lambda p, b, rng: model.apply({"params": p}, b))
    grad = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, jax.random.key(1))[0]))
    want_loss, want = grad(params, batch)
    mesh = make_mesh(dict(data=2, fsdp=2, tensor=2))
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        got_loss, got = grad(params, batch)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)


@pytest.mark.parametrize("latent_encoder", LATENT_ENCODERS)
def test_kv_cached_decoding_equals_the_full_forward_pass(latent_encoder):
    model = tiny_model(latent_encoder=latent_encoder)
    decoder = model.clone(decode=True)
    batch = edit_batch()
    params = meta.unbox(model.init(jax.random.key(0), batch)["params"])
    full = model.apply({"params": params}, batch)
    # Prefill up to the target's first latent slot, then the target block as one chunk (as
    # the sampler denoises it), then the tokens after it one at a time.
    start = int(batch["image_positions"][0, 1, 0])
    p = batch["image_positions"].shape[-1]
    cache = empty_cache(decoder, {**batch, "cache_offset": 0})
    prompt = {k: v[:, :start] for k, v in batch.items() if k in TOKEN_KEYS}
    prompt |= {k: batch[k] for k in ("vit_images", "vit_positions")}
    prompt |= {"images": batch["images"][:, :1], "image_positions": batch["image_positions"][:, :1]}
    out, cache = run_cached(decoder, params, cache, {**prompt, "cache_offset": 0})
    np.testing.assert_allclose(out["logits"], full["logits"][:, :start], atol=1e-5)
    block = {k: v[:, start : start + p] for k, v in batch.items() if k in TOKEN_KEYS}
    block |= {"images": batch["images"][:, 1:], "timesteps": batch["timesteps"][:, 1:]}
    block |= {"image_positions": jnp.broadcast_to(jnp.arange(p), (2, 1, p)), "cache_offset": start}
    out, cache = run_cached(decoder, params, cache, block)
    np.testing.assert_allclose(out["velocity"], full["velocity"][:, 1:], atol=1e-5)
    for i in range(start + p, start + p + 2):
        chunk = {k: v[:, i : i + 1] for k, v in batch.items() if k in TOKEN_KEYS}
        out, cache = run_cached(
            decoder, params, cache, {**chunk, "cache_offset": jnp.full((2,), i)}
        )
        np.testing.assert_allclose(out["logits"][:, 0], full["logits"][:, i], atol=1e-5)


def test_learned_latent_positions_start_at_the_sin_cos_table_and_train():
    batch = edit_batch()
    fixed = tiny_model()
    params = meta.unbox(fixed.init(jax.random.key(0), batch)["params"])
    learned = tiny_model(latent_positions="learned")
    lparams = meta.unbox(learned.init(jax.random.key(0), batch)["params"])
    np.testing.assert_array_equal(lparams["latent_pos_embed"], sincos_2d(2, 2, 32))
    assert "latent_pos_embed" not in params
    want = fixed.apply({"params": params}, batch)["velocity"]
    got = learned.apply({"params": params | {"latent_pos_embed": sincos_2d(2, 2, 32)}}, batch)
    np.testing.assert_allclose(got["velocity"], want, atol=1e-6)
    loss_fn = make_bagel_loss(lambda p, b, rng: learned.apply({"params": p}, b))
    # The zero-initialised read-out passes no gradient: give it weights first
    readout = jax.random.normal(jax.random.key(2), lparams["llm2vae"]["kernel"].shape)
    lparams["llm2vae"] = lparams["llm2vae"] | {"kernel": readout}
    grads = jax.grad(lambda p: loss_fn(p, batch, jax.random.key(1))[0])(lparams)
    assert np.abs(np.asarray(grads["latent_pos_embed"])).max() > 0
    with pytest.raises(ValueError, match="unknown latent_positions 'rope'"):
        tiny_model(latent_positions="rope").init(jax.random.key(0), batch)


@pytest.mark.parametrize("latent_encoder", LATENT_ENCODERS)
def test_training_a_few_steps_lowers_both_losses(latent_encoder):
    model = tiny_model(latent_encoder=latent_encoder)
    seq = seq_config()
    rows = []
    for i in range(8):
        text = TOK.encode("ab"[i % 2] * 3)
        image = np.full((SIZE, SIZE, 3), (-1.0) ** i * 0.8, np.float32)
        rows.append(bagel_row(t2i_parts(text, image, TOK), TOK, seq, SIZE))
        rows.append(bagel_row(caption_parts(image, text, TOK), TOK, seq, SIZE))
    batch = stack_rows(rows)
    params = meta.unbox(model.init(jax.random.key(0), batch)["params"])
    loss_fn = make_bagel_loss(lambda p, b, rng: model.apply({"params": p}, b), timestep_shift=1.0)
    opt = optax.adam(3e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state, rng):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state, metrics

    first = None
    for i in range(60):
        params, state, metrics = step(params, state, jax.random.key(i % 4))
        first = first or {k: float(v) for k, v in metrics.items()}
    _, last = loss_fn(params, batch, jax.random.key(0))
    assert float(last["lm_loss"]) < 0.3 * first["lm_loss"]
    assert float(last["diffusion_loss"]) < 0.7 * first["diffusion_loss"]


def test_guidance_follows_the_official_formula_and_renormalises():
    rng = np.random.default_rng(0)
    v, vt, vi = (jnp.asarray(rng.normal(size=(2, 4, 8))) for _ in range(3))
    s = FlowSettings(text_scale=4.0, image_scale=2.0, renorm_min=1.0, renorm_type="global")
    want = vi + 2.0 * ((vt + 4.0 * (v - vt)) - vi)
    np.testing.assert_allclose(guide(v, vt, vi, s), want, rtol=1e-6)  # renorm_min 1: none
    capped = guide(v, vt, vi, s._replace(renorm_min=0.0))
    norms = jnp.linalg.norm(capped.reshape(2, -1), axis=-1)
    assert np.all(norms <= jnp.linalg.norm(v.reshape(2, -1), axis=-1) + 1e-5)
    per_token = guide(v, vt, None, s._replace(renorm_min=0.0, renorm_type="channel"))
    assert np.all(jnp.linalg.norm(per_token, axis=-1) <= jnp.linalg.norm(v, axis=-1) + 1e-5)
    with pytest.raises(UserError, match="renorm_type"):
        guide(v, vt, vi, s._replace(renorm_type="local"))


def test_prompts_give_clear_errors():
    with pytest.raises(UserError, match="source image"):
        edit_contexts(TOK, None, ["make the red circle blue"], seq_config())
    with pytest.raises(UserError, match="2 source images but 1"):
        edit_contexts(TOK, np.stack([pixels(0), pixels(1)]), ["make it"], seq_config())
    with pytest.raises(UserError, match=r"exceeds data\.sequence\.max_len"):
        t2i_contexts(TOK, ["a very long prompt " * 4], seq_config(), SIZE)


def test_edit_rows_need_shapes_scenes_in_default_pixels():
    record = ShapesSource("train", 1)[0]
    seq = seq_config(max_len=160, bagel_tasks=dict(edit=1.0))
    with pytest.raises(UserError, match="image_mean"):
        bagel_example(np.zeros((32, 32, 3), np.float32), record, TOK, seq, np.random.default_rng(0))
    digit = {"caption": "a 3", "image": record["image"], "source": "digits"}
    with pytest.raises(UserError, match="shapes"):
        bagel_example(record["image"] / 127.5 - 1.0, digit, TOK, seq, np.random.default_rng(0))


def test_a_part_of_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="kind"):
        bagel_row([Part("audio")], TOK, seq_config(), SIZE)


@pytest.mark.slow
def test_sample_cli_draws_captions_and_edits_with_clear_errors(tmp_path, capsys):
    """A 2-step pixel-space bagel run, then `python -m mmjax.sample` three ways."""
    from PIL import Image

    from mmjax.sample import main
    from mmjax.train import train_and_evaluate
    from mmjax.train.config_cli import apply_overrides, load_config

    workdir = str(tmp_path / "bagel")
    config = load_config(os.path.join(REPO, "experiments", "bagel.py") + ":tiny_shapes")
    apply_overrides(config, [
        "total_steps=2", "batch_size=8", "model.depth=1", "model.width=32", "model.mlp_dim=64",
        "model.vision_depth=1", "latents.vae_workdir=", "model.image_shape=(32,32,3)",
        "model.patch_size=8",
    ])  # fmt: skip
    config.evals = {}
    train_and_evaluate(config, workdir)
    source = str(tmp_path / "scene.png")
    Image.fromarray(ShapesSource("test", 1)[0]["image"]).save(source)
    fast = ["--num", "2", "--num_steps", "3"]
    assert main(["--workdir", workdir, "--prompt", "a red circle", *fast]) == 0
    assert main(["--workdir", workdir, "--caption", "2"]) == 0
    assert main(["--workdir", workdir, "--edit", source, "--prompt", "make it blue", *fast]) == 0
    assert os.path.isfile(os.path.join(workdir, "samples", "edit_make_it_blue.png"))
    capsys.readouterr()
    assert main(["--workdir", workdir, "--edit", str(tmp_path / "none.png"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "--edit" in err and "no such file" in err
    assert main(["--workdir", workdir, "--edit", source]) == 2
    assert "--edit needs --prompt" in capsys.readouterr().err


@pytest.mark.long
def test_the_expert_ablation_trains_all_three_decoders_on_a_vaes_latents(tmp_path):
    """python -m mmjax.ablate bagel_experts.py, shrunk, on a random tiny VAE's latents: every
    layout trains (the LM loss falls), is judged and lands in the table with both held-out
    losses; the parameter counts order dense < MoE < MoT."""
    import json
    import subprocess
    import sys

    vae = random_vae_run(str(tmp_path / "vae"), jax.devices()[:1])
    overrides = [
        f"latents.vae_workdir={vae}", "model.depth=1", "model.width=32", "model.num_heads=2",
        "model.mlp_dim=64", "model.vision_depth=1", "model.unet_channels=8", "batch_size=16",
        "total_steps=40", "eval_every=40", "log_every=5", "data.shapes_num_train=64",
        "data.shapes_num_test=8", "optimizer.warmup_steps=2", "optimizer.lr=3e-3",
        "evals.generation.num_samples=4", "evals.generation.num_edits=4",
        "evals.generation.num_steps=2",
    ]  # fmt: skip
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    config = "experiments/ablations/bagel_experts.py"
    cmd = [sys.executable, "-m", "mmjax.ablate", "--config", config, "--workdir"]
    cmd += [str(tmp_path / "abl"), *(f"--config.{o}" for o in overrides)]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "abl" / "table.json") as f:
        results = json.load(f)["results"]
    assert list(results) == ["dense", "moe", "mot"]
    for name, result in results.items():
        for key in ("heldout_diffusion_loss", "heldout_lm_loss", "edit_accuracy"):
            assert np.isfinite(result[key]), (name, key)
        with open(tmp_path / "abl" / name / "metrics.jsonl") as f:
            lm = [r["lm_loss"] for r in map(json.loads, f) if "lm_loss" in r]
        assert lm[-1] < 0.7 * lm[0], (name, lm)
    params = [results[name]["params"] for name in ("dense", "moe", "mot")]
    assert params == sorted(params) and len(set(params)) == 3
