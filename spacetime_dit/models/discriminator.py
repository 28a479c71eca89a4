"""3-D patch discriminator and the GAN terms of the autoencoder's loss.

Shapes: B batch; T/H/W video frames/height/width (of the input, or of the logit grid with
"logits" in the name); C channels.

The discriminator is PatchGAN (Isola et al. 2017, §3.2.2) lifted to video as in the 3-D
"N-layer" discriminators of causal video VAEs (Open-Sora 2.0's `N_Layer_discriminator_3D`,
Open-Sora Plan's `NLayerDiscriminator3D`): a stack of strided 3-D convolutions with leaky ReLUs
whose output is a grid of logits, one per overlapping spacetime patch, so it judges local
texture and motion rather than the whole clip. Two departures:
- Batch norm is replaced by a norm inside each frame (`FrameNorm`): batch statistics would mix
  real and fake clips and would depend on how the batch is sharded.
- Convolutions are causal in time (`conv3d.CausalConv3d`), so an image (1 frame) is a valid
  input and time is halved as 1 + (T - 1) // 2, like the autoencoder's own time axis.

Losses: the hinge loss of Lim & Ye 2017 ("Geometric GAN"), as used by VQGAN (Esser et al. 2021)
and the latent-diffusion autoencoders (Rombach et al. 2022), and VQGAN's adaptive weight
(Esser et al. 2021, eq. 7).
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from spacetime_dit.models import autoencoder as autoencoder_lib
from spacetime_dit.models import conv3d
from spacetime_dit.sharding import axes
from spacetime_dit.sharding import constraints

NORMS = ("group", "rms", "none")
_ACT_AXES = (axes.ACT_BATCH, axes.ACT_FRAMES, axes.ACT_HEIGHT, axes.ACT_WIDTH, axes.ACT_CHANNELS)
# Slope of the leaky ReLUs (Isola et al. 2017; Radford et al. 2016).
_LEAKY_SLOPE = 0.2


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
  """Architecture of `PatchDiscriminator`.

  With `num_layers` = n there are n strided convolutions (each halves H and W and, on the first
  `time_downsample_layers` of them, T) then one unstrided convolution and the 1-channel logit
  convolution, as in PatchGAN's n_layers; n = 3 gives 4x4 kernels a 70x70-pixel receptive field.
  """

  # Width of the first convolution; layer i has channels * min(2^i, max_multiplier).
  channels: int = 64
  # Strided downsampling convolutions.
  num_layers: int = 3
  # Cap on the channel multiplier (PatchGAN: 8).
  max_multiplier: int = 8
  # (kt, kh, kw) of every convolution: PatchGAN's 4x4 in space, 3 causal taps in time.
  kernel_size: tuple[int, int, int] = (3, 4, 4)
  # How many of the strided convolutions also halve time (the first ones; at most all of them).
  time_downsample_layers: int = 2
  # Per-frame norm after every convolution but the first and the last: "group", "rms", "none".
  norm: str = "group"
  # Groups of the "group" norm; every normalised layer's channels must be divisible by it.
  norm_groups: int = 8
  # Causal conv implementation (see conv3d.CONV_IMPLS).
  conv_impl: str = "stacked2d"
  # Activation/compute dtype ("float32" or "bfloat16"); params and logits stay float32.
  dtype: str = "float32"

  def __post_init__(self):
    object.__setattr__(self, "kernel_size", tuple(self.kernel_size))
    for name in ("channels", "num_layers", "max_multiplier"):
      if getattr(self, name) < 1:
        raise ValueError(f"discriminator {name}={getattr(self, name)} must be >= 1.")
    if len(self.kernel_size) != 3 or min(self.kernel_size) < 1:
      raise ValueError(f"discriminator kernel_size={self.kernel_size} must be 3 positive ints (kt, kh, kw).")
    if self.time_downsample_layers < 0:
      raise ValueError(
          f"discriminator time_downsample_layers={self.time_downsample_layers} must be >= 0"
          " (0: no layer halves time).")
    if self.norm not in NORMS:
      raise ValueError(f"discriminator norm={self.norm!r} is not one of {NORMS}.")
    if self.norm == "group":
      bad = [c for c in self.layer_channels()[1:] if c % self.norm_groups]
      if bad:
        raise ValueError(
            f"discriminator norm='group' with norm_groups={self.norm_groups} needs the normalised"
            f" layers' channels divisible by it, but {bad} are not; set channels to a multiple"
            f" of {self.norm_groups} or change norm_groups.")
    if self.conv_impl not in conv3d.CONV_IMPLS:
      raise ValueError(f"discriminator conv_impl={self.conv_impl!r} is not one of {conv3d.CONV_IMPLS}.")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"discriminator dtype={self.dtype!r} must be 'float32' or 'bfloat16'.")

  def layer_channels(self) -> tuple[int, ...]:
    """Output channels of the num_layers strided convolutions and the unstrided one."""
    return tuple(self.channels * min(2**i, self.max_multiplier) for i in range(self.num_layers + 1))


def _constrain(x_bthwc: jax.Array) -> jax.Array:
  # The deep layers are small (H / 2^n): an H the `sequence` devices do not divide is gathered.
  return constraints.even_logical_constraint(x_bthwc, _ACT_AXES)


class PatchDiscriminator(nn.Module):
  """Video (B, T, H, W, 3) in [-1, 1] -> patch logits (B, T', H', W') (real > 0 > fake).

  Attributes:
    config: the architecture.
  """

  config: DiscriminatorConfig

  @nn.compact
  def __call__(self, video_bthwc: jax.Array) -> jax.Array:
    """Returns float32 logits (B, T', H / 2^n, W / 2^n), T' = T halved (causally) per time stride."""
    cfg = self.config
    if video_bthwc.ndim != 5:
      raise ValueError(
          f"discriminator input has shape {video_bthwc.shape}; it needs a (B, T, H, W, C) video."
          " Add a frame axis to images: x[:, None].")
    dtype = jnp.dtype(cfg.dtype)

    def conv(features, strides, name, out_axis=axes.CONV_OUT):
      return conv3d.CausalConv3d(
          features, cfg.kernel_size, strides, impl=cfg.conv_impl, dtype=dtype, out_axis=out_axis,
          name=name)

    x_bthwc = video_bthwc
    channels = cfg.layer_channels()
    for i, c in enumerate(channels):
      strided = i < cfg.num_layers
      strides = (2 if i < cfg.time_downsample_layers else 1, 2, 2) if strided else (1, 1, 1)
      x_bthwc = conv(c, strides, f"conv{i}")(x_bthwc)
      # PatchGAN leaves the first layer unnormalised (the input's own scale is meaningful).
      if i > 0 and cfg.norm != "none":
        x_bthwc = autoencoder_lib.FrameNorm(cfg.norm, cfg.norm_groups, name=f"norm{i}")(x_bthwc)
      x_bthwc = _constrain(nn.leaky_relu(x_bthwc, _LEAKY_SLOPE))
    # One logit per patch; replicated, as 1 output channel divides no mesh axis.
    logits_bthw1 = conv(1, (1, 1, 1), "conv_logits", out_axis=None)(x_bthwc)
    return logits_bthw1[..., 0].astype(jnp.float32)


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """Discriminator hinge loss (Lim & Ye 2017): (mean relu(1 - D(x)) + mean relu(1 + D(G(z)))) / 2.

  The halving follows VQGAN, so the loss is 1 at D = 0 and 0 once every real logit is >= 1 and
  every fake logit <= -1 (the margins beyond which the hinge stops pushing).
  """
  loss_real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
  loss_fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
  return 0.5 * (loss_real + loss_fake)


def generator_loss(logits_fake: jax.Array) -> jax.Array:
  """The generator's hinge-GAN term -mean D(G(z)) (Lim & Ye 2017; VQGAN)."""
  return -jnp.mean(logits_fake.astype(jnp.float32))


def adaptive_weight(rec_grad: jax.Array, gan_grad: jax.Array, *, eps: float = 1e-4,
                    max_weight: float = 1e4) -> jax.Array:
  """VQGAN's adaptive GAN weight (Esser et al. 2021, eq. 7).

  lambda = ||grad_L L_rec|| / (||grad_L L_gan|| + eps), with L the decoder's last layer, so the
  GAN term's gradient at the output starts at the scale of the reconstruction's whatever the
  discriminator's logit scale. Clipped to [0, max_weight] and never differentiated.

  Args:
    rec_grad: gradient of the reconstruction loss with respect to the last layer's kernel.
    gan_grad: gradient of the generator loss with respect to the same kernel.
    eps: keeps the ratio finite when the GAN gradient vanishes.
    max_weight: upper clip.

  Returns:
    Scalar float32 weight.
  """
  rec_norm = jnp.linalg.norm(rec_grad.astype(jnp.float32).ravel())
  gan_norm = jnp.linalg.norm(gan_grad.astype(jnp.float32).ravel())
  return jax.lax.stop_gradient(jnp.clip(rec_norm / (gan_norm + eps), 0.0, max_weight))
