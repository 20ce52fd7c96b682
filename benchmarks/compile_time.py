"""Compile seconds and compiled temporary memory of one train step vs depth, scanned and not.

  python benchmarks/compile_time.py [--config experiments/transfusion.py:tiny]
                                    [--depths 4 16 32] [key=value ...]

For each depth and `model.scan_layers` on/off, builds the config's real train step (through the
trainer, as `python -m mmjax.aot --topology cpu:1` does), compiles it for one CPU device and
prints one JSON line: depth, scanned, lower and compile seconds, the compiled step's
temporary bytes and its optimized HLO's size. A scanned stack compiles one block whatever
the depth; an unrolled one compiles every block, so its time grows about linearly. Run with
nothing else on the machine: compile times are wall-clock.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/transfusion.py:tiny")
    parser.add_argument("--depths", type=int, nargs="*", default=[4, 16, 32])
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args()

    from mmjax.aot import compile_train_step
    from mmjax.train.config_cli import apply_overrides, load_config

    for scan in (True, False):
        for depth in args.depths:
            config = load_config(args.config)
            overrides = [f"model.depth={depth}", f"model.scan_layers={scan}"]
            apply_overrides(config, [*args.overrides, *overrides])
            report = compile_train_step(config, "cpu:1")
            row = {
                "config": args.config,
                "depth": depth,
                "scanned": scan,
                "lower_s": report["lower_s"],
                "compile_s": report["compile_s"],
                "temp_bytes": report["temp_bytes"],
                "hlo_text_bytes": report["hlo_text_bytes"],
            }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
