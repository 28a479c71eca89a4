"""Orbax checkpoints of the train state together with the Grain iterator position.

A checkpoint `W/checkpoints/<step>/` holds three items: `state` (every array of the
`TrainState`, sharded as in training), `data` (each process's iterator state), so a
restart resumes at the exact next batch, and `config` (the W/config.json the run had when
it saved, so a later run with another config can say which fields differ).

Orbax writes a checkpoint into a temporary directory and renames it when complete (and
drops a `commit_success.txt` marker); a checkpoint cut short by a crash or SIGKILL is never
listed, so never loaded, and its leftovers are deleted when the next run opens the
directory (`cleanup_tmp_directories`). `benchmarks/fault_injection.py` kills runs at random
moments, also during an async write, to check exactly this.

Housekeeping: the newest `max_to_keep` checkpoints stay, plus (with `keep_every` > 0)
every checkpoint whose step is a multiple of `keep_every`, forever.
"""

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from spacetime_dit.training import ema as ema_lib

_STATE = "state"
_DATA = "data"
_CONFIG = "config"
CONFIG_FILE = "config.json"  # Beside `checkpoints/` in the workdir (builders.CONFIG_FILE).


class IncompatibleCheckpointError(ValueError):
  """The workdir holds a checkpoint whose arrays do not fit the configured model/optimizer."""


def _path_str(path) -> str:
  """A pytree path as 'a/b/0/c', the same for a TrainState and Orbax's metadata dicts."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _layout(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """{path: (shape, dtype)} of every array leaf."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_str(p): (tuple(leaf.shape), str(leaf.dtype)) for p, leaf in leaves if hasattr(leaf, "shape")}


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(_flatten(value, name + "."))
    else:
      out[name] = value
  return out


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any], sections=None) -> list[str]:
  """'field: old -> new' for every field that differs (JSON-normalised; lists == tuples).

  `sections` (e.g. ("model", "stage")) restricts the comparison to those top-level keys.
  """
  norm = lambda c: _flatten(json.loads(json.dumps(c, default=str)))
  old, new = norm(old), norm(new)
  keys = sorted(set(old) | set(new))
  if sections is not None:
    keys = [k for k in keys if k.split(".")[0] in sections]
  missing = "<absent>"
  changed = [k for k in keys if old.get(k, missing) != new.get(k, missing)]
  return [f"{k}: {old.get(k, missing)!r} -> {new.get(k, missing)!r}" for k in changed]


