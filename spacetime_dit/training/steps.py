"""Pure train steps: `(state, batch, frozen) -> (state, metrics)`, jitted by the loop.

Static collaborators (modules, optimizer, loss settings) are bound with keyword
arguments (`functools.partial`); nothing is closed over from the loop. Per-step
randomness is `fold_in(state.rng, state.step)`, so a resumed run draws exactly the
numbers an uninterrupted run would have drawn.
"""

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from spacetime_dit.config_types import DiffusionConfig
from spacetime_dit.diffusion import flow
from spacetime_dit.models import autoencoder as autoencoder_lib
from spacetime_dit.training.state import TrainState

Metrics = dict[str, jax.Array]


def video_to_model_range(video_bthwc: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return video_bthwc.astype(jnp.float32) / 127.5 - 1.0


def encode_video(autoencoder: nn.Module, params: Any, video_bthwc: jax.Array) -> jax.Array:
  """uint8 video (B, T, H, W, 3) -> the autoencoder's posterior mean (B, t, h, w, C)."""
  mean, _ = autoencoder.apply(
      {"params": params}, video_to_model_range(video_bthwc), method=autoencoder.encode
  )
  return mean


def apply_gradients(
    state: TrainState, grads: Any, *, tx: optax.GradientTransformation, schedule: optax.Schedule
) -> tuple[TrainState, Metrics]:
  """One optimizer update, with the norms that diagnose it."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      "grad_norm": optax.tree.norm(grads),
      "param_norm": optax.tree.norm(params),
      "learning_rate": schedule(state.step),
  }
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def autoencoder_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    frozen: Mapping[str, Any],
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    kl_weight: float,
) -> tuple[TrainState, Metrics]:
  """Reconstruction + KL step of the video autoencoder on a (B, T, H, W, 3) uint8 batch."""
  del frozen  # The autoencoder stage has no frozen networks.
  rng = jax.random.fold_in(state.rng, state.step)
  video = video_to_model_range(batch["video"])

  def loss_fn(params):
    recon, mean, logvar = model.apply(
        {"params": params}, video, sample_posterior=True, rngs={"sample": rng}
    )
    return autoencoder_lib.autoencoder_loss(recon, video, mean, logvar, kl_weight=kl_weight)

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state, metrics = apply_gradients(state, grads, tx=tx, schedule=schedule)
  return state, {"loss": loss, **aux, **metrics}


def clean_latents(
    batch: Mapping[str, jax.Array], frozen: Mapping[str, Any], *, autoencoder: nn.Module
) -> jax.Array:
  """The batch's normalised latent x0: cached posterior means, or the video encoded here.

  Which one is decided when the step is traced (by the batch's keys), not per step.
  """
  if "latent" in batch:
    mean = batch["latent"]
  else:
    mean = encode_video(autoencoder, frozen["autoencoder"], batch["video"])
  return jax.lax.stop_gradient((mean - frozen["latent_mean"]) / frozen["latent_std"])


def dit_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    frozen: Mapping[str, Any],
    *,
    model: nn.Module,
    autoencoder: nn.Module,
    patch_size: tuple[int, int, int],
    diffusion: DiffusionConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
) -> tuple[TrainState, Metrics]:
  """Rectified-flow step of the text-conditioned DiT on the frozen autoencoder's latents.

  `batch` holds "text_ids", "text_mask" and either "latent" (cached posterior means) or
  "video" (uint8, encoded in the step).
  """
  rng = jax.random.fold_in(state.rng, state.step)
  rng_t, rng_noise, rng_drop = jax.random.split(rng, 3)
  x0 = clean_latents(batch, frozen, autoencoder=autoencoder)
  batch_size = x0.shape[0]
  # The shift depends on the token count of this bucket: a static Python number per shape,
  # the same rule the sampler applies (SD3 §5.3.2).
  num_tokens = math.prod(n // p for n, p in zip(x0.shape[1:4], patch_size))
  shift = flow.resolution_shift(num_tokens, diffusion.shift_base_tokens, diffusion.base_shift)
  t = flow.sample_timesteps(
      rng_t,
      (batch_size,),
      distribution=diffusion.timestep_distribution,
      mean=diffusion.logit_mean,
      std=diffusion.logit_std,
      shift=shift,
  )
  noise = jax.random.normal(rng_noise, x0.shape, x0.dtype)
  x_t = flow.interpolate(x0, noise, t)
  drop_text = jax.random.uniform(rng_drop, (batch_size,)) < diffusion.caption_dropout
  target = flow.velocity_target(x0, noise)

  def loss_fn(params):
    pred = model.apply(
        {"params": params}, x_t, t, batch["text_ids"], batch["text_mask"], drop_text_b=drop_text
    )
    return flow.flow_matching_loss(flow.to_velocity(pred, x_t, t, diffusion.prediction), target)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  state, metrics = apply_gradients(state, grads, tx=tx, schedule=schedule)
  return state, {"loss": loss, **metrics}
