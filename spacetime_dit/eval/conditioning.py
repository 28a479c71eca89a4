"""Conditioning fidelity on ShapesWorld: does one checkpoint keep what it is given?

Ground-truth clips are rendered by `data_pipelines.shapesworld` (held-in "train" combinations, a
fixed seed, one size and length: the run's sample config), each with its caption as the prompt.
A trained `inference.Generator` then samples, per clip:

  i2v first-frame PSNR      generated frame 0 vs the given image (the clip's frame 0). The given
                            latent is held clean through sampling, so this measures how exactly
                            the condition survives encode -> DiT -> decode.
  extension continuity      `extend` from the clip's first n = 1 + tf*m frames (tf: temporal
                            factor; by default the frames of the first ceil(T / 2) latent
                            frames): PSNR of the first generated frame (output frame
                            n) vs the true next frame (clip frame n). Baseline for scale:
                            "repeat the last given frame", the PSNR of clip frame n - 1 vs
                            clip frame n (what one frame of motion costs); a model that
                            continues the motion beats it.
  drift                     `num_extensions` chained extensions, each conditioned on the last n
                            frames of the previous output (the first on the clip's own last n
                            frames). Per segment k: the colour-histogram distance of its new
                            frames to the original clip (colours appearing or fading away) and
                            the object persistence of its new frames (`shapesworld_score`: the
                            fraction of frames in which each prompt object is visible or
                            occluded). References: the distance of a different ground-truth clip
                            to the clip (an unrelated scene) and the ground truth's persistence.

Every figure is reported as mean, std (sample std, ddof=1; 0 for one clip), median and n over
the clips. PSNR is capped at `PSNR_CAP_DB` so that identical frames (a static object repeated
exactly) give a finite number; the median is robust to those.

Colour-histogram distance: the total-variation distance 0.5 * sum_i |p_i - q_i| between the two
clips' joint RGB histograms (`bins` per channel, every pixel of every frame, normalised to sum 1);
0 for the same colour distribution, 1 for disjoint ones. On ShapesWorld most pixels are the dark
background, so the distance is about the share of pixels whose colour changed: an object that
vanishes or changes colour costs its area fraction (about 0.1 of a frame for a medium object).

Entry point: `python -m spacetime_dit.evaluate --workdir=W --out=report.json --conditioning`
(see spacetime_dit/evaluate.py), which also writes example videos of every mode to --videos_dir.
"""

import dataclasses
import json
import logging
import math
import os
from collections.abc import Sequence

import numpy as np

from data_pipelines import shapesworld
from spacetime_dit import video_io
from spacetime_dit.eval import shapesworld_score
from spacetime_dit.eval import video_metrics

# Identical uint8 frames have infinite PSNR; a 32x32 pair differing by one level in one value
# is already at 83 dB, so 100 dB is "exact" without breaking means.
PSNR_CAP_DB = 100.0


@dataclasses.dataclass(frozen=True)
class ConditioningEvalConfig:
  """What `evaluate_conditioning` renders and samples."""

  num_clips: int = 8  # N ground-truth clips; every figure is a mean over them.
  frames: int = 9  # Pixel frames of every clip and sample (the run's config.sample.frames).
  height: int = 32  # Pixels (config.sample.height).
  width: int = 32  # Pixels (config.sample.width).
  # Pixel frames given to `extend` (1 + tf*m, fewer than `frames`); 0: default_given_frames.
  given_frames: int = 0
  num_extensions: int = 4  # Chained extensions for drift.
  steps: int | None = None  # Sampler steps; None: config.diffusion.sample_steps.
  guidance: float | None = None  # Text guidance scale; None: config.diffusion.guidance.
  seed: int = 0  # ShapesWorld seed of the ground-truth clips and base noise seed.
  histogram_bins: int = 8  # Bins per RGB channel of the colour histograms.

  def __post_init__(self):
    for name in ("num_clips", "frames", "height", "width", "num_extensions", "histogram_bins"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"{name}={getattr(self, name)}: must be >= 1.")
    if self.frames < 3:
      raise ValueError(
          f"frames={self.frames}: extension needs given frames and generated frames after them;"
          " use at least 1 + 2 * temporal factor frames (e.g. 9).")
    if not 1 <= self.histogram_bins <= 256:
      raise ValueError(f"histogram_bins={self.histogram_bins}: must be in [1, 256] per channel.")
    if self.given_frames < 0:
      raise ValueError(f"given_frames={self.given_frames}: must be >= 0 (0 picks the default).")


# ---------------------------------------------------------------------------------------------
# Pure metrics.


