"""Causal 3-D convolution and the causal temporal resampling built on it.

Shapes: B batch, T/H/W video or latent frames/height/width (each function says which),
C channels, I/O kernel input/output channels.

Causality is along T only: output frame `t` sees input frames `<= t` (the past side of time is
padded, never the future; CogVideoX, Yang et al. 2024, §2.2; Wan 2.1's causal VAE). Space uses
ordinary "SAME" padding.

Why the default implementation is not a 3-D convolution: XLA:CPU runs conv3d at 30-50% of its
conv2d throughput (notes/env-probe.md §9). A kt x kh x kw kernel is exactly the sum of kt 2-D
convolutions, one per time tap, each applied to a time-shifted slice with the frames folded into
the batch ("taps2d"); concatenating the kt slices on channels turns that sum into one conv2d with
kt times the input channels ("stacked2d", the default). On 2 busy CPU cores, forward + backward
of one 3x3x3 32->32 conv on 8 x 9 x 32 x 32 frames: conv3d 472 ms, taps2d 252 ms, stacked2d
212 ms; a whole autoencoder train step: conv3d 5.6 s, taps2d 2.9 s, stacked2d 2.5 s, and
stacked2d compiles about 1.7x faster than taps2d. All three are valid on accelerators too.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from spacetime_dit.sharding import axes

# The implementations of `causal_conv3d`:
#   "taps2d": kt conv2d calls on shifted time slices, summed (env-probe §9);
#   "stacked2d": the kt shifted slices concatenated on channels, one conv2d with kt*I inputs;
#   "conv3d": one `lax.conv_general_dilated` over (T, H, W).
CONV_IMPLS = ("taps2d", "stacked2d", "conv3d")
# How the kt - 1 frames before frame 0 are filled: "replicate" repeats frame 0, so an image is
# treated as a still video (CogVideoX); "zeros" pads with zeros (Wan 2.1's CausalConv3d).
TIME_PADDINGS = ("replicate", "zeros")

_NHWC = ("NHWC", "HWIO", "NHWC")
_NDHWC = ("NDHWC", "DHWIO", "NDHWC")


def pad_time_causal(x_bthwc: jax.Array, frames: int, mode: str) -> jax.Array:
  """Prepends `frames` frames before frame 0 (the past side only).

  Args:
    x_bthwc: (B, T, H, W, C) activations.
    frames: number of frames to prepend (kt - 1 for a kernel with kt time taps).
    mode: "replicate" (copies of frame 0) or "zeros".

  Returns:
    (B, frames + T, H, W, C).
  """
  if mode not in TIME_PADDINGS:
    raise ValueError(f"time padding {mode!r} is not one of {TIME_PADDINGS}.")
  if frames == 0:
    return x_bthwc
  if mode == "zeros":
    return jnp.pad(x_bthwc, ((0, 0), (frames, 0), (0, 0), (0, 0), (0, 0)))
  past = jnp.repeat(x_bthwc[:, :1], frames, axis=1)
  return jnp.concatenate([past, x_bthwc], axis=1)


def causal_output_frames(frames: int, time_stride: int) -> int:
  """Output frames of a causal conv with the given time stride: 1 + (T - 1) // stride.

  The outputs sit at input frames 0, s, 2s, ...: output 0 sees frame 0 alone, and output i >= 1
  ends at frame i*s, so with T = 1 + k*s each output covers the group (i-1)*s + 1 .. i*s. This is
  the "first frame on its own" rule of causal video VAEs.
  """
  return 1 + (frames - 1) // time_stride


def causal_conv3d(
    x_bthwc: jax.Array,
    kernel_tkkio: jax.Array,
    *,
    strides: tuple[int, int, int] = (1, 1, 1),
    time_padding: str = "replicate",
    impl: str = "stacked2d",
) -> jax.Array:
  """A 3-D convolution that is causal in time and "SAME"-padded in space.

  Args:
    x_bthwc: (B, T, H, W, I) video or latent activations.
    kernel_tkkio: (kt, kh, kw, I, O) kernel; time tap kt - 1 multiplies the current frame.
    strides: (time, height, width) strides. A time stride s keeps outputs at frames 0, s, 2s, ...
    time_padding: "replicate" or "zeros", see `TIME_PADDINGS`.
    impl: one of `CONV_IMPLS`.

  Returns:
    (B, 1 + (T - 1) // s_t, ceil(H / s_h), ceil(W / s_w), O).
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv impl {impl!r} is not one of {CONV_IMPLS}.")
  b, t, h, w, c_in = x_bthwc.shape
  kt, kh, kw, k_in, c_out = kernel_tkkio.shape
  if k_in != c_in:
    raise ValueError(f"kernel expects {k_in} input channels but the input has {c_in}.")
  st, sh, sw = strides
  t_out = causal_output_frames(t, st)
  xp_bthwc = pad_time_causal(x_bthwc, kt - 1, time_padding)
  space_pads = jax.lax.padtype_to_pads((h, w), (kh, kw), (sh, sw), "SAME")
  if impl == "conv3d":
    return jax.lax.conv_general_dilated(
        xp_bthwc, kernel_tkkio, strides, [(0, 0), *space_pads], dimension_numbers=_NDHWC)
  # Output frame j reads padded frames j*st + tap, tap = 0 .. kt-1.
  taps = [xp_bthwc[:, tap:tap + st * (t_out - 1) + 1:st] for tap in range(kt)]
  if impl == "stacked2d":
    x_nhwc = jnp.concatenate(taps, axis=-1).reshape(b * t_out, h, w, kt * c_in)
    kernel_hwio = jnp.transpose(kernel_tkkio, (1, 2, 0, 3, 4)).reshape(kh, kw, kt * c_in, c_out)
    y_nhwc = jax.lax.conv_general_dilated(
        x_nhwc, kernel_hwio, (sh, sw), space_pads, dimension_numbers=_NHWC)
  else:
    y_nhwc = sum(
        jax.lax.conv_general_dilated(
            tap_bthwc.reshape(b * t_out, h, w, c_in), kernel_tkkio[i], (sh, sw), space_pads,
            dimension_numbers=_NHWC)
        for i, tap_bthwc in enumerate(taps))
  return y_nhwc.reshape(b, t_out, *y_nhwc.shape[1:])


class CausalConv3d(nn.Module):
  """`causal_conv3d` with a learned kernel and bias.

  Attributes:
    features: output channels O.
    kernel_size: (kt, kh, kw).
    strides: (time, height, width) strides.
    time_padding: "replicate" or "zeros".
    impl: one of `CONV_IMPLS`.
    dtype: computation dtype; parameters stay float32.
    out_axis: logical name of the output-channel axis of kernel and bias; None (replicated) for
      layers with few outputs, e.g. 3 RGB channels, which no mesh axis divides.
    kernel_init: initialiser of the (kt, kh, kw, I, O) kernel.
  """

  features: int
  kernel_size: tuple[int, int, int] = (3, 3, 3)
  strides: tuple[int, int, int] = (1, 1, 1)
  time_padding: str = "replicate"
  impl: str = "stacked2d"
  dtype: jnp.dtype = jnp.float32
  out_axis: str | None = axes.CONV_OUT
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x_bthwc: jax.Array) -> jax.Array:
    """(B, T, H, W, I) -> (B, 1 + (T - 1) // s_t, H / s_h, W / s_w, O)."""
    kernel_tkkio = self.param(
        "kernel",
        nn.with_logical_partitioning(
            self.kernel_init, (None, None, None, axes.CONV_IN, self.out_axis)),
        (*self.kernel_size, x_bthwc.shape[-1], self.features), jnp.float32)
    bias_o = self.param(
        "bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.out_axis,)),
        (self.features,), jnp.float32)
    y_bthwc = causal_conv3d(
        x_bthwc.astype(self.dtype), kernel_tkkio.astype(self.dtype), strides=self.strides,
        time_padding=self.time_padding, impl=self.impl)
    return y_bthwc + bias_o.astype(self.dtype)


