"""Elastic restore: checkpoints move between meshes and process counts (issue 7).

1. A tiny DiT trained on 8 devices (fsdp=8) is resumed from its step-2 checkpoint on 4 devices
   (data=2 x fsdp=2), whose step-4 checkpoint is resumed on 1 device. Parameters and optimizer
   state restore bitwise onto every mesh; the saved data positions, and the losses, are those
   of the uninterrupted 8-device run.
2. A 2-process job (`launch.local`) is resumed from its step-2 checkpoint as 2 processes
   (bitwise the uninterrupted job) and as 1 process on 1 device (same step and data position;
   see `Checkpointer._data_state_of_other_process_count` for what changes).
3. That rule on the loader itself, with four buckets: the step, the bucket order and the global
   batch size are kept across process counts; the clips of each global batch are not.
4. A restore whose buckets' global batch sizes differ (another mesh rounds them differently)
   warns, naming the buckets (`data.BucketsInState`).

Fake device counts are fixed per process, so every mesh is its own `spacetime_dit.train`
subprocess. A "resume from step 2" is a copy of the finished run's workdir without its later
checkpoints: deterministic, where a kill would land anywhere (tests/test_launch_local.py and
tests/test_resume_exact.py kill for real).
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from data_pipelines import buckets as buckets_lib
from data_pipelines import loader
from data_pipelines import shapesworld
from spacetime_dit import config_types
from spacetime_dit.sharding import mesh as mesh_lib
from spacetime_dit.training import builders
from spacetime_dit.training import checkpointing
from spacetime_dit.training import data as data_lib
from spacetime_dit.training import state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every mesh must see the same global batches: one bucket shape, and a global batch (8 clips)
# that the token budget allows and that every batch-axis size used here (8, 4, 1) divides, so
# the bucket's batch size does not depend on the mesh (see data_pipelines/buckets.py).
_DIT = [
    "--config=experiments/base.py:tiny", "--config.train.num_steps=6", "--config.train.checkpoint_every=2",
    "--config.train.keep_every=2", "--config.data.max_buckets=1", "--config.data.max_batch_size=8",
    "--config.data.latent_cache_clips=16", "--config.sample.prompts=('a red circle moving right',)",
    "--config.sample.frames=1", "--config.sample.height=8", "--config.sample.width=8",
]
_AUTOENCODER = [
    "--config=experiments/autoencoder.py:tiny", "--config.train.num_steps=4", "--config.train.checkpoint_every=2",
    "--config.train.keep_every=2", "--config.data.max_buckets=1", "--config.data.num_index_samples=2000",
    "--config.data.token_budget=9600", "--config.data.max_batch_size=2", "--config.latent_stats_clips=2",
]


def _env(devices: int) -> dict[str, str]:
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  env = {**os.environ, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip()}
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("PYTEST_CURRENT_TEST", None)
  return env


def _run(argv: list[str], devices: int) -> subprocess.CompletedProcess:
  result = subprocess.run(argv, cwd=REPO, env=_env(devices), capture_output=True, text=True, timeout=600)
  if result.returncode:
    raise AssertionError(f"{argv} exited {result.returncode}:\n{result.stderr[-4000:]}")
  return result


def _train(workdir: str, devices: int, *flags: str):
  return _run([sys.executable, "-m", "spacetime_dit.train", *flags, f"--workdir={workdir}"], devices)


def _rows(workdir: str) -> dict[int, dict]:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return {row["step"]: row for row in map(json.loads, f)}


def _without_timing(rows: dict[int, dict]) -> dict[int, dict]:
  """Metrics rows without the fields that measure speed (they differ between any two runs)."""
  timing = ("steps_per_sec", "tokens_per_sec", "data_wait_fraction")
  return {step: {k: v for k, v in row.items() if k not in timing} for step, row in rows.items()}


def _data_states(workdir: str, step: int) -> dict[str, dict]:
  """{file name: iterator state} of checkpoint `step`'s data item (one file per process)."""
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, "checkpoints", str(step), "data", "process_*.json"))):
    with open(path, encoding="utf-8") as f:
      out[os.path.basename(path)] = json.load(f)
  return out