def frame_psnr(reference_hwc, frame_hwc, *, max_db: float = PSNR_CAP_DB) -> float:
  """PSNR (dB, data range 255) of one frame against a reference, capped at `max_db`.

  Args:
    reference_hwc: uint8 (H, W, 3) reference frame.
    frame_hwc: uint8 (H, W, 3) frame, same shape.
    max_db: returned for identical frames (and any PSNR above it).
  """
  reference_hwc, frame_hwc = np.asarray(reference_hwc), np.asarray(frame_hwc)
  if reference_hwc.ndim != 3 or frame_hwc.ndim != 3:
    raise ValueError(
        f"frame_psnr compares single frames (H, W, 3); got shapes {reference_hwc.shape} and"
        f" {frame_hwc.shape}. Index the frame first, e.g. video[t].")
  return min(video_metrics.psnr(reference_hwc[None], frame_hwc[None]), max_db)


def colour_histogram(video_thwc, bins: int = 8) -> np.ndarray:
  """float64 (bins**3,) joint RGB histogram of every pixel of a clip, summing to 1.

  Channel value v falls in bin floor(v * bins / 256).
  """
  video_thwc = np.asarray(video_thwc)
  if video_thwc.dtype != np.uint8 or video_thwc.ndim != 4 or video_thwc.shape[-1] != 3:
    raise ValueError(
        f"colour_histogram needs a uint8 (T, H, W, 3) clip; got {video_thwc.dtype}"
        f" {video_thwc.shape}. Add a frame axis to images: image[None].")
  q = (video_thwc.reshape(-1, 3).astype(np.int64) * bins) // 256
  index = (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]
  counts = np.bincount(index, minlength=bins**3).astype(np.float64)
  return counts / counts.sum()


def histogram_distance(a_thwc, b_thwc, bins: int = 8) -> float:
  """Total-variation distance in [0, 1] between two clips' colour histograms (any sizes)."""
  p, q = colour_histogram(a_thwc, bins), colour_histogram(b_thwc, bins)
  return float(0.5 * np.abs(p - q).sum())


def persistence(video_thwc, prompt: str) -> float:
  """Mean over the prompt's objects of the fraction of frames where each is visible or occluded."""
  return float(shapesworld_score.score_video(np.asarray(video_thwc), prompt)["persistence"])


def summarize(values: Sequence[float]) -> dict:
  """{"mean", "std", "median", "n"} of per-clip values; std is the sample std (ddof=1, 0 if n=1)."""
  values = np.asarray([float(v) for v in values], np.float64)
  if values.size == 0:
    return {"mean": None, "std": None, "median": None, "n": 0}
  std = float(np.std(values, ddof=1)) if values.size > 1 else 0.0
  return {"mean": float(values.mean()), "std": std, "median": float(np.median(values)),
          "n": int(values.size)}


def default_given_frames(frames: int, temporal_factor: int) -> int:
  """Pixel frames that give the first ceil(T / 2) of the T latent frames (at least one generated).

  Pixel frame 0 is latent frame 0 alone (causal autoencoder); latent j >= 1 covers pixel frames
  tf*(j-1)+1 .. tf*j. Giving 1 + tf*m pixel frames gives exactly latent frames 0..m. E.g. 9
  frames at tf = 2: T = 5, latents 0..2 given = pixel frames 0..4, frames 5..8 generated.
  """
  latents = 1 + (frames - 1) // temporal_factor
  m = min(math.ceil(latents / 2) - 1, latents - 2)
  return 1 + temporal_factor * max(m, 0)


def check_given_frames(given: int, frames: int, temporal_factor: int) -> None:
  """Raises unless `given` pixel frames are whole latent frames and leave some to generate."""
  if given < 1 or (given - 1) % temporal_factor or given + temporal_factor > frames:
    raise ValueError(
        f"given_frames={given} with frames={frames}: extension needs 1 + {temporal_factor}*m"
        f" given frames (whole latent frames of the temporal factor {temporal_factor}) with at"
        f" least one latent frame ({temporal_factor} pixel frames) left to generate, e.g."
        f" {default_given_frames(frames, temporal_factor)}.")


# ---------------------------------------------------------------------------------------------
# Ground truth and the driver.


def world_config(data_cfg, *, frames: int, height: int, width: int, seed: int):
  """The run's ShapesWorld distribution (objects, holdout, pans) at one size and length."""
  return shapesworld.ShapesWorldConfig(
      seed=seed, sizes=((height, width),), lengths=(frames,), max_objects=data_cfg.max_objects,
      holdout=tuple(tuple(h) for h in data_cfg.holdout), camera_pan_prob=data_cfg.camera_pan_prob,
  )


