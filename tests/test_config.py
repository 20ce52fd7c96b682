"""Experiment configs load, and `--config.key=value` overrides are typed and checked."""

import glob
import os
import subprocess
import sys

import pytest
from helpers import REPO

from mmjax.errors import UserError
from mmjax.models import build_model
from mmjax.train.build import fill_vocab_size
from mmjax.train.config_cli import REQUIRED_KEYS, apply_overrides, config_variants, load_config

CLIP = os.path.join(REPO, "experiments", "clip.py")


def _all_variants() -> list[str]:
    """`path:variant` for every VARIANTS entry of every experiment file, ablations included."""
    specs = []
    for path in sorted(glob.glob(os.path.join(REPO, "experiments", "**", "*.py"), recursive=True)):
        specs += [f"{os.path.relpath(path, REPO)}:{v}" for v in config_variants(path)]
    return specs


@pytest.mark.parametrize("spec", _all_variants())
def test_every_experiment_variant_loads_and_builds_its_model(spec):
    config = load_config(os.path.join(REPO, spec))
    assert all(k in config for k in REQUIRED_KEYS)
    fill_vocab_size(config.model, 1000)
    build_model(config.model)  # constructs (no init): unknown model keys fail here


def test_paper_shapes():
    b16, l14 = load_config(f"{CLIP}:B/16"), load_config(f"{CLIP}:L/14")
    assert (b16.model.image.patch_size, b16.model.image.width, b16.model.image.depth) == (
        16,
        768,
        12,
    )
    assert (l14.model.image.patch_size, l14.model.image.width, l14.model.image.depth) == (
        14,
        1024,
        24,
    )
    assert b16.model.text.max_len == 77 and b16.batch_size == 32768


def test_overrides_are_parsed_to_the_type_of_the_key():
    config = load_config(f"{CLIP}:tiny")
    apply_overrides(
        config,
        [
            "total_steps=7",
            "optimizer.lr=0.01",
            "model.image.scan_layers=true",
            "data.source=shapes",
            "mesh.rules=(('batch', 'data'),)",
        ],
    )
    assert config.total_steps == 7 and isinstance(config.total_steps, int)
    assert config.optimizer.lr == 0.01
    assert config.model.image.scan_layers is True
    assert config.data.source == "shapes"
    assert config.mesh.rules == (("batch", "data"),)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.widht=3", "unknown config key 'model.widht'; valid keys under 'model': ["),
        ("nope=1", "unknown config key 'nope'; valid keys under '<top level>'"),
        ("total_steps=ten", "config key 'total_steps' expects an int, got 'ten'"),
        ("model.image.scan_layers=maybe", "expects a bool"),
        ("model=3", "config key 'model' is a group"),
        ("total_steps", "is not of the form"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    config = load_config(f"{CLIP}:tiny")
    with pytest.raises(UserError) as err:
        apply_overrides(config, [override])
    assert message in str(err.value)


def test_missing_config_file_is_a_user_error():
    with pytest.raises(UserError, match="does not exist"):
        load_config("experiments/nothing.py:tiny")


def test_cli_unknown_key_prints_one_line_and_exits_nonzero(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmjax.train",
            "--config",
            f"{CLIP}:tiny",
            "--workdir",
            str(tmp_path / "w"),
            "--config.model.widht=3",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "unknown config key 'model.widht'" in lines[0] and "'image'" in lines[0]
    assert not (tmp_path / "w").exists()  # nothing written before the config is valid
