"""The generic trainer end to end on the tiny CLIP: loss falls, workdir contents, resume."""

import glob
import json
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
from helpers import tiny_clip_config

from mmjax import parallel
from mmjax.train import train_and_evaluate
from mmjax.train.loop import Trainer
from mmjax.train.metrics import read_metrics


def test_a_few_training_steps_lower_the_loss():
    config = tiny_clip_config(total_steps=40)  # the cosine schedule spans the 40 steps
    config.optimizer.update(lr=3e-3, warmup_steps=3)
    trainer = Trainer(config, workdir=None, devices=jax.devices()[:1])
    data = trainer.data_iterator()
    batches = [next(data) for _ in range(4)]
    state, shardings = trainer.init_state(batches[0])
    losses = []
    with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
        step = trainer.jit_train_step(shardings)
        for i in range(40):
            state, metrics = step(state, parallel.global_batch(batches[i % 4], trainer.mesh))
            losses.append(float(metrics["loss"]))
    chance = np.log(config.batch_size)  # the InfoNCE loss of uniform logits
    assert np.mean(losses[-4:]) < min(0.85 * np.mean(losses[:4]), chance - 0.3), losses


def test_run_writes_the_workdir_and_resumes(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    train_and_evaluate(tiny_clip_config(total_steps=6), workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["total_steps"] == 6
    records = read_metrics(workdir)
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
    assert {"loss", "learning_rate", "examples_per_sec"} <= set(records[0])
    assert 0.0 <= records[-1]["zero_shot_accuracy"] <= 1.0
    assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
    capsys.readouterr()

    train_and_evaluate(tiny_clip_config(total_steps=9), workdir)
    assert "Resuming from step 6" in capsys.readouterr().out
    steps = [r["step"] for r in read_metrics(workdir) if "loss" in r]
    assert steps == [2, 4, 6, 8, 9]


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    for workdir in (straight, resumed):
        train_and_evaluate(tiny_clip_config(total_steps=6), workdir)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))  # as if killed after step 3's save
    train_and_evaluate(tiny_clip_config(total_steps=6), resumed)
    last = [read_metrics(d)[-2] for d in (straight, resumed)]  # [-1] is the eval record
    assert last[0]["step"] == last[1]["step"] == 6
    np.testing.assert_allclose(last[0]["loss"], last[1]["loss"], rtol=1e-6)
