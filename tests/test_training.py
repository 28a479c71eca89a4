"""Train steps under sharding, compile counts, and exact resume of a real (tiny) run."""

import functools
import json
import os
import shutil

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import autoencoder as autoencoder_experiment
from experiments import base as base_experiment
from spacetime_dit import config_types
from spacetime_dit.config_types import MeshConfig
from spacetime_dit.sharding import mesh as mesh_lib
from spacetime_dit.training import builders
from spacetime_dit.training import data as data_lib
from spacetime_dit.training import stages
from spacetime_dit.training import state as state_lib
from spacetime_dit.training import steps

RULES = MeshConfig().rules


def _clips(shape, count, tokenizer):
  """A real ShapesWorld batch of `count` clips of one native (T, H, W)."""
  data_cfg = config_types.dataclass_from_config(
      config_types.DataConfig, base_experiment.get_config("tiny").data
  )
  source = data_lib.make_source(data_cfg)
  indices = [i for i in range(2000) if source.shape_of(i) == shape][:count]
  assert len(indices) == count
  examples = [source[i] for i in indices]
  ids, mask = tokenizer([e["caption"] for e in examples])
  return {"video": np.stack([e["video"] for e in examples]), "text_ids": ids, "text_mask": mask}


def _dit_setup(width=64, heads=4):
  ae_config = autoencoder_experiment.get_config("tiny")
  config = base_experiment.get_config("tiny")
  config.unlock()
  config.model.width, config.model.num_heads = width, heads
  ae_model, ae_init = builders.build_autoencoder(ae_config)
  model, init_params, tokenizer = builders.build_dit(config, ae_config.model.latent_channels)
  tx, schedule = builders.build_optimizer(config)
  ae_params = nn.meta.unbox(ae_init(jax.random.PRNGKey(1)))
  channels = ae_config.model.latent_channels
  frozen = {"autoencoder": ae_params, "latent_mean": jnp.zeros(channels), "latent_std": jnp.ones(channels)}
  diffusion = config_types.dataclass_from_config(config_types.DiffusionConfig, config.diffusion)
  step = functools.partial(
      steps.dit_step, model=model, autoencoder=ae_model, patch_size=model.config.patch_size,
      diffusion=diffusion, tx=tx, schedule=schedule,
  )
  return step, init_params, tx, tokenizer, frozen


def _run_step(step, init_params, tx, frozen, batch, mesh_config, devices=None):
  mesh = mesh_lib.make_mesh(mesh_config, devices)
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    _, shardings = state_lib.state_shardings(init_params, tx, mesh, RULES)
    state = state_lib.create_state(init_params, tx, mesh, RULES, seed=0)
    jitted = jax.jit(step, in_shardings=(shardings, None, None), out_shardings=(shardings, None), donate_argnums=0)
    new_state, metrics = jitted(state, mesh_lib.global_batch(batch, mesh, RULES), frozen)
  return shardings, jax.device_get(new_state.params), jax.device_get(metrics)


def test_dit_step_on_fsdp_tensor_mesh_matches_one_device_and_shards_big_weights():
  step, init_params, tx, tokenizer, frozen = _dit_setup()
  batch = _clips((5, 24, 40), 4, tokenizer)
  _, params_1, metrics_1 = _run_step(step, init_params, tx, frozen, batch, MeshConfig(data=1), jax.devices()[:1])
  shardings, params_8, metrics_8 = _run_step(
      step, init_params, tx, frozen, batch, MeshConfig(data=1, fsdp=2, tensor=2, sequence=2)
  )
  np.testing.assert_allclose(metrics_8["loss"], metrics_1["loss"], rtol=1e-4)
  np.testing.assert_allclose(metrics_8["grad_norm"], metrics_1["grad_norm"], rtol=1e-3)
  chex.assert_trees_all_close(params_8, params_1, atol=1e-5, rtol=1e-4)
  # Every 2-D+ weight with more than 4k scalars must be split over the mesh, not replicated.
  abstract, _ = state_lib.state_shardings(init_params, tx, mesh_lib.make_mesh(MeshConfig(data=1, fsdp=2, tensor=2, sequence=2)), RULES)
  flat = jax.tree_util.tree_leaves_with_path(abstract.params)
  flat_shardings = jax.tree.leaves(shardings.params)
  big = [(jax.tree_util.keystr(p), s) for (p, a), s in zip(flat, flat_shardings) if a.size > 4096]
  assert big, "the model has no large weights to check"
  replicated = [name for name, s in big if s.is_fully_replicated]
  assert not replicated, f"large weights left replicated: {replicated}"


def test_each_bucket_shape_compiles_once():
  step, init_params, tx, tokenizer, frozen = _dit_setup(width=32, heads=2)
  mesh = mesh_lib.make_mesh(MeshConfig(data=-1))
  batches = [_clips(shape, 8, tokenizer) for shape in ((1, 32, 32), (5, 24, 40))]

  @chex.assert_max_traces(n=2)
  def traced(state, batch, frozen):
    return step(state, batch, frozen)

  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    state = state_lib.create_state(init_params, tx, mesh, RULES, seed=0)
    jitted = jax.jit(traced, donate_argnums=0)
    for _ in range(3):
      for batch in batches:
        state, _ = jitted(state, mesh_lib.global_batch(batch, mesh, RULES), frozen)
  assert int(state.step) == 6


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  return rows


def test_resumed_run_continues_exactly(tmp_path):
  config = autoencoder_experiment.get_config("tiny")
  config.unlock()
  config.train.num_steps, config.train.checkpoint_every, config.train.log_every = 6, 3, 1
  workdir = str(tmp_path / "ae")
  stages.train_autoencoder(config, workdir)
  first = _losses(workdir)
  assert [r["step"] for r in first] == [1, 2, 3, 4, 5, 6]
  # Lose the last checkpoint, as a crash after step 3's save would; rerun the same command.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
  os.remove(os.path.join(workdir, builders.LATENT_STATS_FILE))
  stages.train_autoencoder(config, workdir)
  # Rows after the restored step are dropped on resume (MetricsWriter.truncate_after), so the
  # file reads as one uninterrupted run: steps 4-6 are the rerun's.
  resumed = _losses(workdir)
  assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
  for before, after in zip(first, resumed):
    assert before["loss"] == after["loss"], (before, after)  # bitwise: same data, rng, state
    assert before["grad_norm"] == after["grad_norm"]
