"""CLI: python -m mmjax.train --config experiments/NAME.py:VARIANT --workdir DIR [--config.k=v]."""

import argparse
import sys
from collections.abc import Sequence

from mmjax.errors import run_cli


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Splits `--config.key=value` overrides from the other flags."""
    parser = argparse.ArgumentParser(
        prog="python -m mmjax.train",
        description="Train and evaluate an experiment; the same --workdir again resumes.",
        epilog="Override any config key with --config.key=value (e.g. --config.total_steps=100).",
    )
    parser.add_argument("--config", required=True, help="experiments/NAME.py:VARIANT")
    parser.add_argument("--workdir", required=True, help="output directory; reused to resume")
    overrides, rest = [], []
    for arg in argv:
        if arg.startswith("--config."):
            overrides.append(arg[len("--config.") :])
        else:
            rest.append(arg)
    return parser.parse_args(rest), overrides


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)

    def job() -> None:
        from mmjax.train.config_cli import apply_overrides, load_config
        from mmjax.train.loop import train_and_evaluate

        config = load_config(args.config)
        apply_overrides(config, overrides)
        train_and_evaluate(config, args.workdir)

    return run_cli("mmjax.train", job)


if __name__ == "__main__":
    sys.exit(main())
