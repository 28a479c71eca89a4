"""The ShapesWorld benchmark of a trained text-to-video run: JSON, a markdown report and plots.

  python -m spacetime_dit.evaluate --workdir=runs/quickstart
  python -m spacetime_dit.evaluate --workdir=runs/quickstart --parts=sampling,val_loss --num_prompts=8

writes into --out_dir (default <workdir>/eval/): report.json (--out moves it), report.md and PNG
plots. Its parts (--parts, all by default; `spacetime_dit.eval.report` renders them):

  sampling      Prompts from the ShapesWorld caption grammar, the training combinations and,
                reported separately, the held-out ones (--split filters), one clip each at the
                native sizes the run trained on, scored by colour detection
                (`eval.shapesworld_score`): colour, shape, direction of motion, constant velocity
                (RMS residual of the track from a constant-velocity fit, px) and persistence.
  conditioning  Conditioning fidelity (`eval.conditioning`): i2v first-frame PSNR, extension
                continuity against the repeat-last-frame baseline, drift over chained extensions
                (--noconditioning also skips it). --videos_dir also gets one sample of every mode.
  autoencoder   PSNR / SSIM / flicker of the run's autoencoder on unseen ShapesWorld clips
                (`eval.video_metrics`, as `eval.autoencoder` measures them).
  val_loss      The rectified-flow loss of the DiT on unseen ShapesWorld clips per (T, H, W) cell
                of the config and per noise level (`eval.validation_loss`).
  fvd           Fréchet video distance between the sampled training-prompt clips and as many
                ground-truth clips; needs --fvd_weights (a feature network the user brings, e.g.
                the standard I3D weights; `eval.fvd`), else the report says it was skipped.

Unseen clips (conditioning, autoencoder, val_loss, fvd) come from --eval_seed (default
data.seed + 1), never the training seed. The top-level "split", "num_prompts", "frames",
"clips" and the unprefixed summary scores are the first evaluated split's (train unless
--split=holdout), as the one-split report of earlier versions had them; the other split's
scores are "holdout_<score>".
"""

import collections
import dataclasses
import itertools
import logging
import os
import shlex
import sys
import time

from absl import flags
import numpy as np

from data_pipelines import atomic_files
from data_pipelines import shapesworld
from spacetime_dit import cli
from spacetime_dit import config_types
from spacetime_dit import inference
from spacetime_dit import video_io
from spacetime_dit.eval import autoencoder as ae_eval
from spacetime_dit.eval import conditioning as conditioning_eval
from spacetime_dit.eval import report as report_lib
from spacetime_dit.eval import shapesworld_score
from spacetime_dit.eval import validation_loss
from spacetime_dit.eval import video_metrics
from spacetime_dit.training import builders
from spacetime_dit.training import checkpointing
from spacetime_dit.training import data as data_lib

PARTS = ("sampling", "conditioning", "autoencoder", "val_loss", "fvd")
SPLITS = ("train", "holdout")
SCORES = ("colour", "shape", "motion", "persistence", "velocity_residual")

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command-line flags; only when run as a program, so that importing this module
  (tests, notebooks) never clashes with another entry point's flags."""
  flags.DEFINE_string("workdir", None, "A finished `experiments/base.py` training workdir.")
  flags.DEFINE_string("out_dir", "", "Report directory; default <workdir>/eval.")
  flags.DEFINE_string("out", "", "Path of the JSON report; default <out_dir>/report.json.")
  flags.DEFINE_list("parts", list(PARTS), f"Parts to run, a subset of {','.join(PARTS)}.")
  flags.DEFINE_integer("num_prompts", 32, "Prompts sampled and scored per split.")
  flags.DEFINE_enum("split", "both", ["both", *SPLITS], "Prompt combinations to sample.")
  flags.DEFINE_integer("frames", None, "Frames per clip; default: the longest trained length.")
  flags.DEFINE_integer("steps", None, "Sampler steps; default: config.diffusion.sample_steps.")
  flags.DEFINE_float("guidance", None, "Guidance scale; default: config.diffusion.guidance.")
  flags.DEFINE_integer("batch_size", 8, "Clips sampled together.")
  flags.DEFINE_integer("seed", 0, "Prompt and noise seed.")
  flags.DEFINE_string(
      "videos_dir", "", "Also write every scored clip here as mp4 (and every conditioning mode).")
  flags.DEFINE_bool("conditioning", True, "Run the conditioning part (--noconditioning skips it).")
  flags.DEFINE_integer(
      "conditioning_clips", 8, "Ground-truth clips of the conditioning part (mean ± std over them).")
  flags.DEFINE_integer("num_extensions", 4, "Chained extensions for the drift figures.")
  flags.DEFINE_integer(
      "given_frames", 0, "Pixel frames given to extend (1 + temporal factor * m); 0: half the latents.")
  flags.DEFINE_integer("ae_clips", 4, "ShapesWorld clips of the autoencoder part.")
  flags.DEFINE_integer("val_clips", 4, "Clips per (T, H, W) cell of the validation loss.")
  flags.DEFINE_integer("val_levels", 10, "Noise levels (equal bins of t) of the validation loss.")
  flags.DEFINE_integer(
      "eval_seed", None, "ShapesWorld seed of the unseen clips; default data.seed + 1.")
  flags.DEFINE_string(
      "fvd_weights", "", "Feature-network weights for FVD (e.g. I3D; bring your own); empty: skip.")
  flags.DEFINE_integer("fvd_batch_size", 8, "Clips per feature-network call.")
  flags.mark_flags_as_required(["workdir"])


