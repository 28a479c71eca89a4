"""Orbax checkpoints of the train state together with the Grain iterator position.

A checkpoint `W/checkpoints/<step>/` holds two items: `state` (every array of the
`TrainState`, sharded as in training) and `data` (each process's iterator state), so a
restart resumes at the exact next batch. Orbax writes into a temporary directory and
renames it when complete; a checkpoint cut short by a crash is never listed, so never
loaded.
"""

import logging
import os
from typing import Any

import grain
import orbax.checkpoint as ocp

_STATE = "state"
_DATA = "data"


class Checkpointer:
  """Saves and restores (state, data iterator) pairs under `directory`."""

  def __init__(self, directory: str, *, max_to_keep: int = 2, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(_STATE, _DATA))

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: Any | None = None) -> None:
    """Starts saving (returns before the write finishes when async saving is on)."""
    items = {_STATE: ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items[_DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    self._manager.save(step, args=ocp.args.Composite(**items))

  def restore(self, step: int, abstract_state: Any, data_iterator: Any | None = None) -> Any:
    """Restores the state at `step` into the shardings of `abstract_state`.

    When `data_iterator` is given its position is restored in place.
    """
    items = {_STATE: ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items[_DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("restored step %d from %s", step, self.directory)
    return restored[_STATE]

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
