"""Samples videos from a trained text-to-video run, from text and optionally images/videos.

  python -m spacetime_dit.sample --workdir=runs/quickstart \\
      --prompt="a red circle moving right" --out=clip.mp4 --frames=9 --height=32 --width=48
  python -m spacetime_dit.sample --workdir=W --prompt="..." --mode=i2v --cond=first.png --out=a.mp4
  python -m spacetime_dit.sample --workdir=W --prompt="..." --mode=extend --cond=clip.mp4 --frames=17
  python -m spacetime_dit.sample --workdir=W --prompt="..." --mode=interpolate --cond=a.mp4 --cond=b.png
  python -m spacetime_dit.sample --workdir=W --prompt="..." --mode=edit --cond=clip.mp4 --strength=0.6
  python -m spacetime_dit.sample --workdir=W --prompt="..." --seeds=0,1,2 --sampler=heun --draft_scale=0.5

Modes (see `spacetime_dit.inference`): t2v, i2v (image -> frame 0), extend (clip -> leading
frames), extend_backward (clip -> trailing frames), interpolate (two files: leading and trailing),
loop (optional image; first and last frame the same), edit (SDEdit with --strength). Condition
files are any image or video FFmpeg reads, of any size: resized to the output by "scale to cover,
area average (linear when enlarging), centre crop".

Any (frames, height, width) the autoencoder's factors and the DiT patch allow works: portrait,
landscape, and a single frame (an image). Writes real H.264 mp4s of exactly that size, one per
sample: --out, then <out>_1.mp4, <out>_2.mp4, ... (and gifs alike with --gif).
"""

import logging
import os

from absl import flags

from spacetime_dit import cli
from spacetime_dit import inference
from spacetime_dit import video_io
from spacetime_dit.training import builders

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished `experiments/base.py` training workdir.")
_PROMPT = flags.DEFINE_string("prompt", None, "What the clip should show.")
_OUT = flags.DEFINE_string("out", "sample.mp4", "Output mp4 path (more samples: <out>_1.mp4, ...).")
_GIF = flags.DEFINE_string("gif", "", "Also write gifs, to this path (<gif>_1.gif, ... for more samples).")
_FRAMES = flags.DEFINE_integer(
    "frames", None, "Frames (1 + k * temporal factor); default: the config's (edit: the clip's).")
_HEIGHT = flags.DEFINE_integer("height", None, "Pixels; a multiple of spatial factor x patch.")
_WIDTH = flags.DEFINE_integer("width", None, "Pixels; a multiple of spatial factor x patch.")
_STEPS = flags.DEFINE_integer("steps", None, "Sampler steps; default: config.diffusion.sample_steps.")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Text classifier-free guidance scale; 1 disables it.")
_COND_GUIDANCE = flags.DEFINE_float(
    "cond_guidance", 1.0, "Guidance scale of the image/video condition (InstructPix2Pix-style);"
    " 1 disables it (no extra pass).")
_SEED = flags.DEFINE_integer("seed", 0, "Noise seed (with --num_samples: seed, seed+1, ...).")
_SEEDS = flags.DEFINE_string("seeds", "", "Comma-separated seeds, one sample each, e.g. 0,1,2.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", None, "Samples with seeds --seed, --seed+1, ...")
_MODE = flags.DEFINE_enum("mode", "t2v", inference.MODES, "Sampling mode.")
_COND = flags.DEFINE_multi_string(
    "cond", [], "Condition image or video file (any size); give it twice for --mode=interpolate.")
_STRENGTH = flags.DEFINE_float(
    "strength", None, f"--mode=edit: noise level in (0, 1] (default {inference.DEFAULT_EDIT_STRENGTH}).")
_SAMPLER = flags.DEFINE_string("sampler", None, "euler | heun; default: config.diffusion.sampler.")
_DRAFT_SCALE = flags.DEFINE_float(
    "draft_scale", None, "In (0, 1): draft at this fraction of height/width, then refine at full size.")
