"""The latest trained state of a workdir, for commands that evaluate or sample from it."""

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from mmjax.errors import UserError


@dataclasses.dataclass
class Trained:
    """A workdir's config (with overrides), its Trainer and the newest checkpoint's params."""

    config: ml_collections.ConfigDict
    trainer: Any  # mmjax.train.loop.Trainer
    step: int
    params: Any


def load_trained(workdir: str, overrides: Sequence[str] = ()) -> Trained:
    """Reads `workdir/config.json`, applies `--config.*` overrides and restores the newest
    readable checkpoint onto this machine's devices."""
    from mmjax.train.checkpoint import Checkpointer
    from mmjax.train.config_cli import apply_overrides
    from mmjax.train.loop import Trainer

    config = read_config(workdir)
    apply_overrides(config, overrides)
    trainer = Trainer(config, workdir)
    abstract = trainer.abstract_state(next(trainer.data_iterator()))
    ckpt = Checkpointer(workdir, keep=config.get("keep_checkpoints", 3))
    try:
        restored = ckpt.restore_latest(abstract, trainer.data_iterator())
    finally:
        ckpt.close()
    if restored is None:
        raise UserError(f"no checkpoint in {ckpt.directory}")
    step, state = restored
    return Trained(config, trainer, step, state.params)


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a training run wrote to `workdir/config.json`."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist: is {workdir!r} a training workdir?")
    with open(path) as f:
        return ml_collections.ConfigDict(_tuples(json.load(f)))


def _tuples(value: Any) -> Any:
    """JSON's lists back to the tuples configs hold (modules with tuple fields stay hashable,
    e.g. a Transfusion's `image_shape` for the jitted samplers)."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value