def ground_truth_clips(world_cfg, num: int) -> list:
  """Examples 0..num-1 of the "train" split (held-in combinations): video, caption, truth."""
  source = shapesworld.ShapesWorld(world_cfg, split="train")
  return [source.example(i) for i in range(num)]


def temporal_factor_of(generator) -> int:
  """The autoencoder's temporal factor (pixel frames per latent frame after the first)."""
  return int(generator.autoencoder.config.temporal_factor)


def _sample(generator, prompt, cfg, seed, **kwargs) -> np.ndarray:
  """One uint8 (frames, H, W, 3) sample of `prompt` (its noise from `seed` alone)."""
  return np.asarray(generator.generate(
      [prompt], frames=cfg.frames, height=cfg.height, width=cfg.width, steps=cfg.steps,
      guidance=cfg.guidance, seeds=[seed], progress=False, **kwargs)[0])


def evaluate_clip(generator, example, reference_video, cfg: ConditioningEvalConfig, given: int,
                  index: int) -> tuple[dict, dict]:
  """All conditioning figures of one ground-truth clip.

  Args:
    generator: an `inference.Generator` (or any object with its `generate` signature).
    example: a `shapesworld.Example` of cfg's size and length.
    reference_video: another ground-truth clip (an unrelated scene) for the histogram reference.
    cfg: the evaluation settings.
    given: pixel frames given to `extend` (1 + tf*m).
    index: the clip's number; noise seeds derive from it.

  Returns:
    (row of JSON figures, dict of the videos made: "ground_truth", "i2v", "extend", "drift").
  """
  video, prompt = example.video, example.caption
  seed = cfg.seed + 1000 * index
  i2v = _sample(generator, prompt, cfg, seed, mode="i2v", cond=video[0])
  extend = _sample(generator, prompt, cfg, seed + 1, mode="extend", cond=video[:given])
  # Drift: each extension sees only the last `given` frames of what came before.
  tail, new_frames, segments = video[-given:], [], []
  for k in range(cfg.num_extensions):
    out = _sample(generator, prompt, cfg, seed + 2 + k, mode="extend", cond=tail)
    new = out[given:]
    segments.append({
        "histogram_distance": histogram_distance(new, video, cfg.histogram_bins),
        "persistence": persistence(new, prompt),
    })
    new_frames.append(new)
    tail = out[-given:]
  row = {
      "index": int(example.index),
      "prompt": prompt,
      "i2v_first_frame_psnr": frame_psnr(video[0], i2v[0]),
      "extend_first_generated_psnr": frame_psnr(video[given], extend[given]),
      "extend_repeat_last_psnr": frame_psnr(video[given], video[given - 1]),
      "drift": segments,
      "reference_histogram_distance": histogram_distance(reference_video, video, cfg.histogram_bins),
      "ground_truth_persistence": persistence(video, prompt),
  }
  videos = {"ground_truth": video, "i2v": i2v, "extend": extend,
            "drift": np.concatenate([video, *new_frames])}
  return row, videos


def evaluate_conditioning(generator, world_cfg, cfg: ConditioningEvalConfig, *,
                          videos_dir: str = "", fps: int = 8) -> dict:
  """Renders cfg.num_clips ground-truth clips, samples every conditioning task, reports figures.

  Args:
    generator: an `inference.Generator`.
    world_cfg: the `ShapesWorldConfig` to render from (see `world_config`); its sizes and lengths
      must be cfg's (height, width) and frames.
    cfg: the evaluation settings.
    videos_dir: if set, writes each clip's ground truth, i2v, extend and drift chain there as
      `<task>_<clip>.mp4`.
    fps: frame rate of the written videos.

  Returns:
    JSON-ready dict: the settings, "i2v", "extend", "drift" summaries (see the module
    docstring) and the per-clip rows under "clips".
  """
  if tuple(world_cfg.sizes) != ((cfg.height, cfg.width),) or tuple(world_cfg.lengths) != (cfg.frames,):
    raise ValueError(
        f"world_cfg renders sizes {world_cfg.sizes} and lengths {world_cfg.lengths}, but the"
        f" evaluation samples {cfg.frames} frames of {cfg.height}x{cfg.width}; build it with"
        " conditioning.world_config(..., frames=cfg.frames, height=cfg.height, width=cfg.width).")
  tf = temporal_factor_of(generator)
  given = cfg.given_frames or default_given_frames(cfg.frames, tf)
  check_given_frames(given, cfg.frames, tf)
  # One more clip than scored: clip i's unrelated-scene reference is clip i + 1.
  examples = ground_truth_clips(world_cfg, cfg.num_clips + 1)
  rows = []
  for i in range(cfg.num_clips):
    row, videos = evaluate_clip(generator, examples[i], examples[i + 1].video, cfg, given, i)
    rows.append(row)
    if videos_dir:
      os.makedirs(videos_dir, exist_ok=True)
      for task, video in videos.items():
        video_io.write_mp4(os.path.join(videos_dir, f"{task}_{i:03d}.mp4"), video, fps=fps)
    logging.info("conditioning: clip %d/%d", i + 1, cfg.num_clips)
  drift = []
  for k in range(cfg.num_extensions):
    drift.append({
        "segment": k + 1,
        "histogram_distance": summarize([r["drift"][k]["histogram_distance"] for r in rows]),
        "persistence": summarize([r["drift"][k]["persistence"] for r in rows]),
    })
  return {
      "settings": {**dataclasses.asdict(cfg), "given_frames": given, "temporal_factor": tf,
                   "split": "train", "psnr_cap_db": PSNR_CAP_DB},
      "i2v": {"first_frame_psnr": summarize([r["i2v_first_frame_psnr"] for r in rows])},
      "extend": {
          "first_generated_psnr": summarize([r["extend_first_generated_psnr"] for r in rows]),
          "repeat_last_psnr": summarize([r["extend_repeat_last_psnr"] for r in rows]),
      },
      "drift": {
          "segments": drift,
          "reference_histogram_distance": summarize(
              [r["reference_histogram_distance"] for r in rows]),
          "ground_truth_persistence": summarize([r["ground_truth_persistence"] for r in rows]),
      },
      "clips": rows,
  }