def _resume_copy(source: str, target: str, keep_through: int) -> str:
  """`source` as it was when checkpoint `keep_through` was its newest (later ones deleted)."""
  shutil.copytree(source, target)
  for step in os.listdir(os.path.join(target, "checkpoints")):
    if step.isdigit() and int(step) > keep_through:
      shutil.rmtree(os.path.join(target, "checkpoints", step))
  return target


def _restored(workdir: str, step: int, mesh_config: config_types.MeshConfig, devices) -> tuple:
  """Checkpoint `step` of a DiT workdir restored onto a mesh over `devices`: (host leaves, state)."""
  config = builders.load_config(workdir)
  ae_config = builders.load_config(builders.autoencoder_workdir(config, workdir))
  _, init_params, _ = builders.build_dit(config, ae_config.model.latent_channels)
  tx, _ = builders.build_optimizer(config)
  mesh = mesh_lib.make_mesh(mesh_config, devices)
  # With the run's EMA of the weights (when it has one), so the average is compared too.
  ema_decay = config.train.get("ema_decay", 0.0)
  abstract, _ = state_lib.state_shardings(init_params, tx, mesh, mesh_config.rules, config.seed, ema_decay)
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  try:
    state = checkpointer.restore(step, abstract)
  finally:
    checkpointer.close()
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))], state


