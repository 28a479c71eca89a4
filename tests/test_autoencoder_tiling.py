"""Tests for chunked (over time) and tiled (over space) autoencoding: autoencoder_tiling, conv3d."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spacetime_dit.models import autoencoder as ae
from spacetime_dit.models import autoencoder_tiling as tiling
from spacetime_dit.models import conv3d

# tf=2, sf=4, RMS norm, replicated time padding, the stacked-2d conv.
TINY = ae.AutoencoderConfig(
    latent_channels=4, temporal_factor=2, spatial_factor=4, base_channels=8,
    channel_multipliers=(1, 2, 2))
# The other options: tf=4, per-frame GroupNorm, zero time padding, the taps-2d conv, remat.
TINY_TF4 = ae.AutoencoderConfig(
    latent_channels=4, temporal_factor=4, spatial_factor=4, base_channels=8,
    channel_multipliers=(1, 1, 2), norm="group", norm_groups=4, time_padding="zeros",
    conv_impl="taps2d", remat=True)
# One downsampling level: its receptive field is small enough for a tiling test with
# random weights (see test_tiling_is_close_to_one_shot).
TINY_SF2 = ae.AutoencoderConfig(
    latent_channels=4, temporal_factor=2, spatial_factor=2, base_channels=8,
    channel_multipliers=(1, 2))


@functools.cache
def _model_and_params(config: ae.AutoencoderConfig):
  model = ae.CausalVideoAutoencoder(config)
  # "rbg" keys compile in milliseconds on XLA:CPU (threefry takes seconds per new shape).
  init = jax.jit(lambda k: model.init({"params": k}, jnp.zeros((1, 1, 4, 4, 3)),
                                      sample_posterior=False))
  return model, init(jax.random.key(0, impl="rbg"))["params"]


@functools.cache
def _one_shot(config: ae.AutoencoderConfig):
  model, _ = _model_and_params(config)
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))
  decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode))
  return encode, decode


def _noise(seed: int, shape) -> np.ndarray:
  return np.random.default_rng(seed).uniform(-1.0, 1.0, shape).astype(np.float32)


def _smooth_video(frames: int, height: int, width: int) -> np.ndarray:
  """Drifting sinusoids in [-0.8, 0.8]: structure at several scales and in every channel."""
  t, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
  rgb = [np.sin(0.2 * x + 0.3 * t), np.cos(0.15 * y - 0.2 * t), np.sin(0.1 * (x + y))]
  return (0.8 * np.stack(rgb, axis=-1)[None]).astype(np.float32)


def _psnr(x, reference) -> float:
  """PSNR in dB of x against reference, with the reference's value range as the data range."""
  x, reference = np.asarray(x, np.float64), np.asarray(reference, np.float64)
  mse = np.mean(np.square(x - reference))
  return float(10 * np.log10(np.ptp(reference) ** 2 / max(mse, 1e-30)))


# --- the streaming conv ------------------------------------------------------------------------


@pytest.mark.parametrize("impl", conv3d.CONV_IMPLS)
@pytest.mark.parametrize("time_stride, chunks", [(1, (1, 3, 1, 2)), (2, (1, 2, 4, 2))])
def test_streamed_conv_equals_one_shot(impl, time_stride, chunks):
  x = _noise(0, (2, sum(chunks), 5, 4, 3))
  kernel = _noise(1, (3, 3, 3, 3, 4))
  strides = (time_stride, 2, 1)
  expected = conv3d.causal_conv3d(x, kernel, strides=strides, impl=impl)
  past, outs, start = None, [], 0
  for size in chunks:
    y, past = conv3d.causal_conv3d_stream(
        x[:, start:start + size], kernel, past, strides=strides, impl=impl)
    outs.append(y)
    start += size
    # kt - s frames carried, whatever the chunk (a multiple of s after the 1-frame first one).
    assert past.shape[1] == 3 - time_stride
  np.testing.assert_allclose(np.concatenate(outs, axis=1), expected, atol=1e-5)


