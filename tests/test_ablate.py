"""python -m mmjax.ablate: every variant trained into its own folder, one table of results."""

import json
import os
import subprocess
import sys

import ml_collections
import pytest
from helpers import REPO, TRANSFUSION_FAST

from mmjax.ablate import config_values, final_metrics, markdown_table, median_step_ms
from mmjax.errors import UserError

CONFIG = "experiments/ablations/transfusion_attention.py"


def _ablate(workdir: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    cmd = [sys.executable, "-m", "mmjax.ablate", "--config", CONFIG, "--workdir", workdir]
    return subprocess.run(
        [*cmd, *args, *TRANSFUSION_FAST], cwd=REPO, env=env, capture_output=True, text=True
    )


def test_final_metrics_keep_the_last_value_of_each_metric_without_bookkeeping():
    rows = [
        {"step": 2, "loss": 3.0, "learning_rate": 0.1},
        {"step": 4, "loss": 2.0, "grad_norm": 1.0},
        {"step": 4, "heldout_diffusion_loss": 0.5},
    ]
    assert final_metrics(rows) == {"step": 4, "loss": 2.0, "heldout_diffusion_loss": 0.5}
    table = markdown_table({"a": {"step": 4, "loss": 2.0}, "b": {"step": 4}})
    assert table.splitlines()[2:] == ["| a | 4 | 2 |", "| b | 4 | - |"]


def test_step_time_is_the_median_window_after_the_compiling_one():
    rows = [{"examples_per_sec": 1.0}, {"loss": 2.0}] + [
        {"examples_per_sec": r} for r in (100.0, 400.0, 200.0)
    ]
    assert median_step_ms(rows, batch_size=10) == pytest.approx(50.0)  # 10 / 200 per second
    assert median_step_ms(rows[:1], batch_size=10) is None


def test_config_columns_read_dotted_keys_and_name_a_missing_one():
    config = ml_collections.ConfigDict({"data": {"sequence": {"visual_tokens": 16}}})
    assert config_values(config, {"tokens": "data.sequence.visual_tokens"}) == {"tokens": 16}
    with pytest.raises(UserError, match=r"'tokens': the config has no key 'data\.seq\.visual'"):
        config_values(config, {"tokens": "data.seq.visual"})


def _results(workdir) -> dict:
    with open(workdir / "table.json") as f:
        return json.load(f)["results"]


@pytest.mark.long
def test_a_variant_runs_into_its_folder_and_the_table(tmp_path):
    out = _ablate(str(tmp_path), "--variants", "causal")
    assert out.returncode == 0, out.stderr[-3000:]
    results = _results(tmp_path)
    assert list(results) == ["causal"] and results["causal"]["step"] == 6
    assert {"heldout_diffusion_loss", "generation_accuracy", "lm_loss"} <= set(results["causal"])
    assert results["causal"]["params"] > 0 and results["causal"]["ms_per_step"] > 0
    assert os.path.exists(tmp_path / "causal" / "metrics.jsonl")
    assert "| causal |" in (tmp_path / "table.md").read_text()
    # a rerun reads the finished variant instead of training or evaluating it again
    again = _ablate(str(tmp_path), "--variants", "causal")
    assert again.returncode == 0 and "->" not in again.stderr
    assert _results(tmp_path) == results


def test_an_unknown_variant_is_one_clear_error(tmp_path):
    out = _ablate(str(tmp_path), "--variants", "sideways")
    assert out.returncode == 2
    assert "has no variants ['sideways']" in out.stderr.strip().splitlines()[-1]