def test_dit_checkpoint_moves_from_8_devices_to_4_to_1(tmp_path, untrained_autoencoder):
  flags = [*_DIT, f"--config.autoencoder.workdir={untrained_autoencoder}"]
  fsdp8 = ["--config.mesh.data=1", "--config.mesh.fsdp=8"]
  data2_fsdp2 = ["--config.mesh.data=2", "--config.mesh.fsdp=2"]
  single = ["--config.mesh.data=1", "--config.mesh.fsdp=1"]

  # The uninterrupted run: 8 devices, fsdp=8, checkpoints 2, 4 and 6 kept.
  reference = str(tmp_path / "reference")
  _train(reference, 8, *flags, *fsdp8)
  # Resumed from its step-2 checkpoint on 4 devices; that run's step-4 checkpoint on 1 device.
  on_4 = _resume_copy(reference, str(tmp_path / "on_4"), keep_through=2)
  _train(on_4, 4, *flags, *data2_fsdp2)
  on_1 = _resume_copy(on_4, str(tmp_path / "on_1"), keep_through=4)
  _train(on_1, 1, *flags, *single)

  # The data state each run saved (position and buckets with their global batch sizes) is the
  # uninterrupted run's, step for step; with the seed and the process count it fixes every
  # later batch. (The batches' clips are not logged; the losses below show them too.)
  for step in (4, 6):
    assert _data_states(on_4, step) == _data_states(reference, step) != {}
  assert _data_states(on_1, 6) == _data_states(reference, 6)

  # Same batches, same noise (threefry keys are sharding-independent), same parameters: the
  # losses match the uninterrupted run. Not bitwise: another mesh sums the batch and the
  # fsdp-sharded contractions in another order (other all-reduce trees, other partial sums),
  # which moves float32 results in the last bits, and Adam carries that into later steps.
  ref, rows_4, rows_1 = _rows(reference), _rows(on_4), _rows(on_1)
  assert sorted(rows_4) == sorted(rows_1) == sorted(ref) == [1, 2, 3, 4, 5, 6]
  for rows, steps in ((rows_4, (3, 4, 5, 6)), (rows_1, (5, 6))):
    for step in steps:
      for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(rows[step][key], ref[step][key], rtol=2e-5, err_msg=f"{key} at step {step}")
  # A different batch would be far off: the check above can fail.
  assert abs(ref[3]["loss"] - ref[4]["loss"]) > 1e-3

  # Parameters, optimizer state (and EMA) restore bitwise onto any mesh (gathered to the host; the
  # reference is the restore onto fsdp=8, the layout step 2 was written from), and really
  # land in the new layout.
  devices = jax.devices()
  meshes = {
      "fsdp8": (config_types.MeshConfig(data=1, fsdp=8), devices),
      "data2_fsdp2": (config_types.MeshConfig(data=2, fsdp=2), devices[:4]),
      "single": (config_types.MeshConfig(data=1, fsdp=1), devices[:1]),
  }
  for workdir, step in ((reference, 2), (on_4, 4)):
    restored = {name: _restored(workdir, step, cfg, devs) for name, (cfg, devs) in meshes.items()}
    saved, _ = restored["fsdp8"]
    for name, (leaves, state) in restored.items():
      assert len(leaves) == len(saved)
      assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(leaves, saved)), (workdir, name)
      assert {d for x in jax.tree.leaves(state) for d in x.sharding.device_set} == set(meshes[name][1])
    assert int(restored["single"][1].step) == step
    # The biggest split of any parameter: 8 ways on fsdp=8, 2 ways on data=2 x fsdp=2.
    splits = {
        name: max(x.size // np.prod(x.sharding.shard_shape(x.shape)) for x in jax.tree.leaves(state.params))
        for name, (_, state) in restored.items()
    }
    assert splits == {"fsdp8": 8, "data2_fsdp2": 2, "single": 1}


@pytest.mark.slow
def test_two_process_checkpoint_resumes_as_two_processes_and_as_one(tmp_path):
  launcher = [sys.executable, "-m", "launch.local", "--num_processes=2", "--devices_per_process=1", "--",
              *_AUTOENCODER]
  reference = str(tmp_path / "reference")
  _run([*launcher, f"--workdir={reference}"], devices=1)
  # One iterator state per process, all equal: the number of global batches taken.
  states = _data_states(reference, 2)
  assert sorted(states) == ["process_0-of-2.json", "process_1-of-2.json"]
  assert states["process_0-of-2.json"] == states["process_1-of-2.json"]
  assert states["process_0-of-2.json"]["next_index"] == 2

  # As 2 processes (the same mesh): every later step bitwise that of the uninterrupted job.
  as_two = _resume_copy(reference, str(tmp_path / "as_two"), keep_through=2)
  _run([*launcher, f"--workdir={as_two}"], devices=1)
  assert _without_timing(_rows(as_two)) == _without_timing(_rows(reference))
  assert _data_states(as_two, 4) == _data_states(reference, 4)

  # As 1 process on 1 device (another process count and mesh): every process's saved state is
  # the job's position, so the run continues at step 3 with global batch 3 of the same bucket
  # order; the global batch size (2) is the same, the clips in it follow the new process count.
  as_one = _resume_copy(reference, str(tmp_path / "as_one"), keep_through=2)
  result = _train(as_one, 1, *_AUTOENCODER)
  assert "written by 2 processes, resuming on 1" in result.stderr
  assert "saved with other buckets" not in result.stderr
  rows = _rows(as_one)
  assert sorted(rows) == [1, 2, 3, 4]
  assert all(rows[s]["loss"] == _rows(reference)[s]["loss"] for s in (1, 2))
  # Steps 3 and 4 train on other clips than the 2-process job's (finite, not equal).
  assert all(np.isfinite(rows[s]["loss"]) for s in (3, 4))
  assert _data_states(as_one, 4) == {"process_0-of-1.json": states["process_0-of-2.json"] | {"next_index": 4}}
  assert os.path.exists(os.path.join(as_one, "latent_stats.json"))


def _global_batches(source, buckets, indices, shapes, process_count, num_batches, state=None):
  """The next `num_batches` global batches of a job of `process_count` processes (every
  process's iterator built here, started from `state`): [(shape, sorted clip indices)]."""
  iterators = [
      loader.make_bucketed_iterator(
          source, buckets=buckets, seed=0, tokenize=data_lib.no_text,
          process_index=p, process_count=process_count, indices=indices, shapes=shapes, num_threads=1,
      ) for p in range(process_count)
  ]
  if state is not None:
    for it in iterators:
      it.set_state(state)
  out = []
  for _ in range(num_batches):
    parts = [next(it) for it in iterators]
    assert len({part["video"].shape for part in parts}) == 1  # One shape per step across processes.
    out.append((parts[0]["video"].shape[1:4], sorted(int(i) for part in parts for i in part["index"])))
  states = [it.get_state() for it in iterators]
  for it in iterators:
    it.close()
  assert all(s == states[0] for s in states)  # One position for the whole job.
  return out, states[0]


def test_the_data_rule_when_the_process_count_changes():
  """What `Checkpointer._data_state_of_other_process_count` states, on four buckets."""
  source = shapesworld.ShapesWorld(shapesworld.ShapesWorldConfig(seed=0, sizes=((32, 32), (24, 40)), lengths=(1, 5)))
  indices = loader.select_indices(len(source), num_samples=96, seed=0)
  shapes = loader.shapes_of(source, indices)
  buckets, _ = buckets_lib.compute_buckets(
      shapes, tokens_per_clip=lambda s: s[0], token_budget=20, batch_multiple=2, max_batch_size=4)
  assert len(buckets) == 4 and {b.batch_size for b in buckets} == {4}
  _, state = _global_batches(source, buckets, indices, shapes, 2, 5)
  assert state == {"next_index": 5}
  later_on_two, _ = _global_batches(source, buckets, indices, shapes, 2, 12, state)
  later_on_one, _ = _global_batches(source, buckets, indices, shapes, 1, 12, state)
  # Kept: the step, the bucket of every later step, the global batch size.
  assert [s for s, _ in later_on_one] == [s for s, _ in later_on_two]
  assert len({s for s, _ in later_on_two}) > 1  # The bucket order is not trivial.
  assert all(len(a) == len(b) == 4 for (_, a), (_, b) in zip(later_on_one, later_on_two))
  # Changed: the clips of a global batch (each process reads its own slice in its own order).
  assert [c for _, c in later_on_one] != [c for _, c in later_on_two]
  # Restoring on the count that wrote the state is exact.
  assert _global_batches(source, buckets, indices, shapes, 2, 17)[0][5:] == later_on_two


def test_a_resume_whose_bucket_batch_sizes_differ_warns(caplog):
  # Batch sizes budget // frames, capped at 8: 8 clips of 1 frame, 3 of 5 frames on a mesh of
  # 1 batch shard, but 2 on one of 2 shards (rounded down to a multiple of the shards).
  config = config_types.DataConfig(sizes=((32, 32),), lengths=(1, 5), num_index_samples=64, token_budget=15,
                                   max_batch_size=8, num_threads=1)

  def iterator(batch_shards):
    return data_lib.make_iterator(config, tokens_per_clip=lambda s: s[0], batch_multiple=batch_shards,
                                  tokenize=data_lib.no_text, process_index=0, process_count=1)[0]

  saved = iterator(1)
  for _ in range(3):
    next(saved)
  state = saved.get_state()
  assert state[data_lib.BUCKETS_KEY] == [[1, 32, 32, 8], [5, 32, 32, 3]]
  resumed, other_mesh = iterator(1), iterator(2)
  with caplog.at_level("WARNING"):
    resumed.set_state(state)
    assert not caplog.records
    other_mesh.set_state({k: v for k, v in state.items() if k != data_lib.BUCKETS_KEY})  # An older checkpoint.
    assert not caplog.records
    other_mesh.set_state(state)
  assert "5x32x32: 3 -> 2" in caplog.text and "1x32x32" not in caplog.text
  assert next(resumed)["index"].tolist() == next(saved)["index"].tolist()
  for it in (saved, resumed, other_mesh):
    it.close()
