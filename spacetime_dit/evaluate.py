"""Scores a trained text-to-video run on ShapesWorld prompts.

  python -m spacetime_dit.evaluate --workdir=runs/quickstart --out=report.json
  python -m spacetime_dit.evaluate --workdir=runs/quickstart --out=report.json \
      --conditioning --videos_dir=runs/quickstart/eval_videos

Draws prompts from the ShapesWorld caption grammar (the training split by default, or the
held-out combinations with --split=holdout), samples one clip per prompt at the native
sizes the run trained on, detects each object by colour and reports the fraction of clips
with the right colour, shape, direction of motion, and persistence across frames.

--conditioning adds a "conditioning" section (`spacetime_dit.eval.conditioning`): on
--conditioning_clips ground-truth ShapesWorld clips at the run's sample size (config.sample;
--frames overrides the length), i2v first-frame PSNR, extension continuity (PSNR of the first
generated frame vs the true next frame, with the repeat-last-frame baseline) and drift over
--num_extensions chained extensions (colour-histogram distance, object persistence). With
--videos_dir it also writes each clip's ground truth, i2v, extend and drift chain, and one sample
of every sampling mode (mode_*.mp4, with index.json recording how each was made).
"""

import itertools
import json
import logging
import os

from absl import flags

from spacetime_dit import cli
from spacetime_dit import config_types
from spacetime_dit import inference
from spacetime_dit import video_io
from spacetime_dit.eval import conditioning as conditioning_eval
from spacetime_dit.eval import shapesworld_score
from spacetime_dit.training import builders
from spacetime_dit.training import data as data_lib
from data_pipelines import shapesworld

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished `experiments/base.py` training workdir.")
_OUT = flags.DEFINE_string("out", "report.json", "Where to write the JSON report.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 32, "Prompts to sample and score.")
_SPLIT = flags.DEFINE_enum("split", "train", ["train", "holdout"], "Prompt combinations to draw.")
_FRAMES = flags.DEFINE_integer("frames", None, "Frames per clip; default: the longest trained length.")
_STEPS = flags.DEFINE_integer("steps", None, "Sampler steps; default: config.diffusion.sample_steps.")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Guidance scale; default: config.diffusion.guidance.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Clips sampled together.")
_SEED = flags.DEFINE_integer("seed", 0, "Prompt and noise seed.")
_VIDEOS = flags.DEFINE_string(
    "videos_dir", "", "Also write every scored clip here as mp4 (and, with --conditioning, every mode).")
_CONDITIONING = flags.DEFINE_bool(
    "conditioning", False, "Add the conditioning-fidelity section (i2v, extension, drift).")
_COND_CLIPS = flags.DEFINE_integer(
    "conditioning_clips", 8, "Ground-truth clips for --conditioning; figures are mean ± std over them.")
_EXTENSIONS = flags.DEFINE_integer("num_extensions", 4, "Chained extensions for the drift figures.")
_GIVEN = flags.DEFINE_integer(
    "given_frames", 0, "Pixel frames given to extend (1 + temporal factor * m); 0: half the latents.")
flags.mark_flags_as_required(["workdir"])


def evaluate(generator, data_cfg, *, num_prompts, split, frames, steps, guidance, batch_size, seed, videos_dir=""):
  """Samples `num_prompts` clips (cycling through the trained sizes) and scores them."""
  world_cfg = data_lib.make_source(data_cfg).config
  prompts = shapesworld.sample_prompts(world_cfg, num_prompts, seed=seed, split=split, num_objects=1)
  sizes = itertools.cycle(tuple(tuple(s) for s in data_cfg.sizes))
  rows = []
  for start in range(0, num_prompts, batch_size):
    chunk = prompts[start:start + batch_size]
    height, width = next(sizes)
    videos = generator.generate(
        chunk, frames=frames, height=height, width=width, steps=steps, guidance=guidance,
        seed=seed + start, progress=False,
    )
    for offset, (prompt, video) in enumerate(zip(chunk, videos)):
      score = shapesworld_score.score_video(video, prompt)
      rows.append({"prompt": prompt, "size": [frames, height, width], **_plain(score)})
      if videos_dir:
        os.makedirs(videos_dir, exist_ok=True)
        video_io.write_mp4(os.path.join(videos_dir, f"{start + offset:03d}.mp4"), video)
    logging.info("scored %d/%d", len(rows), num_prompts)
  summary = {}
  for key in ("colour", "shape", "motion", "persistence"):
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    summary[key] = sum(values) / len(values) if values else None
  return {"split": split, "num_prompts": num_prompts, "frames": frames, "summary": summary, "clips": rows}


def _plain(value):
  """Makes a score dict JSON-serialisable (numpy scalars and tuples)."""
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if hasattr(value, "item"):
    return value.item()
  return value


def main(argv):
  del argv  # Checked by cli.run.
  cli.use_fast_cpu_convolutions()
  config = builders.load_config(_WORKDIR.value)
  data_cfg = config_types.dataclass_from_config(config_types.DataConfig, config.data, path="config.data")
  generator = inference.Generator.from_workdir(_WORKDIR.value)
  report = evaluate(
      generator, data_cfg, num_prompts=_NUM_PROMPTS.value, split=_SPLIT.value,
      frames=_FRAMES.value or max(data_cfg.lengths), steps=_STEPS.value, guidance=_GUIDANCE.value,
      batch_size=_BATCH.value, seed=_SEED.value, videos_dir=_VIDEOS.value,
  )
  if _CONDITIONING.value:
    report["conditioning"] = evaluate_conditioning(generator, config, data_cfg)
  with open(_OUT.value, "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  print(json.dumps(report["summary"], indent=2))
  if _CONDITIONING.value:
    section = report["conditioning"]
    print(json.dumps({k: section[k] for k in ("i2v", "extend", "drift")}, indent=2))


def evaluate_conditioning(generator, config, data_cfg) -> dict:
  """The "conditioning" section from the flags, at the run's sample size."""
  cfg = conditioning_eval.ConditioningEvalConfig(
      num_clips=_COND_CLIPS.value, frames=_FRAMES.value or config.sample.frames,
      height=config.sample.height, width=config.sample.width, given_frames=_GIVEN.value,
      num_extensions=_EXTENSIONS.value, steps=_STEPS.value, guidance=_GUIDANCE.value,
      seed=_SEED.value,
  )
  world = conditioning_eval.world_config(
      data_cfg, frames=cfg.frames, height=cfg.height, width=cfg.width, seed=cfg.seed)
  section = conditioning_eval.evaluate_conditioning(generator, world, cfg, videos_dir=_VIDEOS.value)
  if _VIDEOS.value:
    section["mode_examples"] = conditioning_eval.write_mode_examples(generator, world, cfg, _VIDEOS.value)
  return section


if __name__ == "__main__":
  cli.run(main)
