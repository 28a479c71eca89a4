"""ODE samplers for rectified flow: integrate dx/dt = v(x, t) from t = 1 (noise) to t = 0 (data).

With the convention of `flow.py` (x_t = (1 - t) x0 + t noise, v = noise - x0), one step from t to
t_next < t is x_next = x + (t_next - t) * v, i.e. x_{t - dt} = x_t - dt * v (Liu et al. 2022).

`velocity_fn(x, t)` receives x of the noise's shape (B, ...) and t as float32 (B,) (every example
at the same time; functions written for a scalar t broadcast it fine) and returns v of x's shape.
Classifier-free guidance is composed inside it with `guided_velocity`.

`euler_sample` and `heun_sample` loop in Python over the steps and call `velocity_fn` once or
twice per step, so pass a jitted `velocity_fn` (one compile, reused every step since t is always
(B,) float32) and a `progress` callback (e.g. a tqdm bar) can tick after each step.
`euler_sample_scan` runs the whole loop inside `jax.lax.fori_loop`, for callers that jit the
entire sampler (e.g. periodic samples inside a training program); it has no progress callback.
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from spacetime_dit.diffusion import flow

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]
# progress(step, t): called after step `step` (1-based) has reached time t.
ProgressFn = Callable[[int, float], None]


def sampling_timesteps(num_steps: int, shift: float = 1.0, start: float = 1.0) -> np.ndarray:
  """Time grid for `num_steps` steps: uniform from 1 to 0, then `flow.shift_timesteps`.

  The shift must be the one used in training (`flow.resolution_shift` of the clip's token count),
  so the sampler spends its steps at the noise levels the model was trained on (SD3 §5.3.2).

  Args:
    num_steps: number of integration steps (>= 1).
    shift: resolution shift (> 0); 1.0 gives the uniform grid.
    start: first time in (0, 1]. Below 1 the grid covers [start, 0] only (SDEdit, Meng et al.
      2022: integrate from a partly noised input): the uniform grid starts at the unshifted time
      that the shift maps to `start`, so the steps keep the full grid's spacing profile.

  Returns:
    float32 (num_steps + 1,), strictly decreasing, first entry exactly `start` and last exactly 0.
  """
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"num_steps is {num_steps!r}; the sampler needs an integer >= 1.")
  if not shift > 0:
    raise ValueError(f"timestep shift is {shift}; it must be > 0 (1.0 means no shift).")
  if not 0.0 < start <= 1.0:
    raise ValueError(f"start time is {start}; it must lie in (0, 1] (1 = pure noise).")
  # Inverse of u -> shift u / (1 + (shift - 1) u).
  u_start = start / (shift - (shift - 1.0) * start)
  t = np.linspace(u_start, 0.0, num_steps + 1, dtype=np.float64)
  t = shift * t / (1.0 + (shift - 1.0) * t)
  t[0], t[-1] = start, 0.0
  return t.astype(np.float32)


def guided_velocity(v_cond: jax.Array, v_uncond: jax.Array, scale: float) -> jax.Array:
  """Classifier-free guidance in velocity space: v_uncond + scale * (v_cond - v_uncond).

  Ho & Salimans 2022 eq. 6 writes (1 + w) eps_cond - w eps_uncond; here scale = 1 + w, so
  scale = 1 is the conditional model and scale = 0 the unconditional one. The velocity is an
  affine function of the noise prediction at fixed (x_t, t), so guiding v equals guiding eps.

  Args:
    v_cond: velocity with the prompt (B, ...).
    v_uncond: velocity with the null prompt, v_cond's shape.
    scale: guidance scale.

  Returns:
    guided velocity with v_cond's shape.
  """
  return v_uncond + scale * (v_cond - v_uncond)


def _check_timesteps(timesteps) -> np.ndarray:
  """Validates a concrete time grid; returns it as float32 numpy."""
  t = np.asarray(timesteps, dtype=np.float32)
  if t.ndim != 1 or t.shape[0] < 2:
    raise ValueError(
        f"timesteps have shape {t.shape}; need a 1-D grid of num_steps + 1 >= 2 times, e.g. "
        "sampling_timesteps(num_steps).")
  if not np.all(np.isfinite(t)) or t.min() < 0.0 or t.max() > 1.0:
    raise ValueError(f"timesteps {t.tolist()} must be finite and lie in [0, 1].")
  if not np.all(np.diff(t) < 0):
    raise ValueError(
        f"timesteps {t.tolist()} are not strictly decreasing; sampling runs from t = 1 (noise) "
        "to t = 0 (data). Use sampling_timesteps(num_steps, shift).")
  return t


def _batch_times(t: float, batch: int) -> jax.Array:
  return jnp.full((batch,), t, dtype=jnp.float32)


def _tick(progress: Optional[ProgressFn], step: int, t: float, x: jax.Array) -> None:
  if progress is not None:
    # Wait for the step to finish so the callback reports real progress, not dispatch.
    jax.block_until_ready(x)
    progress(step, t)


def euler_sample(velocity_fn: VelocityFn, noise: jax.Array, timesteps, *,
                 progress: Optional[ProgressFn] = None) -> jax.Array:
  """First-order (Euler) integration of dx/dt = v from timesteps[0] to timesteps[-1].

  One velocity evaluation per step: x <- x + (t_next - t) * v(x, t). Exact for any step count when
  v is constant along the path (the straight paths rectified flow trains towards).

  Args:
    velocity_fn: v = velocity_fn(x, t), x (B, ...), t float32 (B,); jit it.
    noise: starting point x at timesteps[0], (B, ...), usually standard normal.
    timesteps: concrete 1-D strictly decreasing grid in [0, 1], e.g. `sampling_timesteps(n)`.
      Starting below 1 (with a partly noised input as `noise`) gives SDEdit-style editing.
    progress: optional callback progress(step, t_next) after each step (blocks on the step).

  Returns:
    x at timesteps[-1] (the sample when the grid ends at 0), noise's shape.
  """
  ts = _check_timesteps(timesteps)
  x = noise
  batch = noise.shape[0]
  for i in range(ts.shape[0] - 1):
    t, t_next = float(ts[i]), float(ts[i + 1])
    v = velocity_fn(x, _batch_times(t, batch))
    x = x + (t_next - t) * v
    _tick(progress, i + 1, t_next, x)
  return x


def heun_sample(velocity_fn: VelocityFn, noise: jax.Array, timesteps, *,
                progress: Optional[ProgressFn] = None) -> jax.Array:
  """Second-order (Heun) integration, Karras et al. 2022 Algorithm 1 adapted to flows.

  Each step takes an Euler proposal, evaluates v again at the proposal and time t_next, and
  averages the two slopes (trapezoidal rule). A step that ends at t = 0 stays Euler, as in
  Karras Alg. 1 (sigma_{i+1} = 0): the velocity may be singular there (e.g. x0-prediction divides
  by t) and the extra evaluation would buy little. Cost: 2 * num_steps - 1 evaluations when the
  grid ends at 0.

  Args:
    velocity_fn: v = velocity_fn(x, t), x (B, ...), t float32 (B,); jit it.
    noise: starting point x at timesteps[0], (B, ...).
    timesteps: concrete 1-D strictly decreasing grid in [0, 1].
    progress: optional callback progress(step, t_next) after each step (blocks on the step).

  Returns:
    x at timesteps[-1], noise's shape.
  """
  ts = _check_timesteps(timesteps)
  x = noise
  batch = noise.shape[0]
  for i in range(ts.shape[0] - 1):
    t, t_next = float(ts[i]), float(ts[i + 1])
    dt = t_next - t
    v = velocity_fn(x, _batch_times(t, batch))
    x_euler = x + dt * v
    if t_next == 0.0:
      x = x_euler
    else:
      v_next = velocity_fn(x_euler, _batch_times(t_next, batch))
      x = x + dt * 0.5 * (v + v_next)
    _tick(progress, i + 1, t_next, x)
  return x


def euler_sample_scan(velocity_fn: VelocityFn, noise: jax.Array, timesteps) -> jax.Array:
  """`euler_sample` as one `jax.lax.fori_loop`, usable inside `jax.jit`.

  `velocity_fn` is traced once (not called per step from Python), so the whole sampler compiles
  to a single program; timesteps may be traced then, and are validated only when concrete.

  Args:
    velocity_fn: traceable v = velocity_fn(x, t), x (B, ...), t float32 (B,).
    noise: starting point x at timesteps[0], (B, ...).
    timesteps: 1-D strictly decreasing grid (num_steps + 1,) in [0, 1].

  Returns:
    x at timesteps[-1], noise's shape and dtype.
  """
  try:
    _check_timesteps(timesteps)
  except jax.errors.TracerArrayConversionError:
    pass
  ts = jnp.asarray(timesteps, dtype=jnp.float32)
  if ts.ndim != 1 or ts.shape[0] < 2:
    raise ValueError(f"timesteps have shape {ts.shape}; need a 1-D grid of >= 2 times.")
  batch = noise.shape[0]

  def step(i, x):
    t, t_next = ts[i], ts[i + 1]
    v = velocity_fn(x, jnp.broadcast_to(t, (batch,)))
    return (x + (t_next - t) * v).astype(noise.dtype)

  return jax.lax.fori_loop(0, ts.shape[0] - 1, step, noise)


def velocity_from_prediction(model_fn: Callable[[jax.Array, jax.Array], jax.Array],
                             prediction: str, t_min: float = 0.05) -> VelocityFn:
  """Wraps a network `model_fn(x, t)` whose output means `prediction` into a velocity_fn.

  Args:
    model_fn: network output = model_fn(x, t), x (B, ...), t (B,).
    prediction: "velocity" or "x0" (see `flow.to_velocity`).
    t_min: clamp for the x0 -> velocity division.

  Returns:
    velocity_fn(x, t) -> v.
  """
  if prediction not in flow.PREDICTIONS:
    raise ValueError(
        f"unknown prediction {prediction!r}; valid: {', '.join(flow.PREDICTIONS)}.")

  def velocity_fn(x, t):
    return flow.to_velocity(model_fn(x, t), x, t, prediction, t_min=t_min)

  return velocity_fn
