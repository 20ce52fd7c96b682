"""The CLI under bad input (one error line, non-zero exit, checkpoints intact) and SIGTERM."""

import io
import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from helpers import cli, tree_digest
from PIL import Image

from mmjax import data


def train(workdir: str, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(**cli(workdir, *overrides), capture_output=True, text=True, timeout=300)


def assert_one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("mmjax.train: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def write_shard(path: str, corrupt_index: int, num: int = 8) -> None:
    png = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(png, format="PNG")
    writer = ArrayRecordWriter(path, "group_size:1")
    for i in range(num):
        image = b"\x89PNG not really" if i == corrupt_index else png.getvalue()
        writer.write(data.pack_record(image, f"a grey square {i}", -1, f"{i}.png"))
    writer.close()


def test_missing_data_directory(tmp_path):
    missing = str(tmp_path / "no_such_shards")
    proc = train(
        str(tmp_path / "w"), "--config.data.source=array_record", f"--config.data.path={missing}"
    )
    assert_one_error_line(proc, missing, "does not exist")


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    proc = train(str(blocker / "workdir"))
    assert_one_error_line(proc, "workdir", "is not writable")


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory) -> str:
    workdir = str(tmp_path_factory.mktemp("trained") / "w")
    proc = train(workdir)
    assert proc.returncode == 0, proc.stderr
    return workdir


def test_corrupt_image_in_a_shard_leaves_checkpoints_untouched(trained_workdir, tmp_path):
    before = tree_digest(os.path.join(trained_workdir, "checkpoints"))
    assert any(p.startswith("3") for p in before)
    shard = str(tmp_path / "shards" / "data-00000-of-00001.array_record")
    os.makedirs(os.path.dirname(shard))
    write_shard(shard, corrupt_index=5)
    proc = train(
        trained_workdir,
        "--config.data.source=array_record",
        f"--config.data.path={os.path.dirname(shard)}",
        "--config.total_steps=6",
    )
    assert_one_error_line(proc, "record 5", shard)
    assert tree_digest(os.path.join(trained_workdir, "checkpoints")) == before


def test_bad_override_leaves_checkpoints_untouched(trained_workdir):
    before = tree_digest(os.path.join(trained_workdir, "checkpoints"))
    proc = train(trained_workdir, "--config.optimizer.lr=fast")
    assert_one_error_line(proc, "'optimizer.lr' expects a float, got 'fast'")
    assert tree_digest(os.path.join(trained_workdir, "checkpoints")) == before


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path):
    workdir = str(tmp_path / "w")
    proc = subprocess.Popen(
        **cli(workdir, "--config.total_steps=100000"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 120
    while not (os.path.exists(metrics) and os.path.getsize(metrics)) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    step = int(re.search(r"Preempted: saved checkpoint at step (\d+)", out).group(1))
    assert str(step) in os.listdir(os.path.join(workdir, "checkpoints"))
    resumed = train(workdir, f"--config.total_steps={step + 2}")
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming from step {step}" in resumed.stdout
