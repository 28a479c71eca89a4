"""The 3-D patch discriminator, the GAN losses, and the autoencoder's GAN train step."""

import functools
import json
import math
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import autoencoder as autoencoder_experiment
from spacetime_dit import config_types
from spacetime_dit.models import discriminator as discriminator_lib
from spacetime_dit.sharding import mesh as mesh_lib
from spacetime_dit.training import builders
from spacetime_dit.training import stages
from spacetime_dit.training import state as state_lib
from spacetime_dit.training import steps

RULES = config_types.MeshConfig().rules
VIDEO_SHAPE = (2, 5, 16, 16, 3)


def _key(seed):
  return jax.random.key(seed, impl="rbg")


def _video(seed, shape=VIDEO_SHAPE):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _config(**loss):
  """The tiny autoencoder config with `loss` fields overridden (2 discriminator layers)."""
  config = autoencoder_experiment.get_config("tiny")
  config.unlock()
  config.loss.disc_layers = 2
  for key, value in loss.items():
    setattr(config.loss, key, value)
  return config


# --- the discriminator --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layers, shape, expected",
    [
        (3, (2, 5, 32, 24, 3), (2, 2, 4, 3)),  # T 5 -> 3 -> 2 (two time strides), H, W / 8
        (2, (1, 9, 16, 16, 3), (1, 3, 4, 4)),  # T 9 -> 5 -> 3
        (3, (1, 1, 16, 16, 3), (1, 1, 2, 2)),  # an image stays one frame
    ],
)
def test_logit_grid_shapes(layers, shape, expected):
  model = discriminator_lib.PatchDiscriminator(discriminator_lib.DiscriminatorConfig(channels=8, num_layers=layers))
  video = jnp.zeros(shape, jnp.float32)
  variables = jax.eval_shape(lambda k: model.init(k, video), _key(0))
  logits = jax.eval_shape(model.apply, variables, video)
  assert logits.shape == expected and logits.dtype == jnp.float32
  params = nn.meta.unbox(variables["params"])
  channels = [params[f"conv{i}"]["kernel"].shape[-1] for i in range(layers + 1)]
  assert channels == [8 * 2**i for i in range(layers + 1)]
  assert params["conv0"]["kernel"].shape[:3] == (3, 4, 4)
  # Kernels carry logical axis names: output channels shard like every other conv's.
  assert variables["params"]["conv1"]["kernel"].names[-1] == "conv_out"


def test_discriminator_is_finite_and_differs_between_clips():
  model = discriminator_lib.PatchDiscriminator(discriminator_lib.DiscriminatorConfig(channels=8, num_layers=2))
  video = jnp.asarray(_video(0), jnp.float32) / 127.5 - 1.0
  params = model.init(_key(0), video)
  logits = np.asarray(jax.jit(model.apply)(params, video))
  assert np.isfinite(logits).all()
  assert not np.allclose(logits[0], logits[1])


def test_discriminator_config_errors_name_the_fix():
  with pytest.raises(ValueError, match=r"divisible by it, but \[12\].*multiple of 8"):
    discriminator_lib.DiscriminatorConfig(channels=6, num_layers=2)
  with pytest.raises(ValueError, match="norm='batch' is not one of"):
    discriminator_lib.DiscriminatorConfig(norm="batch")
  with pytest.raises(ValueError, match="num_layers=0 must be >= 1"):
    discriminator_lib.DiscriminatorConfig(num_layers=0)
  # Fewer layers than time strides: every layer halves time.
  assert discriminator_lib.DiscriminatorConfig(num_layers=1).time_downsample_layers == 2


# --- the losses ---------------------------------------------------------------------------------


def test_hinge_losses_closed_form():
  real, fake = jnp.array([2.0, 0.0, 0.5]), jnp.array([-2.0, 0.5, -1.0])
  # real: relu(1 - [2, 0, .5]) = [0, 1, .5]; fake: relu(1 + [-2, .5, -1]) = [0, 1.5, 0].
  np.testing.assert_allclose(discriminator_lib.hinge_d_loss(real, fake), 0.5 * (0.5 + 0.5), rtol=1e-6)
  np.testing.assert_allclose(discriminator_lib.hinge_d_loss(jnp.ones(3), -jnp.ones(3)), 0.0)
  np.testing.assert_allclose(discriminator_lib.hinge_d_loss(jnp.zeros(3), jnp.zeros(3)), 1.0)
  np.testing.assert_allclose(discriminator_lib.generator_loss(fake), 2.5 / 3, rtol=1e-6)


