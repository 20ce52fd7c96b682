"""CLI: evaluate the latest checkpoint of a workdir with the evals of its config.

  python -m mmjax.evaluate --workdir DIR [--config.evals.retrieval.split=test ...]

Reads `DIR/config.json` (the run's resolved config), restores the newest readable checkpoint
onto this machine's devices, runs every entry of `config.evals`, prints one JSON line and
appends the same record to `DIR/metrics.jsonl`.
"""

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from mmjax.errors import UserError


def evaluate(workdir: str, overrides: Sequence[str] = ()) -> dict[str, float]:
    """Evaluates the latest checkpoint in `workdir`; returns {metric: value, "step": step}."""
    import flax.linen as nn
    import jax

    from mmjax.train.build import load_trained
    from mmjax.train.metrics import MetricWriter

    trained = load_trained(workdir, overrides)  # parameters only: no optimizer state
    bundle = trained.bundle
    with jax.set_mesh(bundle.mesh), nn.logical_axis_rules(bundle.rules):
        evaluators = bundle.evaluators(workdir)
        record = {}
        for evaluator in evaluators.values():
            record.update(evaluator(trained.params))
    writer = MetricWriter(workdir, active=jax.process_index() == 0)
    writer.write(trained.step, record)
    writer.close()
    return {"step": trained.step, **record}


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m mmjax.evaluate", description=__doc__)
    parser.add_argument("--workdir", required=True)
    overrides = [a[len("--config.") :] for a in argv if a.startswith("--config.")]
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    logging.basicConfig(level=logging.WARNING)
    try:
        result = evaluate(args.workdir, overrides)
    except UserError as e:
        print(f"mmjax.evaluate: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
