"""Causal 3-D convolutional VAE: video (B, T, H, W, 3) <-> latent (B, t, h, w, C).

Shapes: B batch; T/H/W video frames/height/width; t/h/w (written T/H/W in array names, with
"latent" in the docstring) latent frames/height/width; C channels.

The design follows the causal video VAEs of CogVideoX (Yang et al. 2024, §2.2) and Wan 2.1
(Wan Team 2025, §3.1), scaled down:
- Every convolution is causal in time (`conv3d.causal_conv3d`), and every norm acts inside one
  frame, so latent frame i depends only on video frames <= the last frame it covers.
- The first frame is encoded on its own: a video of 1 + k*tf frames gives 1 + k latent frames
  and an image (1 frame) gives 1 latent frame, so images and videos share one latent space.
  Time is downsampled by causal convolutions with time stride 2 (outputs at frames 0, 2, 4, ...)
  and upsampled by depth-to-space in time that expands latent frame 0 to one frame
  (`conv3d.unfold_time`).
- Time is downsampled on the last (lowest-resolution) log2(tf) of the log2(sf) spatial levels,
  as in Wan 2.1, so the high-resolution levels still see every frame.
- Causality makes streaming exact: with `apply(..., mutable=["cache"])` every causal conv
  carries the input frames its next output needs from one time chunk to the next (see
  `conv3d.CausalConv3d`), so `autoencoder_tiling` encodes and decodes any length in chunks with
  bounded memory and the one-shot result.
- The encoder outputs a diagonal Gaussian posterior (mean, log-variance) with
  `latent_channels` channels (Kingma & Welling 2014).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from spacetime_dit.models import conv3d
from spacetime_dit.sharding import axes
from spacetime_dit.sharding import constraints

NORMS = ("rms", "group")
_ACT_AXES = (axes.ACT_BATCH, axes.ACT_FRAMES, axes.ACT_HEIGHT, axes.ACT_WIDTH, axes.ACT_CHANNELS)


def _is_power_of_two(n: int) -> bool:
  return isinstance(n, int) and n >= 1 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
  """Architecture of `CausalVideoAutoencoder`.

  With spatial factor sf there are log2(sf) downsampling steps, so log2(sf) + 1 levels, and
  `channel_multipliers` has one entry per level (level 0 is full resolution).
  """

  # C of the latent (the diffusion model's input channels).
  latent_channels: int = 16
  # tf: video frames per latent frame after the first; 1, 2 or 4 (a power of two <= sf).
  temporal_factor: int = 4
  # sf: video pixels per latent pixel along H and along W; a power of two >= 2.
  spatial_factor: int = 8
  # Channels of level 0; level l has base_channels * channel_multipliers[l].
  base_channels: int = 64
  # One multiplier per level: len == log2(spatial_factor) + 1.
  channel_multipliers: tuple[int, ...] = (1, 2, 4, 4)
  # Residual blocks per level, in the encoder and in the decoder.
  num_res_blocks: int = 1
  # Channels of the video (3 for RGB).
  video_channels: int = 3
  # "rms": per-position RMS norm over channels (Wan 2.1); "group": GroupNorm over (H, W, C/G)
  # of each frame. Neither normalises over T, which would leak the future into the past.
  norm: str = "rms"
  # Groups G of the "group" norm; every level's channel count must be divisible by it.
  norm_groups: int = 8
  # Fill for the frames before frame 0: "replicate" (copies of frame 0) or "zeros".
  time_padding: str = "replicate"
  # Causal conv implementation (see conv3d.CONV_IMPLS): "stacked2d" (default; the fastest on
  # CPU and the quickest to compile), "taps2d" or "conv3d" (try it on accelerators).
  conv_impl: str = "stacked2d"
  # Added to the predicted posterior log-variance, so training starts from a nearly
  # deterministic posterior (std e^(offset/2)). With the tiny KL weights of video VAEs the
  # decoder would otherwise first have to learn to see through unit-variance noise: a CPU run
  # sat at ~12 dB for 130 steps with offset 0.
  logvar_offset: float = -6.0
  # The posterior log-variance is clipped to [logvar_min, logvar_max] for stable exp().
  logvar_min: float = -30.0
  logvar_max: float = 20.0
  # Activation/compute dtype ("float32" or "bfloat16"); params, norms and posterior stay float32.
  dtype: str = "float32"
  # Rematerialise each residual block in the backward pass (saves memory on long clips).
  remat: bool = False

  def __post_init__(self):
    # ml_collections hands sequences over as lists; a tuple keeps the config hashable.
    object.__setattr__(self, "channel_multipliers", tuple(self.channel_multipliers))
    if not _is_power_of_two(self.spatial_factor) or self.spatial_factor < 2:
      raise ValueError(
          f"spatial_factor={self.spatial_factor} must be a power of two >= 2 (e.g. 4 or 8).")
    if not _is_power_of_two(self.temporal_factor) or self.temporal_factor > self.spatial_factor:
      raise ValueError(
          f"temporal_factor={self.temporal_factor} must be a power of two (1, 2 or 4) no larger "
          f"than spatial_factor={self.spatial_factor}: time is downsampled only on levels that "
          "also downsample space.")
    levels = self.num_levels
    if len(self.channel_multipliers) != levels:
      raise ValueError(
          f"channel_multipliers={self.channel_multipliers} has {len(self.channel_multipliers)} "
          f"entries; spatial_factor={self.spatial_factor} needs log2(sf) + 1 = {levels} "
          f"(one per level), e.g. {(1, 2, 4, 4, 4, 4)[:levels]}.")
    if any(m < 1 for m in self.channel_multipliers) or self.base_channels < 1:
      raise ValueError(
          f"base_channels={self.base_channels} and channel_multipliers="
          f"{self.channel_multipliers} must be positive.")
    for name in ("latent_channels", "video_channels", "num_res_blocks", "norm_groups"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
    if self.norm not in NORMS:
      raise ValueError(f"norm={self.norm!r} is not one of {NORMS}.")
    if self.norm == "group":
      bad = [self.base_channels * m for m in self.channel_multipliers
             if (self.base_channels * m) % self.norm_groups]
      if bad:
        raise ValueError(
            f"norm='group' with norm_groups={self.norm_groups} needs every level's channels "
            f"divisible by it, but {bad} are not; change norm_groups or base_channels.")
    if self.time_padding not in conv3d.TIME_PADDINGS:
      raise ValueError(
          f"time_padding={self.time_padding!r} is not one of {conv3d.TIME_PADDINGS}.")
    if self.conv_impl not in conv3d.CONV_IMPLS:
      raise ValueError(f"conv_impl={self.conv_impl!r} is not one of {conv3d.CONV_IMPLS}.")
    if not self.logvar_min < self.logvar_max:
      raise ValueError(
          f"logvar_min={self.logvar_min} must be below logvar_max={self.logvar_max}.")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'.")

  @property
  def num_levels(self) -> int:
    """log2(spatial_factor) + 1 resolution levels."""
    return int(math.log2(self.spatial_factor)) + 1

  def downsamples_time(self, step: int) -> bool:
    """Whether spatial downsampling step `step` (0 = first) also halves time."""
    steps = self.num_levels - 1
    return step >= steps - int(math.log2(self.temporal_factor))


def latent_shape(config: AutoencoderConfig, frames: int, height: int,
                 width: int) -> tuple[int, int, int]:
  """Latent (T, H, W) of a video of (frames, height, width).

  Raises:
    ValueError: frames is not 1 + k*tf, or height/width is not a positive multiple of sf.
  """
  tf, sf = config.temporal_factor, config.spatial_factor
  if frames < 1 or (frames - 1) % tf:
    nearest = max(1, frames - (frames - 1) % tf)
    raise ValueError(
        f"video has {frames} frames; the autoencoder needs 1 + k*{tf} frames (e.g. {nearest}). "
        "Trim or pad the clip.")
  for name, size in (("height", height), ("width", width)):
    if size < sf or size % sf:
      nearest = max(sf, size - size % sf)
      raise ValueError(
          f"video {name} {size} is not a positive multiple of the spatial factor {sf} "
          f"(e.g. {nearest}). Crop or resize the clip.")
  return 1 + (frames - 1) // tf, height // sf, width // sf


def video_shape(config: AutoencoderConfig, frames: int, height: int,
                width: int) -> tuple[int, int, int]:
  """Video (T, H, W) decoded from a latent of (frames, height, width); inverse of `latent_shape`."""
  if min(frames, height, width) < 1:
    raise ValueError(f"latent shape {(frames, height, width)} must be positive in every axis.")
  sf = config.spatial_factor
  return 1 + (frames - 1) * config.temporal_factor, height * sf, width * sf


class FrameNorm(nn.Module):
  """A norm that never mixes frames (so it keeps causality).

  Attributes:
    kind: "rms" (per position over C, Wan 2.1) or "group" (GroupNorm over (H, W, C/G) of one
      frame; Wu & He 2018).
    groups: G for "group".
    eps: added to the variance.
  """

  kind: str = "rms"
  groups: int = 8
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x_bthwc: jax.Array) -> jax.Array:
    """(B, T, H, W, C) -> (B, T, H, W, C)."""
    c = x_bthwc.shape[-1]
    scale_c = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones, (axes.NORM,)), (c,),
        jnp.float32)
    bias_c = self.param(
        "bias", nn.with_logical_partitioning(nn.initializers.zeros, (axes.NORM,)), (c,),
        jnp.float32)
    x32 = x_bthwc.astype(jnp.float32)
    if self.kind == "rms":
      y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    else:
      g_bthwgc = x32.reshape(*x32.shape[:-1], self.groups, c // self.groups)
      mean = jnp.mean(g_bthwgc, axis=(2, 3, 5), keepdims=True)
      var = jnp.var(g_bthwgc, axis=(2, 3, 5), keepdims=True)
      y = ((g_bthwgc - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x32.shape)
    return (y * scale_c + bias_c).astype(x_bthwc.dtype)


def _conv(config: AutoencoderConfig, features: int, kernel_size=(3, 3, 3), strides=(1, 1, 1),
          name: str | None = None, out_axis: str | None = axes.CONV_OUT) -> conv3d.CausalConv3d:
  return conv3d.CausalConv3d(
      features, kernel_size, strides, time_padding=config.time_padding, impl=config.conv_impl,
      dtype=jnp.dtype(config.dtype), out_axis=out_axis, name=name)


def _norm(config: AutoencoderConfig, name: str | None = None) -> FrameNorm:
  return FrameNorm(config.norm, config.norm_groups, name=name)


class ResBlock(nn.Module):
  """Pre-norm residual block: x + conv(silu(norm(conv(silu(norm(x)))))) (He et al. 2016)."""

  config: AutoencoderConfig
  features: int

  @nn.compact
  def __call__(self, x_bthwc: jax.Array) -> jax.Array:
    """(B, T, H, W, C_in) -> (B, T, H, W, features)."""
    h_bthwc = _conv(self.config, self.features)(nn.silu(_norm(self.config)(x_bthwc)))
    h_bthwc = _conv(self.config, self.features)(nn.silu(_norm(self.config)(h_bthwc)))
    if x_bthwc.shape[-1] != self.features:
      x_bthwc = _conv(self.config, self.features, (1, 1, 1), name="skip")(x_bthwc)
    return x_bthwc + h_bthwc


def _res_block(config: AutoencoderConfig):
  return nn.remat(ResBlock) if config.remat else ResBlock


def _constrain(x_bthwc: jax.Array, latent_height: int) -> jax.Array:
  """Shards activations by their logical names; H only if the latent's H splits evenly.

  Then every level's H (a multiple of the latent's) splits evenly too, and all levels are split
  alike. An uneven split of a small deep level makes XLA compute wrong convolutions
  (`sharding.constraints`), and gathering only those levels still gave wrong gradients on
  8 CPU devices (H = 24, sf = 4, sequence = 4), so the choice is made once per network.
  """
  if constraints.mesh_divides(latent_height, axes.ACT_HEIGHT):
    return nn.with_logical_constraint(x_bthwc, _ACT_AXES)
  return nn.with_logical_constraint(x_bthwc, (*_ACT_AXES[:2], None, *_ACT_AXES[3:]))


class Encoder(nn.Module):
  """Video (B, T, H, W, 3) in [-1, 1] -> posterior (mean, logvar), each latent (B, T, H, W, C)."""

  config: AutoencoderConfig

  @nn.compact
  def __call__(self, video_bthwc: jax.Array) -> tuple[jax.Array, jax.Array]:
    cfg = self.config
    block = _res_block(cfg)
    x_bthwc = _conv(cfg, cfg.base_channels, name="conv_in")(video_bthwc)
    for level, mult in enumerate(cfg.channel_multipliers):
      for i in range(cfg.num_res_blocks):
        x_bthwc = block(cfg, cfg.base_channels * mult, name=f"level{level}_block{i}")(x_bthwc)
      if level < cfg.num_levels - 1:
        # A strided causal conv: time stride 2 keeps frame 0 alone and merges each later pair.
        strides = (2 if cfg.downsamples_time(level) else 1, 2, 2)
        x_bthwc = _conv(cfg, x_bthwc.shape[-1], strides=strides, name=f"down{level}")(x_bthwc)
      x_bthwc = _constrain(x_bthwc, video_bthwc.shape[2] // cfg.spatial_factor)
    x_bthwc = block(cfg, x_bthwc.shape[-1], name="mid_block")(x_bthwc)
    x_bthwc = nn.silu(_norm(cfg, name="norm_out")(x_bthwc))
    moments_bthwc = _conv(cfg, 2 * cfg.latent_channels, name="conv_out")(x_bthwc)
    mean_bthwc, logvar_bthwc = jnp.split(moments_bthwc.astype(jnp.float32), 2, axis=-1)
    logvar_bthwc = logvar_bthwc + cfg.logvar_offset
    return mean_bthwc, jnp.clip(logvar_bthwc, cfg.logvar_min, cfg.logvar_max)


class Decoder(nn.Module):
  """Latent (B, T, H, W, C) -> video (B, 1 + (T-1)*tf, H*sf, W*sf, 3), roughly in [-1, 1].

  Streaming (mutable "cache", see `conv3d.CausalConv3d`): the first chunk decodes like a whole
  latent; a later chunk of T latent frames gives T*tf video frames, because only the stream's
  latent frame 0 stands for a single video frame.
  """

  config: AutoencoderConfig

  @nn.compact
  def __call__(self, latent_bthwc: jax.Array) -> jax.Array:
    cfg = self.config
    # A cache/started entry marks a later chunk; its presence is static at trace time.
    continues_stream = self.has_variable("cache", "started")
    block = _res_block(cfg)
    mults = cfg.channel_multipliers
    x_bthwc = _conv(cfg, cfg.base_channels * mults[-1], name="conv_in")(latent_bthwc)
    x_bthwc = block(cfg, x_bthwc.shape[-1], name="mid_block")(x_bthwc)
    for level in reversed(range(cfg.num_levels)):
      for i in range(cfg.num_res_blocks):
        x_bthwc = block(cfg, cfg.base_channels * mults[level], name=f"level{level}_block{i}")(
            x_bthwc)
      if level > 0:
        c = x_bthwc.shape[-1]
        if cfg.downsamples_time(level - 1):
          # Depth-to-space in time (Wan 2.1 `Resample`): 2C channels -> 2 frames of C, except
          # latent frame 0, which stays one frame.
          y_bthwc = _conv(cfg, 2 * c, (3, 1, 1), name=f"up_time{level}")(x_bthwc)
          x_bthwc = conv3d.unfold_time(y_bthwc, 2, first_frame_alone=not continues_stream)
        # Nearest-neighbour upsampling + conv avoids the checkerboard of transposed convs
        # (Odena et al. 2016). The conv runs at the higher resolution, so it is per frame
        # (1x3x3; the res blocks around it mix time) and already outputs the next level's
        # channels, which halves its cost when the channel count drops.
        x_bthwc = conv3d.upsample_space_nearest(x_bthwc, 2)
        c_next = cfg.base_channels * mults[level - 1]
        x_bthwc = _conv(cfg, c_next, (1, 3, 3), name=f"up_space{level}")(x_bthwc)
      x_bthwc = _constrain(x_bthwc, latent_bthwc.shape[2])
    x_bthwc = nn.silu(_norm(cfg, name="norm_out")(x_bthwc))
    # Replicated: 3 RGB outputs divide no mesh axis.
    video_bthwc = _conv(cfg, cfg.video_channels, name="conv_out", out_axis=None)(x_bthwc)
    if conv3d.is_streaming(self):
      self.put_variable("cache", "started", jnp.ones((), jnp.bool_))
    return video_bthwc.astype(jnp.float32)


def sample_gaussian(rng: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """Reparameterised sample mean + exp(logvar / 2) * eps, eps ~ N(0, I) (Kingma & Welling 2014)."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


