"""Closed-form tests for the rectified-flow samplers in spacetime_dit.diffusion.samplers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spacetime_dit.diffusion import flow
from spacetime_dit.diffusion import samplers


def _pair(shape=(2, 3, 4, 2)):
  k0, k1 = jax.random.split(jax.random.key(0))
  return jax.random.normal(k0, shape), jax.random.normal(k1, shape)


def _straight_field(x0):
  """Exact velocity field of the straight path through x0: v = (x - x0) / t = noise - x0."""
  def velocity_fn(x, t):
    assert t.shape == (x.shape[0],)
    return (x - x0) / flow.broadcast_to_rank(t, x.ndim)
  return velocity_fn


def _grow(x, t):
  """Curved toy field dx/dt = x (ignores t)."""
  del t
  return x


def _time_scaled(x, t):
  """Field dx/dt = t * x, which depends on t, to check t reaches the field correctly."""
  return x * flow.broadcast_to_rank(t, x.ndim)


def test_sampling_timesteps_endpoints_and_shift():
  for n in (1, 2, 7, 50):
    for shift in (1.0, 3.0, 0.5):
      ts = samplers.sampling_timesteps(n, shift)
      assert ts.dtype == np.float32 and ts.shape == (n + 1,)
      assert ts[0] == 1.0 and ts[-1] == 0.0
      assert np.all(np.diff(ts) < 0)
  np.testing.assert_allclose(samplers.sampling_timesteps(4), [1.0, 0.75, 0.5, 0.25, 0.0])
  np.testing.assert_allclose(samplers.sampling_timesteps(2, 3.0)[1], 0.75, rtol=1e-6)
  with pytest.raises(ValueError, match="num_steps"):
    samplers.sampling_timesteps(0)
  with pytest.raises(ValueError, match="shift"):
    samplers.sampling_timesteps(4, shift=-1.0)


@pytest.mark.parametrize("num_steps", [1, 3, 10])
def test_euler_exact_on_straight_path(num_steps):
  x0, noise = _pair()
  ts = samplers.sampling_timesteps(num_steps, shift=2.0)
  v_const = flow.velocity_target(x0, noise)
  out = samplers.euler_sample(lambda x, t: v_const, noise, ts)
  np.testing.assert_allclose(out, x0, rtol=1e-5, atol=1e-5)
  out = samplers.euler_sample(_straight_field(x0), noise, ts)
  np.testing.assert_allclose(out, x0, rtol=1e-5, atol=1e-5)


def test_guided_velocity():
  v_c, v_u = _pair()
  np.testing.assert_allclose(samplers.guided_velocity(v_c, v_u, 1.0), v_c, rtol=1e-6)
  np.testing.assert_allclose(samplers.guided_velocity(v_c, v_u, 0.0), v_u, rtol=1e-6)
  np.testing.assert_allclose(samplers.guided_velocity(v_c, v_u, 3.0), 3 * v_c - 2 * v_u,
                             rtol=1e-5, atol=1e-5)


def test_guided_sampling_at_scale_one_is_conditional():
  x0, noise = _pair()
  cond = _straight_field(x0)
  uncond = _straight_field(jnp.zeros_like(x0))
  ts = samplers.sampling_timesteps(5)
  guided = samplers.euler_sample(
      lambda x, t: samplers.guided_velocity(cond(x, t), uncond(x, t), 1.0), noise, ts)
  np.testing.assert_allclose(guided, samplers.euler_sample(cond, noise, ts), rtol=1e-6)
  np.testing.assert_allclose(guided, x0, rtol=1e-5, atol=1e-5)


def test_heun_exact_on_linear_field():
  x0, noise = _pair()
  for n in (1, 2, 6):
    out = samplers.heun_sample(_straight_field(x0), noise, samplers.sampling_timesteps(n))
    np.testing.assert_allclose(out, x0, rtol=1e-5, atol=1e-5)


def test_heun_beats_euler_on_curved_field():
  # dx/dt = x from t = 1 to 0 has the solution x(0) = x(1) * exp(-1).
  _, noise = _pair()
  exact = noise * math.exp(-1.0)
  field = _grow
  errors = {}
  for n in (8, 16):
    ts = samplers.sampling_timesteps(n)
    errors["euler", n] = float(jnp.max(jnp.abs(samplers.euler_sample(field, noise, ts) - exact)))
    errors["heun", n] = float(jnp.max(jnp.abs(samplers.heun_sample(field, noise, ts) - exact)))
  assert errors["heun", 8] < 0.25 * errors["euler", 8]
  # Second order: doubling the steps cuts the error ~4x (first order: ~2x).
  assert errors["heun", 8] / errors["heun", 16] > 3.0
  assert errors["euler", 8] / errors["euler", 16] < 2.5


def test_heun_function_evaluations():
  calls = []
  _, noise = _pair()

  def field(x, t):
    calls.append(float(t[0]))
    return x

  samplers.heun_sample(field, noise, samplers.sampling_timesteps(4))
  assert len(calls) == 2 * 4 - 1
  assert 0.0 not in calls  # the step into t = 0 is Euler


def test_progress_callback_ticks_each_step():
  x0, noise = _pair()
  ticks = []
  ts = samplers.sampling_timesteps(5)
  for sample in (samplers.euler_sample, samplers.heun_sample):
    ticks.clear()
    sample(_straight_field(x0), noise, ts, progress=lambda i, t: ticks.append((i, t)))
    assert [i for i, _ in ticks] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([t for _, t in ticks], ts[1:])


def test_jitted_velocity_fn_compiles_once():
  x0, noise = _pair()
  traces = []

  @jax.jit
  def field(x, t):
    traces.append(1)
    return x - x0

  samplers.heun_sample(field, noise, samplers.sampling_timesteps(6, shift=3.0))
  assert len(traces) == 1


def test_euler_scan_matches_loop_and_jits():
  _, noise = _pair()
  field = _time_scaled
  ts = samplers.sampling_timesteps(7, shift=2.0)
  loop = samplers.euler_sample(field, noise, ts)
  np.testing.assert_allclose(samplers.euler_sample_scan(field, noise, ts), loop, rtol=1e-6)
  jitted = jax.jit(lambda n, t: samplers.euler_sample_scan(field, n, t))
  np.testing.assert_allclose(jitted(noise, jnp.asarray(ts)), loop, rtol=1e-6)


def test_timestep_validation():
  _, noise = _pair()
  field = _grow
  for sample in (samplers.euler_sample, samplers.heun_sample, samplers.euler_sample_scan):
    with pytest.raises(ValueError, match="strictly decreasing"):
      sample(field, noise, np.array([0.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match="strictly decreasing"):
      sample(field, noise, np.array([1.0, 0.5, 0.5, 0.0]))
    with pytest.raises(ValueError, match="1-D grid"):
      sample(field, noise, np.array([1.0]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
      sample(field, noise, np.array([2.0, 0.0]))


def test_sdedit_style_partial_grid():
  # Starting at t = 0.5 from the path point reaches x0 too (editing with --strength).
  x0, noise = _pair()
  ts = samplers.sampling_timesteps(8)
  ts = ts[ts <= 0.5]
  x_half = flow.interpolate(x0, noise, jnp.full(x0.shape[0], 0.5))
  out = samplers.euler_sample(_straight_field(x0), x_half, ts)
  np.testing.assert_allclose(out, x0, rtol=1e-5, atol=1e-5)


def test_velocity_from_prediction():
  x0, noise = _pair()

  def x0_model(x, t):
    """A perfect clean-latent predictor."""
    del x, t
    return x0

  v_fn = samplers.velocity_from_prediction(x0_model, "x0")
  out = samplers.euler_sample(v_fn, noise, samplers.sampling_timesteps(4))
  np.testing.assert_allclose(out, x0, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="velocity, x0"):
    samplers.velocity_from_prediction(x0_model, "eps")
