"""Loading experiment configs (`experiments/NAME.py:VARIANT`) and `--config.key=value` overrides."""

import ast
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from mmjax.errors import UserError

REQUIRED_KEYS = (
    "seed",
    "total_steps",
    "batch_size",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "mesh",
    "model",
    "data",
    "optimizer",
    "evals",
)


def base_config(**optimizer: Any) -> ml_collections.ConfigDict:
    """The keys every experiment shares, at their defaults; experiments set the rest.

    `optimizer` overrides AdamW's defaults (lr, b1, b2, eps, weight_decay, warmup_steps,
    end_factor: the final lr as a fraction of the peak, grad_clip_norm, frozen: parameter path
    patterns such as "vision/**" that are not trained, mmjax/train/stages.py).
    """
    from mmjax.parallel import DEFAULT_RULES

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mesh = dict(data=-1, fsdp=1, tensor=1, rules=DEFAULT_RULES)
    c.keep_checkpoints = 3
    c.distributed = False
    c.max_bad_steps = 5  # NaN/Inf updates skipped in a row before training stops
    # Pretrained weights (mmjax.convert): format hf_clip | hf_siglip | open_clip, a local path,
    # and for open_clip the model name; their architecture replaces c.model's. Or format
    # workdir: an earlier run's workdir, its checkpoint `step` (-1: latest) and `load`
    # {dst param prefix: src param prefix} (None: all) copied into this model's fresh params,
    # `family` (a model.name) the earlier run must be of ("": any);
    # `more` {name: dict(path, step, load)}: further earlier workdirs, read the same way
    # (mmjax/train/stages.py).
    c.init_from = dict(format="", path="", name="", step=-1, load=None, family="", more={})
    adamw = dict(
        lr=3e-4,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        warmup_steps=0,
        end_factor=0.0,
        grad_clip_norm=1.0,
        frozen=(),
    )
    c.optimizer = dict(name="adamw", **{**adamw, **optimizer})
    c.evals = dict()
    return c


def load_config(spec: str, relative_to: str | None = None) -> ml_collections.ConfigDict:
    """Imports `path.py[:arg]` and returns `get_config(arg)`, checking the required keys.

    `relative_to` (an experiment's `__file__`) resolves a relative path from that file's
    folder: how one experiment builds on another.
    """
    path, _, arg = spec.partition(":")
    if relative_to is not None and not os.path.isabs(path):
        path = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(relative_to)), path))
    module = _import_config_file(path)
    if not hasattr(module, "get_config"):
        raise UserError(f"config file {path!r} defines no get_config(arg)")
    config = module.get_config(arg) if arg else module.get_config()
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise UserError(f"config {spec!r} lacks the required top-level keys {missing}")
    return config


def config_variants(path: str) -> tuple[str, ...]:
    """The `VARIANTS` an experiment file declares (the `:arg` values its get_config takes)."""
    module = _import_config_file(path)
    if not hasattr(module, "VARIANTS"):
        raise UserError(f"config file {path!r} declares no VARIANTS")
    return tuple(module.VARIANTS)


def config_columns(path: str) -> dict[str, str]:
    """An ablation file's `CONFIG_COLUMNS` ({table column: dotted config key}; none: {})."""
    return dict(getattr(_import_config_file(path), "CONFIG_COLUMNS", {}))


def _import_config_file(path: str):
    if not os.path.isfile(path):
        raise UserError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location("mmjax_experiment_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Applies `key.sub=value` strings in place; unknown keys and wrong types are UserErrors.
    A group of keys is replaced whole by a dict literal (e.g. `init_from.load={'a': 'b'}`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UserError(f"override {item!r} is not of the form --config.key=value")
        parent, leaf = _resolve(config, key)
        old = parent[leaf]
        parse = _parse_group if isinstance(old, ml_collections.ConfigDict) else _parse
        parent[leaf] = parse(key, raw, old)


def _resolve(config: ml_collections.ConfigDict, key: str):
    node, parts = config, key.split(".")
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth]) or "<top level>"
        if not isinstance(node, ml_collections.ConfigDict):
            raise UserError(f"config key {key!r}: {prefix!r} is a value, not a group of keys")
        if part not in node:
            raise UserError(
                f"unknown config key {key!r}; valid keys under {prefix!r}: {sorted(node.keys())}"
            )
        if depth == len(parts) - 1:
            return node, part
        node = node[part]
    raise AssertionError("unreachable")


def _parse_group(key: str, raw: str, old: ml_collections.ConfigDict) -> dict:
    """A dict literal that replaces the group `old`."""
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = None
    if not isinstance(value, dict):
        raise UserError(
            f"config key {key!r} is a group; set one of {sorted(old.keys())} or replace it "
            "whole with a dict literal"
        )
    return value


def _parse(key: str, raw: str, old):
    """Parses `raw` to the type of the current value `old`."""

    def bad(expected: str) -> UserError:
        return UserError(f"config key {key!r} expects {expected}, got {raw!r}")

    if isinstance(old, bool):
        lowered = raw.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise bad("a bool (true/false)")
    if isinstance(old, int):
        try:
            return int(raw)
        except ValueError:
            raise bad("an int") from None
    if isinstance(old, float):
        try:
            return float(raw)
        except ValueError:
            raise bad("a float") from None
    if isinstance(old, str):
        return raw
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if old is None:
            return raw
        raise bad(f"a Python literal of type {type(old).__name__}") from None
    if old is not None and not isinstance(value, type(old)):
        if isinstance(old, tuple) and isinstance(value, list):
            return tuple(value)
        raise bad(f"a {type(old).__name__}")
    return value
