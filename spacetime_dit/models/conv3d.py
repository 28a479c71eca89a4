"""Causal 3-D convolution and the causal temporal resampling built on it.

Shapes: B batch, T/H/W video or latent frames/height/width (each function says which),
C channels, I/O kernel input/output channels.

Causality is along T only: output frame `t` sees input frames `<= t` (the past side of time is
padded, never the future; CogVideoX, Yang et al. 2024, §2.2; Wan 2.1's causal VAE). Space uses
ordinary "SAME" padding. Causality is what lets a long video be encoded or decoded in chunks
over time with bounded memory: each conv carries the few input frames its next output needs
from one chunk to the next (`causal_conv3d_stream`, `CausalConv3d`'s "cache" collection).

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


def causal_conv3d_stream(
    x_bthwc: jax.Array,
    kernel_tkkio: jax.Array,
    past_bthwc: jax.Array | None,
    *,
    strides: tuple[int, int, int] = (1, 1, 1),
    time_padding: str = "replicate",
    impl: str = "stacked2d",
) -> tuple[jax.Array, jax.Array]:
  """`causal_conv3d` on one chunk of a stream of frames, with the past carried between chunks.

  The conv reads a time "stream": the input with the kt - 1 padding frames in front. One-shot,
  output j reads stream frames j*s .. j*s + kt - 1. Cut into chunks, the first chunk is padded
  exactly as one-shot, and every later chunk is appended to the part of the stream that the
  next output still needs, `stream[n_out*s:]`. The outputs of all chunks, concatenated, then
  equal the one-shot output exactly (the same products and sums on the same frames). With
  kt >= s that carried past has kt - s frames whenever every chunk after a 1-frame first chunk
  is a multiple of s, so a jitted chunk step sees the same shapes every chunk.

  Args:
    x_bthwc: (B, T, H, W, I) frames of this chunk.
    kernel_tkkio: (kt, kh, kw, I, O) kernel; time tap kt - 1 multiplies the current frame.
    past_bthwc: None for the first chunk (or the whole video): pad as `time_padding` says;
      else (B, P, H, W, I), the `next_past` this function returned for the previous chunk.
    strides: (time, height, width) strides.
    time_padding: "replicate" or "zeros", see `TIME_PADDINGS`; used only when past is None.
    impl: one of `CONV_IMPLS`.

  Returns:
    (y, next_past): y is (B, T_out, ceil(H / s_h), ceil(W / s_w), O) with
    T_out = (P + T - kt) // s_t + 1 (1 + (T - 1) // s_t for the first chunk), and next_past
    the (B, P + T - T_out * s_t, H, W, I) stream tail to pass with the next chunk.

  Raises:
    ValueError: unknown impl, channel mismatch, a kernel with fewer time taps than the time
      stride (its outputs would skip frames that no chunk keeps), or a chunk too short to give
      an output.
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv impl {impl!r} is not one of {CONV_IMPLS}.")
  b, t, h, w, c_in = x_bthwc.shape
  kt, kh, kw, k_in, c_out = kernel_tkkio.shape
  if k_in != c_in:
    raise ValueError(f"kernel expects {k_in} input channels but the input has {c_in}.")
  st, sh, sw = strides
  if past_bthwc is None:
    xp_bthwc = pad_time_causal(x_bthwc, kt - 1, time_padding)
  else:
    if kt < st:
      raise ValueError(
          f"a causal conv with {kt} time taps and time stride {st} cannot stream: it skips "
          f"input frames, so no carried past reproduces it; use kt >= {st} time taps.")
    xp_bthwc = jnp.concatenate([past_bthwc.astype(x_bthwc.dtype), x_bthwc], axis=1)
  stream_frames = xp_bthwc.shape[1]
  if stream_frames < kt:
    raise ValueError(
        f"a chunk of {t} frames after {stream_frames - t} carried frames gives no output of a "
        f"conv with {kt} time taps and time stride {st}; stream chunks of a multiple of {st} "
        "frames.")
  t_out = (stream_frames - kt) // st + 1
  next_past_bthwc = xp_bthwc[:, t_out * st:]
  space_pads = jax.lax.padtype_to_pads((h, w), (kh, kw), (sh, sw), "SAME")
  if impl == "conv3d":
    y_bthwc = jax.lax.conv_general_dilated(
        xp_bthwc, kernel_tkkio, strides, [(0, 0), *space_pads], dimension_numbers=_NDHWC)
    return y_bthwc, next_past_bthwc
  # Output frame j reads stream frames j*st + tap, tap = 0 .. kt-1.
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
  return y_nhwc.reshape(b, t_out, *y_nhwc.shape[1:]), next_past_bthwc


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
  y_bthwc, _ = causal_conv3d_stream(
      x_bthwc, kernel_tkkio, None, strides=strides, time_padding=time_padding, impl=impl)
  return y_bthwc