def test_adaptive_weight_closed_form_clip_and_stop_gradient():
  rec, gan = jnp.array([[3.0, 4.0]]), jnp.array([[0.0, 1.0]])
  np.testing.assert_allclose(discriminator_lib.adaptive_weight(rec, gan), 5.0 / (1.0 + 1e-4), rtol=1e-6)
  np.testing.assert_allclose(discriminator_lib.adaptive_weight(rec, jnp.zeros(2)), 1e4)  # 5 / 1e-4, clipped
  grads = jax.grad(lambda r, g: discriminator_lib.adaptive_weight(r, g), argnums=(0, 1))(rec, gan)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in grads)


def test_loss_config_checks_and_old_configs_default_to_no_gan():
  with pytest.raises(ValueError, match="both 0"):
    steps.AutoencoderLossConfig(l1_weight=0.0, l2_weight=0.0)
  with pytest.raises(ValueError, match="disc_start=-1 must be >= 0"):
    steps.AutoencoderLossConfig(disc_start=-1)
  with pytest.raises(ValueError, match="Did you mean 'disc_weight'"):
    builders.loss_config(_typo_config())
  old = builders.loss_config(_old_config())
  assert old == steps.AutoencoderLossConfig(kl_weight=1e-6) and not old.use_discriminator


def _typo_config():
  config = _config()
  config.loss.disc_weigth = 0.1  # unlocked: the typo reaches the dataclass boundary
  return config


def _old_config():
  config = _config()
  del config.loss["l1_weight"], config.loss["l2_weight"], config.loss["disc_weight"]
  del config.loss["disc_start"], config.loss["disc_channels"], config.loss["disc_layers"]
  return config


@pytest.mark.parametrize("variant", ["tiny", "cpu", "s", "b", "xl"])
def test_gan_is_off_for_the_small_variants_and_on_at_pod_scale(variant):
  config = autoencoder_experiment.get_config(variant)
  _, discriminator, _, _, _, loss = builders.build_autoencoder_training(config)
  assert loss.use_discriminator == (variant not in ("tiny", "cpu"))
  assert (discriminator is not None) == loss.use_discriminator


def test_autoencoder_params_of_either_layout():
  bare = {"encoder": {"w": 1}, "decoder": {"w": 2}}
  assert builders.autoencoder_params(bare) is bare
  assert builders.autoencoder_params({"autoencoder": bare, "discriminator": {"w": 3}}) is bare


# --- the GAN step -------------------------------------------------------------------------------


def _create(config, tx=None):
  """(step function, state) on one device; `tx` replaces the configured optimizer."""
  model, discriminator, init_params, config_tx, schedule, loss = builders.build_autoencoder_training(config)
  tx = tx or config_tx
  step = functools.partial(
      steps.autoencoder_step, model=model, discriminator=discriminator, tx=tx, schedule=schedule, loss=loss
  )
  mesh = mesh_lib.make_mesh(config_types.MeshConfig(data=1), jax.devices()[:1])
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    state = state_lib.create_state(init_params, tx, mesh, RULES, seed=0)
  return step, state, (model, discriminator, loss)


def test_gan_step_matches_brute_force_gradients():
  """The vjp-based step equals jax.grad of the written-out objectives, adaptive weight included."""
  step, state, (model, discriminator, loss) = _create(_config(disc_weight=0.1, disc_start=0), optax.sgd(1.0))
  video_u8 = _video(1)
  params = jax.device_get(state.params)
  new_state, metrics = jax.jit(step)(state, {"video": video_u8}, {})

  video = steps.video_to_model_range(jnp.asarray(video_u8))
  rng = jax.random.fold_in(state.rng, state.step)

  @jax.jit
  def brute_force(ae, d):
    """(adaptive weight, AE loss, AE grads, D loss, D grads) by jax.grad of the objectives."""

    def outputs(ae):
      return model.apply({"params": ae}, video, sample_posterior=True, rngs={"sample": rng})

    def rec_loss(ae):
      recon, mean, logvar = outputs(ae)
      return steps.reconstruction_loss(recon, video, mean, logvar, loss)[0]

    def gen_loss(ae):
      return discriminator_lib.generator_loss(discriminator.apply({"params": d}, outputs(ae)[0]))

    last = lambda g: g["decoder"]["conv_out"]["kernel"]
    rec_last, gen_last = last(jax.grad(rec_loss)(ae)), last(jax.grad(gen_loss)(ae))
    weight = jnp.linalg.norm(rec_last) / (jnp.linalg.norm(gen_last) + 1e-4)
    total, ae_grads = jax.value_and_grad(lambda ae: rec_loss(ae) + 0.1 * weight * gen_loss(ae))(ae)
    recon = jax.lax.stop_gradient(outputs(ae)[0])

    def d_loss(d):
      return discriminator_lib.hinge_d_loss(
          discriminator.apply({"params": d}, video), discriminator.apply({"params": d}, recon)
      )

    return (weight, total, ae_grads, *jax.value_and_grad(d_loss)(d))

  ae, d = params["autoencoder"], params["discriminator"]
  weight, total, ae_grads, d_loss, d_grads = brute_force(ae, d)
  np.testing.assert_allclose(metrics["adaptive_weight"], weight, rtol=1e-4)
  np.testing.assert_allclose(metrics["loss"], total, rtol=1e-5)
  np.testing.assert_allclose(metrics["d_loss"], d_loss, rtol=1e-5)
  # SGD with rate 1: new params = params - gradient.
  expected = jax.tree.map(
      jnp.subtract, {"autoencoder": ae, "discriminator": d}, {"autoencoder": ae_grads, "discriminator": d_grads}
  )
  chex.assert_trees_all_close(jax.device_get(new_state.params), expected, atol=1e-5, rtol=1e-4)


