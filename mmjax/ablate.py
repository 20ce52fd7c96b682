"""CLI: run every variant of an ablation config and tabulate their final metrics.

  python -m mmjax.ablate --config experiments/ablations/transfusion_attention.py \
      --workdir /tmp/abl_attention [--variants causal bidirectional] [--config.k=v ...]

Each variant `V` of the file's `VARIANTS` trains into `WORKDIR/V` (rerunning the command
resumes unfinished variants and skips finished ones), with the `--config.k=v` overrides
applied to all of them (e.g. `--config.total_steps=800` for a shorter sweep). Then the last
value of every metric in each `metrics.jsonl` (the final evaluation and the last logged
training losses) goes into one table, printed and written to `WORKDIR/table.md` and
`WORKDIR/table.json`, with each variant's parameter count (`params`) and median training step
time (`ms_per_step`, the logging windows after the first, which holds the compilation). An
ablation file may name config values to tabulate too, as `CONFIG_COLUMNS = {column: "dotted.key"}`
(e.g. the visual tokens per image of a VLM connector).
"""

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence

import numpy as np

from mmjax.errors import TrainingError, UserError, run_cli

# Logged every few steps but not a result: left out of the table.
BOOKKEEPING = ("learning_rate", "grad_norm", "examples_per_sec", "skipped_steps", "bad_steps")


def final_metrics(rows: Sequence[dict]) -> dict:
    """The last value of each metric over a run's metrics.jsonl rows (later rows win)."""
    last: dict = {}
    for row in rows:
        last.update({k: v for k, v in row.items() if k not in BOOKKEEPING})
    return last


def median_step_ms(rows: Sequence[dict], batch_size: int) -> float | None:
    """Milliseconds per training step: the median over the logging windows after the first
    (whose time includes the compilation); None without two windows."""
    rates = [row["examples_per_sec"] for row in rows if "examples_per_sec" in row][1:]
    return 1000.0 * batch_size / float(np.median(rates)) if rates else None


def parameter_count(config) -> int:
    """The parameters of `config`'s model, from shapes alone (its first batch's layout)."""
    import jax

    from mmjax.train.build import build

    params = build(config, devices=jax.devices()[:1]).abstract_params()
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def config_values(config, columns: Mapping[str, str]) -> dict:
    """{column: the config value at its dotted key} for an ablation file's CONFIG_COLUMNS."""
    values = {}
    for column, key in columns.items():
        node = config
        for name in key.split("."):
            if name not in node:
                raise UserError(f"CONFIG_COLUMNS {column!r}: the config has no key {key!r}")
            node = node[name]
        values[column] = node
    return values


def markdown_table(results: dict[str, dict]) -> str:
    """variant -> metrics as a markdown table, one row per variant, metrics in columns."""
    columns = sorted({k for metrics in results.values() for k in metrics} - {"step"})
    columns = ["step", *columns]
    lines = [
        "| variant | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for variant, metrics in results.items():
        cells = [_format(metrics.get(c)) for c in columns]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _format(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def ablate(
    config_path: str, workdir: str, variants: Sequence[str] | None, overrides: Sequence[str]
) -> dict[str, dict]:
    """Trains each variant into workdir/variant and returns variant -> final metrics."""
    from mmjax.train.config_cli import (
        apply_overrides,
        config_columns,
        config_variants,
        load_config,
    )
    from mmjax.train.loop import train_and_evaluate
    from mmjax.train.metrics import read_metrics

    known = config_variants(config_path)
    columns = config_columns(config_path)
    variants = list(variants or known)
    unknown = [v for v in variants if v not in known]
    if unknown:
        raise UserError(f"{config_path} has no variants {unknown}; valid: {list(known)}")
    results = {}
    for variant in variants:
        config = load_config(f"{config_path}:{variant}")
        apply_overrides(config, overrides)
        values = config_values(config, columns)  # a bad key fails before any training
        run_dir = os.path.join(workdir, variant)
        done = os.path.join(run_dir, "ablate_final.json")
        if os.path.exists(done):  # finished by an earlier invocation
            with open(done) as f:
                results[variant] = json.load(f)
            continue
        print(f"mmjax.ablate: {variant} -> {run_dir}", file=sys.stderr, flush=True)
        train_and_evaluate(config, run_dir)
        rows = read_metrics(run_dir)
        final = final_metrics(rows)
        if final.get("step") != config.total_steps:
            raise TrainingError(f"{variant} stopped at step {final.get('step')}; rerun to resume")
        final.update(
            params=parameter_count(config),
            ms_per_step=median_step_ms(rows, config.batch_size),
            **values,
        )
        with open(done, "w") as f:
            json.dump(final, f)
        results[variant] = final
    table = markdown_table(results)
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write(f"{config_path} {' '.join(overrides)}\n\n{table}")
    with open(os.path.join(workdir, "table.json"), "w") as f:
        json.dump({"config": config_path, "overrides": list(overrides), "results": results}, f)
    print(table)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    overrides = [a[len("--config.") :] for a in argv if a.startswith("--config.")]
    parser = argparse.ArgumentParser(
        prog="python -m mmjax.ablate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", required=True, help="experiments/ablations/NAME.py")
    parser.add_argument("--workdir", required=True, help="one sub-folder per variant")
    parser.add_argument("--variants", nargs="*", help="a subset of the file's VARIANTS")
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    return run_cli(
        "mmjax.ablate", lambda: ablate(args.config, args.workdir, args.variants, overrides)
    )


if __name__ == "__main__":
    sys.exit(main())
