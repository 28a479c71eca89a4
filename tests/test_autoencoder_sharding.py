"""The autoencoder's GAN train step gives the same numbers on every mesh layout (8 fake CPUs).

Layouts: one device; pure data parallelism (data=8); FSDP (fsdp=8: every conv kernel's output
channels split 8 ways); and data=2 x sequence=4, where the activations' H axis is split over the
4 `sequence` devices (`ACT_HEIGHT -> sequence` in `sharding/rules.py`), once with every H
divisible by 4 and once with H = 24, where the discriminator's deep layers (H 6 and 3) are not
and must be gathered rather than split (`sharding.constraints`); and sequence=8 over H = 8,
where the autoencoder's own deep levels are uneven too.
"""

import functools

import chex
import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from experiments import autoencoder as autoencoder_experiment
from spacetime_dit.config_types import MeshConfig
from spacetime_dit.sharding import mesh as mesh_lib
from spacetime_dit.training import builders
from spacetime_dit.training import state as state_lib
from spacetime_dit.training import steps

RULES = MeshConfig().rules
# 8 clips (one per batch shard at data=8) of 5 frames. At H = 32 the autoencoder's H is 32, 16, 8
# and the discriminator's 16, 8, 4, all divisible by sequence=4; at H = 24 the discriminator's
# are 12, 6, 3. W is not sharded.
EVEN, UNEVEN = (8, 5, 32, 16, 3), (8, 5, 24, 16, 3)
LAYOUTS = {
    "data8": (MeshConfig(data=8), EVEN),
    "fsdp8": (MeshConfig(data=1, fsdp=8), EVEN),
    "data2_sequence4": (MeshConfig(data=2, sequence=4), EVEN),
    "data2_sequence4_uneven": (MeshConfig(data=2, sequence=4), UNEVEN),
    # H = 8 over 8 devices: the autoencoder's level-1 H (4) and latent H (2) are uneven too.
    "sequence8_small_frames": (MeshConfig(data=1, sequence=8), (8, 5, 8, 16, 3)),
}


@functools.cache
def _setup():
  config = autoencoder_experiment.get_config("tiny")
  config.unlock()
  config.loss.disc_weight, config.loss.disc_start = 0.1, 0
  model, discriminator, init_params, _, schedule, loss = builders.build_autoencoder_training(config)
  # Plain SGD with rate 1: the update is minus the gradient, so updated parameters compare
  # gradients elementwise (Adam's first step would turn every tiny gradient into +-lr).
  tx = optax.sgd(1.0)
  step = functools.partial(
      steps.autoencoder_step, model=model, discriminator=discriminator, tx=tx, schedule=schedule,
      loss=loss,
  )
  return step, init_params, tx


def _run(mesh_config, video_shape, devices=None):
  """(param shardings, updated params, metrics, compiled HLO text) of one step on a mesh."""
  step, init_params, tx = _setup()
  batch = {"video": np.random.default_rng(0).integers(0, 256, video_shape, dtype=np.uint8)}
  mesh = mesh_lib.make_mesh(mesh_config, devices)
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    _, shardings = state_lib.state_shardings(init_params, tx, mesh, RULES)
    state = state_lib.create_state(init_params, tx, mesh, RULES, seed=0)
    batch_shardings = {"video": mesh_lib.batch_sharding(mesh, RULES, 5)}
    jitted = jax.jit(
        step, in_shardings=(shardings, batch_shardings, None),
        out_shardings=(shardings, mesh_lib.replicated(mesh)),
    )
    global_batch = mesh_lib.global_batch(batch, mesh, RULES)
    compiled = jitted.lower(state, global_batch, {}).compile()
    new_state, metrics = compiled(state, global_batch, {})
  return shardings.params, jax.device_get(new_state.params), jax.device_get(metrics), compiled.as_text()


@functools.cache
def _reference(video_shape):
  _, params, metrics, _ = _run(MeshConfig(data=1), video_shape, jax.devices()[:1])
  return params, metrics


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gan_step_matches_one_device(layout):
  mesh_config, video_shape = LAYOUTS[layout]
  ref_params, ref_metrics = _reference(video_shape)
  shardings, params, metrics, hlo = _run(mesh_config, video_shape)
  for key in ("loss", "recon_l1", "recon_mse", "kl", "g_loss", "d_loss", "d_real", "d_fake"):
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-4, atol=1e-6, err_msg=key)
  for key in ("adaptive_weight", "grad_norm", "d_grad_norm"):
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-3, err_msg=key)
  # params - gradient, for both networks.
  chex.assert_trees_all_close(params, ref_params, atol=1e-5, rtol=1e-4)

  if layout == "fsdp8":
    # Every conv kernel with a mesh-divisible output width is split over fsdp, both networks'.
    flat = jax.tree_util.tree_leaves_with_path(shardings)
    kernels = {jax.tree_util.keystr(p): s for p, s in flat if "kernel" in jax.tree_util.keystr(p)}
    replicated = [k for k, s in kernels.items() if s.is_fully_replicated]
    # Only the RGB output conv and the 1-channel logit conv stay whole.
    assert sorted(replicated) == [
        "['autoencoder']['decoder']['conv_out']['kernel']",
        "['discriminator']['conv_logits']['kernel']",
    ], replicated
  if layout.startswith("data2_sequence4"):
    # Convolutions over an H split across devices exchange halo rows with their neighbours.
    assert "collective-permute" in hlo
