"""Launch scripts compose the right gcloud calls (against a stub gcloud) and reject bad usage."""

import os
import subprocess

from helpers import REPO

STUB = """#!/usr/bin/env bash
call="$*"
printf '%s\\n' "${call//$'\\n'/ }" >> "$GCLOUD_LOG"
[ "$4" = describe ] && exit 1
exit 0
"""


def test_tpu_pod_creates_copies_installs_and_runs_on_all_workers(tmp_path):
    bin_dir, log = tmp_path / "bin", tmp_path / "gcloud.log"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(STUB)
    (bin_dir / "gcloud").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "GCLOUD_LOG": str(log)}
    args = ["--config", "experiments/clip.py:B/16", "--workdir", "/gcs/b/run one"]
    proc = subprocess.run(
        [os.path.join(REPO, "launch", "tpu_pod.sh"), "pod", "zone-a", "v5litepod-64", "--", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert calls[0].startswith("compute tpus tpu-vm describe pod --zone zone-a")
    assert calls[1].startswith("compute tpus tpu-vm create pod --zone zone-a")
    assert "--accelerator-type v5litepod-64" in calls[1]
    assert calls[2].startswith("compute tpus tpu-vm scp") and "--worker=all" in calls[2]
    assert "pip install -q -e '.[tpu]'" in calls[3] and "--worker=all" in calls[3]
    assert "--worker=all" in calls[4]
    assert "MMJAX_DISTRIBUTED=1 .venv/bin/python -m mmjax.train --config " in calls[4]
    assert "/gcs/b/run\\ one" in calls[4]  # arguments survive the remote shell quoted
    assert "logs/$(hostname).log" in calls[4]


def test_launchers_reject_bad_usage(tmp_path):
    for script, args in [
        ("tpu_pod.sh", ["pod", "zone"]),
        ("gpu_host.sh", ["--config", "x"]),
        ("local_multiprocess.sh", ["2"]),
    ]:
        proc = subprocess.run(
            [os.path.join(REPO, "launch", script), *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2, script
        assert proc.stderr.startswith("usage:"), proc.stderr