_REFINE_STRENGTH = flags.DEFINE_float("refine_strength", 0.5, "Edit strength of the refinement of a draft.")
_FPS = flags.DEFINE_integer("fps", 8, "Frame rate of the written clip.")
_EMA = flags.DEFINE_bool(
    "ema", True, "Sample with the EMA of the DiT's weights when the checkpoint has one; --noema:"
    " the raw trained weights.")
flags.mark_flags_as_required(["workdir", "prompt"])


def parse_seeds(seeds: str, num_samples: int | None, seed: int) -> list[int]:
  """Seeds of the samples from --seeds / --num_samples / --seed."""
  if seeds and num_samples is not None:
    raise ValueError(f"--seeds={seeds} and --num_samples={num_samples} both choose the samples; pass one.")
  if seeds:
    try:
      return [int(s) for s in seeds.split(",")]
    except ValueError:
      raise ValueError(f"--seeds={seeds!r} is not a comma-separated list of integers (e.g. 0,1,2).") from None
  if num_samples is not None and num_samples < 1:
    raise ValueError(f"--num_samples is {num_samples}; it must be >= 1.")
  return [seed + i for i in range(num_samples or 1)]


def numbered_path(path: str, index: int) -> str:
  """`path` for sample 0, `<stem>_<index><ext>` after it."""
  if index == 0:
    return path
  stem, ext = os.path.splitext(path)
  return f"{stem}_{index}{ext}"


def read_condition(path: str, mode: str):
  """A --cond file as uint8 (T, H, W, 3); image modes read only the first frame."""
  if mode in ("i2v", "loop"):
    return video_io.read_image(path)
  return video_io.read_video(path)


def main(argv):
  del argv  # Checked by cli.run.
  mode = _MODE.value
  # Cheap checks first: no model is loaded for a bad command line.
  inference.check_options(
      mode, len(_COND.value), strength=_STRENGTH.value, sampler=_SAMPLER.value,
      draft_scale=_DRAFT_SCALE.value, refine_strength=_REFINE_STRENGTH.value,
      cond_guidance=_COND_GUIDANCE.value, guidance=1.0 if _GUIDANCE.value is None else _GUIDANCE.value)
  seeds = parse_seeds(_SEEDS.value, _NUM_SAMPLES.value, _SEED.value)
  cond = [read_condition(path, mode) for path in _COND.value]
  cli.use_fast_cpu_convolutions()
  sample_cfg = builders.load_config(_WORKDIR.value).sample
  generator = inference.Generator.from_workdir(_WORKDIR.value, use_ema=_EMA.value)
  frames = _FRAMES.value
  if frames is None:
    frames = generator.frames_at_most(cond[0].shape[0]) if mode == "edit" else sample_cfg.frames
  height = _HEIGHT.value or sample_cfg.height
  width = _WIDTH.value or sample_cfg.width
  videos = generator.generate(
      [_PROMPT.value], frames=frames, height=height, width=width, steps=_STEPS.value,
      guidance=_GUIDANCE.value, seeds=seeds, mode=mode, cond=cond or None, strength=_STRENGTH.value,
      cond_guidance=_COND_GUIDANCE.value, sampler=_SAMPLER.value, draft_scale=_DRAFT_SCALE.value,
      refine_strength=_REFINE_STRENGTH.value,
  )
  for i, (seed, video) in enumerate(zip(seeds, videos)):
    path = numbered_path(_OUT.value, i)
    video_io.write_mp4(path, video, fps=_FPS.value)
    logging.info("wrote %s (%s, seed %d, %d frames, %dx%d)", path, mode, seed, frames, height, width)
    if _GIF.value:
      gif = numbered_path(_GIF.value, i)
      video_io.write_gif(gif, video, fps=_FPS.value)
      logging.info("wrote %s", gif)


if __name__ == "__main__":
  cli.run(main)