@dataclasses.dataclass(frozen=True)
class BenchmarkOptions:
  """What `run_benchmark` runs (the flags, checked)."""

  parts: tuple[str, ...] = PARTS
  splits: tuple[str, ...] = SPLITS
  num_prompts: int = 32  # Per split.
  frames: int | None = None  # None: the longest trained length.
  steps: int | None = None  # None: config.diffusion.sample_steps.
  guidance: float | None = None  # None: config.diffusion.guidance.
  batch_size: int = 8
  seed: int = 0  # Prompt and sampling-noise seed.
  videos_dir: str = ""
  conditioning_clips: int = 8
  num_extensions: int = 4
  given_frames: int = 0
  ae_clips: int = 4
  val_clips: int = 4
  val_levels: int = 10
  eval_seed: int | None = None  # None: data.seed + 1.
  fvd_weights: str = ""
  fvd_batch_size: int = 8

  def __post_init__(self):
    unknown = [p for p in self.parts if p not in PARTS]
    if unknown or not self.parts:
      raise ValueError(
          f"--parts={','.join(self.parts)}: unknown part(s) {unknown} or none; choose from"
          f" {','.join(PARTS)}.")
    if not self.splits or any(s not in SPLITS for s in self.splits):
      raise ValueError(f"splits={self.splits}: must be a non-empty subset of {SPLITS}.")
    for name in ("num_prompts", "given_frames"):
      if getattr(self, name) < 0:
        raise ValueError(f"--{name}={getattr(self, name)} must be >= 0.")
    for name in ("batch_size", "ae_clips", "val_clips", "val_levels", "fvd_batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name}={getattr(self, name)} must be >= 1.")
    if self.fvd_weights and not os.path.exists(self.fvd_weights):
      raise FileNotFoundError(
          f"--fvd_weights={self.fvd_weights} does not exist; pass the feature network's weights"
          " file (see the README, Evaluation: FVD), or leave it empty to skip FVD.")


# ----------------------------------------------------------------------------- sampling


def _clip_residual(score: dict) -> float | None:
  """Mean over the prompt's objects of the constant-velocity fit residual (px), or None."""
  values = [o["velocity_residual"] for o in score["objects"] if o["velocity_residual"] is not None]
  return float(np.mean(values)) if values else None


