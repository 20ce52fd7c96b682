"""The notebooks run top to bottom: executed with a shrunk config in a fresh kernel."""

import json
import os
import re
import sys

import nbformat
import pytest
from helpers import REPO, SHRINK
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from mmjax.train.metrics import read_metrics

NOTEBOOK = os.path.join(REPO, "notebooks", "clip_zero_shot.ipynb")
KERNEL = "mmjax-test"


def kernel_manager(kernel_dir: str) -> KernelManager:
    """A kernel on this interpreter (whatever `python3` kernelspecs say), JAX on 1 CPU device."""
    spec_dir = os.path.join(kernel_dir, KERNEL)
    os.makedirs(spec_dir)
    with open(os.path.join(spec_dir, "kernel.json"), "w") as f:
        json.dump(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "mmjax test",
                "language": "python",
                "env": {
                    "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
                    "JAX_PLATFORMS": "cpu",
                },
            },
            f,
        )
    specs = KernelSpecManager(kernel_dirs=[kernel_dir])
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


def tagged(nb: nbformat.NotebookNode, tag: str) -> int:
    """Index of the one cell tagged `tag`."""
    found = [i for i, c in enumerate(nb.cells) if tag in c.metadata.get("tags", [])]
    assert len(found) == 1, f"expected one cell tagged {tag!r}, found {found}"
    return found[0]


def text_of(cell: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_clip_zero_shot_notebook_trains_evaluates_and_draws_the_grid(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    workdir = str(tmp_path / "workdir")
    # papermill-style: a cell after the parameters cell overrides them
    params = tagged(nb, "parameters")
    overrides = [s for s in SHRINK if not s.startswith("total_steps=")]
    nb.cells.insert(
        params + 1,
        nbformat.v4.new_code_cell(
            f"TOTAL_STEPS = 6\nWORKDIR = {workdir!r}\nOVERRIDES = {overrides!r}\nNUM_SHOWN = 12"
        ),
    )
    client = NotebookClient(
        nb,
        km=kernel_manager(str(tmp_path / "kernels")),
        timeout=300,
        resources={"metadata": {"path": REPO}},
        coalesce_streams=True,
    )
    client.execute()  # raises CellExecutionError naming the cell that failed

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]

    grid = nb.cells[tagged(nb, "grid")]
    assert any("image/png" in o.get("data", {}) for o in grid.outputs), grid.outputs

    printed = "\n".join(text_of(c) for c in nb.cells if c.cell_type == "code")
    match = re.search(r"zero-shot accuracy on (\d+) held-out digits: ([0-9.]+)", printed)
    assert match, printed[-2000:]
    assert int(match.group(1)) == 360
    accuracy = float(match.group(2))
    assert 0.0 <= accuracy <= 1.0

    records = read_metrics(workdir)
    assert records, "metrics.jsonl is missing or empty"
    final = [r for r in records if "zero_shot_accuracy" in r][-1]
    assert final["step"] == 6
    # the notebook's own zero-shot pass over the restored checkpoint matches the trainer's eval
    assert accuracy == pytest.approx(final["zero_shot_accuracy"], abs=1e-4)