def test_streamed_conv_rejects_a_chunk_without_output_and_skipping_kernels():
  x = _noise(0, (1, 1, 4, 4, 2))
  with pytest.raises(ValueError, match="multiple of 2 frames"):
    conv3d.causal_conv3d_stream(x, _noise(1, (3, 1, 1, 2, 2)), x[:, :0],
                                strides=(2, 1, 1))
  with pytest.raises(ValueError, match="use kt >= 2 time taps"):
    conv3d.causal_conv3d_stream(x, _noise(1, (1, 1, 1, 2, 2)), x, strides=(2, 1, 1))


def test_unfold_time_of_a_later_chunk_expands_every_frame():
  y = _noise(0, (1, 3, 2, 2, 4))
  whole = conv3d.unfold_time(np.concatenate([y[:, :1], y], axis=1), 2)
  later = conv3d.unfold_time(y, 2, first_frame_alone=False)
  assert later.shape == (1, 6, 2, 2, 2)
  np.testing.assert_array_equal(later, whole[:, 1:])


def test_init_makes_no_cache_and_one_shot_apply_keeps_none():
  model = ae.CausalVideoAutoencoder(TINY)
  variables = jax.eval_shape(
      lambda: model.init({"params": jax.random.key(0, impl="rbg")}, jnp.zeros((1, 1, 4, 4, 3)),
                         sample_posterior=False))
  assert set(variables) == {"params"}


# --- chunking over time: exact -----------------------------------------------------------------


# Chunk sizes that do not divide the length: the last chunk is shorter.
@pytest.mark.parametrize("config, frames, chunk", [(TINY, 11, 4), (TINY_TF4, 13, 8)])
def test_chunked_encode_equals_one_shot(config, frames, chunk):
  model, params = _model_and_params(config)
  video = _noise(2, (2, frames, 8, 12, 3))
  mean, logvar = _one_shot(config)[0](params, video)
  chunked_mean, chunked_logvar = tiling.encode(model, params, video, chunk_frames=chunk)
  assert chunked_mean.shape == mean.shape and chunked_mean.dtype == jnp.float32
  np.testing.assert_allclose(chunked_mean, mean, atol=2e-5)
  np.testing.assert_allclose(chunked_logvar, logvar, atol=2e-5)
  assert _psnr(chunked_mean, mean) > 80 and _psnr(chunked_logvar, logvar) > 80


@pytest.mark.parametrize("config, latent_frames, chunk", [(TINY, 6, 2), (TINY_TF4, 4, 2)])
def test_chunked_decode_equals_one_shot(config, latent_frames, chunk):
  model, params = _model_and_params(config)
  latent = _noise(3, (2, latent_frames, 2, 3, config.latent_channels))
  video = _one_shot(config)[1](params, latent)
  chunked = tiling.decode(model, params, jnp.asarray(latent), chunk_frames=chunk)
  assert chunked.shape == video.shape == (2, 1 + (latent_frames - 1) * config.temporal_factor,
                                          8, 12, 3)
  np.testing.assert_allclose(chunked, video, atol=2e-5)
  assert _psnr(chunked, video) > 80


def test_no_chunks_or_tiles_is_the_one_shot_result_and_accepts_init_variables():
  model, params = _model_and_params(TINY)
  video = _noise(4, (1, 5, 8, 8, 3))
  mean, _ = _one_shot(TINY)[0](params, video)
  np.testing.assert_array_equal(tiling.encode(model, {"params": params}, video)[0], mean)


# --- tiling over space: close, with the blend ramps -------------------------------------------


@pytest.mark.parametrize("size, tile, overlap, align", [
    (48, 36, 24, 2), (64, 32, 16, 4), (100, 40, 8, 4), (30, 30, 8, 2), (30, 64, 8, 2),
    (13, 5, 2, 1)])
def test_tile_spans_cover_overlap_and_ramps_sum_to_one(size, tile, overlap, align):
  spans = tiling._tile_spans(size, tile, overlap, align)
  assert spans[0][0] == 0 and spans[-1][1] == size
  assert all(s % align == 0 and e - s == min(tile, size) for s, e in spans)
  assert all(prev[1] - nxt[0] >= overlap for prev, nxt in zip(spans, spans[1:]))
  total = np.zeros(size)
  for (start, stop), weight in zip(spans, tiling._ramps(spans)):
    assert np.all(weight > 0) and np.all(weight <= 1)
    total[start:stop] += weight
  np.testing.assert_allclose(total, 1.0, atol=1e-6)