def test_gan_term_is_off_before_disc_start():
  """Before disc_start the autoencoder trains exactly as without a GAN; the discriminator waits."""
  no_gan_step, no_gan_state, _ = _create(_config(disc_weight=0.0))
  gan_step, gan_state, _ = _create(_config(disc_weight=0.1, disc_start=5))
  chex.assert_trees_all_equal(jax.device_get(gan_state.params["autoencoder"]), jax.device_get(no_gan_state.params))
  d_init = jax.device_get(gan_state.params["discriminator"])
  no_gan_step, gan_step = jax.jit(no_gan_step), jax.jit(gan_step)
  for seed in (2, 3):  # two steps: the first has learning rate 0 (warmup)
    batch = {"video": _video(seed)}
    no_gan_state, no_gan_metrics = no_gan_step(no_gan_state, batch, {})
    gan_state, gan_metrics = gan_step(gan_state, batch, {})
    assert float(gan_metrics["gan_active"]) == 0.0
    for key in ("loss", "recon_l1", "recon_mse", "kl", "psnr"):
      np.testing.assert_allclose(gan_metrics[key], no_gan_metrics[key], rtol=1e-6, err_msg=key)
  chex.assert_trees_all_close(
      jax.device_get(gan_state.params["autoencoder"]), jax.device_get(no_gan_state.params), atol=1e-6, rtol=1e-5
  )
  chex.assert_trees_all_equal(jax.device_get(gan_state.params["discriminator"]), d_init)


def test_a_few_gan_steps_are_finite_and_train_the_discriminator():
  step, state, _ = _create(_config(disc_weight=0.1, disc_start=1))
  d_init = jax.device_get(state.params["discriminator"])
  step = jax.jit(step)
  active = []
  for seed in range(4):
    state, metrics = step(state, {"video": _video(seed)}, {})
    metrics = jax.device_get(metrics)
    assert all(math.isfinite(float(v)) for v in metrics.values()), metrics
    assert {"g_loss", "d_loss", "adaptive_weight", "d_real", "d_fake"} <= set(metrics)
    active.append(float(metrics["gan_active"]))
  assert active == [0.0, 1.0, 1.0, 1.0]
  # The discriminator's first update has learning rate 0 (its own warmup starts at disc_start).
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), jax.device_get(state.params["discriminator"]), d_init)
  assert all(jax.tree.leaves(moved))


def test_gan_run_restores_bare_autoencoder_params(tmp_path):
  """A real tiny run with the GAN on: its checkpoint restores to the bare autoencoder."""
  config = _config(disc_weight=0.1, disc_start=1)
  config.train.num_steps, config.train.checkpoint_every, config.train.log_every = 3, 3, 1
  workdir = str(tmp_path / "ae_gan")
  stages.train_autoencoder(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  assert [r["gan_active"] for r in rows] == [0.0, 1.0, 1.0]
  assert all(math.isfinite(r["d_loss"]) and math.isfinite(r["adaptive_weight"]) for r in rows)
  assert os.path.exists(os.path.join(workdir, builders.LATENT_STATS_FILE))

  mesh = mesh_lib.make_mesh(config_types.MeshConfig(data=1), jax.devices()[:1])
  _, model, params, _, step = builders.restore_params(workdir, mesh, RULES)
  assert step == 3 and set(params) == {"encoder", "decoder"}
  _, ae_init = builders.build_autoencoder(config)
  chex.assert_trees_all_equal_shapes(params, nn.meta.unbox(jax.eval_shape(ae_init, _key(0))))
  recon, _, _ = model.apply({"params": params}, jnp.zeros((1, 5, 16, 16, 3)), sample_posterior=False)
  assert recon.shape == (1, 5, 16, 16, 3)


def test_check_config_refuses_a_discriminator_that_never_starts():
  config = autoencoder_experiment.get_config("tiny")
  config.unlock()
  config.loss.disc_weight, config.loss.disc_start = 0.1, config.train.num_steps
  with pytest.raises(ValueError, match="disc_start=4 is not below"):
    stages.check_config(config)
  config.loss.disc_start = 1
  stages.check_config(config)
