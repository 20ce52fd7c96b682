"""The spine of train/: `build(config)` is pure, reading a workdir reads parameters only, the
initial-parameters decision, and no import circle among the train modules."""

import ast
import json
import os
from pathlib import Path

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from helpers import REPO, tiny_clip_config

import mmjax.train.checkpoint
import mmjax.train.optimizer
from mmjax.errors import UserError
from mmjax.train import train_and_evaluate
from mmjax.train.build import build, load_trained
from mmjax.train.config_cli import apply_overrides, load_config
from mmjax.train.metrics import read_metrics
from mmjax.train.workdir import initial_params

TRAIN = Path(REPO, "mmjax", "train")


def _train_imports(path: Path) -> set[str]:
    """The mmjax.train modules `path` imports anywhere (top level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "mmjax.train":
                names |= {a.name for a in node.names}
            elif node.module.startswith("mmjax.train."):
                names.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[2] for a in node.names if a.name.startswith("mmjax.train.")}
    return names - {path.stem}


def test_the_train_modules_import_each_other_without_a_circle():
    graph = {p.stem: _train_imports(p) for p in TRAIN.glob("*.py") if p.stem != "__init__"}
    graph = {m: {d for d in deps if d in graph} for m, deps in graph.items()}
    assert {"build", "workdir", "loop"} <= graph.keys()
    assert "loop" not in graph["workdir"] | graph["build"] | graph["latents"]
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, " -> ".join((*path, module))
        if module not in done:
            for dep in graph[module]:
                visit(dep, (*path, module))
            done.add(module)

    for module in graph:
        visit(module, ())


def test_build_leaves_its_config_unchanged_and_returns_it_resolved():
    config = tiny_clip_config()
    before = config.to_json(sort_keys=True)
    assert config.model.text.vocab_size == 0  # filled from the tokenizer
    bundle = build(config, devices=jax.devices()[:1])
    assert config.to_json(sort_keys=True) == before
    assert bundle.config.model.text.vocab_size == -(-bundle.tokenizer.vocab_size // 128) * 128
    assert bundle.config is not config
    shapes = bundle.abstract_params()
    (embedding,) = jax.tree.leaves(shapes["text_tower"]["token_embedding"])
    assert embedding.shape[0] == bundle.config.model.text.vocab_size


def test_the_initial_parameters_are_decided_in_one_order():
    workdir = {"format": "workdir", "path": "/earlier"}
    imported = {"format": "open_clip", "path": "/ckpt.bin", "name": "ViT-B-32"}
    assert initial_params(imported, latest_step=7).source == "resume"
    assert "step 7" in initial_params(workdir, latest_step=7).reason
    assert initial_params(imported, latest_step=None).source == "import"
    assert initial_params(workdir, latest_step=None).source == "workdir"
    assert initial_params({"format": ""}, latest_step=None).source == "fresh"


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory) -> str:
    workdir = str(tmp_path_factory.mktemp("clip"))
    train_and_evaluate(tiny_clip_config(total_steps=4, checkpoint_every=2), workdir)
    return workdir


@pytest.mark.slow
def test_a_resumed_run_writes_the_same_resolved_config_json(clip_run, capsys):
    written = Path(clip_run, "config.json").read_bytes()
    assert json.loads(written)["model"]["text"]["vocab_size"] > 0  # resolved, not 0
    train_and_evaluate(tiny_clip_config(total_steps=4, checkpoint_every=2), clip_run)
    assert "Resuming from step 4" in capsys.readouterr().out
    assert Path(clip_run, "config.json").read_bytes() == written


def _refuse(what: str):
    def refuse(*args, **kwargs):
        raise AssertionError(f"{what} was called to read a trained workdir")

    return refuse


@pytest.fixture
def parameters_only(monkeypatch) -> list[set[str]]:
    """Fails the test if an optimizer is built or a whole train state restored; collects the
    top-level items of every checkpoint read."""
    monkeypatch.setattr(mmjax.train.optimizer, "make_optimizer", _refuse("make_optimizer"))
    monkeypatch.setattr(optax, "adamw", _refuse("optax.adamw"))
    monkeypatch.setattr(mmjax.train.checkpoint.Checkpointer, "restore", _refuse("restore"))
    reads: list[set[str]] = []
    restore = ocp.PyTreeCheckpointHandler.restore

    def recording(self, directory, *args, **kwargs):
        reads.append(set(kwargs["args"].item))
        return restore(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "restore", recording)
    return reads


@pytest.mark.slow
def test_evaluate_reads_parameters_only(clip_run, parameters_only):
    from mmjax.evaluate import evaluate

    result = evaluate(clip_run)
    assert result["step"] == 4 and 0.0 <= result["zero_shot_accuracy"] <= 1.0
    assert parameters_only == [{"params"}]


@pytest.mark.slow
def test_sample_reads_parameters_only_and_draws_and_captions(tmp_path, request):
    """A 2-step tiny Transfusion run, then `python -m mmjax.sample` both ways."""
    from mmjax.sample import main

    workdir = str(tmp_path / "tf")
    config = load_config(os.path.join(REPO, "experiments", "transfusion.py") + ":tiny")
    apply_overrides(
        config,
        ["total_steps=2", "model.depth=1", "model.width=32", "model.mlp_dim=64", "batch_size=8"],
    )
    config.evals = {}
    train_and_evaluate(config, workdir)
    parameters_only = request.getfixturevalue("parameters_only")
    draw = ["--prompt", "a red circle", "--num", "2", "--num_steps", "4"]
    assert main(["--workdir", workdir, *draw]) == 0
    assert main(["--workdir", workdir, "--caption", "2"]) == 0
    assert Path(workdir, "samples", "a_red_circle.png").is_file()
    assert Path(workdir, "samples", "captions.png").is_file()
    assert parameters_only == [{"params"}, {"params"}]


def test_reading_a_workdir_without_a_checkpoint_is_one_clear_error(tmp_path):
    Path(tmp_path, "config.json").write_text(tiny_clip_config().to_json())
    with pytest.raises(UserError, match="no complete checkpoint in"):
        load_trained(str(tmp_path))


# --- a family declared from this file alone ---------------------------------------------------


class ToyCaptioner(nn.Module):
    """Mean image colour -> the caption's first word: a family only this test knows."""

    vocab_size: int
    width: int = 16

    @nn.compact
    def __call__(self, batch, train: bool = False):
        pooled = batch["image"].mean(axis=(1, 2))
        hidden = nn.relu(nn.Dense(self.width)(pooled))
        return {"logits": nn.Dense(self.vocab_size)(hidden)}


