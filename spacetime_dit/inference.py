"""Text (+ image/video) -> video with a trained DiT and autoencoder: the library behind `sample`.

    generator = inference.Generator.from_workdir("runs/quickstart")
    videos = generator.generate(["a red circle moving right"], frames=9, height=32, width=40)
    videos = generator.generate(["a red circle"], frames=9, height=32, width=32, mode="i2v",
                                cond=image_hw3, seeds=[0, 1, 2], sampler="heun")

Modes (`MODES`), all with the one checkpoint trained on the conditioning mixture of
`spacetime_dit.conditioning`:
  t2v              text only.
  i2v              an image (or a clip's first frame) is output frame 0.
  extend           a clip's last 1 + tf*m frames are the output's first frames; the rest continues it.
  extend_backward  a clip is the output's last frames (`conditioning.trailing_pixel_clip`).
  interpolate      cond = [clip_a, clip_b]: a leads, b trails, the frames between connect them
                   (images allowed: first and last frame).
  loop             one frame is both the first and the last latent frame (with no cond, a t2v
                   sample's first frame is used).
  edit             SDEdit (Meng et al. 2022): the cond clip is encoded, noised to t = strength and
                   integrated back to t = 0 under the prompt.

Given latent frames enter the DiT clean with timestep 0 (per-token timesteps, as in training);
their velocity is zeroed, so they stay exactly the encoded condition through the sampler.

Condition images and clips may have any size: they are resized to the output size by
`video_io.resize_to_cover` (scale to cover, area average when shrinking / linear when
enlarging, centre crop; never stretched or padded).

The same `Generator` writes the periodic samples during training, so what the trainer shows is
exactly what the sample command produces.
"""

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from spacetime_dit import conditioning
from spacetime_dit import config_types
from spacetime_dit import video_io
from spacetime_dit.diffusion import flow
from spacetime_dit.diffusion import samplers
from spacetime_dit.models import autoencoder as autoencoder_lib
from spacetime_dit.models import patchify
from spacetime_dit.sharding import mesh as mesh_lib
from spacetime_dit.training import builders
from spacetime_dit.training import steps as steps_lib

MODES = ("t2v", "i2v", "extend", "extend_backward", "interpolate", "loop", "edit")
SAMPLERS = ("euler", "heun")
# (fewest, most) condition images/clips each mode takes.
COND_COUNTS = {
    "t2v": (0, 0), "i2v": (1, 1), "extend": (1, 1), "extend_backward": (1, 1),
    "interpolate": (2, 2), "loop": (0, 1), "edit": (1, 1),
}
DEFAULT_EDIT_STRENGTH = 0.6
# Noise streams of one sample: fold_in(PRNGKey(seed), stream).
_NOISE, _COND_NOISE, _REFINE_NOISE, _REFINE_COND_NOISE, _LOOP_DRAFT = range(5)

# A DiT evaluation of classifier-free guidance: (with the given frames, with the text, weight).
Pass = tuple[bool, bool, float]


def check_condition_count(mode: str, count: int) -> None:
  """Clear error for an unknown mode or a wrong number of conditions for it."""
  if mode not in MODES:
    raise ValueError(f"unknown sampling mode {mode!r}; valid: {', '.join(MODES)}.")
  low, high = COND_COUNTS[mode]
  if not low <= count <= high:
    want = str(low) if low == high else f"{low} or {high}"
    usage = {
        "t2v": "text only; use --mode=i2v/extend/... to condition on a file",
        "interpolate": "the clip (or image) to start from and the one to end at: --cond=A --cond=B",
        "loop": "an optional image or clip whose first frame starts and ends the loop",
    }.get(mode, "one image or video file: --cond=FILE")
    raise ValueError(f"mode {mode!r} takes {want} condition(s) ({usage}); got {count}.")


