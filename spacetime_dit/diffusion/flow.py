"""Rectified flow: the noising path, training timesteps, the resolution shift and the loss.

Convention (rectified flow, Liu et al. 2022 "Flow straight and fast", arXiv:2209.03003; as used by
SD3, Esser et al. 2024, arXiv:2403.03206, §2-3):

  x_t = (1 - t) * x0 + t * noise,   t in [0, 1],  t = 1 is pure noise,
  v   = dx_t / dt = noise - x0      (constant along each straight path).

Sampling integrates dx/dt = v from t = 1 down to t = 0 (see `samplers.py`).

Every function here is pure `jnp` and works under `jax.jit`. Shapes use the project alphabet; `x`
is any latent (B, ...) (e.g. (B, T, H, W, C) in latent frames/height/width, or tokens (B, L, P)).
Timesteps `t` are a scalar, per example (B,), or any prefix of x's shape (e.g. per latent frame
(B, T), or per token (B, L) against tokens (B, L, P)); `broadcast_to_rank` aligns them.
"""

import math
from typing import Optional

import jax
import jax.numpy as jnp

PREDICTIONS = ("velocity", "x0")
DISTRIBUTIONS = ("logit_normal", "uniform")


def broadcast_to_rank(t: jax.Array, rank: int) -> jax.Array:
  """Appends trailing unit axes to `t` so that it broadcasts against an array of rank `rank`.

  Timesteps index the leading axes of the latent (per example, per frame, per token), so they
  align from the left, unlike numpy broadcasting which aligns from the right.

  Args:
    t: array of shape () or a prefix (B, ...) of the target's shape.
    rank: rank of the array `t` will be combined with.

  Returns:
    `t` reshaped to t.shape + (1,) * (rank - t.ndim).
  """
  t = jnp.asarray(t)
  if t.ndim > rank:
    raise ValueError(
        f"timesteps have shape {t.shape} (rank {t.ndim}) but the latent has rank {rank}; "
        "t must be a scalar, (B,) or a prefix of the latent's shape. Reshape t.")
  return jnp.reshape(t, t.shape + (1,) * (rank - t.ndim))


