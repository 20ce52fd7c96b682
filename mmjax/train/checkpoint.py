"""Orbax checkpoints of the train state together with the grain data iterator state."""

import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Async, keep-N checkpoints under `workdir/checkpoints`; items `state` and `data`."""

    def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=async_save
            ),
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
            logging.info("saving checkpoint at step %d", step)
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

    def reached_preemption(self, step: int) -> bool:
        """True when the runtime (e.g. a TPU pod maintenance event) asks every host to save."""
        return self.manager.reached_preemption(step)

    def close(self) -> None:
        """Waits for pending async saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the given shardings: the restore target of a tree."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
