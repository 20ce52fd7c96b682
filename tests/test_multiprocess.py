"""Two local JAX processes (4 CPU devices each, gloo) train like one process with 8 devices."""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import FAST, REPO

from mmjax.train.metrics import read_metrics

ARGS = ["-m", "mmjax.train", "--config", "experiments/clip.py:tiny", *FAST]
ARGS += ["--config.total_steps=4", "--config.log_every=2", "--config.checkpoint_every=2"]


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    single = subprocess.run(
        [sys.executable, *ARGS, "--workdir", one],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr
    launcher = os.path.join(REPO, "launch", "local_multiprocess.sh")
    multi = subprocess.run(
        [launcher, "2", "4", sys.executable, *ARGS, "--workdir", two],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={**os.environ, "LOG_DIR": str(tmp_path / "logs")},
    )
    assert multi.returncode == 0, multi.stdout[-3000:]
    records = [read_metrics(d) for d in (one, two)]
    # process 0 alone writes: one record per log step and one for the final eval
    assert [r["step"] for r in records[1]] == [r["step"] for r in records[0]] == [2, 4, 4]
    for a, b in zip(*records, strict=True):
        for key in ("loss", "grad_norm", "zero_shot_accuracy"):
            if key in a:
                np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-5, err_msg=key)
    assert sorted(os.listdir(os.path.join(two, "checkpoints"))) == ["2", "4"]
    assert os.path.exists(tmp_path / "logs" / "process_1.log")


def _rank0_pid(workdir: str) -> int | None:
    """pid of the Python process with JAX_PROCESS_ID=0 training in `workdir`."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        mine = argv[0] == sys.executable.encode() and workdir.encode() in argv
        if mine and b"JAX_PROCESS_ID=0" in environ:
            return int(pid)
    return None


@pytest.mark.long
def test_sigterm_to_one_process_makes_all_save_the_same_step_and_exit_zero(tmp_path):
    workdir = str(tmp_path / "w")
    launcher = os.path.join(REPO, "launch", "local_multiprocess.sh")
    proc = subprocess.Popen(
        [
            launcher,
            "2",
            "4",
            sys.executable,
            *ARGS,
            "--workdir",
            workdir,
            "--config.total_steps=100000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env={**os.environ, "LOG_DIR": str(tmp_path / "logs")},
    )
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 180
    while not (os.path.exists(metrics) and os.path.getsize(metrics)) and time.time() < deadline:
        time.sleep(0.2)
    os.kill(_rank0_pid(workdir), signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    logs = [(tmp_path / "logs" / f"process_{i}.log").read_text() for i in (0, 1)]
    saved = [int(m) for log in logs for m in re.findall(r"Preempted: saved .* step (\d+)", log)]
    assert len(saved) == 2 and saved[0] == saved[1], saved
    assert str(saved[0]) in os.listdir(os.path.join(workdir, "checkpoints"))