class Checkpointer:
  """Saves and restores (state, data iterator) pairs under `directory`."""

  def __init__(self, directory: str, *, max_to_keep: int = 2, keep_every: int = 0, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.workdir = os.path.dirname(self.directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, keep_period=keep_every or None, enable_async_checkpointing=async_save,
        create=True, cleanup_tmp_directories=True,
    )
    handlers = {
        _STATE: ocp.StandardCheckpointHandler(),
        _DATA: grain.checkpoint.CheckpointHandler(),
        _CONFIG: ocp.JsonCheckpointHandler(),
    }
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    # Orbax removes the leftovers of unfinished saves in a thread started just now. Wait for it
    # (a directory listing): a process that exits right away, e.g. with a clear error about a
    # missing checkpoint, would otherwise race the interpreter's shutdown and print a traceback
    # ("cannot schedule new futures after shutdown"). Private in orbax 0.12.8, hence the guard.
    wait_for_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
    if wait_for_cleanup is not None:
      wait_for_cleanup()
    self._config = None

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of every complete checkpoint on disk, ascending."""
    return sorted(self._manager.all_steps())

  def _run_config(self) -> dict:
    """This run's W/config.json (written at start-up by process 0), stored in each checkpoint."""
    if self._config is None:
      path = os.path.join(self.workdir, CONFIG_FILE)
      try:
        with open(path, encoding="utf-8") as f:
          self._config = json.load(f)
      except (OSError, ValueError):
        self._config = {}
    return self._config

  def save(self, step: int, state: Any, data_iterator: Any | None = None, *, force: bool = False) -> bool:
    """Starts saving (returns before the write finishes when async saving is on).

    Returns False when a checkpoint of `step` exists already (nothing is written).
    """
    if step in self._manager.all_steps():
      return False
    items = {_STATE: ocp.args.StandardSave(state), _CONFIG: ocp.args.JsonSave(self._run_config())}
    if data_iterator is not None:
      items[_DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def changed_since(self, step: int, sections=("diffusion", "conditioning", "data", "optimizer")) -> list[str]:
    """Fields of `sections` in which this run's config differs from checkpoint `step`'s.

    A resumed run takes its config from the command line, not the checkpoint, so a changed
    objective (say a conditioning mixture that became the default) would otherwise switch
    silently mid-run. Empty for checkpoints written before configs were stored in them.
    """
    old = self.saved_config(step)
    return [] if old is None else config_differences(old, self._run_config(), sections=sections)

  def saved_config(self, step: int) -> dict | None:
    """The W/config.json stored with checkpoint `step` (None for checkpoints without one)."""
    if not os.path.isdir(os.path.join(self.directory, str(step), _CONFIG)):
      return None
    return dict(self._manager.restore(step, args=ocp.args.Composite(**{_CONFIG: ocp.args.JsonRestore()}))[_CONFIG])

  def saved_fields(self, step: int) -> set[str]:
    """Top-level fields of checkpoint `step`'s state (e.g. whether it holds "ema_params")."""
    metadata = self._manager.item_metadata(step)[_STATE]
    return set(metadata.keys()) if hasattr(metadata, "keys") else set()

  def check_compatible(self, step: int, abstract_state: Any, config: Mapping[str, Any] | None = None) -> None:
    """Raises IncompatibleCheckpointError when checkpoint `step` cannot fill `abstract_state`.

    The arrays' paths, shapes and dtypes are compared with the checkpoint's metadata (so a
    change that leaves the arrays alone, e.g. the attention kernel, is no error); the message
    names the differing arrays and the differing config fields (`config`: the new config).
    An EMA of the weights present on one side only is no error either (`ema.restore_plan`).
    """
    saved = _layout(self._manager.item_metadata(step)[_STATE])
    wanted = _layout(ema_lib.restore_plan(abstract_state, self.saved_fields(step), step)[0])
    if saved == wanted:
      return
    arrays = [f"{k}: {saved[k]} in the checkpoint, {wanted[k]} now" for k in sorted(set(saved) & set(wanted))
              if saved[k] != wanted[k]]
    arrays += [f"{k}: only in the checkpoint" for k in sorted(set(saved) - set(wanted))]
    arrays += [f"{k}: not in the checkpoint" for k in sorted(set(wanted) - set(saved))]
    old_config = self.saved_config(step)
    if config is None:
      config = self._run_config()
    if old_config and jax.process_index() == 0:
      # The new run already wrote its config.json; put the one that matches the checkpoints
      # back, so sampling and evaluating this workdir keep working.
      with open(os.path.join(self.workdir, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(old_config, f, indent=2, sort_keys=True)
    if old_config is None:
      fields = ["(this checkpoint stores no config; compare with the command that wrote it)"]
    else:
      fields = config_differences(old_config, config, sections=("stage", "model", "loss", "optimizer"))
      fields = fields or config_differences(old_config, config) or ["(no config field differs)"]
    raise IncompatibleCheckpointError(
        f"{self.directory} holds checkpoint step {step} of a different model or optimizer: its"
        f" {len(arrays)} differing arrays include\n  " + "\n  ".join(arrays[:8])
        + "\nConfig fields that differ from the run that wrote it:\n  " + "\n  ".join(fields[:20])
        + "\nUse a new --workdir for the new config, or rerun with the old values to resume."
    )

  def restore(self, step: int, abstract_state: Any, data_iterator: Any | None = None) -> Any:
    """Restores the state at `step` into the shardings of `abstract_state`.

    When `data_iterator` is given its position is restored in place. A checkpoint without the
    EMA that `abstract_state` has (or with one it lacks) restores too: `ema.restore_plan`.
    """
    target, finish = ema_lib.restore_plan(abstract_state, self.saved_fields(step), step)
    self.check_compatible(step, target)
    items = {_STATE: ocp.args.StandardRestore(target)}
    data_state = None
    if data_iterator is not None:
      data_state = self._data_state_of_other_process_count(step)
      if data_state is None:
        items[_DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    if data_state is not None:
      data_iterator.set_state(data_state)
    logging.info("restored step %d from %s", step, self.directory)
    return finish(restored[_STATE])

  def _data_state_of_other_process_count(self, step: int) -> dict | None:
    """The iterator state when checkpoint `step` was written by another number of processes.

    The rule when the process count changes: the bucketed iterator's state is the number of
    global batches taken, the same on every process, so any process's saved state is valid
    for every process of the new job. Kept: the step, each global batch's size and the bucket
    (shape) of every later step, which depend on the seed and the buckets alone. Changed:
    which clips make up each global batch. Each process reads its own slice of every bucket
    (`loader.shard_members`: permuted[p::P]) in its own shuffled order, so the slices, their
    orders and hence the clips of global batch k follow the new process count; epoch progress
    (batches taken x batch size / clips) is the same. A new mesh on the same process count
    keeps the clips as well. Both hold while the buckets' global batch sizes stay the
    same: `compute_buckets` rounds them down to a multiple of the mesh's batch shards
    (data x fsdp), and the bucket weights follow them (`data.BucketsInState` warns when a
    restore changes them). Packed batches (`data.packing`) save
    a position in each process's own clip stream, which differs between processes: such a
    checkpoint resumes only on the process count that wrote it (the ValueError below). None
    when the counts match (Grain's own restore then runs).
    """
    directory = os.path.join(self.directory, str(step), _DATA)
    mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if not os.path.isdir(directory) or os.path.exists(os.path.join(directory, mine)):
      return None
    states = []
    for name in sorted(os.listdir(directory)):
      if name.startswith("process_") and name.endswith(".json"):
        with open(os.path.join(directory, name), encoding="utf-8") as f:
          states.append((name, json.load(f)))
    if not states:
      return None
    if any(state != states[0][1] for _, state in states):
      raise ValueError(
          f"checkpoint {step} in {self.directory} holds per-process data iterator states that"
          f" differ ({', '.join(n for n, _ in states)}), so it cannot resume on"
          f" {jax.process_count()} processes; resume with the process count that wrote it"
          f" ({len(states)}, e.g. `python -m launch.local --num_processes={len(states)} -- ...`)."
      )
    logging.warning(
        "checkpoint %d was written by %d processes, resuming on %d: every process takes the"
        " saved data position %s", step, len(states), jax.process_count(), states[0][1],
    )
    return states[0][1]

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
