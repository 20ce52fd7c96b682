"""Staged training: a run starts from exactly the mapped subtrees of an earlier run's
checkpoint; UniFluid trains on a frozen CLIP image tower that stays bit-identical while the
rest trains and the optimizer holds no moments for it; bad input gives one error line."""

import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import FAST, REPO, tiny_clip_config, tree_digest

from mmjax.models import build_model
from mmjax.train import train_and_evaluate
from mmjax.train.__main__ import main as train_cli
from mmjax.train.build import fill_vocab_size, load_trained
from mmjax.train.config_cli import apply_overrides, load_config
from mmjax.train.loop import Trainer
from mmjax.train.metrics import read_metrics
from mmjax.train.stages import matches, param_paths
from mmjax.train.workdir import load_from_workdir

SOURCE_STEPS = 30  # the earlier run
TOWER = "image_tower"
CLIP_TINY = os.path.join(REPO, "experiments", "clip.py:tiny")


def _bytes(tree) -> dict[str, bytes]:
    """{path: the leaf's raw bytes}: equal bytes are bit-identical parameters."""
    return {p: np.asarray(x).tobytes() for p, x in param_paths(tree).items()}


def _under(prefix: str, tree) -> dict[str, bytes]:
    return {p[len(prefix) + 1 :]: b for p, b in _bytes(tree).items() if p.startswith(prefix + "/")}


@pytest.fixture(scope="module")
def clip_workdir(tmp_path_factory) -> str:
    workdir = str(tmp_path_factory.mktemp("earlier") / "clip")
    config = tiny_clip_config(total_steps=SOURCE_STEPS, checkpoint_every=SOURCE_STEPS)
    config.evals = {}
    config.optimizer.update(lr=3e-3)
    train_and_evaluate(config, workdir)
    return workdir


@pytest.mark.parametrize(
    "pattern, path, expected",
    [
        ("vit/**", "vit/encoder/block0/attn/query/kernel", True),
        ("vit/**", "vit", True),  # ** spans zero segments too
        ("vit/**", "vitamin/kernel", False),  # whole segments only
        ("**/bias", "lm/block0/mlp/fc1/bias", True),
        ("**/bias", "lm/block0/mlp/fc1/kernel", False),
        ("lm/block[01]/**", "lm/block1/attn/out/kernel", True),
        ("lm/block[01]/**", "lm/block2/attn/out/kernel", False),
        ("*/encoder/*/attn/**", "vit/encoder/block3/attn/key/bias", True),
        ("*_tower", "image_tower/cls", False),  # a pattern matches the whole path
    ],
)
def test_pattern_syntax(pattern, path, expected):
    assert matches(pattern, path) is expected


def test_staged_init_copies_exactly_the_mapped_subtree(clip_workdir):
    source = load_trained(clip_workdir).params
    # A new model: the earlier run's architecture with fresh values, and one more subtree.
    rng = np.random.default_rng(0)
    fresh = jax.tree.map(lambda x: jax.numpy.asarray(rng.normal(size=x.shape), x.dtype), source)
    fresh = {**fresh, "connector": {"kernel": jax.numpy.ones((4, 4))}}
    shardings = jax.tree.map(lambda x: x.sharding, fresh)
    init_from = dict(path=clip_workdir, step=SOURCE_STEPS, load={TOWER: TOWER})
    loaded = load_from_workdir(init_from, fresh, shardings)
    fresh_b, loaded_b, source_b = _bytes(fresh), _bytes(loaded), _bytes(source)
    tower = [p for p in fresh_b if p.startswith(f"{TOWER}/")]
    assert tower and all(loaded_b[p] == source_b[p] != fresh_b[p] for p in tower)
    rest = sorted(fresh_b.keys() - set(tower))
    assert "connector/kernel" in rest and all(loaded_b[p] == fresh_b[p] for p in rest)
    assert all(loaded_b[p] != source_b[p] for p in rest if p in source_b)


