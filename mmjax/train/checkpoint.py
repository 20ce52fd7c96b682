"""Orbax checkpoints of the train state together with the grain data iterator state.

Restoring takes the newest checkpoint that reads back whole. A torn one (no commit marker, an
item missing, an array file truncated) is moved to `workdir/checkpoints_torn/<step>` with a log
line saying why, never deleted, and the next older one is tried. A readable checkpoint whose
arrays do not match this run's state (another experiment, other shapes) is a UserError: nothing
is re-initialised or overwritten.
"""

import functools
import logging
import os
import shutil
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mmjax.errors import UserError

log = logging.getLogger("mmjax.train")

COMMIT_MARKER = "commit_success.txt"  # written by Orbax when a step is complete
ITEMS = ("state", "data")


@functools.cache
def _whole_replica_writes_on_cpu() -> None:
    """Once per process on the CPU backend: each jax.Array is written by one replica whole.

    CPU "devices" share the host's memory, so splitting a replicated array's write among its
    replicas gains nothing, and each split is an XLA slice compiled for its shape: hundreds of
    compilations per save on 8 devices.
    """
    if jax.default_backend() == "cpu":
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
        )


class Checkpointer:
    """Async, keep-N checkpoints under `workdir/checkpoints`; items `state` and `data`."""

    def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
        _whole_replica_writes_on_cpu()
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        self.torn_directory = os.path.join(self.workdir, "checkpoints_torn")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=async_save
            ),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator, *, force=False):
        """Starts saving `state` and the iterator position at `step` (returns before the write)."""
        saved = self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
            ),
            force=force,
        )
        if saved:
            log.info("saving checkpoint at step %d", step)
        return saved

    def restore(self, step: int, abstract_state: Any, data_iterator: grain.DatasetIterator) -> Any:
        """Restores the state onto the shardings of `abstract_state` and rewinds the iterator."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(data_iterator),
            ),
        )
        return restored.state

    def restore_latest(
        self, abstract_state: Any, data_iterator: grain.DatasetIterator
    ) -> tuple[int, Any] | None:
        """(step, state) of the newest checkpoint that reads back whole, or None if there is none.

        Torn checkpoints are set aside with a log line; a readable checkpoint that does not
        match `abstract_state` raises UserError.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            reason = self._torn_reason(step)
            if reason is None:
                try:
                    saved = self.manager.item_metadata(step)["state"]
                except Exception as e:  # any failure to read the metadata: torn
                    reason = f"its metadata cannot be read ({_first_line(e)})"
                else:
                    check_compatible(saved, abstract_state, os.path.join(self.directory, str(step)))
            if reason is None:
                try:
                    return step, self.restore(step, abstract_state, data_iterator)
                except Exception as e:  # a partial or truncated write
                    reason = f"reading it failed ({_first_line(e)})"
            self._set_aside(step, reason)
        return None

    def _torn_reason(self, step: int) -> str | None:
        step_dir = os.path.join(self.directory, str(step))
        if not os.path.exists(os.path.join(step_dir, COMMIT_MARKER)):
            return f"it has no commit marker ({COMMIT_MARKER}): the save did not finish"
        missing = [i for i in ITEMS if not os.path.exists(os.path.join(step_dir, i, COMMIT_MARKER))]
        if missing:
            return f"its items {missing} are missing or incomplete"
        return None

    def _set_aside(self, step: int, reason: str) -> None:
        """Moves a torn step out of the way (process 0), so training can save that step again."""
        target = os.path.join(self.torn_directory, str(step))
        print(
            f"Checkpoint at step {step} is unusable: {reason}. Moved it to {target} and "
            "falling back to the previous checkpoint.",
            flush=True,
        )
        if jax.process_index() == 0:
            os.makedirs(self.torn_directory, exist_ok=True)
            if os.path.exists(target):
                target = f"{target}.{len(os.listdir(self.torn_directory))}"
            shutil.move(os.path.join(self.directory, str(step)), target)
        multihost_utils.sync_global_devices(f"mmjax_set_aside_checkpoint_{step}")
        self.manager.reload()

    def reached_preemption(self, step: int) -> bool:
        """True when the runtime (e.g. a TPU pod maintenance event) asks every host to save."""
        return self.manager.reached_preemption(step)

    def close(self) -> None:
        """Waits for pending async saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def check_compatible(saved_metadata: Any, abstract_state: Any, where: str) -> None:
    """Raises UserError naming the differences between a checkpoint's arrays and this run's."""
    saved = _shapes_by_path(getattr(saved_metadata, "tree", saved_metadata))
    wanted = _shapes_by_path(abstract_state)
    problems = [f"{p} is missing from the checkpoint" for p in sorted(wanted.keys() - saved)]
    problems += [
        f"{p} is in the checkpoint but not in this run" for p in sorted(saved - wanted.keys())
    ]
    problems += [
        f"{p} is {saved[p][0]} {saved[p][1]} in the checkpoint but {w[0]} {w[1]} here"
        for p, w in sorted(wanted.items())
        if p in saved and saved[p] != w
    ]
    if problems:
        more = f" (and {len(problems) - 3} more differences)" if len(problems) > 3 else ""
        raise UserError(
            f"checkpoint {where} does not match this config, refusing to resume: "
            + "; ".join(problems[:3])
            + more
        )


def _shapes_by_path(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """{'params/image_tower/cls': ((1, 64), 'float32'), ...} for every array leaf."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path]
        out["/".join(names)] = (tuple(leaf.shape), str(jax.numpy.dtype(leaf.dtype)))
    return out


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the given shardings: the restore target of a tree."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
