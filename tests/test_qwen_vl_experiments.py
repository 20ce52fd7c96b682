"""The tiny Qwen-VL experiments train: the grounding rows' loss falls within a few dozen steps
at mixed image sizes (slow), and the whole video experiment answers which way the shape moves
on held-out videos (long: `bash .ci/run -m long`)."""

import os

import pytest
from helpers import REPO

from mmjax.train import train_and_evaluate
from mmjax.train.config_cli import apply_overrides, load_config
from mmjax.train.metrics import read_metrics


@pytest.mark.slow
def test_the_grounding_loss_falls_and_the_eval_scores_it(tmp_path):
    config = load_config(os.path.join(REPO, "experiments", "qwen2_5_vl.py:tiny"))
    apply_overrides(
        config,
        [
            "total_steps=60",
            "batch_size=8",
            "log_every=10",
            "eval_every=60",
            "checkpoint_every=60",
            "optimizer.warmup_steps=10",
            "data.scenes_num_train=500",
            "data.scenes_num_test=8",
            "evals.qwen_vl.num_samples=4",
            "evals.qwen_vl.batch_size=8",
        ],
    )
    config.evals.qwen_vl.max_new_tokens = 8  # a key the preset leaves at its default
    workdir = tmp_path / "run"
    final = train_and_evaluate(config, str(workdir))
    losses = [r["loss"] for r in read_metrics(str(workdir)) if "loss" in r]
    assert losses[0] > 2 * losses[-1], losses
    metrics = ("grounding_miou", "grounding_accuracy", "caption_accuracy")
    assert all(0.0 <= final[m] <= 1.0 for m in metrics), final
    assert sorted(os.listdir(workdir / "samples")) == ["qwen_vl_001.png", "qwen_vl_001.txt"]


@pytest.mark.long
def test_the_video_experiment_answers_the_motion(tmp_path):
    """experiments/qwen2_5_vl.py:tiny_video as it is (1,500 steps): video_accuracy >= 0.9 on
    200 held-out videos (measured 1.0)."""
    config = load_config(os.path.join(REPO, "experiments", "qwen2_5_vl.py:tiny_video"))
    final = train_and_evaluate(config, str(tmp_path / "run"))
    assert final["video_accuracy"] >= 0.9, final