def interpolate(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """Point on the straight path from data to noise: x_t = (1 - t) * x0 + t * noise.

  Rectified flow forward process (Liu et al. 2022; SD3 §3.1).

  Args:
    x0: clean latent (B, ...).
    noise: standard normal noise, same shape as x0.
    t: () or a prefix (B, ...) of x0's shape, values in [0, 1].

  Returns:
    x_t with x0's shape.
  """
  t = broadcast_to_rank(t, x0.ndim)
  return (1.0 - t) * x0 + t * noise


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
  """Regression target v = d x_t / dt = noise - x0 (independent of t for straight paths).

  Args:
    x0: clean latent (B, ...).
    noise: noise with x0's shape.

  Returns:
    velocity with x0's shape.
  """
  return noise - x0


def sample_uniform(rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Timesteps t ~ U(0, 1), float32 of `shape` (the plain rectified-flow choice)."""
  return jax.random.uniform(rng, shape, dtype=jnp.float32)


def sample_logit_normal(rng: jax.Array, shape: tuple[int, ...], mean: float = 0.0,
                        std: float = 1.0) -> jax.Array:
  """Timesteps t = sigmoid(u), u ~ N(mean, std^2): the logit-normal sampler of SD3 §3.1.

  It puts more training steps at intermediate t, where the velocity is hardest to predict: near
  t = 0 the optimal v is about -x_t and near t = 1 about x_t - E[x0], both easy. SD3 found
  rf/lognorm(0.00, 1.00) the most consistent choice among the samplers it compared (§5.1).

  Args:
    rng: PRNG key.
    shape: output shape, e.g. (B,).
    mean: location m of the logit.
    std: scale s > 0 of the logit.

  Returns:
    float32 of `shape`, values in (0, 1) (up to float32 rounding at |u| > ~17).
  """
  if isinstance(std, (int, float)) and not std > 0:
    raise ValueError(f"logit-normal std is {std}; it must be > 0 (SD3 uses 1.0).")
  u = mean + std * jax.random.normal(rng, shape, dtype=jnp.float32)
  return jax.nn.sigmoid(u)


def shift_timesteps(t: jax.Array, shift: float) -> jax.Array:
  """Resolution-dependent timestep shift t' = shift * t / (1 + (shift - 1) * t) (SD3 eq. 23).

  More tokens carry more redundant signal, so a given t destroys less of the content at a higher
  resolution; shift > 1 moves t towards 1 (more noise) to compensate. The map fixes 0 and 1, is
  monotone increasing for shift > 0, and shift = 1 is the identity.

  Args:
    t: timesteps of any shape, values in [0, 1].
    shift: alpha > 0 in SD3 §5.3.2.

  Returns:
    shifted timesteps with t's shape.
  """
  if isinstance(shift, (int, float)) and not shift > 0:
    raise ValueError(f"timestep shift is {shift}; it must be > 0 (1.0 means no shift).")
  t = jnp.asarray(t)
  return shift * t / (1.0 + (shift - 1.0) * t)


def resolution_shift(num_tokens: int, base_tokens: int, base_shift: float = 1.0) -> float:
  """Shift for a latent of `num_tokens` tokens: base_shift * sqrt(num_tokens / base_tokens).

  SD3 §5.3.2 derives alpha = sqrt(m / n) for m tokens relative to a reference of n tokens (the
  per-token noise needed to keep the same uncertainty about the image grows with sqrt of the
  token count). The SAME rule must be used for training timesteps and sampling grids, otherwise
  the sampler visits noise levels the model was not trained on.

  Args:
    num_tokens: tokens of the clip being trained or sampled (e.g. T * H * W / patch volume).
    base_tokens: tokens of the reference resolution at which the shift is `base_shift`.
    base_shift: shift at the reference resolution.

  Returns:
    the shift, a Python float.
  """
  if num_tokens <= 0 or base_tokens <= 0:
    raise ValueError(
        f"resolution_shift got num_tokens={num_tokens}, base_tokens={base_tokens}; both must "
        "be positive token counts.")
  if not base_shift > 0:
    raise ValueError(f"base_shift is {base_shift}; it must be > 0 (1.0 means no shift).")
  return float(base_shift) * math.sqrt(num_tokens / base_tokens)


def sample_timesteps(rng: jax.Array, shape: tuple[int, ...], *,
                     distribution: str = "logit_normal", mean: float = 0.0, std: float = 1.0,
                     shift: float = 1.0) -> jax.Array:
  """Training timesteps: draw from `distribution`, then apply `shift_timesteps(., shift)`.

  Args:
    rng: PRNG key.
    shape: output shape, e.g. (B,) or per frame (B, T).
    distribution: "logit_normal" (SD3 §3.1; uses mean, std) or "uniform" (ignores them).
    mean: logit-normal location.
    std: logit-normal scale.
    shift: resolution shift (see `resolution_shift`); 1.0 leaves t unchanged.

  Returns:
    float32 of `shape` in [0, 1].
  """
  if distribution == "logit_normal":
    t = sample_logit_normal(rng, shape, mean=mean, std=std)
  elif distribution == "uniform":
    t = sample_uniform(rng, shape)
  else:
    raise ValueError(
        f"unknown timestep distribution {distribution!r}; valid: {', '.join(DISTRIBUTIONS)}.")
  return shift_timesteps(t, shift)


def _check_prediction(prediction: str) -> None:
  if prediction not in PREDICTIONS:
    raise ValueError(
        f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)} "
        "(what the network's output means).")


def to_velocity(pred: jax.Array, x_t: jax.Array, t: jax.Array, prediction: str,
                t_min: float = 0.05) -> jax.Array:
  """Turns a network output into a velocity, so that the loss and samplers see only velocities.

  "velocity": the output is v. "x0": the output is the clean latent x0_hat; on the path
  x_t = (1 - t) x0 + t noise we have v = noise - x0 = (x_t - x0) / t. A small-width model predicts
  the clean latent more easily than the velocity, while the loss stays on velocity (keeping the
  SD3 weighting). Dividing by t explodes near t = 0, so t is clamped at `t_min`: below it the
  velocity is under-estimated rather than amplifying the x0 error by 1/t.

  Args:
    pred: network output (B, ...).
    x_t: noisy latent, pred's shape.
    t: () or a prefix (B, ...) of pred's shape.
    prediction: "velocity" or "x0".
    t_min: clamp for the division in the "x0" case (> 0).

  Returns:
    velocity with pred's shape.
  """
  _check_prediction(prediction)
  if prediction == "velocity":
    return pred
  if not t_min > 0:
    raise ValueError(f"t_min is {t_min}; it must be > 0 to keep (x_t - x0) / t finite.")
  t = broadcast_to_rank(t, pred.ndim)
  return (x_t - pred) / jnp.maximum(t, t_min)


def to_x0(pred: jax.Array, x_t: jax.Array, t: jax.Array, prediction: str) -> jax.Array:
  """Turns a network output into the clean-latent estimate x0_hat (for previews and metrics).

  "x0": the output is x0_hat. "velocity": x0 = x_t - t * v (from x_t = x0 + t * (noise - x0)).
  For t >= t_min, `to_x0(to_velocity(p, x_t, t, "x0"), x_t, t, "velocity") == p`.

  Args:
    pred: network output (B, ...).
    x_t: noisy latent, pred's shape.
    t: () or a prefix (B, ...) of pred's shape.
    prediction: "velocity" or "x0".

  Returns:
    x0 estimate with pred's shape.
  """
  _check_prediction(prediction)
  if prediction == "x0":
    return pred
  t = broadcast_to_rank(t, pred.ndim)
  return x_t - t * pred


def flow_matching_loss(pred_v: jax.Array, target_v: jax.Array,
                       weights: Optional[jax.Array] = None,
                       mask: Optional[jax.Array] = None) -> jax.Array:
  """Mean squared velocity error, the conditional flow matching loss (Lipman et al. 2023 eq. 9).

  loss = sum(w * m * (pred_v - target_v)^2) / sum(m), where w and m are broadcast from the left
  against the latent. Weights scale each example's contribution and are not renormalised, so
  weights of ones give the plain mean. Elements with m = 0 (padding tokens, conditioning frames
  that are given, not generated) contribute nothing and are not counted. Computed in float32.

  Args:
    pred_v: predicted velocity (B, ...).
    target_v: `velocity_target(x0, noise)`, pred_v's shape.
    weights: optional per-example weights (B,) (or any prefix of the shape).
    mask: optional validity mask, bool or float, a prefix of the shape, e.g. per example (B,),
      per latent frame (B, T), per token (B, L) or per element.

  Returns:
    scalar float32 loss (0 when every element is masked out).
  """
  if pred_v.shape != target_v.shape:
    raise ValueError(
        f"pred_v has shape {pred_v.shape} but target_v has shape {target_v.shape}; they must "
        "match (convert the network output with to_velocity first).")
  err = jnp.square(pred_v.astype(jnp.float32) - target_v.astype(jnp.float32))
  if weights is not None:
    err = err * broadcast_to_rank(jnp.asarray(weights, jnp.float32), err.ndim)
  if mask is None:
    return jnp.mean(err)
  m = jnp.broadcast_to(broadcast_to_rank(jnp.asarray(mask, jnp.float32), err.ndim), err.shape)
  return jnp.sum(err * m) / jnp.maximum(jnp.sum(m), 1.0)