def sample_and_score(generator, data_cfg, *, num_prompts, split, frames, steps, guidance, batch_size,
                     seed, videos_dir=""):
  """Samples `num_prompts` prompts of `split` (cycling through the trained sizes) and scores them.

  Returns:
    (section, videos): the JSON-ready split section ("split", "num_prompts", "frames",
    "summary" of SCORES, "clips") and the uint8 (T, H, W, 3) samples.
  """
  world_cfg = data_lib.make_source(data_cfg).config
  prompts = shapesworld.sample_prompts(world_cfg, num_prompts, seed=seed, split=split, num_objects=1)
  sizes = itertools.cycle(tuple(tuple(s) for s in data_cfg.sizes))
  rows, samples = [], []
  for start in range(0, num_prompts, batch_size):
    chunk = prompts[start:start + batch_size]
    height, width = next(sizes)
    videos = generator.generate(
        chunk, frames=frames, height=height, width=width, steps=steps, guidance=guidance,
        seed=seed + start, progress=False,
    )
    for offset, (prompt, video) in enumerate(zip(chunk, videos)):
      score = shapesworld_score.score_video(video, prompt)
      rows.append({"prompt": prompt, "size": [frames, height, width],
                   "velocity_residual": _clip_residual(score), **report_lib.json_safe(score)})
      samples.append(np.asarray(video))
      if videos_dir:
        os.makedirs(videos_dir, exist_ok=True)
        video_io.write_mp4(os.path.join(videos_dir, f"{split}_{start + offset:03d}.mp4"), video)
    logging.info("sampling %s: scored %d/%d", split, len(rows), num_prompts)
  summary = {}
  for key in SCORES:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    summary[key] = sum(values) / len(values) if values else None
  section = {"split": split, "num_prompts": num_prompts, "frames": frames, "summary": summary,
             "clips": rows}
  return section, samples


# ----------------------------------------------------------------------------- other parts


def evaluate_conditioning(generator, config, data_cfg, opts: BenchmarkOptions, eval_seed: int) -> dict:
  """The conditioning section at the run's sample size (--frames overrides the length).

  Its ground-truth clips come from `eval_seed`, like every other part's unseen clips.
  """
  cfg = conditioning_eval.ConditioningEvalConfig(
      num_clips=opts.conditioning_clips, frames=opts.frames or config.sample.frames,
      height=config.sample.height, width=config.sample.width, given_frames=opts.given_frames,
      num_extensions=opts.num_extensions, steps=opts.steps, guidance=opts.guidance, seed=eval_seed,
  )
  world = conditioning_eval.world_config(
      data_cfg, frames=cfg.frames, height=cfg.height, width=cfg.width, seed=cfg.seed)
  section = conditioning_eval.evaluate_conditioning(generator, world, cfg, videos_dir=opts.videos_dir)
  if opts.videos_dir:
    section["mode_examples"] = conditioning_eval.write_mode_examples(generator, world, cfg, opts.videos_dir)
  return section


def evaluate_autoencoder(generator, data_cfg, *, num_clips: int, seed: int, workdir: str) -> dict:
  """PSNR / SSIM / flicker of the generator's autoencoder on `num_clips` unseen ShapesWorld clips
  of the longest trained length: `eval.autoencoder`'s clips, reconstruction and scores."""
  if seed == data_cfg.seed:
    raise ValueError(
        f"--eval_seed={seed} is the run's training seed (data.seed): those clips are training"
        f" data. Use another seed, e.g. {data_cfg.seed + 1} (the default).")
  config = generator.autoencoder.config
  reconstruct = ae_eval.make_reconstruct(
      generator.autoencoder, generator.autoencoder_params, ae_eval.Streaming())
  rows = [ae_eval.evaluate_clip(clip, reconstruct, config)
          for clip in ae_eval.shapesworld_clips(data_cfg, num_clips, seed)]
  return {
      "workdir": workdir,
      "settings": {"num_clips": num_clips, "shapesworld_seed": seed,
                   "ssim": "luma (BT.601), Gaussian 11x11 sigma 1.5, Wang et al. 2004"},
      "summary": {
          "clips": len(rows), **video_metrics.mean_metrics(rows),
          "compression_factor": float(np.mean([r["compression_factor"] for r in rows])) if rows else None,
      },
      "clips": rows,
  }


def ground_truth_like(data_cfg, videos, seed: int) -> list[np.ndarray]:
  """One unseen ShapesWorld clip (training combinations) per video, of that video's (T, H, W)."""
  wanted = collections.Counter(v.shape[:3] for v in videos)
  pools = {}
  for (frames, height, width), count in wanted.items():
    world = conditioning_eval.world_config(data_cfg, frames=frames, height=height, width=width, seed=seed)
    pools[(frames, height, width)] = iter(
        [e.video for e in conditioning_eval.ground_truth_clips(world, count)])
  return [next(pools[v.shape[:3]]) for v in videos]


def load_fvd_network(weights: str, frames: int):
  """The user's feature network (`eval.fvd`, imported here: an optional part), taking the first
  min(16, frames) frames: the standard FVD's 16 when the clips are that long (ShapesWorld's are
  often shorter; the report's "network" then says the FVD is not comparable to published ones)."""
  from spacetime_dit.eval import fvd as fvd_lib  # pylint: disable=g-import-not-at-top

  return fvd_lib.load_feature_network(weights, num_frames=min(16, frames))


