"""benchmarks/packed_vit.py at its smallest: one JSON line, packed == padded per image."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "packed_vit.py"
KEYS = {
    "benchmark", "device", "images", "patches_total", "max_over_median_patches", "packed_rows",
    "packed_capacity", "padded_shape", "packed_images_per_s", "padded_images_per_s", "speedup",
    "max_abs_diff", "repeats",
}  # fmt: skip


def load_script():
    spec = importlib.util.spec_from_file_location("packed_vit", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pack_greedy_fits_capacity():
    pv = load_script()
    sizes = [1024, 960, 256, 256, 256, 96, 96, 64, 64]
    rows = pv.pack_greedy(sizes, 1024)
    assert sorted(i for r in rows for i in r) == list(range(len(sizes)))
    assert all(sum(sizes[i] for i in r) <= 1024 for r in rows)
    assert len(rows) == 3  # 1024 | 960 + 64 | 3 x 256 + 2 x 96 + 64
    assert pv.parse_grids("8x12:2,32x32") == [(8, 12), (8, 12), (32, 32)]


def test_packed_vit_benchmark_prints_one_json_line(capsys):
    pv = load_script()
    pv.main(["--repeats", "1", "--depth", "1", "--width", "32", "--heads", "2", "--mlp", "64"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    row = json.loads(lines[0])
    assert row.keys() >= KEYS
    assert row["benchmark"] == "packed_vit"
    assert row["max_abs_diff"] < 1e-4
    assert row["max_over_median_patches"] >= 2
    assert row["packed_rows"] < row["images"] == row["padded_shape"][0]
    assert row["packed_images_per_s"] > 0 and row["padded_images_per_s"] > 0
