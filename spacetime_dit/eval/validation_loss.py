"""Rectified-flow validation loss of a DiT per (T, H, W) cell and per noise level.

The loss is the training loss of the text-only step (`training.steps.dit_step` with the
conditioning mixture off), evaluated on clips the run never trained on, at fixed noise levels
instead of sampled ones:

  x0   = (autoencoder posterior mean - latent_mean) / latent_std      (B, T, H, W, C)
  x_t  = (1 - t) x0 + t noise,  v = noise - x0                        (`diffusion.flow`)
  L(t) = mean over elements of (to_velocity(DiT(x_t, t, text)) - v)^2  (`flow.flow_matching_loss`)

with the caption always given (no caption dropout) and one standard-normal `noise` per clip,
drawn from a fixed seed and shared by every t: the curve over t then shows how the error depends
on the noise level, not on different noise draws.

Noise levels are the centres of `num_levels` equal bins of [0, 1]. Training draws t from the
config's distribution (logit-normal by default, SD3 §3.1, Esser et al. 2024, arXiv:2403.03206)
shifted by the cell's token count (SD3 §5.3.2), so each cell also gets the mass that distribution
puts in each bin (`training_weights`, closed form) and their weighted sum, a midpoint-rule
estimate of E_t[L(t)]: the number comparable to the training loss of that bucket.

Clips: ShapesWorld's training distribution (held-in combinations) rendered at the cell's shape
with a seed other than the training seed (`cell_clips`); clips and noise depend on the seed and
the cell only, so runs with different bucket lists compare in the cells they share.
"""

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from data_pipelines import shapesworld
from spacetime_dit.diffusion import flow
from spacetime_dit.training import steps as steps_lib

def bin_edges(num_levels: int) -> np.ndarray:
  """float64 (K + 1,): equal bins 0, 1/K, ..., 1 of the noise level t."""
  if num_levels < 1:
    raise ValueError(f"--val_levels={num_levels} must be >= 1 (e.g. 10).")
  return np.linspace(0.0, 1.0, num_levels + 1)


def noise_levels(num_levels: int) -> np.ndarray:
  """float64 (K,): the centres (k + 0.5) / K of `bin_edges(K)`, the t the loss is evaluated at."""
  edges = bin_edges(num_levels)
  return 0.5 * (edges[:-1] + edges[1:])


def unshift_timesteps(t_shifted: np.ndarray, shift: float) -> np.ndarray:
  """Inverse of `flow.shift_timesteps`: t = t' / (shift - (shift - 1) t')."""
  t_shifted = np.asarray(t_shifted, np.float64)
  return t_shifted / (shift - (shift - 1.0) * t_shifted)


def training_cdf(t: np.ndarray, *, distribution: str, mean: float, std: float, shift: float) -> np.ndarray:
  """P(training timestep <= t) for `flow.sample_timesteps`'s distribution, in closed form.

  The shift is monotone, so P(shift(u) <= t) = P(u <= unshift(t)); for the logit-normal
  u = sigmoid(z), z ~ N(mean, std^2), P(u <= x) = Phi((logit(x) - mean) / std).
  """
  x = np.clip(unshift_timesteps(t, shift), 0.0, 1.0)
  if distribution == "uniform":
    return x
  if distribution != "logit_normal":
    raise ValueError(
        f"unknown timestep distribution {distribution!r}; valid: {', '.join(flow.DISTRIBUTIONS)}.")
  with np.errstate(divide="ignore"):
    logit = np.log(x) - np.log1p(-x)  # -inf at 0 and +inf at 1 give Phi = 0 and 1.
  return special.ndtr((logit - mean) / std)


def training_weights(edges: np.ndarray, *, distribution: str, mean: float, std: float,
                     shift: float) -> np.ndarray:
  """float64 (K,): the probability mass the training timesteps put in each bin; sums to 1."""
  return np.diff(training_cdf(edges, distribution=distribution, mean=mean, std=std, shift=shift))


