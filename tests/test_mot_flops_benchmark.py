"""benchmarks/mot_flops.py at a small shape: one JSON line, and on a TPU chip the MoT and MoE
train steps cost what the dense one does (within 10%), while XLA:CPU's ragged dot does not."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "mot_flops.py"


@pytest.mark.slow
def test_the_routed_train_step_costs_the_dense_ones_flops_on_tpu(capsys):
    spec = importlib.util.spec_from_file_location("mot_flops", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = ["--width", "256", "--depth", "1", "--batch", "4", "--image_size", "64"]
    assert module.main([*args, "--max_len", "128"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["tpu"]) == {"dense", "moe", "mot"}
    assert 1.0 <= out["tpu_mot_over_dense"] < 1.1
    assert 1.0 <= out["tpu_moe_over_dense"] < 1.1
    assert out["cpu_mot_over_dense"] > out["tpu_mot_over_dense"]  # the CPU lowering's 2x
