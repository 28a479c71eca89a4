"""clip_codec: exact raw round trips, mp4 quality on real footage, exact frame counts."""

import numpy as np
import pytest

from data_pipelines import clip_codec
from data_pipelines import real_clips
from spacetime_dit.eval import video_metrics


@pytest.fixture(scope="module")
def carphone():
  """Real camera footage: uint8 (33, 144, 176, 3)."""
  return real_clips.load("carphone", temporal_factor=4, spatial_factor=16, max_frames=33)


def _noise(shape, seed=0):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("shape", [(1, 16, 16, 3), (5, 17, 9, 3), (33, 32, 48, 3)])
def test_raw_round_trip_is_exact(shape):
  frames = _noise(shape)
  data = clip_codec.encode_clip(frames, "raw")
  assert clip_codec.sniff_codec(data) == "raw"
  decoded = clip_codec.decode_clip(data, "raw")
  assert decoded.dtype == np.uint8
  np.testing.assert_array_equal(decoded, frames)
  np.testing.assert_array_equal(clip_codec.decode_clip(data), frames)  # "auto"


def test_mp4_psnr_above_35db_at_crf18_on_real_footage(carphone):
  data = clip_codec.encode_clip(carphone, "mp4", fps=8, crf=18)
  decoded = clip_codec.decode_clip(data, "mp4")
  assert decoded.shape == carphone.shape
  assert video_metrics.psnr(carphone, decoded) > 35.0
  assert len(data) < carphone.nbytes / 10  # The point of mp4: much smaller than raw.
  assert clip_codec.sniff_codec(data) == "mp4"


def test_mp4_lower_crf_is_better(carphone):
  clip = carphone[:9]
  quality = [
      video_metrics.psnr(clip, clip_codec.decode_clip(clip_codec.encode_clip(clip, crf=c)))
      for c in (10, 30)]
  assert quality[0] > quality[1]


@pytest.mark.parametrize("num_frames", [1, 2, 5, 33])
def test_mp4_frame_count_is_exact(carphone, num_frames):
  decoded = clip_codec.decode_clip(clip_codec.encode_clip(carphone[:num_frames], "mp4"), "mp4")
  assert decoded.shape == (num_frames, 144, 176, 3)


def test_mp4_odd_size_keeps_shape():
  frames = _noise((3, 17, 19, 3))
  assert clip_codec.decode_clip(clip_codec.encode_clip(frames, "mp4")).shape == frames.shape


@pytest.mark.parametrize("frames, match", [
    (np.zeros((4, 8, 8), np.uint8), "uint8 \\(T, H, W, 3\\)"),
    (np.zeros((1, 8, 8, 3), np.float32), "uint8"),
    (np.zeros((0, 8, 8, 3), np.uint8), ">= 1"),
])
def test_encode_rejects_bad_frames(frames, match):
  with pytest.raises(ValueError, match=match):
    clip_codec.encode_clip(frames, "raw")


def test_bad_arguments_are_named():
  frames = _noise((1, 8, 8, 3))
  with pytest.raises(ValueError, match="codec is 'gif'"):
    clip_codec.encode_clip(frames, "gif")
  with pytest.raises(ValueError, match="crf is 60"):
    clip_codec.encode_clip(frames, "mp4", crf=60)
  with pytest.raises(ValueError, match="fps is 0"):
    clip_codec.encode_clip(frames, "mp4", fps=0)
  with pytest.raises(ValueError, match="preset is 'quick'"):
    clip_codec.encode_clip(frames, "mp4", preset="quick")


def test_corrupt_bytes_raise_clip_decode_error():
  data = clip_codec.encode_clip(_noise((2, 8, 8, 3)), "raw")
  with pytest.raises(clip_codec.ClipDecodeError, match="20-byte header; the record is truncated"):
    clip_codec.decode_clip(data[:10], "raw")
  with pytest.raises(clip_codec.ClipDecodeError, match="payload"):
    clip_codec.decode_clip(data[:-5], "raw")
  with pytest.raises(clip_codec.ClipDecodeError, match="header"):
    clip_codec.decode_clip(b"XXXX" + data[4:], "raw")
  with pytest.raises(clip_codec.ClipDecodeError):
    clip_codec.decode_clip(b"definitely not an mp4 file", "mp4")
