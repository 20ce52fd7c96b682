"""CLI: evaluate the latest checkpoint of a workdir with the evals of its config.

  python -m mmjax.evaluate --workdir DIR [--config.evals.retrieval.split=test ...]

Reads `DIR/config.json` (the run's resolved config), restores the newest readable checkpoint
onto this machine's devices, runs every entry of `config.evals`, prints one JSON line and
appends the same record to `DIR/metrics.jsonl`.
"""

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from mmjax.errors import UserError


def evaluate(workdir: str, overrides: Sequence[str] = ()) -> dict[str, float]:
    """Evaluates the latest checkpoint in `workdir`; returns {metric: value, "step": step}."""
    import flax.linen as nn
    import jax
    import ml_collections

    from mmjax import evals
    from mmjax.train.checkpoint import Checkpointer, abstract_like
    from mmjax.train.config_cli import apply_overrides
    from mmjax.train.loop import Trainer
    from mmjax.train.metrics import MetricWriter

    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist: is {workdir!r} a training workdir?")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    apply_overrides(config, overrides)
    trainer = Trainer(config, workdir)
    state, shardings = trainer.init_state(next(trainer.data_iterator()))
    ckpt = Checkpointer(workdir, keep=config.get("keep_checkpoints", 3))
    try:
        restored = ckpt.restore_latest(abstract_like(state, shardings), trainer.data_iterator())
        if restored is None:
            raise UserError(f"no checkpoint to evaluate in {ckpt.directory}")
        step, state = restored
        with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
            evaluators = evals.build_evaluators(
                config.evals, trainer.model, trainer.tokenizer, config.data, trainer.mesh, workdir
            )
            record = {}
            for evaluator in evaluators.values():
                record.update(evaluator(state.params))
    finally:
        ckpt.close()
    writer = MetricWriter(workdir, active=trainer.is_main)
    writer.write(step, record)
    writer.close()
    return {"step": step, **record}


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
