"""Checkpoint housekeeping: keep the last N plus every K-th, async saves, incompatible configs."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spacetime_dit.training import checkpointing


def _write_config(workdir, width):
  os.makedirs(workdir, exist_ok=True)
  config = {"stage": "dit", "model": {"width": width, "depth": 2, "patch_size": [1, 2, 2]},
            "train": {"num_steps": 10}}
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f)
  return config


def _state(width):
  return {"step": jnp.int32(0), "params": {"dense": {"kernel": jnp.ones((width, 4))}, "bias": jnp.zeros(4)}}


@pytest.mark.parametrize("async_save", [True, False])
def test_keeps_the_last_n_plus_every_kth(tmp_path, async_save):
  checkpointer = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=2, keep_every=4,
                                            async_save=async_save)
  state = _state(3)
  for step in range(1, 11):
    checkpointer.save(step, state)
  checkpointer.close()
  assert checkpointing.Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [4, 8, 9, 10]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "4", "8", "9"]  # Nothing half-written.


def test_saving_an_existing_step_again_is_a_no_op(tmp_path):
  checkpointer = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  assert checkpointer.save(3, _state(3))
  assert not checkpointer.save(3, _state(3))
  checkpointer.close()


def test_an_incompatible_checkpoint_names_the_differing_fields_and_arrays(tmp_path):
  old = _write_config(tmp_path, width=3)
  checkpointer = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  checkpointer.save(5, _state(3))
  checkpointer.close()
  assert checkpointing.Checkpointer(str(tmp_path / "checkpoints")).saved_config(5) == old

  _write_config(tmp_path, width=5)  # What the new run's save_config does first.
  checkpointer = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  abstract = jax.eval_shape(lambda: _state(5))
  with pytest.raises(checkpointing.IncompatibleCheckpointError) as info:
    checkpointer.restore(5, abstract)
  message = str(info.value)
  assert "model.width: 3 -> 5" in message
  assert "params/dense/kernel: ((3, 4), 'float32') in the checkpoint, ((5, 4), 'float32') now" in message
  assert "train.num_steps" not in message and "--workdir" in message
  # The workdir's config.json matches its checkpoints again (sampling it keeps working).
  with open(tmp_path / "config.json", encoding="utf-8") as f:
    assert json.load(f) == old
  # A compatible config (same arrays) restores fine, whatever else changed.
  restored = checkpointer.restore(5, jax.eval_shape(lambda: _state(3)))
  np.testing.assert_array_equal(restored["params"]["dense"]["kernel"], np.ones((3, 4)))
  checkpointer.close()


def test_config_differences_normalises_tuples_and_lists():
  old = {"model": {"patch": [1, 2, 2], "width": 8}, "seed": 0}
  new = {"model": {"patch": (1, 2, 2), "width": 16}, "seed": 0, "extra": 1}
  assert checkpointing.config_differences(old, new) == ["extra: '<absent>' -> 1", "model.width: 8 -> 16"]
  assert checkpointing.config_differences(old, new, sections=("model",)) == ["model.width: 8 -> 16"]


def test_changed_since_names_objective_fields_that_differ_from_the_checkpoint(tmp_path):
  config = _write_config(tmp_path, width=3)
  checkpointer = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  checkpointer.save(2, _state(3))
  checkpointer.close()
  # The resumed run's config (written first by save_config) adds a conditioning mixture and
  # trains more steps: only the objective's section is reported.
  config["conditioning"] = {"text": 0.3}
  config["train"]["num_steps"] = 20
  with open(tmp_path / "config.json", "w", encoding="utf-8") as f:
    json.dump(config, f)
  checkpointer = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  assert checkpointer.changed_since(2) == ["conditioning.text: '<absent>' -> 0.3"]
  checkpointer.close()