@pytest.mark.long
def test_unifluid_trains_on_a_frozen_clip_tower(clip_workdir, tmp_path):
    """experiments/unifluid.py:tiny_clip, shrunk: its ViT is the CLIP run's image tower, frozen
    bit for bit through real trainer steps and checkpoints, while every other parameter
    trains, the loss falls and the optimizer holds moments for the trained parameters only."""
    config = load_config(os.path.join(REPO, "experiments", "unifluid.py") + ":tiny_clip")
    apply_overrides(
        config,
        [
            f"init_from.path={clip_workdir}",
            "model.vision_depth=1",  # the shrunk CLIP's tower
            "model.depth=1",
            "model.width=32",
            "model.num_heads=2",
            "model.mlp_dim=64",
            "model.head_width=32",
            "data.tokenizer=byte",
            "batch_size=16",
            "total_steps=40",
            "log_every=5",
            "eval_every=1000",
            "checkpoint_every=20",
            "optimizer.warmup_steps=2",
        ],
    )
    config.evals = {}
    run = str(tmp_path / "unifluid")
    before = tree_digest(clip_workdir)
    train_and_evaluate(config, run)
    assert tree_digest(clip_workdir) == before  # the earlier workdir is only read

    final = load_trained(run).params
    middle = load_from_workdir(  # every parameter at step 20
        dict(path=run, step=20), final, jax.tree.map(lambda x: x.sharding, final)
    )
    vit = _under("vit", final)
    assert vit and vit == _under("vit", middle) == _under(TOWER, load_trained(clip_workdir).params)
    final_b, middle_b = _bytes(final), _bytes(middle)
    trained = sorted(p for p in final_b if not p.startswith("vit/"))
    assert all(final_b[p] != middle_b[p] for p in trained)

    losses = [r["loss"] for r in read_metrics(run) if "loss" in r]
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.5, losses

    trainer = Trainer(config, workdir=None, devices=jax.devices()[:1])
    opt_state = trainer.abstract_state(next(trainer.data_iterator())).opt_state
    moments = [p for p in param_paths(opt_state) if "/mu/" in p or "/nu/" in p]
    assert sorted(p.split("/mu/")[-1].split("/nu/")[-1] for p in moments) == sorted(trained * 2)


def _param_shapes(config, batch: dict) -> dict[str, tuple[int, ...]]:
    fill_vocab_size(config.model, 128)
    model = build_model(config.model)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), batch))["params"]
    return {p: tuple(x.shape) for p, x in param_paths(nn.meta.unbox(params)).items()}


@pytest.mark.parametrize("encoder", ["clip", "siglip"])
def test_unifluid_vit_has_the_image_tower_of_each_tiny_encoder(encoder):
    """unifluid.py:tiny_<encoder>'s ViT holds exactly the paths and shapes of the image tower
    of <encoder>.py:tiny (SigLIP's has no norm_pre), so the load of tiny_<encoder> fits."""
    tower = _param_shapes(
        load_config(os.path.join(REPO, "experiments", f"{encoder}.py:tiny")),
        {"image": jnp.zeros((1, 8, 8, 3)), "text": jnp.zeros((1, 16), jnp.int32)},
    )
    length, patches = 32, jnp.arange(16)[None]
    unifluid = _param_shapes(
        load_config(os.path.join(REPO, "experiments", f"unifluid.py:tiny_{encoder}")),
        {
            "tokens": jnp.zeros((1, length), jnp.int32),
            "positions": jnp.arange(length)[None],
            "segment_ids": jnp.ones((1, length), jnp.int32),
            "span_ids": jnp.zeros((1, length), jnp.int32),
            "understand_images": jnp.zeros((1, 8, 8, 1)),  # grey, repeated to 3 channels
            "feature_positions": patches,
        },
    )
    vit = {p.removeprefix("vit/"): s for p, s in unifluid.items() if p.startswith("vit/")}
    assert vit == {p.removeprefix(f"{TOWER}/"): s for p, s in tower.items() if p.startswith(TOWER)}
    assert any(p.startswith("norm_pre/") for p in vit) == (encoder == "clip")


def _train_cli(workdir: str, *flags: str) -> int:
    """The training CLI in this process (the shrunk tiny CLIP); returns its exit code."""
    argv = ["--config", CLIP_TINY, "--workdir", workdir, *FAST]
    return train_cli(argv + [f"--config.{f}" for f in flags])


