"""Shared pytest setup: 8 fake CPU devices, so sharding tests run on any machine."""

import fcntl
import os
import tempfile

import pytest

# Must happen before jax is imported anywhere: XLA reads the flags once at backend start.
# Tests run tiny shapes, where compiling dominates: the lowest backend optimisation level
# compiles about 2.5x faster and the programs still run in milliseconds.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA cache for the whole session (and the CLI subprocesses it starts), so
# the same tiny model is compiled once, not once per test workdir.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "spacetime_dit_test_xla_cache")
)


def train_tiny_run(workdir: str) -> str:
  """A tiny autoencoder + DiT trained two steps each on one ShapesWorld bucket shape.

  One bucket shape keeps compilation to one train step per stage (the autoencoder on 5 x 32 x 32,
  which fits its tiny token budget with one clip per fake device; the DiT on 9 x 32 x 32, the
  sample size). The DiT trains on the conditioning mixture of experiments/base.py:tiny, so every
  sampling mode has seen its masks.
  """
  # Imported here: jax must not start before XLA_FLAGS above is set.
  from experiments import autoencoder as autoencoder_experiment  # pylint: disable=g-import-not-at-top
  from experiments import base as base_experiment  # pylint: disable=g-import-not-at-top
  from spacetime_dit.training import stages  # pylint: disable=g-import-not-at-top

  ae_config = autoencoder_experiment.get_config("tiny")
  ae_config.data.sizes, ae_config.data.lengths = ((32, 32),), (5,)
  ae_config.train.num_steps = 2
  ae_config.latent_stats_clips = 4
  stages.train_autoencoder(ae_config, os.path.join(workdir, "autoencoder"))
  config = base_experiment.get_config("tiny")
  config.data.sizes, config.data.lengths = ((32, 32),), (9,)
  config.data.latent_cache_clips = 8
  config.train.num_steps = 2
  config.train.sample_every = 0
  stages.train_dit(config, workdir)
  return workdir


@pytest.fixture(scope="session")
def tiny_conditioned_run(tmp_path_factory, worker_id) -> str:
  """`train_tiny_run`'s workdir, trained once per test session and shared by the xdist workers.

  Read-only for the tests that use it. Workers share the parent of their base temp directories;
  the first to take the lock trains, the others wait and reuse the finished run.
  """
  root = tmp_path_factory.getbasetemp()
  if worker_id != "master":
    root = root.parent
  workdir = root / "tiny_conditioned_run"
  done = root / "tiny_conditioned_run.done"
  with open(root / "tiny_conditioned_run.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not done.exists():
        train_tiny_run(str(workdir))
        done.touch()
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return str(workdir)


@pytest.fixture(scope="session")
def untrained_autoencoder(tmp_path_factory) -> str:
  """A complete tiny autoencoder run (config, step-0 checkpoint, latent stats), untrained.

  Read-only for its users: a DiT run points `config.autoencoder.workdir` at it, or
  `encode_latents` reads it.
  """
  # Imported here: jax must not start before XLA_FLAGS above is set.
  import numpy as np  # pylint: disable=g-import-not-at-top
  from experiments import autoencoder as autoencoder_experiment  # pylint: disable=g-import-not-at-top
  from spacetime_dit import config_types  # pylint: disable=g-import-not-at-top
  from spacetime_dit.sharding import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from spacetime_dit.training import builders  # pylint: disable=g-import-not-at-top
  from spacetime_dit.training import checkpointing  # pylint: disable=g-import-not-at-top
  from spacetime_dit.training import state as state_lib  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path_factory.mktemp("untrained_ae"))
  config = autoencoder_experiment.get_config("tiny")
  builders.save_config(config, workdir)
  _, _, init_params, tx, _, _ = builders.build_autoencoder_training(config)
  mesh_cfg = config_types.MeshConfig()
  state = state_lib.create_state(init_params, tx, mesh_lib.make_mesh(mesh_cfg), mesh_cfg.rules,
                                 config.seed)
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  checkpointer.save(0, state)
  checkpointer.close()
  channels = config.model.latent_channels
  builders.save_latent_stats(workdir, np.zeros(channels), np.ones(channels))
  return workdir