def evaluate_fvd(fake_videos, data_cfg, *, network, batch_size: int, seed: int,
                 size: tuple[int, int]) -> dict:
  """FVD between the sampled clips and as many ground-truth clips of the same shapes.

  Every clip is resized to `size` (`video_io.resize_to_cover`) so that the sizes the samples
  cycle through stack into one batch; real and fake clips go through the same resize.

  Args:
    fake_videos: uint8 (T, H, W, 3) samples of training-combination prompts.
    data_cfg: the run's `DataConfig` (the ground truth's distribution).
    network: an `eval.fvd` feature network (e.g. `load_fvd_network`).
    batch_size: clips per network call.
    seed: ShapesWorld seed of the ground-truth clips.
    size: (height, width) every clip is resized to.
  """
  from spacetime_dit.eval import fvd as fvd_lib  # pylint: disable=g-import-not-at-top

  real = ground_truth_like(data_cfg, fake_videos, seed)
  height, width = size
  real_bthwc = np.stack([video_io.resize_to_cover(v, height, width) for v in real])
  fake_bthwc = np.stack([video_io.resize_to_cover(v, height, width) for v in fake_videos])
  value = fvd_lib.frechet_video_distance(network, real_bthwc, fake_bthwc, batch_size=batch_size)
  return {"fvd": float(value), "num_clips": len(fake_videos),
          "network": getattr(network, "description", repr(network)),
          "weights": getattr(network, "source", ""),
          "resized_to": [int(fake_bthwc.shape[1]), height, width], "real_seed": seed}


# ----------------------------------------------------------------------------- the benchmark


def _latest_step(workdir: str) -> int | None:
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  step = checkpointer.latest_step()
  checkpointer.close()
  return step


def _headline(report: dict) -> dict:
  """The flat summary: scores of the first split unprefixed, other splits prefixed, one figure
  per other part."""
  summary = {}
  for split, section in report.get("sampling", {}).items():
    prefix = "" if split == report["split"] else f"{split}_"
    summary.update({prefix + k: v for k, v in section["summary"].items()})
  if "val_loss" in report:
    summary["val_loss"] = report["val_loss"]["summary"]["weighted_loss"]
  if "autoencoder" in report:
    summary["ae_psnr"] = report["autoencoder"]["summary"]["psnr"]
    summary["ae_ssim"] = report["autoencoder"]["summary"]["ssim"]
  if "conditioning" in report:
    summary["i2v_first_frame_psnr"] = report["conditioning"]["i2v"]["first_frame_psnr"]["mean"]
    summary["extend_first_generated_psnr"] = (
        report["conditioning"]["extend"]["first_generated_psnr"]["mean"])
  if "fvd" in report:
    summary["fvd"] = report["fvd"].get("fvd")
  return summary


