"""FVD: the Fréchet distance against closed forms, the I3D feature network with random weights,
its weight file (round trip and clear errors) and the reference FVD's preprocessing rules.

The I3D runs at 4 frames of 16 x 16 here (the standard FVD uses 16 frames of 224 x 224, too slow
for a CPU test); the standard weights are not shipped, so no test can check published numbers.
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg

from spacetime_dit.eval import fvd
from spacetime_dit.eval import i3d

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {"num_frames": 4, "resolution": 16}


def _random_cov(rng, d, rank=None):
  x = rng.standard_normal((rank or d + 3, d))
  return x.T @ x / x.shape[0]


# ------------------------------------------------------------------------------ Fréchet math


def test_identical_gaussians_are_at_distance_zero():
  rng = np.random.default_rng(0)
  mu, cov = rng.standard_normal(7), _random_cov(rng, 7)
  assert fvd.frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-9)


def test_diagonal_covariances_match_the_closed_form():
  rng = np.random.default_rng(1)
  mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
  s1, s2 = rng.uniform(0.1, 3.0, 5), rng.uniform(0.1, 3.0, 5)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2.0 * np.sqrt(s1 * s2))
  assert fvd.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-12)


def test_non_diagonal_2x2_matches_the_closed_form():
  # For 2x2 M with eigenvalues l1, l2 >= 0: (sqrt l1 + sqrt l2)^2 = tr M + 2 sqrt(det M). With
  # A = [[2, 1], [1, 2]], B = diag(1, 3): tr(AB) = 8, det(AB) = 3 * 3, so Tr sqrt(AB) = sqrt(14)
  # and d^2 = |(1, 2)|^2 + tr A + tr B - 2 sqrt(14) = 13 - 2 sqrt(14).
  a, b = np.array([[2.0, 1.0], [1.0, 2.0]]), np.diag([1.0, 3.0])
  got = fvd.frechet_distance(np.zeros(2), a, np.array([1.0, 2.0]), b)
  assert got == pytest.approx(13.0 - 2.0 * math.sqrt(14.0), rel=1e-12)


def test_matches_scipy_sqrtm_and_is_symmetric():
  rng = np.random.default_rng(2)
  mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
  c1, c2 = _random_cov(rng, 6), _random_cov(rng, 6)
  trace_sqrt = np.trace(scipy.linalg.sqrtm(c1 @ c2)).real
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2.0 * trace_sqrt
  forward = fvd.frechet_distance(mu1, c1, mu2, c2)
  assert forward == pytest.approx(expected, rel=1e-9)
  assert fvd.frechet_distance(mu2, c2, mu1, c1) == pytest.approx(forward, rel=1e-10)


def test_singular_covariances_fewer_samples_than_features():
  # Same covariance: sqrt(C C) = C, so d^2 = |mu1 - mu2|^2 exactly, even for a rank-3 C in 10-D
  # (the FVD of a few clips), where sqrtm of the product is ill-conditioned.
  rng = np.random.default_rng(3)
  cov = _random_cov(rng, 10, rank=3)
  mu1, mu2 = rng.standard_normal(10), rng.standard_normal(10)
  assert fvd.frechet_distance(mu1, cov, mu2, cov) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-7)
  got = fvd.frechet_distance(mu1, cov, mu2, _random_cov(rng, 10, rank=4))
  assert np.isfinite(got) and got > 0


def test_feature_statistics_and_invariance_to_feature_and_sample_order():
  rng = np.random.default_rng(4)
  x, y = rng.standard_normal((40, 6)), rng.standard_normal((30, 6)) + 0.5
  mu, cov = fvd.feature_statistics(x)
  np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
  np.testing.assert_allclose(cov, (x - mu).T @ (x - mu) / 39, rtol=1e-10)  # Unbiased: N - 1.
  base = fvd.frechet_distance(*fvd.feature_statistics(x), *fvd.feature_statistics(y))
  perm_d, perm_n = rng.permutation(6), rng.permutation(40)
  permuted = fvd.frechet_distance(
      *fvd.feature_statistics(x[perm_n][:, perm_d]), *fvd.feature_statistics(y[:, perm_d]))
  assert permuted == pytest.approx(base, rel=1e-9)
  assert base > 1.0  # The mean shift alone contributes about 6 x 0.5^2 = 1.5.


def test_bad_inputs_name_the_rule():
  with pytest.raises(ValueError, match=r"N >= 2"):
    fvd.feature_statistics(np.zeros((1, 4)))
  with pytest.raises(ValueError, match=r"widths 2 and 3"):
    fvd.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
  with pytest.raises(ValueError, match=r"not symmetric"):
    fvd.frechet_distance(np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), np.zeros(2), np.eye(2))


def test_any_callable_is_a_feature_network_and_batches_are_padded():
  # A pluggable network: mean colour per clip (B, 3); FVD with it is the Fréchet distance of the
  # clips' mean colours, computable directly.
  shapes = []

  def mean_colour(videos_bthwc):
    shapes.append(videos_bthwc.shape)
    return videos_bthwc.astype(np.float64).mean(axis=(1, 2, 3))

  rng = np.random.default_rng(5)
  real = rng.integers(0, 200, (5, 3, 4, 4, 3), dtype=np.uint8)
  fake = rng.integers(50, 256, (5, 3, 4, 4, 3), dtype=np.uint8)
  got = fvd.frechet_video_distance(mean_colour, real, fake, batch_size=2)
  assert shapes == [(2, 3, 4, 4, 3)] * 6  # 5 clips = 2 + 2 + (1 + 1 padding), twice.
  direct = fvd.frechet_distance(
      *fvd.feature_statistics(real.mean(axis=(1, 2, 3))),
      *fvd.feature_statistics(fake.mean(axis=(1, 2, 3))))
  assert got == pytest.approx(direct, rel=1e-12) and got > 0


# ----------------------------------------------------------------------------- preprocessing


def test_legacy_bilinear_resize_rule():
  # TF1 resize_bilinear (align_corners=False): output i samples input i * in / out.
  np.testing.assert_allclose(
      i3d.legacy_bilinear_matrix(2, 4), [[1, 0], [0.5, 0.5], [0, 1], [0, 1]])
  np.testing.assert_allclose(i3d.legacy_bilinear_matrix(4, 2), [[1, 0, 0, 0], [0, 0, 1, 0]])
  np.testing.assert_array_equal(i3d.legacy_bilinear_matrix(5, 5), np.eye(5))
  video = np.zeros((1, 1, 3, 5, 3), np.uint8)
  video[..., 1] = 255
  x = np.asarray(i3d.preprocess(video, 7))
  assert x.shape == (1, 1, 7, 7, 3)
  np.testing.assert_allclose(x[..., 0], -1.0)
  np.testing.assert_allclose(x[..., 1], 1.0, rtol=1e-6)


def test_frame_rule_first_frames_and_errors():
  videos = np.arange(6, dtype=np.uint8)[None, :, None, None, None] * np.ones((2, 6, 2, 2, 3), np.uint8)
  np.testing.assert_array_equal(i3d.select_frames(videos, 4)[0, :, 0, 0, 0], [0, 1, 2, 3])
  with pytest.raises(ValueError, match=r"have 6 frames but the network takes 16"):
    i3d.select_frames(videos, 16)
  with pytest.raises(ValueError, match=r"dtype float32; it needs uint8"):
    i3d.select_frames(videos.astype(np.float32), 4)


# ------------------------------------------------------------------- I3D with random weights


@pytest.fixture(scope="module")
def network():
  return fvd.random_feature_network(0, **SMALL)


def _clips(seed, n, brightness=0):
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 64, (n, 6, 20, 20, 3)) + brightness).astype(np.uint8)


def test_random_i3d_fvd_is_zero_for_a_set_with_itself_and_grows_with_a_shift(network):
  real, other, bright = _clips(0, 8), _clips(1, 8), _clips(2, 8, brightness=96)
  assert network(real).shape == (8, 400)
  same = fvd.frechet_video_distance(network, real, real)
  resample = fvd.frechet_video_distance(network, real, other)
  shifted = fvd.frechet_video_distance(network, real, bright)
  assert same == pytest.approx(0.0, abs=1e-9)
  assert shifted > 20 * resample > 0  # Measured: 0.52 vs 0.0020.
  assert "not comparable" in network.description


def test_weight_file_round_trip_gives_the_same_features(network, tmp_path):
  path = str(tmp_path / "weights")  # No .npz suffix: the path is used as given.
  i3d.save_weights(path, network.params)
  loaded = fvd.load_feature_network(path, **SMALL)
  clips = _clips(3, 8)
  np.testing.assert_array_equal(loaded(clips), network(clips))
  assert loaded.source == path


def _standard_arrays():
  return {name: np.zeros(shape, np.float32) for name, shape in i3d.expected_shapes().items()}


def test_weight_file_errors_name_the_path_and_the_first_bad_array(tmp_path):
  missing = str(tmp_path / "absent.npz")
  with pytest.raises(FileNotFoundError, match=r"absent\.npz does not exist.*not shipped"):
    fvd.load_feature_network(missing)

  prefixed = str(tmp_path / "prefixed.npz")
  np.savez(prefixed, **{"RGB/inception_i3d/Conv3d_1a_7x7/conv_3d/w": np.zeros((7, 7, 7, 3, 64))})
  with pytest.raises(ValueError, match=r"prefixed\.npz has no array 'Conv3d_1a_7x7/batch_norm/beta'"
                     r".*starting RGB/inception_i3d/.*--describe_weights"):
    fvd.load_feature_network(prefixed)

  arrays = _standard_arrays()
  arrays["Mixed_4c/Branch_1/Conv3d_0b_3x3/conv_3d/w"] = np.zeros((3, 3, 3, 112, 200), np.float32)
  arrays["Logits/Conv3d_0c_1x1/conv_3d/b"] = np.zeros((600,), np.float32)
  # Sonnet stores batch-norm statistics as (1, 1, 1, 1, C): accepted.
  arrays["Conv3d_1a_7x7/batch_norm/moving_mean"] = np.zeros((1, 1, 1, 1, 64), np.float32)
  shaped = str(tmp_path / "shaped.npz")
  np.savez(shaped, **arrays)
  with pytest.raises(ValueError, match=r"'Mixed_4c/Branch_1/Conv3d_0b_3x3/conv_3d/w' has shape"
                     r" \(3, 3, 3, 112, 200\), expected \(3, 3, 3, 112, 224\)"):
    fvd.load_feature_network(shaped)
  arrays["Mixed_4c/Branch_1/Conv3d_0b_3x3/conv_3d/w"] = np.zeros((3, 3, 3, 112, 224), np.float32)
  np.savez(shaped, **arrays)
  with pytest.raises(ValueError, match=r"has shape \(600,\), expected \(400,\)\. The logits have 600"
                     r" classes: pass num_classes=600"):
    fvd.load_feature_network(shaped)

  with open(str(tmp_path / "text.npz"), "w", encoding="utf-8") as f:
    f.write("not a zip")
  with pytest.raises(ValueError, match=r"text\.npz is not a numpy \.npz"):
    fvd.load_feature_network(str(tmp_path / "text.npz"))


def test_describe_weights_lists_every_array():
  text = i3d.describe_weights()
  # 3 stem units + 9 Inception blocks x 6 units, 4 arrays each (w, beta, mean, var), + logits w, b.
  assert len(i3d.expected_shapes()) == (3 + 9 * 6) * 4 + 2
  for line in ("Conv3d_1a_7x7/conv_3d/w (7, 7, 7, 3, 64)",
               "Mixed_5b/Branch_2/Conv3d_0a_3x3/conv_3d/w (3, 3, 3, 32, 128)",
               "Mixed_5c/Branch_3/Conv3d_0b_1x1/batch_norm/moving_variance (128,)",
               "Logits/Conv3d_0c_1x1/conv_3d/w (1, 1, 1, 1024, 400)"):
    assert line in text.splitlines()
  assert "not shipped" in text


def test_cli_missing_weights_is_one_error_line_and_status_2(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "spacetime_dit.eval.fvd", f"--check_weights={tmp_path}/none.npz"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert result.stderr.startswith("error: FVD weight file") and "not shipped" in result.stderr
