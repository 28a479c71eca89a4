"""Closed-form checks of the conditioning masks, mode sampling and pixel-clip placement."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from spacetime_dit import conditioning as cond
from spacetime_dit.models import patchify

ID = cond.MODE_ID


def _mask(mode, k, t, frames=None, **kw):
  """Grid-mode frame mask of one example (T = t)."""
  frames = t if frames is None else frames
  out = cond.frame_mask(np.array([ID[mode]]), np.array([k]), np.array([t]),
                        np.arange(frames)[None], **kw)
  return np.asarray(out[0]).astype(int).tolist()


@pytest.mark.parametrize("mode,k,expected", [
    ("text", 2, [0, 0, 0, 0, 0]),
    ("first_frame", 2, [1, 0, 0, 0, 0]),
    ("last_frame", 2, [0, 0, 0, 0, 1]),
    ("first_last", 2, [1, 0, 0, 0, 1]),
    ("leading", 2, [1, 1, 0, 0, 0]),
    ("trailing", 2, [0, 0, 0, 1, 1]),
    ("leading", 9, [1, 1, 1, 1, 0]),  # k clipped to T - 1.
    ("trailing", 9, [0, 1, 1, 1, 1]),
])
def test_masks_per_mode_on_five_frames(mode, k, expected):
  assert _mask(mode, k, 5) == expected


@pytest.mark.parametrize("mode", cond.MODES)
def test_images_fall_back_to_text(mode):
  cfg = cond.ConditioningConfig(random=1.0, random_frame_prob=1.0)
  assert _mask(mode, 3, 1, rng=jax.random.PRNGKey(0), cfg=cfg) == [0]


def test_first_last_on_two_frames_falls_back_and_frames_past_t_are_never_given():
  assert _mask("first_last", 1, 2) == [0, 0]
  # A slot of 3 frames evaluated on a longer frame axis (packed rows): frames >= T stay False.
  assert _mask("trailing", 1, 3, frames=6) == [0, 0, 1, 0, 0, 0]
  assert _mask("last_frame", 1, 3, frames=5) == [0, 0, 1, 0, 0]
  assert _mask("leading", 2, 0, frames=3) == [0, 0, 0]  # Empty slot.


def test_random_mode_always_generates_a_frame_and_draws_each_frame_once():
  cfg = cond.ConditioningConfig(text=0.0, random=1.0, random_frame_prob=1.0)
  b, t = 64, 5
  modes = np.full((b,), ID["random"])
  mask = np.asarray(cond.frame_mask(modes, np.ones(b), np.full(b, t), np.arange(t)[None],
                                    rng=jax.random.PRNGKey(1), cfg=cfg))
  # p = 1: every frame but exactly one (the always-generated frame, uniform over the clip).
  np.testing.assert_array_equal(mask.sum(1), t - 1)
  assert len(set(np.argmin(mask, 1).tolist())) > 1
  # The draw depends on (example, frame) only: per-token frame indices agree with per-frame ones.
  cfg_half = cond.ConditioningConfig(text=0.0, random=1.0, random_frame_prob=0.5)
  per_frame = np.asarray(cond.frame_mask(modes, 1, t, np.arange(t)[None], rng=jax.random.PRNGKey(2),
                                         cfg=cfg_half))
  tokens = np.repeat(np.arange(t), 4)[None]  # 4 tokens per frame.
  per_token = np.asarray(cond.frame_mask(modes, 1, t, tokens, rng=jax.random.PRNGKey(2),
                                         cfg=cfg_half))
  np.testing.assert_array_equal(per_token, np.repeat(per_frame, 4, axis=1))
  assert 0.3 < per_frame.mean() < 0.5  # 0.5 * (T - 1) / T = 0.4 given.


def test_random_mode_without_rng_is_an_error():
  with pytest.raises(ValueError, match="rng"):
    cond.frame_mask(np.array([ID["random"]]), 1, 5, np.arange(5)[None])


def test_per_slot_masks_broadcast_over_a_frame_axis():
  # Packed layout: modes (B, G), frame index (1, 1, F) -> (B, G, F).
  modes = np.array([[ID["first_frame"], ID["trailing"]]])
  got = cond.frame_mask(modes, np.array([[1, 2]]), np.array([[3, 4]]), np.arange(5)[None, None])
  np.testing.assert_array_equal(np.asarray(got).astype(int),
                                [[[1, 0, 0, 0, 0], [0, 0, 1, 1, 0]]])


def test_sample_modes_follow_the_weights_and_k_stays_below_t():
  cfg = cond.ConditioningConfig(text=0.5, leading=0.25, trailing=0.25, max_frames=6)
  modes, k = cond.sample_modes(jax.random.PRNGKey(0), cfg, (4000,), num_frames=4)
  counts = np.bincount(np.asarray(modes), minlength=len(cond.MODES)) / 4000
  np.testing.assert_allclose(counts, [0.5, 0, 0, 0, 0.25, 0.25, 0], atol=0.03)
  assert set(np.asarray(k).tolist()) == {1, 2, 3}  # [1, min(6, T - 1)].
  _, k_free = cond.sample_modes(jax.random.PRNGKey(0), cfg, (2000, 2))
  assert set(np.asarray(k_free).ravel().tolist()) == set(range(1, 7))
  _, k_image = cond.sample_modes(jax.random.PRNGKey(0), cfg, (50,), num_frames=1)
  assert set(np.asarray(k_image).tolist()) == {1}


def test_config_validates_and_reads_the_section():
  assert cond.ConditioningConfig().text_only
  with pytest.raises(ValueError, match="sum to 0"):
    cond.ConditioningConfig(text=0.0)
  with pytest.raises(ValueError, match=">= 0"):
    cond.ConditioningConfig(leading=-1.0)
  with pytest.raises(ValueError, match="random_frame_prob"):
    cond.ConditioningConfig(random_frame_prob=1.5)
  section = ml_collections.ConfigDict({"text": 0.5, "leading": 0.5, "max_frames": 2})
  cfg = cond.ConditioningConfig.from_config(ml_collections.ConfigDict({"conditioning": section}))
  assert cfg.probabilities == (0.5, 0, 0, 0, 0.5, 0, 0) and not cfg.text_only
  assert cond.ConditioningConfig.from_config(ml_collections.ConfigDict()) == cond.ConditioningConfig()
  with pytest.raises(ValueError, match="leadin"):
    cond.ConditioningConfig.from_config(
        ml_collections.ConfigDict({"conditioning": {"leadin": 1.0}}))


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 2, 2)])
def test_token_mask_follows_grid_positions(patch):
  t, h, w = 4, 4, 6
  grid = patchify.patch_grid((t, h, w), patch)
  frames = np.array([[1, 1, 0, 0], [0, 0, 1, 1]], bool)
  got = np.asarray(cond.token_mask(frames, grid, patch))
  positions = patchify.grid_positions(grid)
  expected = frames[:, positions[:, 0] * patch[0]]
  assert got.shape == (2, int(np.prod(grid)))
  np.testing.assert_array_equal(got, expected)
  # Same as patchifying a per-frame indicator latent.
  indicator = np.broadcast_to(frames[:, :, None, None, None], (2, t, h, w, 1)).astype(np.float32)
  np.testing.assert_array_equal(got, np.asarray(patchify.patchify(indicator, patch)).min(-1) > 0)


def test_token_mask_rejects_half_given_temporal_patches_and_wrong_t():
  with pytest.raises(ValueError, match="constant within temporal"):
    cond.token_mask(np.array([[1, 0, 0, 0]], bool), (2, 1, 1), (2, 2, 2))
  with pytest.raises(ValueError, match="T = gt"):
    cond.token_mask(np.zeros((1, 3), bool), (2, 1, 1), (2, 2, 2))


def test_timesteps_with_condition():
  given = np.array([[True, False, False], [False, False, True]])
  np.testing.assert_array_equal(cond.timesteps_with_condition(np.array([0.5, 0.25]), given),
                                [[0, 0.5, 0.5], [0.25, 0.25, 0]])
  t_bl = np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
  np.testing.assert_allclose(cond.timesteps_with_condition(t_bl, given),
                             [[0, 0.2, 0.3], [0.4, 0.5, 0]])


def test_leading_placement():
  # tf = 2: 1 + 2m frames encode to 1 + m latents.
  assert [cond.leading_pixel_frames(n, 2) for n in range(1, 8)] == [1, 1, 3, 3, 5, 5, 7]
  assert [cond.latent_frames_for_leading(n, 2) for n in range(1, 8)] == [1, 1, 2, 2, 3, 3, 4]
  assert cond.leading_pixel_frames(9, 4) == 9 and cond.latent_frames_for_leading(9, 4) == 3
  with pytest.raises(ValueError, match="at least 1 frame"):
    cond.leading_pixel_frames(0, 2)


@pytest.mark.parametrize("n,tf,m,pad", [(1, 2, 1, 2), (2, 2, 1, 1), (3, 2, 1, 0), (4, 2, 2, 1),
                                        (5, 2, 2, 0), (6, 4, 2, 3), (1, 1, 1, 1)])
def test_trailing_placement(n, tf, m, pad):
  frames = np.arange(1, n + 1, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 3, 3), np.uint8)
  padded, got_m = cond.trailing_pixel_clip(frames, tf)
  assert got_m == m and padded.shape == (1 + tf * m, 2, 3, 3) and padded.dtype == np.uint8
  np.testing.assert_array_equal(padded[:pad], np.repeat(frames[:1], pad, axis=0))
  np.testing.assert_array_equal(padded[pad:], frames)
  with pytest.raises(ValueError, match="frames"):
    cond.trailing_pixel_clip(frames[0], tf)


def test_masks_jit():
  cfg = cond.ConditioningConfig(text=0.3, first_frame=0.3, random=0.4)

  @jax.jit
  def f(rng):
    modes, k = cond.sample_modes(rng, cfg, (8,), num_frames=5)
    return cond.frame_mask(modes, k, 5, jnp.arange(5)[None], rng=rng, cfg=cfg)

  mask = np.asarray(f(jax.random.PRNGKey(3)))
  assert mask.shape == (8, 5) and not mask.all(axis=1).any()


def test_deterministic_modes_need_no_rng_and_rng_needs_cfg():
  assert _mask("leading", 2, 4, cfg=cond.ConditioningConfig()) == [1, 1, 0, 0]
  with pytest.raises(ValueError, match="no cfg"):
    _mask("leading", 2, 4, rng=jax.random.PRNGKey(0))