def run_benchmark(workdir: str, opts: BenchmarkOptions, *, command: str = "", generator=None) -> dict:
  """Runs every part of `opts.parts` on the run in `workdir`; returns the JSON-ready report.

  Args:
    workdir: a finished DiT run.
    opts: the parts and their settings.
    command: the command line, recorded in the report.
    generator: an `inference.Generator` of the run (default: restored from `workdir`).
  """
  config = builders.load_config(workdir)
  data_cfg = config_types.dataclass_from_config(config_types.DataConfig, config.data, path="config.data")
  eval_seed = data_cfg.seed + 1 if opts.eval_seed is None else opts.eval_seed
  frames = opts.frames or max(data_cfg.lengths)
  if generator is None:
    generator = inference.Generator.from_workdir(workdir)
  report = {
      "workdir": os.path.abspath(workdir), "step": _latest_step(workdir), "command": command,
      "parts": list(opts.parts),
      "settings": {**dataclasses.asdict(opts), "eval_seed": eval_seed, "frames": frames},
      "config": config.to_dict(),
  }
  skipped, timings = [], {}

  def part(name):
    logging.info("evaluate: %s ...", name)
    return time.perf_counter()

  def done(name, start):
    timings[name] = round(time.perf_counter() - start, 2)
    logging.info("evaluate: %s done in %.1f s", name, timings[name])

  samples = {}
  if "sampling" in opts.parts:
    start = part("sampling")
    report["sampling"] = {}
    for split in opts.splits:
      report["sampling"][split], samples[split] = sample_and_score(
          generator, data_cfg, num_prompts=opts.num_prompts, split=split, frames=frames,
          steps=opts.steps, guidance=opts.guidance, batch_size=opts.batch_size, seed=opts.seed,
          videos_dir=opts.videos_dir)
    first = report["sampling"][opts.splits[0]]
    report.update({k: first[k] for k in ("split", "num_prompts", "frames", "clips")})
    done("sampling", start)
  if "conditioning" in opts.parts:
    start = part("conditioning")
    report["conditioning"] = evaluate_conditioning(generator, config, data_cfg, opts, eval_seed)
    done("conditioning", start)
  if "autoencoder" in opts.parts:
    start = part("autoencoder")
    report["autoencoder"] = evaluate_autoencoder(
        generator, data_cfg, num_clips=opts.ae_clips, seed=eval_seed,
        workdir=os.path.abspath(builders.autoencoder_workdir(config, workdir)))
    done("autoencoder", start)
  if "val_loss" in opts.parts:
    start = part("val_loss")
    report["val_loss"] = validation_loss.evaluate_validation_loss(
        generator, data_cfg,
        validation_loss.ValidationConfig(num_clips=opts.val_clips, num_levels=opts.val_levels,
                                         seed=eval_seed))
    done("val_loss", start)
  if "fvd" in opts.parts:
    fake = samples.get("train", [])
    if not opts.fvd_weights:
      report["fvd"] = {"fvd": None, "skipped": report_lib.FVD_SKIPPED}
      skipped.append("fvd")
    elif len(fake) < 2:  # Two Gaussians need two clips each at least.
      report["fvd"] = {"fvd": None, "skipped": f"{len(fake)} sampled training-prompt clips; FVD needs"
                                                " >= 2 (the sampling part, the train split and"
                                                " --num_prompts >= 2)"}
      skipped.append("fvd")
    else:
      start = part("fvd")
      report["fvd"] = evaluate_fvd(
          fake, data_cfg, network=load_fvd_network(opts.fvd_weights, frames),
          batch_size=opts.fvd_batch_size, seed=eval_seed,
          size=(config.sample.height, config.sample.width))
      done("fvd", start)
  report["skipped_parts"] = skipped
  report["timings_s"] = timings
  report["summary"] = _headline(report)
  return report_lib.json_safe(report)


def write_outputs(report: dict, out_dir: str, out: str = "") -> dict[str, str]:
  """report.json (at `out`, default <out_dir>/report.json), report.md and the plots."""
  out = out or os.path.join(out_dir, "report.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  atomic_files.write_json(out, report)
  return {"json": out, **report_lib.write(report, out_dir)}


def options_from_flags() -> BenchmarkOptions:
  parts = tuple(p.strip() for p in FLAGS.parts if p.strip())
  if not FLAGS.conditioning:
    parts = tuple(p for p in parts if p != "conditioning")
  return BenchmarkOptions(
      parts=parts, splits=SPLITS if FLAGS.split == "both" else (FLAGS.split,),
      num_prompts=FLAGS.num_prompts, frames=FLAGS.frames, steps=FLAGS.steps,
      guidance=FLAGS.guidance, batch_size=FLAGS.batch_size, seed=FLAGS.seed,
      videos_dir=FLAGS.videos_dir, conditioning_clips=FLAGS.conditioning_clips,
      num_extensions=FLAGS.num_extensions, given_frames=FLAGS.given_frames,
      ae_clips=FLAGS.ae_clips, val_clips=FLAGS.val_clips, val_levels=FLAGS.val_levels,
      eval_seed=FLAGS.eval_seed, fvd_weights=FLAGS.fvd_weights, fvd_batch_size=FLAGS.fvd_batch_size,
  )


def main(argv):
  del argv  # Checked by cli.run.
  cli.use_fast_cpu_convolutions()
  opts = options_from_flags()
  command = shlex.join(["python", "-m", "spacetime_dit.evaluate", *sys.argv[1:]])
  report = run_benchmark(FLAGS.workdir, opts, command=command)
  out_dir = FLAGS.out_dir or os.path.join(FLAGS.workdir, "eval")
  paths = write_outputs(report, out_dir, FLAGS.out)
  print(report_lib.summary_table(report))
  print()
  for name, path in paths.items():
    print(f"{name}: {path}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