# ---------------------------------------------------------------------------------------------
# One example video per sampling mode.


def mode_examples(example, given: int) -> list[tuple[str, dict]]:
  """(name, `generate` kwargs) of one sample per sampling mode from one ground-truth clip."""
  video = example.video
  return [
      ("t2v", {"mode": "t2v"}),
      ("i2v", {"mode": "i2v", "cond": video[0]}),
      ("extend", {"mode": "extend", "cond": video[:given]}),
      ("extend_backward", {"mode": "extend_backward", "cond": video[-given:]}),
      ("interpolate", {"mode": "interpolate", "cond": [video[0], video[-1]]}),
      ("loop", {"mode": "loop", "cond": video[0]}),
      ("edit", {"mode": "edit", "cond": video, "strength": 0.6}),
      ("draft_refine", {"mode": "t2v", "draft_scale": 0.5, "refine_strength": 0.5}),
  ]


def _describe(kwargs: dict) -> dict:
  """The JSON form of generate kwargs: arrays become their shapes."""
  out = {}
  for key, value in kwargs.items():
    if isinstance(value, np.ndarray):
      out[key] = f"uint8 {list(value.shape)} from the ground-truth clip"
    elif isinstance(value, list):
      out[key] = [f"uint8 {list(v.shape)} from the ground-truth clip" for v in value]
    else:
      out[key] = value
  return out


def write_mode_examples(generator, world_cfg, cfg: ConditioningEvalConfig, videos_dir: str, *,
                        fps: int = 8) -> list[dict]:
  """Writes `<videos_dir>/mode_<name>.mp4` for every sampling mode and an index.json.

  The conditions come from ground-truth clip 0 (written as `mode_ground_truth.mp4`); index.json
  records, per file, the prompt and every `generate` argument, so each sample can be re-made
  with `python -m spacetime_dit.sample` and the matching --mode/--cond flags.
  """
  example = ground_truth_clips(world_cfg, 1)[0]
  tf = temporal_factor_of(generator)
  given = cfg.given_frames or default_given_frames(cfg.frames, tf)
  os.makedirs(videos_dir, exist_ok=True)
  video_io.write_mp4(os.path.join(videos_dir, "mode_ground_truth.mp4"), example.video, fps=fps)
  index = [{"file": "mode_ground_truth.mp4", "prompt": example.caption,
            "source": f"ShapesWorld train split, seed {world_cfg.seed}, index 0"}]
  for name, kwargs in mode_examples(example, given):
    video = _sample(generator, example.caption, cfg, cfg.seed, **kwargs)
    path = f"mode_{name}.mp4"
    video_io.write_mp4(os.path.join(videos_dir, path), video, fps=fps)
    index.append({"file": path, "prompt": example.caption, "seed": cfg.seed,
                  "frames": cfg.frames, "height": cfg.height, "width": cfg.width,
                  "steps": cfg.steps, "guidance": cfg.guidance, **_describe(kwargs)})
  with open(os.path.join(videos_dir, "index.json"), "w", encoding="utf-8") as f:
    json.dump(index, f, indent=2)
  return index