class CausalConv3d(nn.Module):
  """`causal_conv3d` with a learned kernel and bias, optionally streaming over time.

  Streaming (chunked encoding/decoding with bounded memory): when the "cache" collection is
  mutable (`apply(..., mutable=["cache"])`, outside `init`), the layer stores in
  cache/past the input frames that its next output still needs (`causal_conv3d_stream`). A
  call that finds cache/past prepends those frames instead of padding, so chunks after the
  first continue the stream; a call without it (the first chunk, or any one-shot call) pads
  exactly as `causal_conv3d`. Parameters are the same either way.

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
    # Presence of cache/past is static at trace time: a first chunk and a later chunk are
    # traced (and compiled) as two programs.
    past_bthwc = self.get_variable("cache", "past") if self.has_variable("cache", "past") else None
    y_bthwc, next_past_bthwc = causal_conv3d_stream(
        x_bthwc.astype(self.dtype), kernel_tkkio.astype(self.dtype), past_bthwc,
        strides=self.strides, time_padding=self.time_padding, impl=self.impl)
    if is_streaming(self):
      self.put_variable("cache", "past", next_past_bthwc)
    return y_bthwc + bias_o.astype(self.dtype)


def is_streaming(module: nn.Module) -> bool:
  """Whether `module` runs one chunk of a stream: the "cache" collection is mutable.

  `init` makes every collection mutable, so it never counts: a parameter tree never gains a
  cache, and one-shot `apply` calls (no mutable "cache") compute exactly as before.
  """
  return module.is_mutable_collection("cache") and not module.is_initializing()


def unfold_time(y_bthwc: jax.Array, factor: int, first_frame_alone: bool = True) -> jax.Array:
  """Expands frames into `factor` frames each, keeping frame 0 as a single frame.

  The inverse of the causal time stride: the channels of latent frame i >= 1 hold its `factor`
  output frames side by side (depth-to-space in time, as in Wan 2.1's `Resample`), and latent
  frame 0 becomes one frame (its last channel slot, the slot that ends a group).

  Args:
    y_bthwc: (B, T, H, W, factor * C) latent-side activations.
    factor: time expansion factor s.
    first_frame_alone: True for a whole latent or the first chunk of a stream; False for a
      later chunk, whose frame 0 is an ordinary latent frame that expands to s frames.

  Returns:
    (B, 1 + (T - 1) * s, H, W, C), or (B, T * s, H, W, C) when not first_frame_alone.
  """
  b, t, h, w, sc = y_bthwc.shape
  c = sc // factor
  split = 1 if first_frame_alone else 0
  rest_btshwc = y_bthwc[:, split:].reshape(b, t - split, h, w, factor, c)
  rest_bthwc = rest_btshwc.transpose(0, 1, 4, 2, 3, 5).reshape(b, (t - split) * factor, h, w, c)
  if not first_frame_alone:
    return rest_bthwc
  first_bthwc = y_bthwc[:, :1, ..., (factor - 1) * c:]
  return jnp.concatenate([first_bthwc, rest_bthwc], axis=1)


def upsample_space_nearest(x_bthwc: jax.Array, factor: int = 2) -> jax.Array:
  """Nearest-neighbour spatial upsampling of every frame: (B, T, H, W, C) -> (B, T, sH, sW, C)."""
  b, t, h, w, c = x_bthwc.shape
  x_bthwc = jnp.broadcast_to(x_bthwc[:, :, :, None, :, None], (b, t, h, factor, w, factor, c))
  return x_bthwc.reshape(b, t, h * factor, w * factor, c)