def guidance_passes(guidance: float, cond_guidance: float, conditioned: bool) -> tuple[Pass, ...]:
  """The DiT passes of two-scale classifier-free guidance and their weights.

  InstructPix2Pix (Brooks et al. 2023, eq. 3) in velocity form, with text scale s_t = guidance
  and conditioning scale s_c = cond_guidance:
    v = v(0c, 0t) + s_c (v(c, 0t) - v(0c, 0t)) + s_t (v(c, t) - v(c, 0t))
      = (1 - s_c) v(0c, 0t) + (s_c - s_t) v(c, 0t) + s_t v(c, t).
  A pass whose weight is 0 is skipped (s_c = 1: no v(0c, 0t); s_c = s_t: no v(c, 0t); s_t = 1
  with nothing given: the conditional pass alone). With nothing given, 0c = c.

  Returns:
    ((with_condition, with_text, weight), ...) with nonzero weights, the conditional pass first.
  """
  for name, value in (("guidance", guidance), ("cond_guidance", cond_guidance)):
    if not math.isfinite(value):
      raise ValueError(f"{name} is {value}; it must be a finite scale (1 disables it).")
  if not conditioned:
    weights = {(True, True): guidance, (True, False): 1.0 - guidance}
  else:
    weights = {
        (True, True): guidance, (True, False): cond_guidance - guidance,
        (False, False): 1.0 - cond_guidance,
    }
  # The weights sum to 1, so at least one pass remains.
  return tuple((c, t, float(w)) for (c, t), w in weights.items() if w != 0.0)


def _as_clip(value: Any, what: str) -> np.ndarray:
  """A condition as uint8 (T, H, W, 3); images (H, W, 3) get a frame axis."""
  clip = np.asarray(value)
  if clip.dtype != np.uint8:
    raise ValueError(
        f"{what} has dtype {clip.dtype}; conditions are uint8 RGB: an image (H, W, 3) or a clip"
        " (T, H, W, 3) with values 0..255 (e.g. from video_io.read_video).")
  if clip.ndim == 3:
    clip = clip[None]
  if clip.ndim != 4 or clip.shape[-1] != 3 or min(clip.shape[:3]) < 1:
    raise ValueError(
        f"{what} has shape {clip.shape}; conditions are an image (H, W, 3) or a clip (T, H, W, 3)"
        " of RGB frames.")
  return clip


def condition_clips(mode: str, cond: Any) -> list[np.ndarray]:
  """Validates `generate`'s `cond` for `mode`; returns its clips as uint8 (T, H, W, 3) arrays.

  `cond` is None, one array, or a list/tuple of arrays (`interpolate` takes two).
  """
  if cond is None:
    items = []
  elif isinstance(cond, (list, tuple)):
    items = list(cond)
  else:
    items = [cond]
  check_condition_count(mode, len(items))
  return [_as_clip(c, f"condition {i} of mode {mode!r}") for i, c in enumerate(items)]


def check_options(mode: str, num_cond: int, *, strength=None, sampler=None, draft_scale=None,
                  refine_strength=0.5, guidance=1.0, cond_guidance=1.0) -> float | None:
  """Validates `generate`'s options that need no model (the CLI calls it before loading one).

  Returns:
    the edit strength to use (DEFAULT_EDIT_STRENGTH for an edit without one; None otherwise).
  """
  check_condition_count(mode, num_cond)
  if mode == "edit":
    strength = DEFAULT_EDIT_STRENGTH if strength is None else strength
    if not 0.0 < strength <= 1.0:
      raise ValueError(
          f"edit strength is {strength}; it must lie in (0, 1]: the noise level the clip is"
          " taken to (small keeps more of it, 1 keeps only its layout's noise-free start).")
  elif strength is not None:
    raise ValueError(f"strength is for mode 'edit' (SDEdit); mode {mode!r} does not take it.")
  if sampler is not None and sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}.")
  if draft_scale is not None and not 0.0 < draft_scale < 1.0:
    raise ValueError(
        f"draft_scale is {draft_scale}; it must lie in (0, 1) (e.g. 0.5 drafts at half the height"
        " and width), or be None for no draft.")
  if not 0.0 < refine_strength <= 1.0:
    raise ValueError(f"refine_strength is {refine_strength}; it must lie in (0, 1].")
  guidance_passes(guidance, cond_guidance, True)
  return strength