def unfold_time(y_bthwc: jax.Array, factor: int) -> jax.Array:
  """Expands frames into `factor` frames each, keeping frame 0 as a single frame.

  The inverse of the causal time stride: the channels of latent frame i >= 1 hold its `factor`
  output frames side by side (depth-to-space in time, as in Wan 2.1's `Resample`), and latent
  frame 0 becomes one frame (its last channel slot, the slot that ends a group).

  Args:
    y_bthwc: (B, T, H, W, factor * C) latent-side activations.
    factor: time expansion factor s.

  Returns:
    (B, 1 + (T - 1) * s, H, W, C).
  """
  b, t, h, w, sc = y_bthwc.shape
  c = sc // factor
  first_bthwc = y_bthwc[:, :1, ..., (factor - 1) * c:]
  rest_btshwc = y_bthwc[:, 1:].reshape(b, t - 1, h, w, factor, c).transpose(0, 1, 4, 2, 3, 5)
  rest_bthwc = rest_btshwc.reshape(b, (t - 1) * factor, h, w, c)
  return jnp.concatenate([first_bthwc, rest_bthwc], axis=1)


def upsample_space_nearest(x_bthwc: jax.Array, factor: int = 2) -> jax.Array:
  """Nearest-neighbour spatial upsampling of every frame: (B, T, H, W, C) -> (B, T, sH, sW, C)."""
  b, t, h, w, c = x_bthwc.shape
  x_bthwc = jnp.broadcast_to(x_bthwc[:, :, :, None, :, None], (b, t, h, factor, w, factor, c))
  return x_bthwc.reshape(b, t, h * factor, w * factor, c)