def _from_workdir(path: str) -> list[str]:
    return [
        "init_from.format=workdir",
        f"init_from.path={path}",
        f"init_from.load={{'{TOWER}': '{TOWER}'}}",
        f"optimizer.frozen=['{TOWER}/**']",
    ]


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (  # another MLP width: the tower's shapes differ
            ["model.image.mlp_dim=128"],
            [
                "init_from: image_tower/encoder/block0/mlp/fc1/bias is (256,) in ",
                " but (128,) here; image_tower/encoder/block0/mlp/fc1/kernel is (64, 256) in ",
            ],
        ),
        (["init_from.load={'image_tower': 'vision'}"], ["init_from.load: 'vision' is not in "]),
        (
            ["optimizer.frozen=['vision/**']"],
            ["optimizer.frozen pattern 'vision/**' matches no parameter", "'image_tower'"],
        ),
        (["init_from.path=/nonexistent/run"], ["init_from.path: ", "a training workdir?"]),
        (["init_from.step=7"], ["init_from.step 7 has no complete checkpoint", "available: [30]"]),
    ],
)
def test_bad_stage_config_is_one_error_line(clip_workdir, tmp_path, capsys, overrides, fragments):
    assert _train_cli(str(tmp_path / "w"), *_from_workdir(clip_workdir), *overrides) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmjax.train: error: "), lines
    assert all(f in lines[0] for f in fragments), lines[0]


def test_resuming_takes_precedence_over_init_from(clip_workdir, tmp_path, capsys):
    """A workdir with checkpoints resumes; init_from (here: gone) is not read again."""
    workdir = str(tmp_path / "resumed")
    shutil.copytree(clip_workdir, workdir)
    config = tiny_clip_config(total_steps=SOURCE_STEPS)
    config.evals = {}
    config.init_from.update(format="workdir", path="/nonexistent/run", load={TOWER: TOWER})
    train_and_evaluate(config, workdir)
    assert f"Training already finished at step {SOURCE_STEPS}" in capsys.readouterr().out


# ---------------------------------------------------------------- several earlier workdirs
@pytest.fixture(scope="module")
def other_clip_workdir(tmp_path_factory) -> str:
    """A second earlier run (another seed, fewer steps): every parameter differs."""
    workdir = str(tmp_path_factory.mktemp("other") / "clip")
    config = tiny_clip_config(total_steps=4, checkpoint_every=4)
    config.evals = {}
    config.seed = 1
    train_and_evaluate(config, workdir)
    return workdir


def test_two_sources_fill_disjoint_subtrees_exactly(clip_workdir, other_clip_workdir):
    """init_from loads the image tower from one run, init_from.more.text the text tower from
    another: each bit-identical to its own run; the rest stays this run's."""
    first, second = load_trained(clip_workdir).params, load_trained(other_clip_workdir).params
    rng = np.random.default_rng(0)
    fresh = jax.tree.map(lambda x: jax.numpy.asarray(rng.normal(size=x.shape), x.dtype), first)
    shardings = jax.tree.map(lambda x: x.sharding, fresh)
    init_from = dict(
        path=clip_workdir,
        load={TOWER: TOWER},
        more={"text": dict(path=other_clip_workdir, step=4, load={"text_tower": "text_tower"})},
    )
    loaded = load_from_workdir(init_from, fresh, shardings)
    assert _under(TOWER, loaded) == _under(TOWER, first) != _under(TOWER, second)
    assert _under("text_tower", loaded) == _under("text_tower", second)
    assert _under("text_tower", loaded) != _under("text_tower", first)
    rest = [p for p in _bytes(fresh) if not p.startswith((f"{TOWER}/", "text_tower/"))]
    assert rest and all(_bytes(loaded)[p] == _bytes(fresh)[p] for p in rest)


