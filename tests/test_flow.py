"""Closed-form tests for the rectified-flow math in spacetime_dit.diffusion.flow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spacetime_dit.diffusion import flow


def _pair(shape=(2, 3, 4, 4, 2)):
  k0, k1 = jax.random.split(jax.random.key(0))
  return jax.random.normal(k0, shape), jax.random.normal(k1, shape)


def test_broadcast_to_rank_aligns_from_the_left():
  t = jnp.arange(6.0).reshape(2, 3)
  out = flow.broadcast_to_rank(t, 5)
  assert out.shape == (2, 3, 1, 1, 1)
  assert flow.broadcast_to_rank(jnp.float32(0.5), 3).shape == (1, 1, 1)
  with pytest.raises(ValueError, match="prefix"):
    flow.broadcast_to_rank(jnp.zeros((2, 3, 4)), 2)


def test_interpolate_endpoints_and_midpoint():
  x0, noise = _pair()
  b = x0.shape[0]
  np.testing.assert_allclose(flow.interpolate(x0, noise, jnp.zeros(b)), x0)
  np.testing.assert_allclose(flow.interpolate(x0, noise, jnp.ones(b)), noise)
  np.testing.assert_allclose(
      flow.interpolate(x0, noise, jnp.full(b, 0.5)), 0.5 * (x0 + noise), rtol=1e-6, atol=1e-6)


def test_interpolate_per_example_and_per_frame_t():
  x0, noise = _pair()
  t_b = jnp.array([0.0, 1.0])
  x_t = flow.interpolate(x0, noise, t_b)
  np.testing.assert_allclose(x_t[0], x0[0])
  np.testing.assert_allclose(x_t[1], noise[1])
  t_bt = jnp.array([[0.0, 0.25, 1.0], [1.0, 1.0, 0.0]])
  x_t = flow.interpolate(x0, noise, t_bt)
  np.testing.assert_allclose(x_t[0, 1], 0.75 * x0[0, 1] + 0.25 * noise[0, 1], rtol=1e-6)
  np.testing.assert_allclose(x_t[1, 2], x0[1, 2])


def test_velocity_is_the_time_derivative_of_the_path():
  x0, noise = _pair()
  v = flow.velocity_target(x0, noise)
  dt = 0.25
  t = jnp.full(x0.shape[0], 0.5)
  finite_diff = (flow.interpolate(x0, noise, t + dt) - flow.interpolate(x0, noise, t)) / dt
  np.testing.assert_allclose(finite_diff, v, rtol=1e-5, atol=1e-5)


def test_loss_is_zero_for_exact_velocity_and_known_for_offset():
  x0, noise = _pair()
  target = flow.velocity_target(x0, noise)
  assert float(flow.flow_matching_loss(target, target)) == 0.0
  np.testing.assert_allclose(float(flow.flow_matching_loss(target + 0.5, target)), 0.25,
                             rtol=1e-6)


def test_loss_weights_and_mask():
  target = jnp.zeros((2, 3, 4))
  pred = jnp.ones((2, 3, 4)) * jnp.array([1.0, 2.0])[:, None, None]  # errors 1 and 4
  np.testing.assert_allclose(float(flow.flow_matching_loss(pred, target)), 2.5)
  # Weights scale each example without renormalising.
  weighted = flow.flow_matching_loss(pred, target, weights=jnp.array([1.0, 0.5]))
  np.testing.assert_allclose(float(weighted), (1.0 + 2.0) / 2)
  # Per-example mask keeps only example 1.
  masked = flow.flow_matching_loss(pred, target, mask=jnp.array([False, True]))
  np.testing.assert_allclose(float(masked), 4.0)
  # Per-token mask: example 0 keeps 1 of 3 tokens, example 1 keeps 2 of 3 -> (1*4 + 4*8) / 12.
  mask_bl = jnp.array([[True, False, False], [True, True, False]])
  np.testing.assert_allclose(float(flow.flow_matching_loss(pred, target, mask=mask_bl)),
                             (1 * 4 + 4 * 8) / 12)
  assert float(flow.flow_matching_loss(pred, target, mask=jnp.zeros(2, bool))) == 0.0
  with pytest.raises(ValueError, match="shape"):
    flow.flow_matching_loss(pred, target[:, :2])


def test_logit_normal_statistics():
  t = flow.sample_logit_normal(jax.random.key(1), (20000,), mean=0.5, std=0.8)
  assert t.dtype == jnp.float32 and t.shape == (20000,)
  t = np.asarray(t, np.float64)
  assert np.all(t > 0) and np.all(t < 1)
  logit = np.log(t / (1 - t))
  assert abs(logit.mean() - 0.5) < 0.03
  assert abs(logit.std() - 0.8) < 0.03
  with pytest.raises(ValueError, match="std"):
    flow.sample_logit_normal(jax.random.key(1), (2,), std=0.0)


def test_sample_timesteps_distributions_and_shift():
  rng = jax.random.key(2)
  u = flow.sample_timesteps(rng, (4000,), distribution="uniform")
  assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
  assert abs(float(u.mean()) - 0.5) < 0.03
  shifted = flow.sample_timesteps(rng, (4000,), distribution="uniform", shift=3.0)
  np.testing.assert_allclose(shifted, flow.shift_timesteps(u, 3.0), rtol=1e-6)
  assert float(shifted.mean()) > float(u.mean()) + 0.1  # shift > 1 means more noise
  ln = flow.sample_timesteps(rng, (3, 5), distribution="logit_normal", mean=0.0, std=1.0)
  assert ln.shape == (3, 5) and ln.dtype == jnp.float32
  with pytest.raises(ValueError, match="logit_normal, uniform"):
    flow.sample_timesteps(rng, (2,), distribution="cosine")


def test_shift_timesteps_properties_and_value():
  t = jnp.linspace(0.0, 1.0, 101)
  for shift in (0.5, 1.0, 3.0):
    s = flow.shift_timesteps(t, shift)
    assert float(s[0]) == 0.0 and float(s[-1]) == 1.0
    assert bool(jnp.all(jnp.diff(s) > 0))
  np.testing.assert_allclose(flow.shift_timesteps(t, 1.0), t, rtol=1e-7)
  # Hand-computed: 3 * 0.5 / (1 + 2 * 0.5) = 0.75.
  np.testing.assert_allclose(float(flow.shift_timesteps(jnp.float32(0.5), 3.0)), 0.75, rtol=1e-6)
  with pytest.raises(ValueError, match="shift"):
    flow.shift_timesteps(t, 0.0)


def test_resolution_shift():
  assert flow.resolution_shift(1024, 256) == pytest.approx(2.0)
  assert flow.resolution_shift(256, 256, base_shift=1.5) == pytest.approx(1.5)
  assert flow.resolution_shift(4 * 300, 300, base_shift=3.0) == pytest.approx(6.0)
  assert isinstance(flow.resolution_shift(10, 10), float)
  with pytest.raises(ValueError, match="positive"):
    flow.resolution_shift(0, 256)


def test_to_velocity_and_to_x0():
  x0, noise = _pair()
  t = jnp.array([0.3, 0.9])
  x_t = flow.interpolate(x0, noise, t)
  v_true = flow.velocity_target(x0, noise)
  # A perfect x0 prediction gives the exact velocity (t >= t_min).
  np.testing.assert_allclose(flow.to_velocity(x0, x_t, t, "x0"), v_true, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(flow.to_velocity(v_true, x_t, t, "velocity"), v_true)
  pred = jax.random.normal(jax.random.key(5), x0.shape)
  v = flow.to_velocity(pred, x_t, t, "x0")
  np.testing.assert_allclose(flow.to_x0(v, x_t, t, "velocity"), pred, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(flow.to_x0(pred, x_t, t, "x0"), pred)
  with pytest.raises(ValueError, match="velocity, x0"):
    flow.to_velocity(pred, x_t, t, "eps")
  with pytest.raises(ValueError, match="velocity, x0"):
    flow.to_x0(pred, x_t, t, "v")


def test_to_velocity_clamps_small_t():
  x_t = jnp.ones((1, 4))
  pred = jnp.zeros((1, 4))
  v = flow.to_velocity(pred, x_t, jnp.array([0.0]), "x0", t_min=0.05)
  np.testing.assert_allclose(v, 20.0 * jnp.ones((1, 4)), rtol=1e-6)
  assert bool(jnp.all(jnp.isfinite(v)))


def test_flow_functions_jit():
  x0, noise = _pair()

  @jax.jit
  def step(rng):
    t = flow.sample_timesteps(rng, (x0.shape[0],), distribution="logit_normal", shift=2.0)
    x_t = flow.interpolate(x0, noise, t)
    target = flow.velocity_target(x0, noise)
    x0_hat = flow.to_x0(target, x_t, t, "velocity")
    return flow.flow_matching_loss(target + 1.0, target), x0_hat

  loss, x0_hat = step(jax.random.key(0))
  np.testing.assert_allclose(float(loss), 1.0, rtol=1e-6)
  np.testing.assert_allclose(x0_hat, x0, rtol=1e-5, atol=1e-5)