def test_tiling_is_close_to_one_shot():
  # Random weights use the whole receptive field (about 7 latent pixels of this sf=2 model on
  # each side), which a trained model need not: the overlap is large here. The tiles also
  # stream over time (3 chunks).
  model, params = _model_and_params(TINY_SF2)
  video = _smooth_video(5, 48, 48)
  encode, decode = _one_shot(TINY_SF2)
  mean, logvar = encode(params, video)
  tiled_mean, tiled_logvar = tiling.encode(
      model, params, video, chunk_frames=2, tile=(36, 36), overlap=(24, 24))
  assert _psnr(tiled_mean, mean) > 45 and _psnr(tiled_logvar, logvar) > 45
  recon = decode(params, mean)
  tiled_recon = tiling.decode(model, params, mean, chunk_frames=1, tile=(18, 18),
                              overlap=(12, 12), progress=True)
  assert _psnr(tiled_recon, recon) > 45


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(chunk_frames=3), r"chunk_frames=3 must be a positive multiple of 2 .*chunk_frames=2"),
    (dict(chunk_frames=0), "chunk_frames=0 must be a positive multiple"),
    (dict(chunk_frames=True), "chunk_frames=True"),
    (dict(tile=(6, 8)), r"tile=\(6, 8\) must be \(H, W\), each a positive multiple of 4"),
    (dict(tile=8), "tile=8 must be"),
    (dict(tile=(8, 8), overlap=(8, 0)), r"overlap=\(8, 0\) must be .* in \[0, tile\)"),
    (dict(tile=(8, 8), overlap=(2, 0)), "multiple of 4"),
    (dict(overlap=(4, 4)), "without tile"),
])
def test_encode_rejects_bad_chunks_tiles_and_overlaps(kwargs, match):
  model, params = _model_and_params(TINY)
  with pytest.raises(ValueError, match=match):
    tiling.encode(model, params, np.zeros((1, 5, 8, 8, 3), np.float32), **kwargs)


def test_encode_and_decode_reject_bad_shapes():
  model, params = _model_and_params(TINY)
  with pytest.raises(ValueError, match="1 \\+ k\\*2 frames"):
    tiling.encode(model, params, np.zeros((1, 4, 8, 8, 3), np.float32), chunk_frames=2)
  with pytest.raises(ValueError, match="x\\[:, None\\]"):
    tiling.encode(model, params, np.zeros((1, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match="decode needs"):
    tiling.decode(model, params, np.zeros((1, 2, 2, 2, 3), np.float32))
  with pytest.raises(ValueError, match="overlap=\\(2, 1\\) must be .* in \\[0, tile\\)"):
    tiling.decode(model, params, np.zeros((1, 2, 4, 4, 4), np.float32), tile=(2, 1),
                  overlap=(2, 1))


# --- compiles -------------------------------------------------------------------------------------


def test_equal_chunks_and_tiles_share_one_compiled_step():
  model, params = _model_and_params(TINY)
  # A frame size no other test uses, so the counts start from zero here.
  video = _noise(5, (1, 9, 12, 16, 3))
  before = dict(tiling.TRACE_COUNTS)

  def traced(name):
    return tiling.TRACE_COUNTS[name] - before.get(name, 0)

  tiling.encode(model, params, video, chunk_frames=2)  # 1 + 4 equal chunks.
  assert traced("encode_first") == 1 and traced("encode_next") == 1
  tiling.encode(model, params, video, chunk_frames=2)
  assert traced("encode_first") == 1 and traced("encode_next") == 1
  # 2 x 3 equal 8x8 tiles, each streamed in 5 chunks: one more program per direction.
  tiling.encode(model, params, video, chunk_frames=2, tile=(8, 8), overlap=(4, 4))
  assert traced("encode_first") == 2 and traced("encode_next") == 2
