"""Padding waste of shape bucketing (with and without max_buckets) against NaViT packing.

  python -m benchmarks.padding_waste --out=runs/bench/padding_waste.json

Counts only tokens (no model, no clip is decoded), for the DiT's tokens per clip
(latent cells / patch volume), on three shape mixes:

- `shapesworld_cpu`: the `experiments/base.py:cpu` training sample (ShapesWorld, 10,000
  indices), its token budget (1536), max batch (64), and the `cpu` autoencoder (2x4x4).
- `web33` / `web65`: an ASSUMED web-video mix run through the real ingest rules
  (`data_pipelines.ingest.target_size` and `split_lengths`: 256x256 area cap, size multiple
  16, 8 fps, max_frames 33 or 65, frame multiple 4), with the pod autoencoder (4x8x8), patch
  (1, 2, 2), token budget 65536, max batch 64 and batch multiple 8 (one 8-device host,
  data parallel). The mix (`WEB_MIX`, below) is a plausible guess, not a measured census: no
  public per-aspect / per-duration proportions of web video were at hand offline. Change it
  with the constants or read the figures as "for a mix like this".

Measures:
- bucketing, per `max_buckets` (0 = one bucket per shape): buckets (= compiled step shapes),
  padding waste 1 - sum_k w_k B_k t_k / budget (w_k: share of steps from bucket k, B_k its
  batch, t_k its tokens per clip; a bucket batch cannot fill the budget exactly because B is
  an integer multiple of the batch multiple and capped), the pixels cropping drops
  (`BucketReport.crop_pixel_fraction_lost`) and the clips no bucket takes.
- packing (`data_pipelines.bin_packing.first_fit`, clips in a shuffled order, at most G = 16 per
  row): the row padding (`padding_fraction`) of grain's online packer (32 open rows, what
  `make_packed_iterator` runs) and of offline first-fit (every row open: a lower bound), and
  the waste against the budget when a batch holds floor(budget / L) rows rounded down to the
  batch multiple. Packing pays elsewhere: attention over a packed row costs L^2 per row (a
  block-diagonal mask computes the cross-clip blocks too unless the kernel skips them).
"""


from absl import flags
import numpy as np

from data_pipelines import bin_packing
from data_pipelines import buckets as buckets_lib
from data_pipelines import packing
from benchmarks import reporting
from spacetime_dit import cli

_MIXES = flags.DEFINE_list("mixes", ["shapesworld_cpu", "web33", "web65"], "Shape mixes.")
_MAX_BUCKETS = flags.DEFINE_list(
    "max_buckets", ["0", "32", "16", "8", "4"], "Bucket caps (0: none).")
_NUM_VIDEOS = flags.DEFINE_integer("num_videos", 20_000, "Web mix: source videos/images drawn.")
_WEB_BATCH_MULTIPLE = flags.DEFINE_integer(
    "web_batch_multiple", 8, "Web mixes: global batches (and packed rows) are multiples of this.")
_MAX_SEGMENTS = flags.DEFINE_integer("max_segments", 16, "Packing: clips per row at most (G).")
_NUM_BINS = flags.DEFINE_integer("num_bins", 32, "Packing: rows grain's online packer keeps open.")
_PACK_CLIPS = flags.DEFINE_integer("pack_clips", 20_000, "Packing: clips packed per estimate.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling and shuffling seed.")
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")

# The ASSUMED web-video mix. Families: (name, share of items, ((width, height) of the source,
# share within the family), ...). Sizes are common delivery resolutions of each aspect family.
WEB_MIX = (
    ("16:9", 0.53, (((1920, 1080), 0.35), ((1280, 720), 0.35), ((854, 480), 0.10),
                    ((640, 360), 0.10), ((3840, 2160), 0.05), ((1998, 1080), 0.03),
                    ((2048, 1080), 0.02))),
    ("9:16", 0.22, (((1080, 1920), 0.60), ((720, 1280), 0.25), ((1080, 2340), 0.10),
                    ((480, 854), 0.05))),
    ("4:3", 0.10, (((640, 480), 0.50), ((1440, 1080), 0.20), ((320, 240), 0.10),
                   ((176, 144), 0.10), ((720, 480), 0.10))),
    ("1:1", 0.10, (((1080, 1080), 0.60), ((720, 720), 0.30), ((480, 480), 0.10))),
    ("21:9", 0.05, (((2560, 1080), 0.40), ((1920, 800), 0.30), ((1920, 816), 0.30))),
)
WEB_IMAGE_SHARE = 0.10  # Items that are still images (T = 1), same size mix.
# Video durations: log-normal, median 6 s, sigma 0.9 (about 80% between 2 and 19 s), clamped
# to [0.25 s, 300 s]; longer videos are cut into consecutive max_frames clips by ingest.
WEB_DURATION_MEDIAN_S = 6.0
WEB_DURATION_SIGMA = 0.9


