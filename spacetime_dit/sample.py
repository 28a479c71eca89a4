"""Samples a video from a trained text-to-video run.

  python -m spacetime_dit.sample --workdir=runs/quickstart \\
      --prompt="a red circle moving right" --out=clip.mp4 --frames=9 --height=32 --width=48

Any (frames, height, width) the autoencoder's factors and the DiT patch allow works:
portrait, landscape, and a single frame (an image). Writes a real H.264 mp4 of exactly
that size (and a gif with --gif).
"""

import logging

from absl import flags

from spacetime_dit import cli
from spacetime_dit import inference
from spacetime_dit import video_io
from spacetime_dit.training import builders

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished `experiments/base.py` training workdir.")
_PROMPT = flags.DEFINE_string("prompt", None, "What the clip should show.")
_OUT = flags.DEFINE_string("out", "sample.mp4", "Output mp4 path.")
_GIF = flags.DEFINE_string("gif", "", "Also write a gif to this path.")
_FRAMES = flags.DEFINE_integer("frames", None, "Frames (1 + k * temporal factor); default: the config's.")
_HEIGHT = flags.DEFINE_integer("height", None, "Pixels; a multiple of spatial factor x patch.")
_WIDTH = flags.DEFINE_integer("width", None, "Pixels; a multiple of spatial factor x patch.")
_STEPS = flags.DEFINE_integer("steps", None, "Sampler steps; default: config.diffusion.sample_steps.")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Classifier-free guidance scale; 1 disables it.")
_SEED = flags.DEFINE_integer("seed", 0, "Noise seed.")
_FPS = flags.DEFINE_integer("fps", 8, "Frame rate of the written clip.")
flags.mark_flags_as_required(["workdir", "prompt"])


def main(argv):
  del argv  # Checked by cli.run.
  cli.use_fast_cpu_convolutions()
  sample_cfg = builders.load_config(_WORKDIR.value).sample
  generator = inference.Generator.from_workdir(_WORKDIR.value)
  frames = _FRAMES.value or sample_cfg.frames
  height = _HEIGHT.value or sample_cfg.height
  width = _WIDTH.value or sample_cfg.width
  video = generator.generate(
      [_PROMPT.value], frames=frames, height=height, width=width, steps=_STEPS.value,
      guidance=_GUIDANCE.value, seed=_SEED.value,
  )[0]
  video_io.write_mp4(_OUT.value, video, fps=_FPS.value)
  logging.info("wrote %s (%d frames, %dx%d)", _OUT.value, frames, height, width)
  if _GIF.value:
    video_io.write_gif(_GIF.value, video, fps=_FPS.value)
    logging.info("wrote %s", _GIF.value)


if __name__ == "__main__":
  cli.run(main)