@pytest.mark.long
def test_more_sources_from_the_command_line_and_config_json(clip_workdir, tmp_path):
    """`init_from.more` replaced by a dict literal, then one key of a source set alone; the
    config.json of the run reads back with the same sources, and resuming keeps them."""
    config = load_config(CLIP_TINY)
    more = "{'text': {'path': '/x', 'load': {'text_tower': 'text_tower'}}}"
    apply_overrides(config, [f"init_from.more={more}", f"init_from.more.text.path={clip_workdir}"])
    assert config.init_from.more.text.to_dict() == {
        "path": clip_workdir,
        "load": {"text_tower": "text_tower"},
    }
    run = str(tmp_path / "w")
    flags = [f"init_from.more={more}", f"init_from.more.text.path={clip_workdir}"]
    load = f"init_from.load={{'{TOWER}': '{TOWER}'}}"
    base = ["init_from.format=workdir", f"init_from.path={clip_workdir}", load]
    assert _train_cli(run, *base, *flags) == 0
    assert _train_cli(run, *base, *flags, "total_steps=9") == 0  # resumes from step 6
    written = load_trained(run).config.init_from
    assert written.more.text.path == clip_workdir
    assert dict(written.more.text.load) == {"text_tower": "text_tower"}
    trained = load_trained(run).params
    assert _under("text_tower", trained) != _under("text_tower", load_trained(clip_workdir).params)


def _bad_more(clip: str) -> list[tuple[list[str], list[str]]]:
    tower = f"{{'{TOWER}/encoder': '{TOWER}/encoder'}}"
    text = "{'text_tower': 'text_tower'}"
    return [
        (  # the image tower's encoder again, from a second source
            [f"init_from.more={{'b': {{'path': '{clip}', 'load': {tower}}}}}"],
            [
                f"init_from: {TOWER}/encoder/",
                f" is loaded by both init_from ({clip}) and init_from.more.b ({clip})",
            ],
        ),
        (
            ["init_from.more={'lm': {'path': '/nonexistent/run', 'load': {'a': 'b'}}}"],
            ["init_from.more.lm.path: ", "a training workdir?"],
        ),
        (  # another text MLP width: only the second source's shapes differ
            [
                f"init_from.more={{'b': {{'path': '{clip}', 'load': {text}}}}}",
                "model.text.mlp_dim=32",
            ],
            ["init_from.more.b: text_tower/", " in ", " but (32,) here"],
        ),
        (
            [f"init_from.more={{'b': {{'load': {text}}}}}"],
            ["init_from.more.b needs a path"],
        ),
        (
            [f"init_from.more={{'b': {{'path': '{clip}', 'lod': {text}}}}}"],
            ["init_from.more.b: unknown keys ['lod']"],
        ),
        (
            [f"init_from.more={{'b': {{'path': '{clip}', 'step': 7, 'load': {text}}}}}"],
            ["init_from.more.b.step 7 has no complete checkpoint", "available: [30]"],
        ),
    ]


@pytest.mark.parametrize("case", range(6))
def test_bad_second_source_is_one_error_line(clip_workdir, tmp_path, capsys, case):
    overrides, fragments = _bad_more(clip_workdir)[case]
    assert _train_cli(str(tmp_path / "w"), *_from_workdir(clip_workdir), *overrides) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmjax.train: error: "), lines
    assert all(f in lines[0] for f in fragments), lines[0]


@pytest.mark.long
def test_a_token_embedding_from_another_tokenizer_is_an_error(tmp_path, capsys):
    """A text tower (its token embedding has a "vocab" axis) trained with a 128-piece
    SentencePiece vocabulary cannot load into a run with a 100-piece one: both pad to 128
    rows, so only the tokenizer check tells them apart. The image tower alone loads."""
    earlier = str(tmp_path / "earlier")
    sentencepiece = [f for f in FAST if "tokenizer=byte" not in f]
    assert train_cli(["--config", CLIP_TINY, "--workdir", earlier, *sentencepiece]) == 0
    capsys.readouterr()
    flags = [
        "--config.init_from.format=workdir",
        f"--config.init_from.path={earlier}",
        "--config.init_from.load={'text_tower': 'text_tower'}",
        "--config.data.vocab_size=100",
    ]
    argv = ["--config", CLIP_TINY, "--workdir", str(tmp_path / "w"), *sentencepiece, *flags]
    assert train_cli(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    for fragment in [
        "init_from: text_tower/",
        "(a 'vocab' axis) is loaded from ",
        "trained with another tokenizer (128 ids there, 100 here)",
        "data.vocab_size 128 there, 100 here",
    ]:
        assert fragment in lines[0], lines[0]
    flags[2] = f"--config.init_from.load={{'{TOWER}': '{TOWER}'}}"
    argv = ["--config", CLIP_TINY, "--workdir", str(tmp_path / "w2"), *sentencepiece, *flags]
    assert train_cli(argv) == 0