def loss_at_t(denoise: Callable[[jax.Array, jax.Array], jax.Array], x0: jax.Array,
              noise: jax.Array, t: jax.Array, *, prediction: str) -> jax.Array:
  """Per-example rectified-flow loss at one noise level t.

  Args:
    denoise: (x_t (B, T, H, W, C), t (B,)) -> the network output (what `prediction` names).
    x0: normalised clean latents (B, T, H, W, C).
    noise: standard-normal noise, x0's shape.
    t: scalar noise level in [0, 1].
    prediction: "velocity" or "x0" (`flow.to_velocity`).

  Returns:
    float32 (B,): each example's `flow.flow_matching_loss`; their mean is the batch's loss.
  """
  t_b = jnp.full((x0.shape[0],), t, jnp.float32)
  x_t = flow.interpolate(x0, noise, t_b)
  v_pred = flow.to_velocity(denoise(x_t, t_b), x_t, t_b, prediction)
  target = flow.velocity_target(x0, noise)
  return jax.vmap(lambda p, q: flow.flow_matching_loss(p[None], q[None]))(v_pred, target)


def make_dit_loss(dit, prediction: str):
  """Jitted (params, x0, noise, t, text, text_mask) -> (B,) loss of the text-conditioned DiT.

  t is traced, so one program per latent shape serves every noise level.
  """

  def fn(params, x0, noise, t, text, text_mask):
    def denoise(x_t, t_b):
      drop = jnp.zeros((x0.shape[0],), bool)  # Caption always given: no dropout at evaluation.
      return dit.apply({"params": params}, x_t, t_b, text, text_mask, drop_text_b=drop)

    return loss_at_t(denoise, x0, noise, t, prediction=prediction)

  return jax.jit(fn)


@dataclasses.dataclass(frozen=True)
class ValidationConfig:
  """What `evaluate_validation_loss` measures."""

  num_clips: int = 4  # Clips per cell; every figure is a mean over them.
  num_levels: int = 10  # K equal bins of t; the loss is taken at their centres.
  seed: int = 1  # ShapesWorld seed of the clips (not the run's data.seed) and noise seed.

  def __post_init__(self):
    if self.num_clips < 1:
      raise ValueError(f"--val_clips={self.num_clips} must be >= 1.")
    bin_edges(self.num_levels)


def cells(data_cfg) -> list[tuple[int, int, int]]:
  """The config's native (T, H, W) shapes, lengths-major: ShapesWorld's bucket shapes."""
  return [(int(t), int(h), int(w)) for t in data_cfg.lengths for h, w in data_cfg.sizes]


def cell_clips(data_cfg, shape: tuple[int, int, int], num_clips: int,
               seed: int) -> tuple[list[np.ndarray], list[str]]:
  """`num_clips` clips of the run's ShapesWorld distribution rendered at one (T, H, W): (videos,
  captions).

  Each cell renders from its own one-shape world, so a cell's clips depend on the seed and the
  shape only, not on which other sizes and lengths the config lists: runs whose bucket lists
  differ still score the same clips in the cells they share.
  """
  frames, height, width = shape
  world = shapesworld.ShapesWorldConfig(
      seed=seed, sizes=((height, width),), lengths=(frames,), max_objects=data_cfg.max_objects,
      holdout=tuple(tuple(h) for h in data_cfg.holdout), camera_pan_prob=data_cfg.camera_pan_prob)
  source = shapesworld.ShapesWorld(world, split="train")
  examples = [source[i] for i in range(num_clips)]
  return [e["video"] for e in examples], [e["caption"] for e in examples]


def cell_noise(seed: int, shape: tuple[int, int, int], latent_shape: tuple[int, ...]) -> jax.Array:
  """Standard-normal noise (B, T, H, W, C) of one cell, a function of the seed and the shape."""
  key = jax.random.PRNGKey(seed)
  for n in shape:
    key = jax.random.fold_in(key, n)
  return jax.random.normal(key, latent_shape, jnp.float32)


def _summary(values: Sequence[float]) -> float | None:
  values = [v for v in values if v is not None and math.isfinite(v)]
  return float(np.mean(values)) if values else None


