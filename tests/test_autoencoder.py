"""Tests for the causal video autoencoder (spacetime_dit.models.autoencoder and .conv3d)."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from spacetime_dit.models import autoencoder as ae
from spacetime_dit.models import conv3d
from spacetime_dit.sharding import axes
from spacetime_dit.sharding import rules

# tf=2, sf=4: the shape of the project's tiny quickstart autoencoder, with fewer channels.
TINY = ae.AutoencoderConfig(
    latent_channels=4, temporal_factor=2, spatial_factor=4, base_channels=8,
    channel_multipliers=(1, 2, 2), conv_impl="stacked2d")
# The other options: tf=4, per-frame GroupNorm, zero time padding, the taps-2d conv.
TINY_TF4 = ae.AutoencoderConfig(
    latent_channels=4, temporal_factor=4, spatial_factor=4, base_channels=8,
    channel_multipliers=(1, 1, 2), norm="group", norm_groups=4, time_padding="zeros",
    conv_impl="taps2d")


# The test shapes are tiny, so XLA's LLVM optimisation passes, not the math, dominate test time;
# level 0 compiles about 2.5x faster and changes no result beyond float rounding.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _key(seed: int) -> jax.Array:
  # XLA:CPU takes seconds to compile each threefry draw of a new shape; "rbg" keys compile in
  # milliseconds and are just as good for initialising a test model.
  return jax.random.key(seed, impl="rbg")


def _video(seed: int, shape) -> jax.Array:
  """Uniform noise in [-1, 1], drawn with numpy (no XLA compile per shape)."""
  return jnp.asarray(np.random.default_rng(seed).uniform(-1.0, 1.0, shape), jnp.float32)


def _normal(seed: int, shape) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@functools.cache
def _model_and_params(config: ae.AutoencoderConfig):
  model = ae.CausalVideoAutoencoder(config)
  init = _jit(lambda k: model.init({"params": k}, jnp.zeros((1, 1, 4, 4, 3)),
                                      sample_posterior=False))
  return model, init(_key(0))


@functools.cache
def _encode_fn(config: ae.AutoencoderConfig):
  model, _ = _model_and_params(config)
  return _jit(functools.partial(model.apply, method=model.encode))


@functools.cache
def _decode_fn(config: ae.AutoencoderConfig):
  model, _ = _model_and_params(config)
  return _jit(functools.partial(model.apply, method=model.decode))


# --- config and shape arithmetic ---------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(spatial_factor=6, channel_multipliers=(1, 2, 2)), "power of two"),
    (dict(temporal_factor=3), "temporal_factor=3"),
    (dict(temporal_factor=8, spatial_factor=4, channel_multipliers=(1, 2, 2)), "no larger"),
    (dict(spatial_factor=4, channel_multipliers=(1, 2)), r"log2\(sf\) \+ 1 = 3"),
    (dict(norm="layer"), "norm='layer'"),
    (dict(norm="group", norm_groups=3, base_channels=8), "divisible"),
    (dict(conv_impl="fft"), "conv_impl"),
    (dict(time_padding="reflect"), "time_padding"),
    (dict(logvar_min=1.0, logvar_max=0.0), "logvar_min"),
])
def test_config_rejects_invalid_values(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ae.AutoencoderConfig(**kwargs)


@pytest.mark.parametrize("config, video, latent", [
    (TINY, (1, 16, 24), (1, 4, 6)),
    (TINY, (5, 16, 16), (3, 4, 4)),
    (TINY, (9, 24, 16), (5, 6, 4)),
    (ae.AutoencoderConfig(), (17, 64, 128), (5, 8, 16)),
])
def test_latent_shape_and_video_shape_invert(config, video, latent):
  assert ae.latent_shape(config, *video) == latent
  assert ae.video_shape(config, *latent) == video


def test_latent_shape_errors_name_value_rule_and_fix():
  with pytest.raises(ValueError, match=r"has 4 frames.*1 \+ k\*2 frames \(e\.g\. 3\)"):
    ae.latent_shape(TINY, 4, 16, 16)
  with pytest.raises(ValueError, match=r"has 0 frames"):
    ae.latent_shape(TINY, 0, 16, 16)
  with pytest.raises(ValueError, match=r"height 18 .* spatial factor 4 \(e\.g\. 16\)"):
    ae.latent_shape(TINY, 5, 18, 16)
  with pytest.raises(ValueError, match=r"width 2 .* \(e\.g\. 4\)"):
    ae.latent_shape(TINY, 5, 16, 2)
  with pytest.raises(ValueError, match="positive"):
    ae.video_shape(TINY, 0, 4, 4)


# --- shapes through the network ----------------------------------------------------------------


@pytest.mark.parametrize("config, thw", [
    (TINY, (1, 16, 24)),
    (TINY, (5, 16, 16)),
    (TINY, (9, 24, 16)),
    (ae.AutoencoderConfig(latent_channels=4, temporal_factor=4, spatial_factor=8,
                          base_channels=8, channel_multipliers=(1, 1, 2, 2)), (9, 16, 24)),
    (ae.AutoencoderConfig(latent_channels=4, temporal_factor=4, spatial_factor=8,
                          base_channels=8, channel_multipliers=(1, 1, 2, 2)), (1, 8, 8)),
])
def test_output_shapes_for_videos_images_and_aspect_ratios(config, thw):
  model = ae.CausalVideoAutoencoder(config)
  video = jax.ShapeDtypeStruct((2, *thw, 3), jnp.float32)
  variables = jax.eval_shape(
      lambda k, v: model.init({"params": k}, v, sample_posterior=False), _key(0), video)
  recon, mean, logvar = jax.eval_shape(
      lambda p, v, k: model.apply(p, v, sample_posterior=True, rngs={"sample": k}),
      variables, video, _key(1))
  latent = (2, *ae.latent_shape(config, *thw), config.latent_channels)
  assert recon.shape == video.shape and recon.dtype == jnp.float32
  assert mean.shape == latent and logvar.shape == latent
  decoded = jax.eval_shape(lambda p, z: model.apply(p, z, method=model.decode), variables, mean)
  assert decoded.shape == video.shape


def test_encode_rejects_bad_frame_count():
  model, params = _model_and_params(TINY)
  with pytest.raises(ValueError, match="1 \\+ k\\*2 frames"):
    jax.eval_shape(lambda p, v: model.apply(p, v, method=model.encode), params,
                   jax.ShapeDtypeStruct((1, 4, 16, 16, 3), jnp.float32))


def test_encode_and_decode_run_through_apply_method():
  model, params = _model_and_params(TINY)
  video = _video(0, (1, 5, 16, 24, 3))

  @_jit
  def round_trip(params, video):
    mean, logvar = model.apply(params, video, method=model.encode)
    return mean, logvar, model.apply(params, mean, method=model.decode)

  mean, logvar, recon = round_trip(params, video)
  assert mean.shape == (1, 3, 4, 6, 4)
  assert bool(jnp.all(logvar >= TINY.logvar_min)) and bool(jnp.all(logvar <= TINY.logvar_max))
  assert recon.shape == video.shape
  assert bool(jnp.all(jnp.isfinite(recon)))


def test_posterior_sampling_uses_the_sample_rng():
  model, params = _model_and_params(TINY)
  video = _video(1, (1, 1, 8, 8, 3))

  @_jit
  def sampled_and_mean_recon(k):
    sampled = model.apply(params, video, sample_posterior=True, rngs={"sample": k})[0]
    return sampled, model.apply(params, video, sample_posterior=False)[0]

  a, mean_recon = sampled_and_mean_recon(_key(1))
  b, _ = sampled_and_mean_recon(_key(2))
  np.testing.assert_array_equal(a, sampled_and_mean_recon(_key(1))[0])
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3
  assert float(jnp.max(jnp.abs(a - mean_recon))) > 1e-3


# --- causality -----------------------------------------------------------------------------------


def _causality_batch(config: ae.AutoencoderConfig) -> jax.Array:
  """Three rows: a clip of 1 + 2*tf frames, then it with frames > tf and frames > 0 perturbed."""
  tf = config.temporal_factor
  video = _video(2, (1, 1 + 2 * tf, 16, 16, 3))
  noise = _video(3, video.shape)
  perturbed_late = video.at[:, tf + 1:].add(noise[:, tf + 1:])
  perturbed_all_but_first = video.at[:, 1:].add(noise[:, 1:])
  return jnp.concatenate([video, perturbed_late, perturbed_all_but_first])


@pytest.mark.parametrize("config", [TINY, TINY_TF4], ids=["tf2_rms", "tf4_group_zeros"])
def test_encoder_is_causal_in_time(config):
  mean, logvar = _encode_fn(config)(_model_and_params(config)[1], _causality_batch(config))
  for moment in (mean, logvar):
    # Latent frames 0 and 1 cover video frames <= tf; latent frame 0 covers frame 0 alone.
    np.testing.assert_allclose(moment[1, :2], moment[0, :2], atol=1e-5)
    np.testing.assert_allclose(moment[2, :1], moment[0, :1], atol=1e-5)
  assert float(jnp.max(jnp.abs(mean[1, 2:] - mean[0, 2:]))) > 1e-3
  assert float(jnp.max(jnp.abs(mean[2, 1:] - mean[0, 1:]))) > 1e-3


def test_image_latent_equals_first_latent_of_its_video():
  videos = _causality_batch(TINY)
  _, params = _model_and_params(TINY)
  mean_video, _ = _encode_fn(TINY)(params, videos)
  mean_image, _ = _encode_fn(TINY)(params, videos[:, :1])
  assert mean_image.shape[1] == 1
  np.testing.assert_allclose(mean_image[:, 0], mean_video[:, 0], atol=1e-5)


@pytest.mark.parametrize("config", [TINY, TINY_TF4], ids=["tf2_rms", "tf4_group_zeros"])
def test_decoder_is_causal_in_time(config):
  tf = config.temporal_factor
  latent = _normal(4, (1, 3, 4, 4, config.latent_channels))
  perturbed = latent.at[:, 2:].add(1.0)
  videos = _decode_fn(config)(_model_and_params(config)[1], jnp.concatenate([latent, perturbed]))
  # Latent frames 0 and 1 decode to video frames 0 .. tf; latent frame 2 to the rest.
  np.testing.assert_allclose(videos[1, :tf + 1], videos[0, :tf + 1], atol=1e-5)
  assert float(jnp.max(jnp.abs(videos[1, tf + 1:] - videos[0, tf + 1:]))) > 1e-3


# --- convolution building blocks -------------------------------------------------------------


@pytest.mark.parametrize("strides", [(1, 1, 1), (2, 2, 2)])
@pytest.mark.parametrize("time_padding", conv3d.TIME_PADDINGS)
def test_conv_implementations_agree(strides, time_padding):
  x = _video(6, (2, 5, 6, 8, 3))
  kernel = _normal(7, (3, 3, 3, 3, 4))

  @_jit
  def all_impls(x, kernel):
    return [conv3d.causal_conv3d(x, kernel, strides=strides, time_padding=time_padding, impl=i)
            for i in conv3d.CONV_IMPLS]

  outs = all_impls(x, kernel)
  assert outs[0].shape == (2, 1 + 4 // strides[0], 6 // strides[1], 8 // strides[2], 4)
  for out in outs[1:]:
    np.testing.assert_allclose(out, outs[0], atol=1e-4)


def test_conv_frame0_sees_replicated_or_zero_past():
  x = _video(8, (1, 3, 4, 4, 2))
  kernel = _normal(9, (3, 1, 1, 2, 2))
  replicate = conv3d.causal_conv3d(x, kernel, time_padding="replicate")
  zeros = conv3d.causal_conv3d(x, kernel, time_padding="zeros")
  np.testing.assert_allclose(replicate[:, 0], x[:, 0] @ kernel.sum(axis=0)[0, 0], atol=1e-5)
  np.testing.assert_allclose(zeros[:, 0], x[:, 0] @ kernel[2, 0, 0], atol=1e-5)


def test_unfold_time_expands_all_but_the_first_frame():
  y = jnp.arange(3 * 2 * 2, dtype=jnp.float32).reshape(1, 3, 1, 1, 4)
  out = conv3d.unfold_time(y, 2)
  assert out.shape == (1, 5, 1, 1, 2)
  np.testing.assert_array_equal(out[0, :, 0, 0], [[2, 3], [4, 5], [6, 7], [8, 9], [10, 11]])


def test_params_carry_logical_axis_names_and_shard_on_a_mesh():
  model = ae.CausalVideoAutoencoder(TINY)
  abstract = jax.eval_shape(
      lambda k: model.init({"params": k}, jnp.zeros((1, 1, 4, 4, 3)), sample_posterior=False),
      _key(0))
  specs = nn.get_partition_spec(abstract)["params"]
  assert specs["encoder"]["level0_block0"]["CausalConv3d_0"]["kernel"] == P(
      None, None, None, axes.CONV_IN, axes.CONV_OUT)
  assert specs["decoder"]["conv_out"]["kernel"] == P(None, None, None, axes.CONV_IN, None)
  mesh = jax.make_mesh((2, 2, 2, 1), rules.MESH_AXES, axis_types=(AxisType.Auto,) * 4)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules.DEFAULT_RULES):
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh,
                                            rules.DEFAULT_RULES)
    params = _jit(
        lambda k: model.init({"params": k}, jnp.zeros((2, 1, 4, 4, 3)), sample_posterior=False),
        out_shardings=shardings)(_key(0))
  kernel = params["params"]["encoder"]["level0_block0"]["CausalConv3d_0"]["kernel"].value
  assert kernel.sharding.spec[-1] == "fsdp"
  assert kernel.addressable_shards[0].data.shape[-1] == TINY.base_channels // 2


# --- loss ------------------------------------------------------------------------------------


def test_kl_is_zero_at_the_prior_and_matches_closed_form():
  zeros = jnp.zeros((2, 3))
  np.testing.assert_allclose(ae.gaussian_kl(zeros, zeros), 0.0, atol=1e-7)
  mean, logvar = jnp.array([1.0, -2.0]), jnp.array([math.log(2.0), -1.0])
  expected = [0.5 * (1 + 2 - 1 - math.log(2.0)), 0.5 * (4 + math.exp(-1.0) - 1 + 1)]
  np.testing.assert_allclose(ae.gaussian_kl(mean, logvar), expected, rtol=1e-6)


def test_autoencoder_loss_terms():
  video = _video(10, (1, 1, 4, 4, 3))
  mean, logvar = jnp.ones((1, 1, 1, 1, 2)), jnp.zeros((1, 1, 1, 1, 2))
  loss, metrics = ae.autoencoder_loss(video + 0.1, video, mean, logvar, kl_weight=0.5)
  assert set(metrics) == {"recon_l1", "recon_mse", "kl", "psnr"}
  np.testing.assert_allclose(metrics["recon_l1"], 0.1, rtol=1e-5)
  np.testing.assert_allclose(metrics["recon_mse"], 0.01, rtol=1e-4)
  np.testing.assert_allclose(metrics["kl"], 0.5, rtol=1e-6)
  np.testing.assert_allclose(metrics["psnr"], 10 * math.log10(400.0), rtol=1e-4)
  np.testing.assert_allclose(loss, 0.1 + 0.01 + 0.5 * 0.5, rtol=1e-5)
  with pytest.raises(ValueError, match="differs from video shape"):
    ae.autoencoder_loss(video[:, :, :2], video, mean, logvar, kl_weight=0.0)


def test_a_few_adam_steps_reduce_reconstruction_loss():
  model, params = _model_and_params(TINY)
  # A smooth clip with a bright square moving right: something a small VAE can fit quickly.
  t, y, x = jnp.meshgrid(jnp.arange(5), jnp.arange(16), jnp.arange(16), indexing="ij")
  square = ((x >= 2 + 2 * t) & (x < 7 + 2 * t) & (y >= 5) & (y < 10)).astype(jnp.float32)
  background = jnp.stack([x / 16.0, y / 16.0, jnp.full_like(x, 0.3, jnp.float32)], -1)
  video = (0.6 * square[..., None] + 0.4 * background - 0.5)[None] * 2.0
  optimizer = optax.adam(3e-3)

  def recon_loss(p):
    recon, mean, logvar = model.apply(p, video, sample_posterior=False)
    loss, metrics = ae.autoencoder_loss(recon, video, mean, logvar, kl_weight=1e-6)
    return loss, metrics["recon_l1"] + metrics["recon_mse"]

  @_jit
  def step(p, opt_state):
    (_, recon), grads = jax.value_and_grad(recon_loss, has_aux=True)(p)
    updates, opt_state = optimizer.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, recon

  opt_state = optimizer.init(params)
  history = []
  for _ in range(30):
    params, opt_state, recon = step(params, opt_state)
    history.append(float(recon))
  # The best constant colour scores `flat`; beating it well means the VAE reconstructs structure.
  centred = video - jnp.mean(video, axis=(0, 1, 2, 3))
  flat = float(jnp.mean(jnp.abs(centred)) + jnp.mean(jnp.square(centred)))
  assert history[-1] < 0.25 * history[0], history
  assert history[-1] < 0.7 * flat, (flat, history)


def test_bfloat16_compute_and_remat_keep_float32_outputs_and_gradients():
  config = dataclasses.replace(TINY, dtype="bfloat16", remat=True)
  model = ae.CausalVideoAutoencoder(config)
  video = jax.ShapeDtypeStruct((1, 5, 8, 8, 3), jnp.float32)
  variables = jax.eval_shape(
      lambda k, v: model.init({"params": k}, v, sample_posterior=False), _key(0), video)

  def loss(variables, video):
    recon, mean, logvar = model.apply(variables, video, sample_posterior=False)
    assert recon.dtype == mean.dtype == logvar.dtype == jnp.float32
    return ae.autoencoder_loss(recon, video, mean, logvar, kl_weight=1e-6)[0]

  grads = jax.eval_shape(jax.grad(loss), variables, video)
  assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
