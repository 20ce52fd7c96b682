"""Evals: Recall@K and the linear probe on known inputs; all evals of the tiny CLIP run."""

import numpy as np
import pytest
from helpers import tiny_clip_config
from sklearn.datasets import make_blobs

from mmjax.evals.linear_probe import fit_probe
from mmjax.evals.retrieval import recall_at_k
from mmjax.evaluate import evaluate, main
from mmjax.train import train_and_evaluate
from mmjax.train.metrics import read_metrics


def test_recall_at_k_counts_the_rank_of_the_first_positive():
    similarity = np.array([[0.9, 0.8, 0.1], [0.2, 0.1, 0.3], [0.5, 0.4, 0.6]])
    positives = np.eye(3, dtype=bool)
    # row 0: positive ranked 1st; row 1: ranked 3rd; row 2: ranked 1st
    assert recall_at_k(similarity, positives, ks=(1, 2, 3)) == {1: 2 / 3, 2: 2 / 3, 3: 1.0}
    duplicate = positives | np.array([[0, 0, 0], [0, 0, 1], [0, 1, 0]], dtype=bool)
    assert recall_at_k(similarity, duplicate, ks=(1,))[1] == 1.0  # repeated captions count


def test_linear_probe_separates_separable_features():
    x, y = make_blobs(400, n_features=16, centers=4, cluster_std=2.0, random_state=0)
    probe = fit_probe(x[:300], y[:300])
    assert probe.score(x[300:], y[300:]) > 0.95
    shuffled = fit_probe(x[:300], np.random.default_rng(0).permutation(y[:300]))
    assert shuffled.score(x[300:], y[300:]) < 0.5  # no signal, no accuracy


@pytest.mark.slow  # a whole tiny run; CI runs it
def test_tiny_run_writes_every_eval_metric(tmp_path):
    workdir = str(tmp_path / "w")
    final = train_and_evaluate(tiny_clip_config(total_steps=4), workdir)
    names = {"zero_shot_accuracy", "linear_probe_accuracy"}
    names |= {f"retrieval_{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert names <= set(final)
    last = read_metrics(workdir)[-1]
    assert names <= set(last) and last["step"] == 4
    for name in names:
        assert 0.0 <= last[name] <= 1.0
    assert last["retrieval_i2t_r1"] <= last["retrieval_i2t_r5"] <= last["retrieval_i2t_r10"]

    standalone = evaluate(workdir)  # python -m mmjax.evaluate --workdir ...
    assert standalone["step"] == 4
    for name in names:
        assert standalone[name] == pytest.approx(last[name], abs=1e-6), name
    assert read_metrics(workdir)[-1] == standalone


def test_evaluate_cli_on_a_directory_without_a_run(tmp_path, capsys):
    assert main(["--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json does not exist" in err[0]