def make_first_word_loss(apply_fn):
    def loss(params, batch, rng):
        logits = apply_fn(params, batch, rng)["logits"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["text"][:, 1])
        return ce.mean(), {"loss": ce.mean()}

    return loss


@pytest.fixture
def toy_family():
    import mmjax.families as families
    from mmjax import models, objectives

    family = families.register(
        families.Family(
            "toy_captioner",
            ToyCaptioner,
            ("first_word",),
            {"image": families.BatchKey((4,), "float"), "text": families.BatchKey((2,), "int")},
        ),
        first_word=make_first_word_loss,
    )
    yield family
    families.FAMILIES.pop(family.name)
    models.MODELS.pop(family.name)
    objectives.OBJECTIVES.pop("first_word")


def toy_config(**overrides):
    config = tiny_clip_config(total_steps=2, log_every=1, **overrides)
    config.model = ml_collections.ConfigDict({"name": "toy_captioner", "vocab_size": 0})
    config.objective = ml_collections.ConfigDict({"name": "first_word"})
    config.evals = ml_collections.ConfigDict()
    return config


def test_a_family_registered_from_a_test_file_trains(toy_family, tmp_path):
    workdir = str(tmp_path / "toy")
    final = train_and_evaluate(toy_config(), workdir)
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert np.isfinite(final["loss"]) and final["loss"] > 0
    assert json.loads(Path(workdir, "config.json").read_text())["model"]["vocab_size"] > 0