def _shapesworld_cpu() -> dict:
  """The :cpu DiT's training sample and its bucketing / packing settings."""
  # pylint: disable=g-import-not-at-top  (experiments/ is a repository package, not a library one)
  from experiments import autoencoder as ae_experiment
  from experiments import base as dit_experiment
  from spacetime_dit import config_types
  from spacetime_dit.models import autoencoder as autoencoder_lib
  from spacetime_dit.training import data as data_lib
  # pylint: enable=g-import-not-at-top
  config = dit_experiment.get_config("cpu")
  data = config_types.dataclass_from_config(
      config_types.DataConfig, config.data, path="config.data")
  ae_cfg = config_types.dataclass_from_config(
      autoencoder_lib.AutoencoderConfig, ae_experiment.get_config("cpu").model, path="config.model")
  source = data_lib.make_source(data)
  _, shapes = data_lib.training_indices(data, source)
  patch = tuple(config.model.patch_size)
  pack_length = int(config.data.get("pack_length", 256))
  return {
      "description": (
          f"ShapesWorld experiments/base.py:cpu, {len(shapes)} sampled clips: sizes {data.sizes} "
          f"x lengths {data.lengths}; autoencoder {ae_cfg.temporal_factor}x"
          f"{ae_cfg.spatial_factor}x{ae_cfg.spatial_factor}, patch {patch}"),
      "shapes": shapes,
      "latent_shape": lambda s: autoencoder_lib.latent_shape(ae_cfg, *s),
      "patch": patch, "token_budget": data.token_budget, "max_batch_size": data.max_batch_size,
      "batch_multiple": 1, "pack_lengths": [pack_length, 2 * pack_length],
  }


def web_shapes(max_frames: int, num_videos: int, seed: int) -> list[tuple[int, int, int]]:
  """(T, H, W) of every clip ingest makes from `num_videos` items drawn from `WEB_MIX`."""
  from data_pipelines import ingest  # pylint: disable=g-import-not-at-top
  options = ingest.IngestOptions(fps=8.0, max_frames=max_frames, frame_multiple=4,
                                 size_multiple=16, max_pixels=256 * 256)
  rng = np.random.default_rng(seed)
  sizes, weights = [], []
  for _, share, family in WEB_MIX:
    for size, within in family:
      sizes.append(size)
      weights.append(share * within)
  weights = np.asarray(weights) / np.sum(weights)
  target = {}
  shapes = []
  for k in rng.choice(len(sizes), size=num_videos, p=weights):
    width, height = sizes[k]
    if (height, width) not in target:
      target[(height, width)] = ingest.target_size(height, width, options)[:2]
    h, w = target[(height, width)]
    if rng.random() < WEB_IMAGE_SHARE:
      shapes.append((1, h, w))
      continue
    seconds = float(np.clip(rng.lognormal(np.log(WEB_DURATION_MEDIAN_S), WEB_DURATION_SIGMA),
                            0.25, 300.0))
    frames = max(1, int(seconds * options.fps))
    shapes.extend((t, h, w) for t in ingest.split_lengths(frames, options))
  return shapes