class CausalVideoAutoencoder(nn.Module):
  """Causal 3-D VAE; `encode` and `decode` work through `model.apply(..., method=...)`.

  Attributes:
    config: the architecture.
  """

  config: AutoencoderConfig

  def setup(self):
    self.encoder = Encoder(self.config)
    self.decoder = Decoder(self.config)

  def encode(self, video_bthwc: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Posterior of a video.

    Args:
      video_bthwc: (B, T, H, W, 3) video, float in [-1, 1]; T = 1 + k*tf, H and W multiples of sf.

    Returns:
      (mean, logvar), each a float32 latent (B, 1 + k, H / sf, W / sf, latent_channels).
    """
    if video_bthwc.ndim != 5 or video_bthwc.shape[-1] != self.config.video_channels:
      raise ValueError(
          f"video has shape {video_bthwc.shape}; the encoder needs (B, T, H, W, "
          f"{self.config.video_channels}). Add a frame axis to images: x[:, None].")
    latent_shape(self.config, *video_bthwc.shape[1:4])
    return self.encoder(video_bthwc)

  def decode(self, latent_bthwc: jax.Array) -> jax.Array:
    """Video of a latent.

    Args:
      latent_bthwc: (B, T, H, W, latent_channels) latent.

    Returns:
      (B, 1 + (T - 1) * tf, H * sf, W * sf, 3) float32 video, roughly in [-1, 1].
    """
    if latent_bthwc.ndim != 5 or latent_bthwc.shape[-1] != self.config.latent_channels:
      raise ValueError(
          f"latent has shape {latent_bthwc.shape}; the decoder needs (B, T, H, W, "
          f"{self.config.latent_channels}).")
    return self.decoder(latent_bthwc)

  def __call__(self, video_bthwc: jax.Array, *,
               sample_posterior: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Encodes, takes the posterior mean or a sample (rng stream "sample"), decodes.

    Returns:
      (recon_bthwc video, mean_bthwc latent, logvar_bthwc latent).
    """
    mean_bthwc, logvar_bthwc = self.encode(video_bthwc)
    latent_bthwc = mean_bthwc
    if sample_posterior:
      latent_bthwc = sample_gaussian(self.make_rng("sample"), mean_bthwc, logvar_bthwc)
    return self.decode(latent_bthwc), mean_bthwc, logvar_bthwc


def gaussian_kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """Elementwise KL(N(mean, exp(logvar)) || N(0, 1)) = (mean^2 + var - 1 - logvar) / 2."""
  return 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


def autoencoder_loss(recon: jax.Array, video: jax.Array, mean: jax.Array, logvar: jax.Array, *,
                     kl_weight: float, l1_weight: float = 1.0,
                     l2_weight: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Reconstruction + KL loss of a VAE step.

  loss = l1_weight * mean|recon - video| + l2_weight * mean (recon - video)^2
         + kl_weight * mean KL.
  L1 keeps edges sharp and L2 punishes large colour errors; both are averaged per video element.
  The KL to N(0, I) is averaged per latent element (not summed), so kl_weight does not depend
  on the clip or latent size. SD's VAE (Rombach et al. 2022) weights a summed KL by 1e-6
  against a summed reconstruction loss, about 2e-8 in this per-element convention; weights of
  1e-6 to 1e-4 trade a little reconstruction for a smoother, better-scaled latent.

  Args:
    recon: (B, T, H, W, 3) decoded video.
    video: (B, T, H, W, 3) target video in [-1, 1].
    mean: (B, T, H, W, C) posterior mean (latent).
    logvar: (B, T, H, W, C) posterior log-variance (latent).
    kl_weight: weight of the KL term.
    l1_weight, l2_weight: weights of the L1 and L2 reconstruction terms.

  Returns:
    (scalar loss, metrics) with "recon_l1", "recon_mse", "kl" and "psnr" (dB, for a data range
    of 2, i.e. 10 log10(4 / mse)).
  """
  if recon.shape != video.shape:
    raise ValueError(
        f"recon shape {recon.shape} differs from video shape {video.shape}; decode the latent "
        "of this same video.")
  diff = recon.astype(jnp.float32) - video.astype(jnp.float32)
  l1 = jnp.mean(jnp.abs(diff))
  mse = jnp.mean(jnp.square(diff))
  kl = jnp.mean(gaussian_kl(mean.astype(jnp.float32), logvar.astype(jnp.float32)))
  loss = l1_weight * l1 + l2_weight * mse + kl_weight * kl
  psnr = 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))
  return loss, {"recon_l1": l1, "recon_mse": mse, "kl": kl, "psnr": psnr}
