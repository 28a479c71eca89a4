"""Tests for spacetime_dit.models.patchify."""

import numpy as np
import pytest

from spacetime_dit.models import patchify as patchify_lib


@pytest.mark.parametrize(
    "shape, patch",
    [
        ((2, 4, 6, 8, 3), (1, 2, 2)),
        ((1, 1, 6, 12, 8), (1, 2, 2)),  # one frame, landscape
        ((3, 6, 8, 4, 2), (2, 4, 2)),  # portrait
        ((1, 5, 3, 3, 1), (1, 1, 1)),
        ((2, 4, 4, 4, 5), (4, 4, 4)),  # one token
    ],
)
def test_round_trip(shape, patch):
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  grid = patchify_lib.patch_grid(shape[1:4], patch)
  tokens = patchify_lib.patchify(x, patch)
  assert tokens.shape == (shape[0], int(np.prod(grid)), int(np.prod(patch)) * shape[-1])
  back = patchify_lib.unpatchify(tokens, grid, patch, shape[-1])
  np.testing.assert_array_equal(np.asarray(back), x)


def test_token_order_matches_grid_positions():
  b, t, h, w, c = 1, 4, 6, 4, 2
  patch = (2, 3, 2)
  x = np.random.default_rng(1).normal(size=(b, t, h, w, c)).astype(np.float32)
  tokens = np.asarray(patchify_lib.patchify(x, patch))
  positions = patchify_lib.grid_positions(patchify_lib.patch_grid((t, h, w), patch))
  for l, (pt, ph, pw) in enumerate(positions):
    box = x[0, pt * 2 : pt * 2 + 2, ph * 3 : ph * 3 + 3, pw * 2 : pw * 2 + 2]
    np.testing.assert_array_equal(tokens[0, l], box.reshape(-1))


def test_grid_positions_t_major():
  positions = patchify_lib.grid_positions((2, 3, 4))
  assert positions.shape == (24, 3) and positions.dtype == np.int32
  np.testing.assert_array_equal(positions[0], [0, 0, 0])
  np.testing.assert_array_equal(positions[1], [0, 0, 1])
  np.testing.assert_array_equal(positions[4], [0, 1, 0])
  np.testing.assert_array_equal(positions[12], [1, 0, 0])
  np.testing.assert_array_equal(positions[-1], [1, 2, 3])


def test_indivisible_latent_names_the_axis_and_fix():
  x = np.zeros((1, 3, 7, 8, 4), np.float32)
  with pytest.raises(ValueError, match=r"height H=7 .*patch size 2.*crop it to 6 or pad it to 8"):
    patchify_lib.patchify(x, (1, 2, 2))
  with pytest.raises(ValueError, match=r"frames T=3.*pad it to 4"):
    patchify_lib.patch_grid((3, 8, 8), (4, 2, 2))


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="B, T, H, W, C"):
    patchify_lib.patchify(np.zeros((8, 8, 4), np.float32), (1, 2, 2))
  with pytest.raises(ValueError, match="positive integers"):
    patchify_lib.patch_grid((4, 4, 4), (0, 2, 2))
  tokens = np.zeros((1, 16, 16), np.float32)
  with pytest.raises(ValueError, match="holds 8 tokens"):
    patchify_lib.unpatchify(tokens, (2, 2, 2), (1, 2, 2), 4)
  with pytest.raises(ValueError, match="P=32"):
    patchify_lib.unpatchify(tokens, (1, 4, 4), (1, 2, 2), 8)