def _web(max_frames: int) -> dict:
  shapes = web_shapes(max_frames, _NUM_VIDEOS.value, _SEED.value)
  tf, sf, patch = 4, 8, (1, 2, 2)

  def latent_shape(shape):
    t, h, w = shape
    return 1 + (t - 1) // tf, h // sf, w // sf

  max_tokens = max(packing.latent_tokens(latent_shape(s), patch) for s in shapes)
  fit = -(-max_tokens // 256) * 256  # The longest clip, rounded up to 256 tokens.
  return {
      "description": (
          f"ASSUMED web mix (WEB_MIX), {_NUM_VIDEOS.value} items ({WEB_IMAGE_SHARE:.0%} images), "
          f"durations log-normal median {WEB_DURATION_MEDIAN_S} s sigma {WEB_DURATION_SIGMA}; "
          f"ingest 256x256 area, size multiple 16, 8 fps, max_frames {max_frames}; "
          f"autoencoder {tf}x{sf}x{sf}, patch {patch}"),
      "shapes": shapes, "latent_shape": latent_shape, "patch": patch,
      "token_budget": 65536, "max_batch_size": 64, "batch_multiple": _WEB_BATCH_MULTIPLE.value,
      "pack_lengths": sorted({fit, 8192}),
  }


def bucketing(mix: dict, max_buckets: int) -> dict:
  """Buckets, padding waste, crop loss and rejected clips of one max_buckets setting."""
  patch = mix["patch"]
  budget = mix["token_budget"]
  buckets, report = buckets_lib.compute_buckets(
      mix["shapes"], tokens_per_clip=lambda s: packing.latent_tokens(mix["latent_shape"](s), patch),
      token_budget=budget, batch_multiple=mix["batch_multiple"],
      max_batch_size=mix["max_batch_size"], max_buckets=max_buckets,
  )
  used = sum(b.weight * b.tokens_per_batch for b in buckets) / budget
  return {
      "max_buckets": max_buckets, "buckets": len(buckets), "padding_waste": 1.0 - used,
      "crop_pixel_fraction_lost": report.crop_pixel_fraction_lost,
      "cropped_clip_fraction": report.cropped_clips / report.total_clips,
      "rejected_clip_fraction": report.rejected_clips / report.total_clips,
      "mean_batch_size": sum(b.weight * b.batch_size for b in buckets),
  }


def packed(mix: dict, seq_len: int, num_bins: int | None) -> dict:
  """Row padding and budget waste of first-fit packing at row length `seq_len`."""
  rng = np.random.default_rng(_SEED.value)
  shapes = [mix["shapes"][i] for i in rng.permutation(len(mix["shapes"]))[:_PACK_CLIPS.value]]
  counts = [packing.latent_tokens(mix["latent_shape"](s), mix["patch"]) for s in shapes]
  fitting = [c for c in counts if c <= seq_len]
  rows = bin_packing.first_fit(fitting, seq_len=seq_len, max_segments=_MAX_SEGMENTS.value,
                           num_bins=num_bins)
  pad = bin_packing.padding_fraction(rows, fitting, seq_len=seq_len)
  multiple = mix["batch_multiple"]
  rows_per_batch = mix["token_budget"] // seq_len // multiple * multiple
  budget_used = rows_per_batch * seq_len / mix["token_budget"]
  return {
      "seq_len": seq_len, "num_bins": num_bins, "rows_per_batch": rows_per_batch,
      "row_padding": pad, "waste_vs_budget": 1.0 - (1.0 - pad) * budget_used,
      "mean_clips_per_row": len(fitting) / len(rows),
      "rejected_clip_fraction": 1.0 - len(fitting) / len(counts),
  }


def run_mix(name: str) -> dict:
  if name == "shapesworld_cpu":
    mix = _shapesworld_cpu()
  elif name in ("web33", "web65"):
    mix = _web(int(name[3:]))
  else:
    raise ValueError(f"--mixes: unknown mix {name!r}; use shapesworld_cpu, web33 or web65.")
  shapes = mix["shapes"]
  distinct = {}
  for s in shapes:
    distinct[s] = distinct.get(s, 0) + 1
  top = sorted(distinct.items(), key=lambda kv: -kv[1])[:12]
  result = {
      "mix": name, "description": mix["description"], "clips": len(shapes),
      "distinct_shapes": len(distinct),
      "top_shapes": {"x".join(map(str, s)): n / len(shapes) for s, n in top},
      "token_budget": mix["token_budget"], "max_batch_size": mix["max_batch_size"],
      "batch_multiple": mix["batch_multiple"],
      "bucketing": [bucketing(mix, int(k)) for k in _MAX_BUCKETS.value],
      "packing": [packed(mix, length, bins) for length in mix["pack_lengths"]
                  for bins in (_NUM_BINS.value, None)],
  }
  return result


def _pct(x: float) -> str:
  return f"{100 * x:.1f}%"


def _table(results: list[dict]) -> str:
  rows = [("mix", "method", "setting", "compiled shapes", "padding waste", "crop px lost",
           "clips dropped", "clips/batch|row")]
  for r in results:
    for b in r["bucketing"]:
      setting = f"max_buckets={b['max_buckets']}" if b["max_buckets"] else "one per shape"
      rows.append((r["mix"], "buckets", setting, str(b["buckets"]), _pct(b["padding_waste"]),
                   _pct(b["crop_pixel_fraction_lost"]), _pct(b["rejected_clip_fraction"]),
                   f"{b['mean_batch_size']:.1f}"))
    for p in r["packing"]:
      bins = "offline" if p["num_bins"] is None else f"{p['num_bins']} bins"
      rows.append((r["mix"], "packing", f"L={p['seq_len']} {bins}", "1",
                   f"{_pct(p['waste_vs_budget'])} (rows {_pct(p['row_padding'])})", "0.0%",
                   _pct(p["rejected_clip_fraction"]), f"{p['mean_clips_per_row']:.1f}"))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
  notes = ["(padding waste: share of the token budget a step leaves empty; packing: against the "
           "budget, in brackets the padding inside the rows. crop px lost: share of the kept "
           "clips' pixels cropping drops.)"]
  for r in results:
    shares = ", ".join(f"{s} {_pct(v)}" for s, v in list(r["top_shapes"].items())[:6])
    notes.append(f"{r['mix']}: {r['clips']} clips, {r['distinct_shapes']} shapes (top: {shares}). "
                 f"{r['description']}.")
  return "\n".join(lines + notes)


def main(argv):
  del argv
  results = [run_mix(name) for name in _MIXES.value]
  print(_table(results))
  if _OUT.value:
    reporting.write_json(_OUT.value, {"results": results, "web_mix": [
          {"family": name, "share": share, "sources": [{"size": s, "share": w} for s, w in fam]}
          for name, share, fam in WEB_MIX], "web_image_share": WEB_IMAGE_SHARE,
          "web_duration_median_s": WEB_DURATION_MEDIAN_S,
          "web_duration_sigma": WEB_DURATION_SIGMA})


if __name__ == "__main__":
  cli.run(main)
