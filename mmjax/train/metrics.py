"""Metric writing: `metrics.jsonl` plus TensorBoard scalars in the workdir, process 0 only."""

import json
import os
from collections.abc import Mapping

import numpy as np

from mmjax.train.tb_events import ScalarEventWriter


class MetricWriter:
    """Appends `{"step": N, name: value, ...}` lines and TensorBoard scalars.

    Inactive writers (processes other than 0) accept calls and write nothing.
    """

    def __init__(self, workdir: str, active: bool = True):
        self.active = active
        self._jsonl = None
        self._tb = None
        if active:
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
            self._tb = ScalarEventWriter(workdir)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """Records scalar metrics at `step`; values are converted to Python floats."""
        if not self.active:
            return
        scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
        self._jsonl.flush()
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, int(step))
        self._tb.flush()

    def close(self) -> None:
        if self.active:
            self._jsonl.close()
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    """All records of `workdir/metrics.jsonl`, in order."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
