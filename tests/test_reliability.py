"""Reliability: NaN policy, torn checkpoints, incompatible workdirs, resharded restore, kill -9."""

import glob
import os
import random
import shutil
import signal
import subprocess
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import cli, tiny_clip_config, tree_digest

from mmjax.errors import TrainingError, UserError
from mmjax.train import train_and_evaluate
from mmjax.train.loop import Trainer
from mmjax.train.metrics import read_metrics


class InjectNaN(grain.DatasetIterator):
    """Passes batches through, with NaN images at the given (1-based) training steps."""

    def __init__(self, parent: grain.DatasetIterator, steps: set[int]):
        super().__init__(parent)
        self.steps, self.count = steps, 0

    def __next__(self):
        batch = next(self._parent)
        self.count += 1
        if self.count in self.steps:
            batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
        return batch

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


def inject_nan(monkeypatch, steps: set[int]) -> None:
    original = Trainer.data_iterator
    monkeypatch.setattr(Trainer, "data_iterator", lambda self: InjectNaN(original(self), steps))


def test_nan_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    inject_nan(monkeypatch, {3, 4})
    workdir = str(tmp_path / "w")
    final = train_and_evaluate(tiny_clip_config(total_steps=8, max_bad_steps=2), workdir)
    assert final["skipped_steps"] == 2 and np.isfinite(final["loss"])
    records = {r["step"]: r for r in read_metrics(workdir) if "loss" in r}
    assert records[2]["skipped_steps"] == 0 and records[4]["skipped_steps"] == 2
    assert np.isnan(records[4]["loss"]) and np.isfinite(records[6]["loss"])


def test_too_many_nan_steps_stop_training_keeping_the_last_good_checkpoint(tmp_path, monkeypatch):
    inject_nan(monkeypatch, set(range(5, 100)))
    workdir = str(tmp_path / "w")
    config = tiny_clip_config(total_steps=30, max_bad_steps=3, checkpoint_every=3)
    with pytest.raises(TrainingError) as err:
        train_and_evaluate(config, workdir)
    message = str(err.value)
    assert "NaN/Inf for 4 consecutive steps (5..8)" in message
    assert "max_bad_steps=3" in message and "last good checkpoint is step 3" in message
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> str:
    """A tiny run to step 6 with checkpoints at 2, 4 and 6."""
    workdir = str(tmp_path_factory.mktemp("trained") / "w")
    train_and_evaluate(tiny_clip_config(total_steps=6, checkpoint_every=2), workdir)
    return workdir


def _truncate_largest_array_file(step_dir: str) -> None:
    files = [
        os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs
    ]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)


CORRUPTIONS = {
    "truncated_array_file": (_truncate_largest_array_file, "reading it failed"),
    "missing_commit_marker": (
        lambda d: os.remove(os.path.join(d, "commit_success.txt")),
        "it has no commit marker",
    ),
    "half_written_step": (
        lambda d: shutil.rmtree(os.path.join(d, "data")),
        "its items ['data'] are missing or incomplete",
    ),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_torn_checkpoint_falls_back_to_the_previous_step(trained, tmp_path, capsys, corruption):
    workdir = str(tmp_path / "w")
    shutil.copytree(trained, workdir)
    corrupt, reason = CORRUPTIONS[corruption]
    corrupt(os.path.join(workdir, "checkpoints", "6"))
    capsys.readouterr()
    train_and_evaluate(tiny_clip_config(total_steps=6, checkpoint_every=2), workdir)
    out = capsys.readouterr().out
    torn = os.path.join(workdir, "checkpoints_torn", "6")
    assert f"Checkpoint at step 6 is unusable: {reason}" in out
    assert f"Moved it to {torn}" in out
    assert "Resuming from step 4" in out
    assert os.path.isdir(torn)  # kept for inspection, never deleted
    assert "6" in os.listdir(os.path.join(workdir, "checkpoints"))  # saved again


def test_incompatible_checkpoint_refuses_to_resume(trained, tmp_path):
    workdir = str(tmp_path / "w")
    shutil.copytree(trained, workdir)
    before = tree_digest(workdir)
    config = tiny_clip_config(total_steps=8)
    config.model.embed_dim = 32
    with pytest.raises(UserError) as err:
        train_and_evaluate(config, workdir)
    message = str(err.value)
    assert "does not match this config, refusing to resume" in message
    assert "image_head/kernel is (64, 64) float32 in the checkpoint but (64, 32) float32" in message
    after = tree_digest(workdir)
    assert {k: v for k, v in after.items() if "tfevents" not in k} == {
        k: v for k, v in before.items() if "tfevents" not in k
    }


@pytest.mark.slow
def test_checkpoint_from_8_devices_restores_on_4(tmp_path):
    straight, moved = str(tmp_path / "straight"), str(tmp_path / "moved")
    fsdp8 = ["--config.mesh.data=1", "--config.mesh.fsdp=8"]
    run = subprocess.run(
        **cli(straight, *fsdp8, devices=8), capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    shutil.copytree(straight, moved)
    shutil.rmtree(os.path.join(moved, "checkpoints", "6"))  # as if stopped after step 3
    on4 = ["--config.mesh.data=2", "--config.mesh.fsdp=2"]
    run = subprocess.run(**cli(moved, *on4, devices=4), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "Resuming from step 3" in run.stdout
    losses = [
        [r["loss"] for r in read_metrics(d) if r["step"] == 6 and "loss" in r]
        for d in (straight, moved)
    ]
    np.testing.assert_allclose(losses[1][-1], losses[0][-1], rtol=1e-5, atol=1e-5)


def _final_state(workdir: str, step: int):
    with ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"),
        item_handlers={"state": ocp.StandardCheckpointHandler()},
    ) as manager:
        return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))[
            "state"
        ]


@pytest.mark.parametrize(
    "experiment", ["clip", pytest.param("transfusion", marks=pytest.mark.long)]
)
@pytest.mark.slow
def test_kill_9_at_a_random_step_then_resume_is_bitwise_identical(tmp_path, experiment):
    total = ["--config.total_steps=14", "--config.checkpoint_every=2", "--config.log_every=1"]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    kw = dict(experiment=experiment)
    run = subprocess.run(**cli(straight, *total, **kw), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    kill_at = random.Random().randint(3, 11)
    proc = subprocess.Popen(
        **cli(killed, *total, **kw), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 180
    while time.time() < deadline:
        steps = [r["step"] for r in read_metrics(killed)] if os.path.exists(killed) else []
        # kill once step kill_at ran and a checkpoint has committed (saves are async, so an
        # earlier kill would rightly start over and leave nothing to resume from)
        committed = glob.glob(os.path.join(killed, "checkpoints", "*", "commit_success.txt"))
        if steps and max(steps) >= kill_at and committed:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(
        **cli(killed, *total, **kw), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from step" in resumed.stdout, (kill_at, resumed.stdout)
    a, b = _final_state(straight, 14), _final_state(killed, 14)
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 10
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y)), f"killed at step {kill_at}"
