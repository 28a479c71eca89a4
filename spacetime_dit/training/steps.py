"""Pure train steps: `(state, batch, frozen) -> (state, metrics)`, jitted by the loop.

Static collaborators (modules, optimizer, loss settings) are bound with keyword
arguments (`functools.partial`); nothing is closed over from the loop. Per-step
randomness is `fold_in(state.rng, state.step)`, so a resumed run draws exactly the
numbers an uninterrupted run would have drawn.
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from spacetime_dit import conditioning as conditioning_lib
from spacetime_dit.config_types import DiffusionConfig
from spacetime_dit.diffusion import flow
from spacetime_dit.models import autoencoder as autoencoder_lib
from spacetime_dit.models import discriminator as discriminator_lib
from spacetime_dit.training import ema as ema_lib
from spacetime_dit.training import optimizer as optimizer_lib
from spacetime_dit.training.state import TrainState

Metrics = dict[str, jax.Array]


def video_to_model_range(video_bthwc: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return video_bthwc.astype(jnp.float32) / 127.5 - 1.0


def video_from_model_range(video_bthwc: jax.Array) -> jax.Array:
  """float [-1, 1] (decoder output, may overshoot) -> uint8 [0, 255], rounded and clipped."""
  return jnp.clip(jnp.round((video_bthwc + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def encode_video(autoencoder: nn.Module, params: Any, video_bthwc: jax.Array) -> jax.Array:
  """uint8 video (B, T, H, W, 3) -> the autoencoder's posterior mean (B, t, h, w, C)."""
  mean, _ = autoencoder.apply(
      {"params": params}, video_to_model_range(video_bthwc), method=autoencoder.encode
  )
  return mean


def apply_gradients(
    state: TrainState, grads: Any, *, tx: optax.GradientTransformation, schedule: optax.Schedule
) -> tuple[TrainState, Metrics]:
  """One optimizer update, with the norms that diagnose it, and the EMA's update if the state has one.

  The norms are `optimizer.global_norm`, as in the optimizer's clipping: XLA merges the two
  identical gradient-norm computations into one, and neither squares a parameter-sized copy.
  """
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      "grad_norm": optimizer_lib.global_norm(grads),
      "param_norm": optimizer_lib.global_norm(params),
      "learning_rate": schedule(state.step),
  }
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  # The average takes in this update's parameters. A non-finite update that
  # `loop.guard_nonfinite` skips puts back the old average with the old parameters.
  return ema_lib.update_state(new_state, t=state.step), metrics


@dataclasses.dataclass(frozen=True)
class AutoencoderLossConfig:
  """Weights of the autoencoder's loss terms (the experiment's `config.loss` section).

  loss = l1_weight * mean|x' - x| + l2_weight * mean (x' - x)^2 + kl_weight * mean KL
         + [step >= disc_start] * disc_weight * lambda * (-mean D(x')),
  lambda being VQGAN's adaptive weight (`discriminator.adaptive_weight`). Defaults reproduce the
  loss of checkpoints written before these fields existed (L1 + L2, no GAN).
  """

  l1_weight: float = 1.0  # L1 keeps edges sharp.
  l2_weight: float = 1.0  # L2 punishes large colour errors; PSNR is its log.
  kl_weight: float = 1e-6  # Per-element KL to N(0, I) (see `autoencoder_lib.autoencoder_loss`).
  # 0 disables the GAN statically: no discriminator is built and the state holds the bare
  # autoencoder parameters.
  disc_weight: float = 0.0
  disc_start: int = 0  # Step at which the generator term and the discriminator's updates start.
  disc_channels: int = 64  # Width of the discriminator's first layer.
  disc_layers: int = 3  # Strided layers of the discriminator (PatchGAN n_layers).
  adaptive_weight_max: float = 1e4  # Clip of the adaptive weight lambda.

  def __post_init__(self):
    for name in ("l1_weight", "l2_weight", "kl_weight", "disc_weight", "disc_start"):
      if getattr(self, name) < 0:
        raise ValueError(f"loss.{name}={getattr(self, name)} must be >= 0.")
    if self.l1_weight + self.l2_weight <= 0:
      raise ValueError(
          f"loss.l1_weight={self.l1_weight} and loss.l2_weight={self.l2_weight} are both 0: the"
          " autoencoder would learn no reconstruction. Set at least one > 0.")
    if self.disc_weight > 0 and (self.disc_channels < 1 or self.disc_layers < 1):
      raise ValueError(
          f"loss.disc_channels={self.disc_channels} and loss.disc_layers={self.disc_layers} must"
          " be >= 1 when loss.disc_weight > 0.")

  @property
  def use_discriminator(self) -> bool:
    return self.disc_weight > 0