def evaluate_validation_loss(generator: Any, data_cfg, cfg: ValidationConfig, *,
                             progress: Callable[[str], None] | None = None) -> dict:
  """The loss of `generator.dit` per cell of `data_cfg` and per noise level (module docstring).

  Args:
    generator: an `inference.Generator` (its DiT, autoencoder, latent statistics, text front end
      and diffusion settings).
    data_cfg: the run's `DataConfig` (a ShapesWorld source: sizes, lengths, holdout).
    cfg: clips per cell, noise levels, seed.
    progress: called with a line per finished cell.

  Returns:
    JSON-ready dict: "settings", "noise_levels" (K,), "cells" (per shape: loss and its std over
    clips per level, training weights, weighted loss), "skipped_cells" (shapes the model cannot
    take, each with the reason), "by_noise_level" (mean over cells, (K,)) and "summary".
  """
  if data_cfg.source != "shapesworld":
    raise ValueError(
        f"the validation loss renders ShapesWorld clips, but data.source={data_cfg.source!r}."
        " Skip it with --parts without val_loss.")
  if cfg.seed == data_cfg.seed:
    raise ValueError(
        f"--eval_seed={cfg.seed} is the run's training seed (data.seed): those clips are training"
        f" data. Use another seed, e.g. {data_cfg.seed + 1} (the default).")
  diffusion = generator.diffusion
  loss_fn = make_dit_loss(generator.dit, diffusion.prediction)
  encode = jax.jit(functools.partial(steps_lib.encode_video, generator.autoencoder))
  patch = tuple(generator.dit.config.patch_size)
  edges, levels = bin_edges(cfg.num_levels), noise_levels(cfg.num_levels)
  rows, skipped = [], []
  for shape in cells(data_cfg):
    try:
      latent = generator.latent_grid(*shape)
    except ValueError as e:
      skipped.append({"shape": list(shape), "reason": str(e)})
      continue
    videos, captions = cell_clips(data_cfg, shape, cfg.num_clips, cfg.seed)
    mean = encode(generator.autoencoder_params, jnp.asarray(np.stack(videos)))
    x0 = (mean - generator.latent_mean) / generator.latent_std
    noise = cell_noise(cfg.seed, shape, x0.shape)
    text, mask = (jnp.asarray(a) for a in generator.tokenizer(list(captions)))
    per_level = np.stack([
        np.asarray(loss_fn(generator.dit_params, x0, noise, jnp.float32(t), text, mask))
        for t in levels])  # (K, B)
    tokens = math.prod(n // p for n, p in zip(latent, patch))
    shift = steps_lib.timestep_shift(diffusion, tokens)
    weights = training_weights(edges, distribution=diffusion.timestep_distribution,
                               mean=diffusion.logit_mean, std=diffusion.logit_std, shift=shift)
    loss_k = per_level.mean(axis=1)
    rows.append({
        "shape": list(shape), "latent_shape": list(latent), "tokens": tokens, "shift": shift,
        "clips": len(videos),
        "loss": loss_k.tolist(),
        "loss_std": per_level.std(axis=1, ddof=1 if len(videos) > 1 else 0).tolist(),
        "training_weights": weights.tolist(),
        "weighted_loss": float(weights @ loss_k),
    })
    line = f"val_loss {'x'.join(map(str, shape))}: weighted {rows[-1]['weighted_loss']:.4f}"
    logging.info(line)
    if progress:
      progress(line)
  by_level = [_summary([r["loss"][k] for r in rows]) for k in range(len(levels))]
  return {
      "settings": {
          **dataclasses.asdict(cfg), "split": "train", "prediction": diffusion.prediction,
          "timestep_distribution": diffusion.timestep_distribution,
          "bin_edges": edges.tolist(),
          "text": "caption always given (no dropout); conditioning off (text-to-video step)",
      },
      "noise_levels": levels.tolist(),
      "cells": rows,
      "skipped_cells": skipped,
      "by_noise_level": by_level,
      "summary": {
          "weighted_loss": _summary([r["weighted_loss"] for r in rows]),
          "mean_loss": _summary([v for r in rows for v in r["loss"]]),
          "cells": len(rows),
      },
  }