@dataclasses.dataclass(frozen=True)
class _Given:
  """Latent frames fixed by the condition."""

  frames_t: np.ndarray  # bool (T,): which latent frames are given.
  latent: jax.Array  # (1 or B, T, H, W, C) normalised clean latent; zeros where not given.

  @property
  def any(self) -> bool:
    return bool(self.frames_t.any())


@dataclasses.dataclass
class Generator:
  """A trained pipeline: text front end -> DiT sampler (+ conditions) -> autoencoder decoder."""

  dit: nn.Module
  dit_params: Any
  autoencoder: nn.Module
  autoencoder_params: Any
  latent_mean: np.ndarray  # (C,) per-channel statistics the DiT was trained on.
  latent_std: np.ndarray
  tokenizer: Any
  diffusion: config_types.DiffusionConfig

  def __post_init__(self):
    self._velocity = jax.jit(self._guided_velocity, static_argnames=("passes", "conditioned"))
    self._decode = jax.jit(self._decode_latent)
    self._encode = jax.jit(self._encode_video)

  @classmethod
  def from_workdir(cls, workdir: str, mesh=None, rules=None, use_ema: bool = True) -> "Generator":
    """Loads the latest checkpoint of a DiT run and its autoencoder.

    The DiT's weights are its EMA (`training.ema`) when the checkpoint has one, unless
    `use_ema=False` asks for the raw trained weights. The autoencoder is loaded as the DiT's
    training loaded it (`builders.restore_params`' default), whatever `use_ema` says.
    """
    if mesh is None:
      mesh = mesh_lib.make_mesh(config_types.MeshConfig())
      rules = config_types.MeshConfig().rules
    config, dit, dit_params, tokenizer, _ = builders.restore_params(workdir, mesh, rules, use_ema=use_ema)
    if config.stage != "dit":
      raise ValueError(
          f"{workdir} holds a {config.stage!r} run; sampling needs a diffusion-transformer run"
          " (trained with experiments/base.py)."
      )
    ae_dir = builders.autoencoder_workdir(config, workdir)
    _, autoencoder, ae_params, _, _ = builders.restore_params(ae_dir, mesh, rules)
    mean, std = builders.load_latent_stats(ae_dir)
    diffusion = config_types.dataclass_from_config(
        config_types.DiffusionConfig, config.diffusion, path="config.diffusion"
    )
    return cls(dit, dit_params, autoencoder, ae_params, mean, std, tokenizer, diffusion)

  @property
  def temporal_factor(self) -> int:
    return self.autoencoder.config.temporal_factor

  def _units(self) -> tuple[int, int, int]:
    """Pixel frames per latent frame and pixels per token along height and width."""
    ae, patch = self.autoencoder.config, self.dit.config.patch_size
    return ae.temporal_factor * patch[0], ae.spatial_factor * patch[1], ae.spatial_factor * patch[2]

  def latent_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(t, h, w) of the latent for a video size; a clear error when the size cannot work.

    Frames must be 1 + k * temporal factor (times the temporal patch), height and width
    multiples of spatial factor x patch.
    """
    ae, patch = self.autoencoder.config, self.dit.config.patch_size
    units = self._units()
    frames_ok = frames >= 1 and (frames - 1) % ae.temporal_factor == 0
    frames_ok = frames_ok and (1 + (frames - 1) // ae.temporal_factor) % patch[0] == 0
    sizes_ok = all(n >= u and n % u == 0 for n, u in zip((height, width), units[1:]))
    if not (frames_ok and sizes_ok):
      near = [max(u, n - n % u) for n, u in zip((height, width), units[1:])]
      raise ValueError(
          f"cannot sample {frames} frames of {height}x{width}: this model needs frames = 1 + k*"
          f"{ae.temporal_factor} (e.g. {1 + max(frames - 1, 0) // ae.temporal_factor * ae.temporal_factor})"
          f" and height, width multiples of {units[1]} and {units[2]} (autoencoder factor"
          f" {ae.spatial_factor} x patch {patch[1:]}; e.g. {near[0]}x{near[1]})."
      )
    return autoencoder_lib.latent_shape(ae, frames, height, width)

  def frames_at_most(self, n: int) -> int:
    """The most output frames the model can take that are <= n (>= 1)."""
    tf, pt = self.temporal_factor, self.dit.config.patch_size[0]
    latents = max(1, 1 + (max(n, 1) - 1) // tf)
    latents = max(pt, latents - latents % pt)
    return 1 + tf * (latents - 1)

  def draft_size(self, height: int, width: int, scale: float) -> tuple[int, int]:
    """(height, width) of a draft at `scale` of the output, rounded to sizes the model takes."""
    check_options("t2v", 0, draft_scale=scale)
    units = self._units()[1:]
    return tuple(max(u, round(n * scale / u) * u) for n, u in zip((height, width), units))

  # ---------------------------------------------------------------- jitted pieces

  def _encode_video(self, params, video_bthwc):
    mean = steps_lib.encode_video(self.autoencoder, params, video_bthwc)
    return (mean - self.latent_mean) / self.latent_std

  def _decode_latent(self, params, latent):
    z = latent * self.latent_std + self.latent_mean
    video = self.autoencoder.apply({"params": params}, z, method=self.autoencoder.decode)
    return steps_lib.video_from_model_range(video)

  def _guided_velocity(self, params, x, t_b, text, mask, given_t, given_latent, cond_noise, *, passes,
                       conditioned=True):
    """Guided velocity of all `passes` in one batched DiT call; zero at the given frames.

    x (B, T, H, W, C) with the given frames holding `given_latent`; t_b (B,) the time of the
    generated frames. The unconditional passes (0c) see the given frames noised to t_b with the
    fixed `cond_noise`, as the model saw not-given frames in training. With nothing given
    (`conditioned` False) the DiT gets one t per example, its cheaper (B,) modulation path.
    """
    batch, frames = x.shape[:2]
    t_b = t_b.astype(jnp.float32)
    given_bt = jnp.broadcast_to(given_t[None], (batch, frames))
    xs, givens, drops = [], [], []
    for with_cond, with_text, _ in passes:
      if with_cond:
        xs.append(x)
        givens.append(given_bt)
      else:
        t5 = t_b[:, None, None, None, None]
        noised = (1.0 - t5) * given_latent + t5 * cond_noise
        xs.append(jnp.where(given_t[None, :, None, None, None], noised, x))
        givens.append(jnp.zeros_like(given_bt))
      drops.append(jnp.full((batch,), not with_text))
    x_all, given_all_bt, drop = jnp.concatenate(xs), jnp.concatenate(givens), jnp.concatenate(drops)
    n = len(passes)
    t_all_b = jnp.concatenate([t_b] * n)
    text_all = jnp.concatenate([text] * n)
    mask_all = jnp.concatenate([mask] * n)
    patch = self.dit.config.patch_size
    grid = patchify.patch_grid(tuple(x.shape[1:4]), patch)
    # Per-token timesteps, the rule training uses: given tokens at t = 0.
    given_bl = conditioning.token_mask(given_all_bt, grid, patch)
    t_bl = conditioning.timesteps_with_condition(t_all_b, given_bl)
    t_model = t_bl if conditioned else t_all_b
    pred = self.dit.apply({"params": params}, x_all, t_model, text_all, mask_all, drop_text_b=drop)
    t_bt = jnp.where(given_all_bt, 0.0, t_all_b[:, None])
    v_all = flow.to_velocity(pred, x_all, t_bt, self.diffusion.prediction)
    v = sum(w * v_all[i * batch:(i + 1) * batch] for i, (_, _, w) in enumerate(passes))
    return jnp.where(given_t[None, :, None, None, None], 0.0, v)

  # ---------------------------------------------------------------- conditions

  def _encode_clips(self, clips_bthwc: np.ndarray) -> jax.Array:
    return self._encode(self.autoencoder_params, jnp.asarray(clips_bthwc))

  def _given(self, mode: str, clips: Sequence[np.ndarray], grid, frames: int) -> _Given:
    """Places the (resized, batched (1|B, n, H, W, 3)) condition clips on the latent frames."""
    num_t = grid[0]
    tf = self.temporal_factor
    given = np.zeros((num_t,), bool)
    parts = []  # (first latent frame, latent (1|B, m, H, W, C)).

    def lead(clip):
      n_used = conditioning.leading_pixel_frames(clip.shape[1], tf)
      # The LAST frames: the generated frames continue from the clip's last frame.
      latent = self._encode_clips(clip[:, clip.shape[1] - n_used:])
      parts.append((0, latent))
      return latent.shape[1]

    def trail(clip):
      padded = [conditioning.trailing_pixel_clip(c, tf) for c in clip]
      m = padded[0][1]
      latent = self._encode_clips(np.stack([p for p, _ in padded]))[:, -m:]
      parts.append((num_t - m, latent))
      return m

    if mode in ("i2v", "loop"):
      clips = [clips[0][:, :1]] * (2 if mode == "loop" else 1)
    used = 0
    if mode in ("i2v", "extend", "interpolate", "loop"):
      used += lead(clips[0])
    if mode in ("extend_backward", "interpolate", "loop"):
      used += trail(clips[-1])
    if used >= num_t:
      raise ValueError(self._frames_error(mode, clips, frames, num_t, used))
    height, width, channels = grid[1], grid[2], self.latent_mean.shape[0]
    rows = max([p[1].shape[0] for p in parts], default=1)
    latent = jnp.zeros((rows, num_t, height, width, channels), jnp.float32)
    for start, part in parts:
      latent = latent.at[:, start:start + part.shape[1]].set(part)
      given[start:start + part.shape[1]] = True
    # A temporal patch must be given or generated whole (clear error otherwise).
    patch = self.dit.config.patch_size
    conditioning.token_mask(given[None], patchify.patch_grid(tuple(grid), patch), patch)
    return _Given(given, latent)

  def _frames_error(self, mode, clips, frames, num_t, used) -> str:
    tf, pt = self.temporal_factor, self.dit.config.patch_size[0]
    lengths = " and ".join(str(c.shape[1]) for c in clips) or "a t2v sample's first"
    latents = -(-(used + 1) // pt) * pt  # One more than the condition fills, whole patches.
    need = 1 + tf * (latents - 1)
    return (
        f"mode {mode!r}: the condition ({lengths} frame(s)) takes {used} latent frame(s) and a"
        f" {frames}-frame output has {num_t}; at least one must be left to generate (a latent"
        f" frame is {tf} pixel frames after the first). Ask for more frames (--frames >= {need})"
        " or give a shorter condition clip."
    )

  # ---------------------------------------------------------------- sampling

  def _noise(self, seeds: Sequence[int], stream: int, shape) -> jax.Array:
    """Standard normal (B, *shape): sample i from fold_in(PRNGKey(seeds[i]), stream) alone."""
    keys = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(s), stream) for s in seeds])
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)

  def _resize(self, clip_bthwc: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.stack([video_io.resize_to_cover(c, height, width) for c in clip_bthwc])

  def _sample(self, prompts, seeds, mode, clips, *, frames, height, width, steps, guidance,
              cond_guidance, sampler, progress, init_video=None, strength=None, stage="",
              noise_streams=(_NOISE, _COND_NOISE)) -> np.ndarray:
    """One sampling run at one size; clips are batched (1|B, n, H, W, 3) uint8 of any H, W."""
    grid = self.latent_grid(frames, height, width)
    clips = [self._resize(c, height, width) for c in clips]
    if mode == "loop" and not clips:
      if grid[0] < 3:  # Checked before the t2v draft is spent.
        raise ValueError(self._frames_error(mode, clips, frames, grid[0], 2))
      draft = self._sample(
          prompts, seeds, "t2v", [], frames=frames, height=height, width=width, steps=steps,
          guidance=guidance, cond_guidance=cond_guidance, sampler=sampler, progress=progress,
          stage=f"{stage}loop frame ", noise_streams=(_LOOP_DRAFT, _COND_NOISE),
      )
      clips = [draft[:, :1]]
    if mode == "edit":
      init_video, clips, mode = clips[0], [], "t2v"
      if init_video.shape[1] < frames:
        raise ValueError(
            f"mode 'edit': the clip has {init_video.shape[1]} frames but the output has {frames};"
            f" edit needs at least as many (its first {frames} are used). Ask for --frames <= "
            f"{self.frames_at_most(init_video.shape[1])}.")
      init_video = init_video[:, :frames]
    given = self._given(mode, clips, grid, frames)
    channels = self.latent_mean.shape[0]
    shape = (*grid, channels)
    noise = self._noise(seeds, noise_streams[0], shape)
    cond_noise = self._noise(seeds, noise_streams[1], shape)
    batch = len(prompts)
    start = 1.0 if init_video is None else strength
    pt, ph, pw = self.dit.config.patch_size
    num_tokens = math.prod(n // p for n, p in zip(grid, (pt, ph, pw)))
    shift = steps_lib.timestep_shift(self.diffusion, num_tokens)
    timesteps = samplers.sampling_timesteps(steps, shift, start=start)
    x = noise
    if init_video is not None:
      init = self._encode_clips(init_video)
      x = (1.0 - start) * init + start * noise
    given_latent = jnp.broadcast_to(given.latent, (batch, *shape))
    given_t = jnp.asarray(given.frames_t)
    x = jnp.where(given_t[None, :, None, None, None], given_latent, x)
    text, mask = (jnp.asarray(a) for a in self.tokenizer(list(prompts)))
    passes = guidance_passes(guidance, cond_guidance, given.any)

    def velocity_fn(x, t):
      return self._velocity(
          self.dit_params, x, t, text, mask, given_t, given_latent, cond_noise, passes=passes,
          conditioned=given.any)

    name = stage + ("edit" if init_video is not None else mode)
    bar = tqdm.tqdm(total=steps, desc=f"{name} {frames}x{height}x{width}", disable=not progress, leave=False)
    integrate = samplers.heun_sample if sampler == "heun" else samplers.euler_sample
    latent = integrate(velocity_fn, x, timesteps, progress=lambda *_: bar.update(1))
    bar.close()
    return np.asarray(self._decode(self.autoencoder_params, latent))

  def generate(
      self,
      prompts: Sequence[str],
      *,
      frames: int,
      height: int,
      width: int,
      steps: int | None = None,
      guidance: float | None = None,
      seed: int = 0,
      seeds: Sequence[int] | None = None,
      progress: bool = True,
      mode: str = "t2v",
      cond: Any = None,
      strength: float | None = None,
      cond_guidance: float = 1.0,
      sampler: str | None = None,
      draft_scale: float | None = None,
      refine_strength: float = 0.5,
  ) -> np.ndarray:
    """Samples clips; returns uint8 (B, frames, height, width, 3).

    Args:
      prompts: one caption per clip (B = len(prompts) without `seeds`).
      frames, height, width: output size; see `latent_grid` for the sizes the model takes.
      steps: sampler steps (default config.diffusion.sample_steps); an edit spends them all on
        [strength, 0].
      guidance: text guidance scale s_t (default config.diffusion.guidance; 1 disables it).
      seed: without `seeds`, prompt i uses seed + i.
      seeds: one sample per (prompt, seed), prompt-major: B = len(prompts) * len(seeds). Each
        sample's noise comes from PRNGKey(its seed) alone, so it is the same in any batch.
      progress: tqdm bars for the sampler steps.
      mode: one of `MODES` (module docstring).
      cond: None, an image (H, W, 3) / clip (T, H, W, 3) uint8 of any size, or a list of them
        (`interpolate`: [clip_a, clip_b]); resized by `video_io.resize_to_cover` (scale to cover,
        area average / linear, centre crop).
      strength: `edit` only: the time t in (0, 1] the clip is noised to (default 0.6; 1 keeps
        nothing of the clip but its noise-free start).
      cond_guidance: conditioning guidance scale s_c (`guidance_passes`); 1 costs no extra pass.
      sampler: "euler" or "heun" (default config.diffusion.sampler).
      draft_scale: in (0, 1): sample at that fraction of height and width first (rounded to
        sizes the model takes), upsample it, and refine it at full size with an edit of
        `refine_strength`, keeping the mode's given frames. None: sample at full size directly.
      refine_strength: the edit strength of the refinement, in (0, 1].

    Returns:
      uint8 (B, frames, height, width, 3).
    """
    if isinstance(prompts, str):
      raise ValueError(f"prompts is the string {prompts!r}; pass a list of prompts, e.g. [{prompts!r}].")
    if not prompts:
      raise ValueError("generate() needs at least one prompt.")
    if seeds is None:
      samples = [(p, seed + i) for i, p in enumerate(prompts)]
    else:
      seeds = list(seeds)
      if not seeds or not all(isinstance(s, (int, np.integer)) for s in seeds):
        raise ValueError(f"seeds is {seeds!r}; it must be a non-empty list of integers (or None).")
      samples = [(p, int(s)) for p in prompts for s in seeds]
    prompts, sample_seeds = [p for p, _ in samples], [s for _, s in samples]
    steps = self.diffusion.sample_steps if steps is None else steps
    if not isinstance(steps, (int, np.integer)) or steps < 1:
      raise ValueError(f"steps is {steps!r}; the sampler needs an integer >= 1.")
    guidance = self.diffusion.guidance if guidance is None else guidance
    sampler = self.diffusion.sampler if sampler is None else sampler
    clips = [c[None] for c in condition_clips(mode, cond)]
    strength = check_options(
        mode, len(clips), strength=strength, sampler=sampler, draft_scale=draft_scale,
        refine_strength=refine_strength, guidance=guidance, cond_guidance=cond_guidance)
    self.latent_grid(frames, height, width)
    opts = dict(steps=steps, guidance=guidance, cond_guidance=cond_guidance, sampler=sampler,
                progress=progress)
    if draft_scale is None:
      return self._sample(prompts, sample_seeds, mode, clips, frames=frames, height=height,
                          width=width, strength=strength, **opts)
    draft_h, draft_w = self.draft_size(height, width, draft_scale)
    draft = self._sample(prompts, sample_seeds, mode, clips, frames=frames, height=draft_h,
                         width=draft_w, strength=strength, stage="draft ", **opts)
    upsampled = self._resize(draft, height, width)
    if mode == "edit":
      mode, clips = "t2v", []
    elif mode == "loop" and not clips:
      clips = [upsampled[:, :1]]  # Each sample keeps the loop frame of its own draft.
    return self._sample(
        prompts, sample_seeds, mode, clips, frames=frames, height=height, width=width,
        init_video=upsampled, strength=refine_strength, stage="refine ",
        noise_streams=(_REFINE_NOISE, _REFINE_COND_NOISE), **opts)


def write_samples(
    generator: Generator, directory: str, prompts: Sequence[str], *, write: bool = True, fps: int = 8, **kwargs
) -> list[str]:
  """Generates each prompt and writes `<directory>/<i>_<prompt>.mp4`; returns the paths.

  `kwargs` go to `Generator.generate` (one sample per prompt: not `seeds`). With
  `write=False` it only generates (the other processes of a multi-process job must join the
  computation but not write).
  """
  if kwargs.get("seeds") is not None:
    raise ValueError(
        "write_samples names one file per prompt, so it takes `seed` (prompt i uses seed + i),"
        f" not seeds={kwargs['seeds']!r}; call Generator.generate(..., seeds=...) and write the"
        " videos yourself for several seeds per prompt.")
  videos = generator.generate(prompts, **kwargs)
  if not write:
    return []
  os.makedirs(directory, exist_ok=True)
  paths = []
  for i, (prompt, video) in enumerate(zip(prompts, videos)):
    name = "".join(c if c.isalnum() else "_" for c in prompt)[:60]
    path = os.path.join(directory, f"{i:02d}_{name}.mp4")
    video_io.write_mp4(path, video, fps=fps)
    paths.append(path)
  return paths
