"""PSNR, SSIM and temporal flicker against closed forms and a brute-force SSIM."""

import math

import numpy as np
import pytest

from spacetime_dit.eval import video_metrics

C1 = (0.01 * 255) ** 2
C2 = (0.03 * 255) ** 2


def _video(seed=0, shape=(5, 16, 20, 3)):
  return np.random.default_rng(seed).integers(40, 216, shape).astype(np.uint8)


def test_identical_videos_give_infinite_psnr_ssim_one_and_no_flicker():
  x = _video()
  assert video_metrics.psnr(x, x) == math.inf
  assert video_metrics.ssim(x, x) == pytest.approx(1.0, abs=1e-12)
  assert video_metrics.ssim(x, x, channels="rgb") == pytest.approx(1.0, abs=1e-12)
  assert video_metrics.temporal_flicker(x, x) == 0.0


def test_psnr_of_a_constant_offset_is_exact():
  x = _video()
  # MSE = 25: 10 log10(255^2 / 25) = 20 log10(51).
  assert video_metrics.psnr(x, x + 5) == pytest.approx(20 * math.log10(51), abs=1e-12)
  xf = x.astype(np.float64) / 255
  assert video_metrics.psnr(xf, xf + 0.01, data_range=1.0) == pytest.approx(40.0, abs=1e-9)


def test_ssim_of_constant_frames_is_the_luminance_term():
  # Constant frames: sigma = 0 and cov = 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1).
  x = np.full((2, 11, 11, 3), 100, np.uint8)
  y = np.full((2, 11, 11, 3), 120, np.uint8)
  expected = (2 * 100 * 120 + C1) / (100**2 + 120**2 + C1)
  assert video_metrics.ssim(x, y) == pytest.approx(expected, rel=1e-12)
  assert video_metrics.ssim(x, y, channels="rgb") == pytest.approx(expected, rel=1e-12)


def test_ssim_of_an_offset_11x11_frame_matches_the_hand_computation():
  # One window position on an 11x11 frame. y = x + 10 has equal variances and cov = var, so
  # SSIM = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1) with mu the Gaussian-weighted mean.
  g = np.exp(-np.square(np.arange(11) - 5.0) / (2 * 1.5**2))
  w = np.outer(g, g) / np.outer(g, g).sum()
  grey = np.random.default_rng(1).integers(50, 200, (11, 11)).astype(np.float64)
  x = np.repeat(grey[None, :, :, None], 3, axis=-1)
  mu_x = float(np.sum(w * grey))
  mu_y = mu_x + 10
  expected = (2 * mu_x * mu_y + C1) / (mu_x**2 + mu_y**2 + C1)
  assert video_metrics.ssim(x, x + 10) == pytest.approx(expected, rel=1e-12)


def _brute_force_ssim_plane(x, y):
  """SSIM of one plane with explicit loops over every valid 11x11 window (Wang et al. eq. 13)."""
  g = np.exp(-np.square(np.arange(11) - 5.0) / (2 * 1.5**2))
  w = np.outer(g, g) / np.outer(g, g).sum()
  scores = []
  for i in range(x.shape[0] - 10):
    for j in range(x.shape[1] - 10):
      a, b = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
      ma, mb = np.sum(w * a), np.sum(w * b)
      va, vb = np.sum(w * (a - ma) ** 2), np.sum(w * (b - mb) ** 2)
      cab = np.sum(w * (a - ma) * (b - mb))
      scores.append((2 * ma * mb + C1) * (2 * cab + C2) / ((ma**2 + mb**2 + C1) * (va + vb + C2)))
  return np.mean(scores)


def test_ssim_matches_a_brute_force_window_loop_on_luma_and_per_channel():
  rng = np.random.default_rng(2)
  x = rng.integers(0, 256, (2, 13, 15, 3)).astype(np.float64)
  y = np.clip(x + rng.normal(0, 25, x.shape), 0, 255)
  luma = np.array([0.299, 0.587, 0.114])
  expected_luma = np.mean([_brute_force_ssim_plane(a @ luma, b @ luma) for a, b in zip(x, y)])
  expected_rgb = np.mean([_brute_force_ssim_plane(a[..., c], b[..., c]) for a, b in zip(x, y) for c in range(3)])
  assert video_metrics.ssim(x, y) == pytest.approx(expected_luma, rel=1e-9)
  assert video_metrics.ssim(x, y, channels="rgb") == pytest.approx(expected_rgb, rel=1e-9)


def test_ssim_is_symmetric_and_decreases_with_noise():
  x = _video(shape=(3, 24, 24, 3)).astype(np.float64)
  rng = np.random.default_rng(3)
  noise = rng.normal(0, 1, x.shape)
  scores = [video_metrics.ssim(x, np.clip(x + s * noise, 0, 255)) for s in (2, 8, 32)]
  assert 1 > scores[0] > scores[1] > scores[2]
  y = np.clip(x + 8 * noise, 0, 255)
  assert video_metrics.ssim(x, y) == pytest.approx(video_metrics.ssim(y, x), rel=1e-12)


def test_flicker_is_zero_for_a_static_error_and_exact_for_a_drifting_one():
  x = _video().astype(np.float64)
  fixed_error = np.random.default_rng(4).normal(0, 10, x.shape[1:])
  assert video_metrics.temporal_flicker(x, x + fixed_error) == pytest.approx(0.0, abs=1e-12)
  # Error 3*t: every frame change is off by exactly 3.
  drift = 3.0 * np.arange(x.shape[0])[:, None, None, None]
  assert video_metrics.temporal_flicker(x, x + drift) == pytest.approx(3.0, abs=1e-12)
  # Reported in [0, 255] units for any data range.
  assert video_metrics.temporal_flicker(x / 255, (x + drift) / 255, data_range=1.0) == pytest.approx(3.0, abs=1e-9)
  assert math.isnan(video_metrics.temporal_flicker(x[:1], x[:1] + 1))


def test_compare_and_mean_metrics_skip_missing_values():
  x = _video()
  row = video_metrics.compare(x, x + 5)
  assert set(row) == {"psnr", "ssim", "temporal_flicker"}
  assert row["temporal_flicker"] == 0.0
  summary = video_metrics.mean_metrics([
      {"psnr": 30.0, "ssim": 0.9, "temporal_flicker": 1.0},
      {"psnr": 40.0, "ssim": 0.7, "temporal_flicker": math.nan},
      {"psnr": 20.0, "ssim": 0.8},
  ])
  assert summary == pytest.approx({"psnr": 30.0, "ssim": 0.8, "temporal_flicker": 1.0})
  assert video_metrics.mean_metrics([], keys=("psnr",)) == {"psnr": None}


def test_bad_inputs_are_clear_errors():
  x = _video()
  with pytest.raises(ValueError, match=r"different shapes"):
    video_metrics.psnr(x, x[:, :8])
  with pytest.raises(ValueError, match=r"Add a frame axis"):
    video_metrics.psnr(x[0], x[0])
  with pytest.raises(ValueError, match=r"H and W >= 11"):
    video_metrics.ssim(x[:, :8, :8], x[:, :8, :8])
  with pytest.raises(ValueError, match=r"channels='yuv'"):
    video_metrics.ssim(x, x, channels="yuv")
  with pytest.raises(ValueError, match=r"data_range"):
    video_metrics.psnr(x, x, data_range=0)
