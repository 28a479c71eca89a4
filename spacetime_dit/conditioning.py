"""Frame conditioning: which latent frames are given (clean) and which are generated.

One checkpoint learns every conditioning mode (image-to-video, extension forwards and backwards,
interpolation between clips, looping) because training draws, per example, a mode from a
configurable mixture and hands the chosen latent frames to the DiT clean: their tokens hold the
clean latent x0 and timestep t = 0, the other tokens are noised at the example's t and carry the
loss. Per-token timesteps are how diffusion forcing (Chen et al. 2024, arXiv:2407.01392) mixes
noise levels inside one sequence; giving clean frames at t = 0 in the same sequence, rather than
through a separate channel, is the in-context conditioning of Sora-style models (e.g.
"Pyramidal Flow", Jin et al. 2024; Open-Sora 2.0, arXiv:2503.09642 §3 uses a mask channel for
the same job). The model sees which tokens are given through their t = 0 timestep embedding.

Frames here are the DiT's frame units: latent frames in grid mode, temporal patches in packed
rows (`positions[..., 0]`); with a temporal patch pt > 1 a given unit is pt whole latent frames.

Modes (`MODES`, ids are their positions):
  text         nothing given (plain text-to-video)
  first_frame  frame 0 given (image-to-video)
  last_frame   frame T-1 given
  first_last   frames 0 and T-1 (interpolation / connecting / looping)
  leading      frames [0, k) (extend forwards)
  trailing     frames [T-k, T) (extend backwards)
  random       each frame given with probability `random_frame_prob`, one drawn frame always
               generated (frame-level masking, as in MaskFlow / diffusion forcing)
At least one frame is always generated: a mode that would give every frame (T == 1: images,
first_last with T == 2) gives nothing, i.e. falls back to "text"; k is clipped to T - 1.

Everything here is a pure jnp function (works on numpy input and under jit) with closed-form
tests in tests/test_conditioning.py. The sampling-side placement helpers at the end map pixel
clips given by a user onto latent frames of the causal autoencoder.
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spacetime_dit import config_types

MODES = ("text", "first_frame", "last_frame", "first_last", "leading", "trailing", "random")
MODE_ID = {name: i for i, name in enumerate(MODES)}


@dataclasses.dataclass(frozen=True)
class ConditioningConfig:
  """Mixture of conditioning modes drawn per training example (the `config.conditioning` section).

  Weights are relative (normalised by their sum). The default, text only, is the behaviour of
  runs made before conditioning existed: the train step is then bit-for-bit the old one.
  """

  text: float = 1.0  # Nothing given: text-to-video.
  first_frame: float = 0.0  # Latent frame 0 given: image-to-video.
  last_frame: float = 0.0  # The last latent frame given.
  first_last: float = 0.0  # First and last latent frames given: interpolation and loops.
  leading: float = 0.0  # The first k latent frames given: extension forwards.
  trailing: float = 0.0  # The last k latent frames given: extension backwards.
  random: float = 0.0  # Each latent frame given with probability random_frame_prob.
  max_frames: int = 4  # k of leading/trailing is uniform in [1, min(max_frames, T - 1)].
  random_frame_prob: float = 0.3  # Per-frame probability of being given in "random".

  def __post_init__(self):
    weights = self.weights
    negative = {m: w for m, w in zip(MODES, weights) if not w >= 0}
    if negative:
      raise ValueError(
          f"conditioning weights must be >= 0, got {negative}. Set them to 0 to disable a mode.")
    if not sum(weights) > 0:
      raise ValueError(
          f"conditioning weights {dict(zip(MODES, weights))} sum to 0: no mode could be drawn."
          " Give at least one mode a positive weight, e.g. --config.conditioning.text=1.")
    if self.max_frames < 1:
      raise ValueError(
          f"conditioning.max_frames={self.max_frames} must be >= 1 (frames given by leading and"
          " trailing).")
    if not 0.0 <= self.random_frame_prob <= 1.0:
      raise ValueError(
          f"conditioning.random_frame_prob={self.random_frame_prob} must be a probability in"
          " [0, 1].")

  @property
  def weights(self) -> tuple[float, ...]:
    """The weights in `MODES` order."""
    return tuple(float(getattr(self, m)) for m in MODES)

  @property
  def probabilities(self) -> tuple[float, ...]:
    """The weights normalised to sum to 1, in `MODES` order."""
    total = sum(self.weights)
    return tuple(w / total for w in self.weights)

  @property
  def text_only(self) -> bool:
    """True when no frame is ever given (the train step then takes its unconditioned path)."""
    return all(w == 0 for w in self.weights[1:])

  @classmethod
  def from_config(cls, config: Any) -> "ConditioningConfig":
    """From an experiment's ConfigDict (its `conditioning` section; text only if it has none,
    as in configs written before the section existed)."""
    section = config.get("conditioning") if hasattr(config, "get") else None
    if section is None:
      return cls()
    return config_types.dataclass_from_config(cls, section, path="config.conditioning")


def sample_modes(
    rng: jax.Array, cfg: ConditioningConfig, shape: tuple[int, ...], num_frames: Any = None
) -> tuple[jax.Array, jax.Array]:
  """Draws a conditioning mode and a frame count k per example (or per packed clip slot).

  Args:
    rng: PRNG key.
    cfg: the mixture.
    shape: e.g. (B,) in grid mode or (B, G) for the clip slots of packed rows.
    num_frames: optional frames T per element (broadcastable to `shape`); k is then uniform in
      [1, min(max_frames, T - 1)] (1 when T <= 2). Without it k is uniform in [1, max_frames]
      and `frame_mask` clips it to T - 1.

  Returns:
    (mode_ids int32 `shape`, indices into MODES; k int32 `shape`, >= 1).
  """
  rng_mode, rng_k = jax.random.split(rng)
  probs = jnp.asarray(cfg.probabilities, jnp.float32)
  mode_ids = jax.random.choice(rng_mode, len(MODES), shape, p=probs).astype(jnp.int32)
  high = jnp.full(shape, cfg.max_frames, jnp.int32)
  if num_frames is not None:
    high = jnp.minimum(high, jnp.asarray(num_frames, jnp.int32) - 1)
  high = jnp.maximum(high, 1)
  u = jax.random.uniform(rng_k, shape)
  k = jnp.minimum(jnp.floor(u * high).astype(jnp.int32) + 1, high)
  return mode_ids, k


def _left_align(x: jax.Array, rank: int) -> jax.Array:
  """Trailing unit axes so that x broadcasts from the left against a rank-`rank` array."""
  return jnp.reshape(x, x.shape + (1,) * (rank - x.ndim))


def frame_mask(
    mode_ids: Any,
    k: Any,
    num_frames: Any,
    frame_index: Any,
    rng: jax.Array | None = None,
    cfg: ConditioningConfig | None = None,
) -> jax.Array:
  """True where a frame is GIVEN (clean, t = 0, no loss); False where it is generated.

  `mode_ids`, `k` and `num_frames` share a shape M, e.g. (B,) per example or (B, G) per packed
  clip slot; `frame_index` has M's rank or more, its leading axes broadcasting against M from
  the left (grid: `jnp.arange(T)[None]` -> (B, T); per slot: `jnp.arange(F)[None, None]` ->
  (B, G, F)). Frames at or beyond num_frames are never given.

  Fallbacks keep at least one frame generated: k is clipped to [0, T - 1]; first_frame and
  last_frame with T == 1 and first_last with T <= 2 give nothing (i.e. "text"); "random" always
  generates one uniformly drawn frame (so T == 1 gives nothing).

  Args:
    mode_ids: int indices into MODES, shape M.
    k: int frames of leading/trailing, shape M.
    num_frames: int frames T of each example/slot, shape M (0 for an empty slot).
    frame_index: int frame of each output element.
    rng: PRNG key, required when any mode is "random": the draw for a frame is a function of
      (rng, position in M, frame index) alone, so repeated frame indices (one per token) agree.
      Without it, "random" is an error when mode_ids are concrete (and gives nothing under jit).
    cfg: the mixture, required with rng (for random_frame_prob).

  Returns:
    bool of the broadcast shape of M and frame_index.
  """
  frame_index = jnp.asarray(frame_index, jnp.int32)
  mode_ids = jnp.asarray(mode_ids, jnp.int32)
  m_shape = jnp.broadcast_shapes(mode_ids.shape, jnp.shape(k), jnp.shape(num_frames))
  rank = max(len(m_shape), frame_index.ndim)
  mode = _left_align(jnp.broadcast_to(mode_ids, m_shape), rank)
  t = _left_align(jnp.broadcast_to(jnp.asarray(num_frames, jnp.int32), m_shape), rank)
  kk = _left_align(jnp.broadcast_to(jnp.asarray(k, jnp.int32), m_shape), rank)
  kk = jnp.clip(kk, 0, jnp.maximum(t - 1, 0))
  f = frame_index
  first = (f == 0) & (t >= 2)
  last = (f == t - 1) & (t >= 2)
  by_mode = [
      jnp.zeros_like(first),  # text
      first,  # first_frame
      last,  # last_frame
      (first | last) & (t >= 3),  # first_last
      f < kk,  # leading
      f >= t - kk,  # trailing
  ]
  given = jnp.select([mode == i for i in range(len(by_mode))], by_mode, False)
  if rng is not None:
    given = jnp.where(mode == MODE_ID["random"], _random_frames(rng, cfg, m_shape, t, f), given)
  else:
    _check_no_random(mode_ids)
  return given & (f >= 0) & (f < t)


def _check_no_random(mode_ids: jax.Array) -> None:
  """Without rng, "random" cannot be drawn: an error when the modes are known (not traced)."""
  if not isinstance(mode_ids, jax.core.Tracer) and bool(jnp.any(mode_ids == MODE_ID["random"])):
    raise ValueError(
        "frame_mask got mode 'random' without rng and cfg; pass rng=<PRNG key> and"
        " cfg=<ConditioningConfig> (random_frame_prob) to draw its frames.")


def _random_frames(rng, cfg, m_shape, t, f):
  """Mode "random": frame j given w.p. random_frame_prob, except one drawn frame j* < T."""
  if cfg is None:
    raise ValueError(
        "frame_mask got rng but no cfg: mode 'random' needs cfg=<ConditioningConfig> for its"
        " random_frame_prob. Pass cfg, or drop rng when no example uses 'random'.")
  size = max(1, math.prod(m_shape))
  rng_star, rng_frames = jax.random.split(rng)
  u_star = jax.random.uniform(rng_star, (size,))
  keys = jax.random.split(rng_frames, size)
  u_star = _left_align(u_star.reshape(m_shape), t.ndim)
  j_star = jnp.floor(u_star * jnp.maximum(t, 1)).astype(jnp.int32)
  j_star = jnp.minimum(j_star, jnp.maximum(t - 1, 0))
  out_shape = jnp.broadcast_shapes(t.shape, f.shape)
  element = _left_align(jnp.arange(size, dtype=jnp.int32).reshape(m_shape), t.ndim)
  element = jnp.broadcast_to(element, out_shape).reshape(-1)
  frames = jnp.maximum(jnp.broadcast_to(f, out_shape).reshape(-1), 0)
  draw = jax.vmap(lambda e, j: jax.random.uniform(jax.random.fold_in(keys[e], j)))
  u = draw(element, frames).reshape(out_shape)
  return (u < cfg.random_frame_prob) & (f != j_star)


def token_mask(
    frame_mask_bt: Any, grid: tuple[int, int, int], patch: tuple[int, int, int]
) -> jax.Array:
  """Given tokens (B, L) of a grid-mode latent from its given latent frames (B, T).

  Tokens are frame-major (`patchify.grid_positions`): token l covers latent frames
  [pt * (l // (gh*gw)), pt * (l // (gh*gw) + 1)). A token is given when its temporal patch's
  frames are; the mask must be constant within each temporal patch (a token is either clean or
  noisy as a whole).

  Args:
    frame_mask_bt: bool (B, T), T = gt * pt.
    grid: token grid (gt, gh, gw).
    patch: (pt, ph, pw).

  Returns:
    bool (B, L), L = gt * gh * gw.
  """
  gt, gh, gw = grid
  pt = patch[0]
  fm = jnp.asarray(frame_mask_bt, bool)
  if fm.ndim != 2 or fm.shape[1] != gt * pt:
    raise ValueError(
        f"frame mask has shape {fm.shape}; it must be (B, T) with T = gt * pt = {gt} * {pt} ="
        f" {gt * pt} for grid {tuple(grid)} and patch {tuple(patch)}.")
  by_patch = fm.reshape(fm.shape[0], gt, pt)
  if not isinstance(fm, jax.core.Tracer) and not bool(jnp.all(by_patch == by_patch[:, :, :1])):
    raise ValueError(
        f"frame mask {np.asarray(fm).astype(int).tolist()} is not constant within temporal"
        f" patches of {pt} frames: a token would be half clean, half noisy. Give or generate whole"
        " temporal patches (compute the mask per temporal patch and repeat it pt times).")
  return jnp.repeat(by_patch[:, :, 0], gh * gw, axis=1)


def timesteps_with_condition(t_b_or_bl: Any, given_bl: Any) -> jax.Array:
  """Per-token timesteps (B, L): the example's (or token's) t, and 0 at given tokens.

  Args:
    t_b_or_bl: float (B,) per example or (B, L) per token.
    given_bl: bool (B, L).

  Returns:
    float (B, L).
  """
  given_bl = jnp.asarray(given_bl, bool)
  t = jnp.asarray(t_b_or_bl)
  if t.ndim == 1:
    t = t[:, None]
  t = jnp.broadcast_to(t, given_bl.shape)
  return jnp.where(given_bl, jnp.zeros_like(t), t)


# Sampling-side placement of user clips onto the causal autoencoder's latent frames. With
# temporal factor tf, pixel frame 0 is latent frame 0 alone and latent frame j >= 1 covers pixel
# frames tf*(j-1)+1 .. tf*j, so a clip encodes cleanly when it has 1 + tf*m frames.


def _check_counts(n_pixel: int, tf: int) -> None:
  if n_pixel < 1 or tf < 1:
    raise ValueError(
        f"got {n_pixel} pixel frames with temporal factor {tf}; need at least 1 frame and a"
        " factor >= 1.")


def leading_pixel_frames(num_pixel_frames: int, temporal_factor: int) -> int:
  """Pixel frames of a clip used as LEADING frames: the largest 1 + tf*m <= n.

  A clip placed at the start of the output uses 1 + tf*m of its frames (more would make a partial
  latent frame); they encode to exactly `latent_frames_for_leading` latent frames that match the
  output's first latent frames. `inference.Generator` takes the clip's LAST 1 + tf*m frames, so
  an extension continues from the clip's final frame.
  """
  _check_counts(num_pixel_frames, temporal_factor)
  return 1 + temporal_factor * ((num_pixel_frames - 1) // temporal_factor)


def latent_frames_for_leading(n_pixel: int, tf: int) -> int:
  """Latent frames 1 + (n - 1) // tf that n leading pixel frames give (see leading_pixel_frames)."""
  _check_counts(n_pixel, tf)
  return 1 + (n_pixel - 1) // tf


def trailing_pixel_clip(frames_thwc: Any, tf: int) -> tuple[np.ndarray, int]:
  """Pads a clip to be placed at the END of the output; returns (padded frames, m).

  Policy: m = max(1, ceil((n - 1) / tf)); the clip is front-padded with copies of its first frame
  up to 1 + tf*m frames. Encode the result, DROP latent 0 (the causal encoder's lone first
  frame, which only ever stands for an output's frame 0) and keep the last m latents: they cover
  the last tf*m output pixel frames, which show the clip (its first up to tf - 1 positions
  repeat its first frame). An image (n = 1) gives m = 1: one latent frame of tf copies.

  Args:
    frames_thwc: (n, H, W, C) array, any dtype.
    tf: the autoencoder's temporal factor.

  Returns:
    ((1 + tf*m, H, W, C) array of frames_thwc's dtype, m).
  """
  frames = np.asarray(frames_thwc)
  if frames.ndim != 4:
    raise ValueError(
        f"trailing_pixel_clip needs frames (T, H, W, C); got shape {frames.shape}. Add a frame axis"
        " for an image.")
  n = frames.shape[0]
  _check_counts(n, tf)
  m = max(1, -(-(n - 1) // tf))
  pad = 1 + tf * m - n
  padded = np.concatenate([np.repeat(frames[:1], pad, axis=0), frames], axis=0)
  return padded, m