def reconstruction_loss(
    recon: jax.Array, video: jax.Array, mean: jax.Array, logvar: jax.Array, loss: AutoencoderLossConfig
) -> tuple[jax.Array, Metrics]:
  """Weighted L1 + L2 + KL, with the unweighted terms and PSNR as metrics.

  `autoencoder_lib.autoencoder_loss` with the weights of the `config.loss` section.
  """
  return autoencoder_lib.autoencoder_loss(
      recon, video, mean, logvar, kl_weight=loss.kl_weight, l1_weight=loss.l1_weight,
      l2_weight=loss.l2_weight)


def autoencoder_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    frozen: Mapping[str, Any],
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    loss: AutoencoderLossConfig,
    discriminator: nn.Module | None = None,
) -> tuple[TrainState, Metrics]:
  """One step of the video autoencoder on a (B, T, H, W, 3) uint8 batch.

  Without a discriminator (`loss.disc_weight == 0`) `state.params` are the autoencoder's and
  the loss is reconstruction + KL. With one, `state.params` is {"autoencoder", "discriminator"}
  and both networks update in this step (see `_gan_autoencoder_step`).

  Args:
    state: the train state.
    batch: {"video": (B, T, H, W, 3) uint8}.
    frozen: unused (the autoencoder stage has no frozen networks).
    model: the `CausalVideoAutoencoder`.
    tx, schedule: the optimizer (for both networks: `builders.build_autoencoder_training`) and
      the learning-rate schedule it logs.
    loss: the loss weights.
    discriminator: the `PatchDiscriminator`, required when `loss.disc_weight > 0`.

  Returns:
    (new state, metrics): "loss" (the autoencoder's objective), "recon_l1", "recon_mse", "kl",
    "psnr", the optimizer norms, and with the GAN "g_loss", "d_loss", "adaptive_weight",
    "d_real", "d_fake" (mean logits), "gan_active" (1 from disc_start) and "d_grad_norm".
  """
  del frozen  # The autoencoder stage has no frozen networks.
  rng = jax.random.fold_in(state.rng, state.step)
  video = video_to_model_range(batch["video"])
  if loss.use_discriminator:
    if discriminator is None:
      raise ValueError(
          f"loss.disc_weight={loss.disc_weight} > 0 but no discriminator was passed; build the"
          " step with `builders.build_autoencoder_training`.")
    return _gan_autoencoder_step(state, video, rng, model=model, discriminator=discriminator, tx=tx,
                                 schedule=schedule, loss=loss)

  def loss_fn(params):
    recon, mean, logvar = model.apply(
        {"params": params}, video, sample_posterior=True, rngs={"sample": rng}
    )
    return reconstruction_loss(recon, video, mean, logvar, loss)

  (total, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state, metrics = apply_gradients(state, grads, tx=tx, schedule=schedule)
  return state, {"loss": total, **aux, **metrics}


# Path of the decoder's last convolution kernel in the autoencoder's parameters: the layer of
# VQGAN's adaptive weight.
LAST_LAYER = ("decoder", "conv_out", "kernel")


def last_layer(ae_params: Any) -> jax.Array:
  """The decoder's output-conv kernel (`LAST_LAYER`) from the autoencoder's parameter tree."""
  node = ae_params
  for key in LAST_LAYER:
    if key not in node:
      raise KeyError(
          f"autoencoder parameters have no {'/'.join(LAST_LAYER)} (missing {key!r}); the adaptive"
          " GAN weight needs the decoder's last layer. Update steps.LAST_LAYER to its new path.")
    node = node[key]
  return node


def _gan_autoencoder_step(state, video, rng, *, model, discriminator, tx, schedule, loss):
  """Autoencoder + discriminator step with VQGAN's adaptively weighted hinge GAN.

  The autoencoder's forward pass is linearised once (`jax.vjp` of params -> (recon, mean,
  logvar)); every autoencoder gradient is that pullback applied to a cotangent on its outputs:
  - the full gradient, with cotangent d(rec + KL)/d(outputs) + w * d(gen loss)/d(recon);
  - the two last-layer gradients of the adaptive weight, with the reconstruction's and the
    generator's cotangents on recon; only the last kernel is kept, so XLA drops the rest of
    those two backward passes (it needs the saved input of that conv and nothing else: the
    compiled tiny step has exactly 2 more convolutions than with a constant weight).
  The discriminator runs once on the real and once on the fake clip; the fake pass's pullback
  gives both the discriminator's gradient (hinge loss, with recon held fixed) and the
  generator's gradient on recon (with the discriminator held fixed).

  On 2 CPU cores the whole GAN step costs 1.3x the GAN-free step for the tiny config (8-channel
  discriminator, 2 x 5 x 32 x 32 clips) and 1.05x for the cpu autoencoder with a 16-channel one
  (4 x 9 x 32 x 32), compile excluded.

  Before `disc_start` the generator term's weight is 0 (so the autoencoder's loss and update
  equal the GAN-free step's) and the discriminator's optimizer is masked (see
  `builders.build_autoencoder_training`).
  """
  ae_params, d_params = state.params["autoencoder"], state.params["discriminator"]

  def forward(params):
    return model.apply({"params": params}, video, sample_posterior=True, rngs={"sample": rng})

  def apply_d(params, x):
    return discriminator.apply({"params": params}, x)

  (recon, mean, logvar), ae_pullback = jax.vjp(forward, ae_params)
  (rec_loss, aux), (ct_recon, ct_mean, ct_logvar) = jax.value_and_grad(
      lambda r, m, lv: reconstruction_loss(r, video, m, lv, loss), argnums=(0, 1, 2), has_aux=True
  )(recon, mean, logvar)

  logits_real, real_pullback = jax.vjp(lambda p: apply_d(p, video), d_params)
  logits_fake, fake_pullback = jax.vjp(apply_d, d_params, recon)
  d_loss, (ct_real, ct_fake) = jax.value_and_grad(discriminator_lib.hinge_d_loss, argnums=(0, 1))(
      logits_real, logits_fake
  )
  g_loss, ct_gen = jax.value_and_grad(discriminator_lib.generator_loss)(logits_fake)
  (d_grads_real,) = real_pullback(ct_real)
  d_grads_fake, _ = fake_pullback(ct_fake)
  d_grads = jax.tree.map(jnp.add, d_grads_real, d_grads_fake)
  _, ct_gen_recon = fake_pullback(ct_gen)

  zeros_mean, zeros_logvar = jnp.zeros_like(mean), jnp.zeros_like(logvar)
  # KL does not reach the decoder's last layer, so the reconstruction's cotangent on recon is
  # ct_recon whole.
  (rec_last,) = ae_pullback((ct_recon, zeros_mean, zeros_logvar))
  (gen_last,) = ae_pullback((ct_gen_recon, zeros_mean, zeros_logvar))
  weight = discriminator_lib.adaptive_weight(
      last_layer(rec_last), last_layer(gen_last), max_weight=loss.adaptive_weight_max
  )
  active = state.step >= loss.disc_start
  gen_scale = jnp.where(active, loss.disc_weight * weight, 0.0)
  (ae_grads,) = ae_pullback((ct_recon + gen_scale * ct_gen_recon, ct_mean, ct_logvar))

  grads = {"autoencoder": ae_grads, "discriminator": d_grads}
  state, metrics = apply_gradients(state, grads, tx=tx, schedule=schedule)
  # The autoencoder's norms only, so the curves compare with GAN-free runs (d_grad_norm below).
  metrics["grad_norm"] = optax.tree.norm(ae_grads)
  metrics["param_norm"] = optax.tree.norm(state.params["autoencoder"])
  gan_metrics = {
      "g_loss": g_loss,
      "d_loss": d_loss,
      "adaptive_weight": weight,
      "d_real": jnp.mean(logits_real),
      "d_fake": jnp.mean(logits_fake),
      "gan_active": active.astype(jnp.float32),
      "d_grad_norm": optax.tree.norm(d_grads),
  }
  return state, {"loss": rec_loss + gen_scale * g_loss, **aux, **metrics, **gan_metrics}


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


def batch_text(batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """The DiT's text input and its mask: frozen-encoder features if the batch has them, else ids.

  "text_features" (B, S, E) float come from a frozen pretrained encoder (computed ahead of time);
  "text_ids" (B, S) int feed the DiT's own trainable encoder. Packed rows have one more axis
  (B, G, ...), one caption per clip slot. The mask is "text_mask" in both cases.
  """
  text = batch["text_features"] if "text_features" in batch else batch["text_ids"]
  return text, batch["text_mask"]


def timestep_shift(diffusion: DiffusionConfig, num_tokens: int) -> float:
  """The timestep shift of a clip of `num_tokens` tokens; training and sampling share it.

  `diffusion.resolution_shift` False gives the constant `base_shift` at every size (the "off"
  arm of `experiments/base.py`'s shift sweep), else SD3's sqrt(tokens / base) rule.
  """
  if not diffusion.resolution_shift:
    return float(diffusion.base_shift)
  return flow.resolution_shift(num_tokens, diffusion.shift_base_tokens, diffusion.base_shift)


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
    conditioning: conditioning_lib.ConditioningConfig | None = None,
) -> tuple[TrainState, Metrics]:
  """Rectified-flow step of the text-conditioned DiT on the frozen autoencoder's latents.

  `batch` holds "text_ids" (or "text_features", see `batch_text`), "text_mask" and either
  "latent" (cached posterior means) or "video" (uint8, encoded in the step).

  With a `conditioning` mixture every example draws a mode (`conditioning.sample_modes`); its
  given latent frames enter clean (x_t = x0) with timestep 0 on their tokens, the others are
  noised at the example's t, and the loss covers the generated frames only. Frames are drawn per
  temporal patch, so a token is either given or generated as a whole. A text-only mixture (or
  None) takes the unconditioned path, bit-for-bit the step of runs made before conditioning.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  rng_t, rng_noise, rng_drop = jax.random.split(rng, 3)
  x0 = clean_latents(batch, frozen, autoencoder=autoencoder)
  batch_size = x0.shape[0]
  text, text_mask = batch_text(batch)
  # The shift depends on the token count of this bucket: a static Python number per shape,
  # the same rule the sampler applies (SD3 §5.3.2).
  grid = tuple(n // p for n, p in zip(x0.shape[1:4], patch_size))
  num_tokens = math.prod(grid)
  shift = timestep_shift(diffusion, num_tokens)
  t = flow.sample_timesteps(
      rng_t,
      (batch_size,),
      distribution=diffusion.timestep_distribution,
      mean=diffusion.logit_mean,
      std=diffusion.logit_std,
      shift=shift,
  )
  noise = jax.random.normal(rng_noise, x0.shape, x0.dtype)
  drop_text = jax.random.uniform(rng_drop, (batch_size,)) < diffusion.caption_dropout
  target = flow.velocity_target(x0, noise)

  if conditioning is None or conditioning.text_only:
    x_t = flow.interpolate(x0, noise, t)

    def loss_fn(params):
      pred = model.apply({"params": params}, x_t, t, text, text_mask, drop_text_b=drop_text)
      return flow.flow_matching_loss(flow.to_velocity(pred, x_t, t, diffusion.prediction), target)

    given_fraction = jnp.zeros((), jnp.float32)
  else:
    # A fourth stream (fold_in, not a 4-way split) keeps t, noise and dropout identical to the
    # text-only step's draws.
    rng_mode, rng_frames = jax.random.split(jax.random.fold_in(rng, 3))
    pt, gt = patch_size[0], grid[0]
    mode_b, k_b = conditioning_lib.sample_modes(
        rng_mode, conditioning, (batch_size,), num_frames=gt
    )
    given_bg = conditioning_lib.frame_mask(
        mode_b, k_b, gt, jnp.arange(gt)[None], rng=rng_frames, cfg=conditioning
    )
    given_bt = jnp.repeat(given_bg, pt, axis=1)  # Temporal patches -> latent frames.
    t_bt = conditioning_lib.timesteps_with_condition(t, given_bt)
    t_bl = conditioning_lib.timesteps_with_condition(
        t, conditioning_lib.token_mask(given_bt, grid, patch_size)
    )
    x_t = flow.interpolate(x0, noise, t_bt)  # x0 exactly where t = 0.
    generated_bt = jnp.logical_not(given_bt)

    def loss_fn(params):
      pred = model.apply({"params": params}, x_t, t_bl, text, text_mask, drop_text_b=drop_text)
      return flow.flow_matching_loss(
          flow.to_velocity(pred, x_t, t_bt, diffusion.prediction), target, mask=generated_bt
      )

    given_fraction = jnp.mean(given_bt.astype(jnp.float32))

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  state, metrics = apply_gradients(state, grads, tx=tx, schedule=schedule)
  return state, {"loss": loss, **metrics, "given_fraction": given_fraction}


def packed_clean_tokens(
    batch: Mapping[str, jax.Array], frozen: Mapping[str, Any], *, latent_channels: int
) -> jax.Array:
  """A packed batch's normalised clean tokens x0 (B, L, P), zero at padding.

  `batch["tokens"]` holds patchified posterior means; P is ordered (pt, ph, pw, C), so the
  per-channel latent statistics apply along the last axis of a (B, L, P / C, C) view.
  """
  tokens_blp = batch["tokens"].astype(jnp.float32)
  b, length, p = tokens_blp.shape
  x = tokens_blp.reshape(b, length, p // latent_channels, latent_channels)
  x = (x - frozen["latent_mean"]) / frozen["latent_std"]
  valid_bl = batch["segment_ids"] > 0
  x = jnp.where(valid_bl[:, :, None, None], x, 0.0)
  return jax.lax.stop_gradient(x.reshape(b, length, p))


def packed_timesteps(
    rng: jax.Array, grid_bg3: jax.Array, diffusion: DiffusionConfig
) -> jax.Array:
  """Training timesteps per clip slot (B, G), each shifted by its own clip's token count.

  The same rule as `dit_step` (SD3 §5.3.2: shift = base_shift * sqrt(tokens / base_tokens)),
  evaluated per clip because a packed row mixes resolutions and lengths.
  """
  tokens_bg = jnp.maximum(jnp.prod(grid_bg3, axis=-1), 1).astype(jnp.float32)
  if diffusion.resolution_shift:
    shift_bg = diffusion.base_shift * jnp.sqrt(tokens_bg / diffusion.shift_base_tokens)
  else:  # `timestep_shift`'s constant, per clip.
    shift_bg = jnp.full_like(tokens_bg, diffusion.base_shift)
  t = flow.sample_timesteps(
      rng, grid_bg3.shape[:2], distribution=diffusion.timestep_distribution,
      mean=diffusion.logit_mean, std=diffusion.logit_std,
  )
  return flow.shift_timesteps(t, shift_bg)


def packed_given_tokens(
    rng: jax.Array,
    batch: Mapping[str, jax.Array],
    conditioning: conditioning_lib.ConditioningConfig,
) -> jax.Array:
  """Given tokens (B, L) of packed rows: each clip slot draws its own mode from the mixture.

  Slot g's frames are its temporal patches: T = batch["grid"][..., 0] and a token's frame is
  positions[..., 0]. Masks are drawn per (slot, frame) on a frame axis of L (a clip has no more
  temporal patches than tokens) and gathered per token, so every token of a frame agrees and a
  token's mask follows its own slot's frame count. Padding is never given.
  """
  rng_mode, rng_frames = jax.random.split(rng)
  num_frames_bg = batch["grid"][..., 0].astype(jnp.int32)
  b, g = num_frames_bg.shape
  length = batch["segment_ids"].shape[1]
  mode_bg, k_bg = conditioning_lib.sample_modes(
      rng_mode, conditioning, (b, g), num_frames=num_frames_bg
  )
  given_bgf = conditioning_lib.frame_mask(
      mode_bg, k_bg, num_frames_bg, jnp.arange(length)[None, None], rng=rng_frames, cfg=conditioning
  )
  segment_ids_bl = batch["segment_ids"].astype(jnp.int32)
  slot_bl = jnp.clip(segment_ids_bl - 1, 0, g - 1)
  frame_bl = jnp.clip(batch["positions"][..., 0].astype(jnp.int32), 0, length - 1)
  given_bl = jnp.take_along_axis(
      given_bgf.reshape(b, g * length), slot_bl * length + frame_bl, axis=1
  )
  return given_bl & (segment_ids_bl > 0)


def dit_packed_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    frozen: Mapping[str, Any],
    *,
    model: nn.Module,
    diffusion: DiffusionConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    conditioning: conditioning_lib.ConditioningConfig | None = None,
) -> tuple[TrainState, Metrics]:
  """Rectified-flow step on packed rows (`data_pipelines.packing`): one program for any mix.

  Every clip slot draws its own timestep, caption dropout and (with a `conditioning` mixture)
  conditioning mode; a token takes its clip's, and given tokens (`packed_given_tokens`) are
  clean with timestep 0. The loss averages over real generated tokens only (segment id > 0,
  not given), so padding and conditions neither train nor dilute.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  rng_t, rng_noise, rng_drop = jax.random.split(rng, 3)
  latent_channels = model.config.latent_channels
  x0 = packed_clean_tokens(batch, frozen, latent_channels=latent_channels)
  segment_ids_bl = batch["segment_ids"].astype(jnp.int32)
  text, text_mask = batch_text(batch)
  t_bg = packed_timesteps(rng_t, batch["grid"], diffusion)
  slot_bl = jnp.clip(segment_ids_bl - 1, 0, t_bg.shape[1] - 1)
  t_bl = jnp.take_along_axis(t_bg, slot_bl, axis=1)
  valid_bl = segment_ids_bl > 0
  if conditioning is None or conditioning.text_only:
    loss_mask_bl = valid_bl
    given_fraction = jnp.zeros((), jnp.float32)
  else:
    # fold_in keeps t, noise and dropout identical to the text-only step's draws.
    given_bl = packed_given_tokens(jax.random.fold_in(rng, 3), batch, conditioning)
    t_bl = conditioning_lib.timesteps_with_condition(t_bl, given_bl)
    loss_mask_bl = valid_bl & jnp.logical_not(given_bl)
    given_fraction = jnp.sum(given_bl) / jnp.maximum(jnp.sum(valid_bl), 1)
  noise = jax.random.normal(rng_noise, x0.shape, x0.dtype)
  x_t = flow.interpolate(x0, noise, t_bl)
  drop_text_bg = jax.random.uniform(rng_drop, t_bg.shape) < diffusion.caption_dropout
  target = flow.velocity_target(x0, noise)

  def loss_fn(params):
    pred = model.apply(
        {"params": params}, x_t, t_bl, text, text_mask,
        drop_text_b=drop_text_bg, segment_ids=segment_ids_bl, positions=batch["positions"],
    )
    return flow.flow_matching_loss(
        flow.to_velocity(pred, x_t, t_bl, diffusion.prediction), target, mask=loss_mask_bl
    )

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  state, metrics = apply_gradients(state, grads, tx=tx, schedule=schedule)
  metrics["token_fill"] = jnp.mean(valid_bl.astype(jnp.float32))
  metrics["given_fraction"] = given_fraction.astype(jnp.float32)
  return state, {"loss": loss, **metrics}