def test_a_config_or_batch_that_does_not_fit_its_family_is_one_error(toy_family, tmp_path):
    import mmjax.families as families

    config = toy_config()
    config.objective.name = "clip"
    with pytest.raises(UserError, match=r"objective\.name 'clip' does not train model\.name"):
        build(config, devices=jax.devices()[:1])
    config = toy_config()
    config.evals = ml_collections.ConfigDict({"zs": {"type": "zero_shot"}})
    with pytest.raises(UserError, match=r"evals\.zs\.type 'zero_shot' does not evaluate"):
        build(config, devices=jax.devices()[:1])
    batch = {"image": np.zeros((2, 8, 8, 3), np.float32), "text": np.zeros((2, 4), np.int32)}
    families.check_batch(toy_family, batch)
    with pytest.raises(UserError, match="the batch has no 'text'"):
        families.check_batch(toy_family, {"image": batch["image"]})
    with pytest.raises(UserError, match=r"batch\['text'\] is float32 of shape \(2, 4\)"):
        families.check_batch(toy_family, {**batch, "text": batch["text"].astype(np.float32)})


# --- a checkpoint between scanned and unscanned layouts ----------------------------------------


@pytest.fixture(scope="module")
def deep_clip_run(tmp_path_factory) -> str:
    """A tiny CLIP with 3-block towers, trained unscanned (block0..block2) for 2 steps."""
    workdir = str(tmp_path_factory.mktemp("deep_clip"))
    config = tiny_clip_config(total_steps=2)
    apply_overrides(config, ["model.image.depth=3", "model.text.depth=3"])
    train_and_evaluate(config, workdir)
    return workdir


def _scanned(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    apply_overrides(config, ["model.image.scan_layers=true", "model.text.scan_layers=true"])
    return config


@pytest.mark.slow
def test_a_checkpoint_reads_into_the_other_layout_with_the_same_outputs(deep_clip_run):
    from mmjax.data import first_example
    from mmjax.train.workdir import read_config, read_params

    plain = load_trained(deep_clip_run)
    bundle = build(_scanned(read_config(deep_clip_run)), deep_clip_run)
    step, scanned = read_params(deep_clip_run, bundle.abstract_params())
    assert step == plain.step == 2
    tower = scanned["image_tower"]["encoder"]
    assert set(tower) == {"layers", "last"}  # 2 stacked blocks + the last
    example = first_example(plain.config.data, plain.bundle.tokenizer)
    batch = {k: np.asarray(v)[None] for k, v in example.items()}
    want = plain.bundle.model.apply({"params": plain.params}, batch)
    got = bundle.model.apply({"params": scanned}, batch)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_init_from_an_unscanned_run_fills_a_scanned_one(deep_clip_run, tmp_path):
    from mmjax.train.workdir import read_config

    config = _scanned(read_config(deep_clip_run))
    config.total_steps = 1
    config.optimizer.frozen = ("image_tower/**",)  # one step leaves it as loaded
    config.init_from = ml_collections.ConfigDict(
        {"format": "workdir", "path": deep_clip_run, "load": {"image_tower": "image_tower"}}
    )
    workdir = str(tmp_path / "scanned")
    train_and_evaluate(config, workdir)
    plain = load_trained(deep_clip_run).params["image_tower"]["encoder"]
    scanned = load_trained(workdir).params["image_tower"]["encoder"]
    for i in range(2):
        for a, b in zip(
            jax.tree.leaves(plain[f"block{i}"]),
            jax.tree.leaves(jax.tree.map(lambda x, i=i: x[i], scanned["layers"])),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(
        jax.tree.leaves(plain["block2"]), jax.tree.leaves(scanned["last"]), strict=True
    ):
        np.testing.assert_array_equal(a, b)
