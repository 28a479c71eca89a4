"""The benchmark report of `python -m spacetime_dit.evaluate`: markdown tables and PNG plots.

Everything here reads the JSON-ready report dict that `evaluate.run_benchmark` builds (sections
"sampling", "val_loss", "conditioning", "autoencoder", "fvd"; any may be absent when its part was
skipped) and writes files; nothing samples or restores a model.

Plots use matplotlib's object API (`Figure` rendered by the Agg canvas), not pyplot: no global
figure state and no display backend, so it runs on headless machines and inside tests.
"""

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import matplotlib
from matplotlib.figure import Figure

SCORE_KEYS = ("colour", "shape", "motion", "persistence")
LOSS_PLOT = "val_loss_vs_noise.png"
SCORES_PLOT = "shapesworld_scores.png"
FVD_SKIPPED = "skipped (bring I3D weights, see docs)"


def json_safe(value: Any) -> Any:
  """Strict JSON: NaN -> null, +-inf -> "inf"/"-inf", numpy scalars -> Python numbers."""
  if isinstance(value, dict):
    return {str(k): json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if hasattr(value, "item") and not isinstance(value, (str, bytes)):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
  return value


def fmt(value: Any, digits: int = 3, percent: bool = False) -> str:
  """A table cell: "–" for missing, a percentage for fractions when `percent`."""
  if value is None:
    return "–"
  if isinstance(value, str):
    return value
  if isinstance(value, float) and math.isinf(value):
    return str(value)
  if percent:
    return f"{100 * value:.{max(digits - 2, 0)}f}%"
  return f"{value:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A markdown table."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def _shape(shape: Sequence[int]) -> str:
  return "x".join(str(n) for n in shape)


# ----------------------------------------------------------------------------- sections


def summary_table(report: dict) -> str:
  """The headline figures, one row each."""
  s = report.get("summary", {})
  rows = []
  for split in report.get("sampling", {}):
    prefix = "" if split == report.get("split") else f"{split}_"
    for key in SCORE_KEYS:
      rows.append((f"{key} ({split} combinations)", fmt(s.get(prefix + key), 3, percent=True)))
    rows.append((f"velocity residual, px ({split} combinations)",
                 fmt(s.get(prefix + "velocity_residual"), 3)))
  named = (
      ("val_loss", "validation loss, training-t weighted (mean over cells)", 4),
      ("ae_psnr", "autoencoder PSNR (dB)", 2),
      ("ae_ssim", "autoencoder SSIM", 4),
      ("i2v_first_frame_psnr", "i2v first-frame PSNR (dB)", 2),
      ("extend_first_generated_psnr", "extension first generated frame PSNR (dB)", 2),
  )
  for key, label, digits in named:
    if key in s:
      rows.append((label, fmt(s[key], digits)))
  if "fvd" in report:
    skipped = report["fvd"].get("skipped", FVD_SKIPPED)
    rows.append(("FVD", fmt(s.get("fvd"), 2) if s.get("fvd") is not None else skipped))
  return table(("figure", "value"), rows)


def sampling_table(sampling: dict) -> str:
  """One row per split: the ShapesWorld scores of the sampled clips."""
  rows = []
  for split, section in sampling.items():
    s = section["summary"]
    rows.append((split, section["num_prompts"], section["frames"],
                 *(fmt(s.get(k), 3, percent=True) for k in SCORE_KEYS),
                 fmt(s.get("velocity_residual"), 3)))
  return table(("split", "prompts", "frames", "colour", "shape", "motion", "persistence",
                "velocity residual (px)"), rows)


def cell_table(val: dict) -> str:
  """One row per (T, H, W) cell: the weighted loss and the loss at the ends and middle of t."""
  levels = val["noise_levels"]
  picks = sorted({0, len(levels) // 2, len(levels) - 1})
  rows = []
  for cell in val["cells"]:
    rows.append((_shape(cell["shape"]), _shape(cell["latent_shape"]), cell["tokens"],
                 fmt(cell["shift"], 2), cell["clips"], fmt(cell["weighted_loss"], 4),
                 *(fmt(cell["loss"][k], 4) for k in picks)))
  for cell in val.get("skipped_cells", []):
    rows.append((_shape(cell["shape"]), "skipped: " + cell["reason"], *[""] * (4 + len(picks))))
  return table(("T x H x W", "latent t x h x w", "tokens", "shift", "clips", "weighted loss",
                *(f"loss at t={levels[k]:.2f}" for k in picks)), rows)


def noise_level_table(val: dict) -> str:
  """One row per noise level: the mean over cells and every cell's loss."""
  header = ("t", "mean over cells", *(_shape(c["shape"]) for c in val["cells"]))
  rows = []
  for k, t in enumerate(val["noise_levels"]):
    rows.append((f"{t:.3f}", fmt(val["by_noise_level"][k], 4),
                 *(fmt(c["loss"][k], 4) for c in val["cells"])))
  return table(header, rows)


def conditioning_table(section: dict) -> str:
  """Mean, std, median and n of every conditioning figure."""
  def row(label, stats, digits=2):
    return (label, fmt(stats["mean"], digits), fmt(stats["std"], digits),
            fmt(stats["median"], digits), stats["n"])

  rows = [
      row("i2v first-frame PSNR (dB)", section["i2v"]["first_frame_psnr"]),
      row("extend: first generated frame PSNR (dB)", section["extend"]["first_generated_psnr"]),
      row("extend: repeat-last-frame baseline PSNR (dB)", section["extend"]["repeat_last_psnr"]),
  ]
  for seg in section["drift"]["segments"]:
    rows.append(row(f"drift segment {seg['segment']}: histogram distance", seg["histogram_distance"], 3))
    rows.append(row(f"drift segment {seg['segment']}: persistence", seg["persistence"], 3))
  drift = section["drift"]
  rows.append(row("reference: unrelated clip's histogram distance",
                  drift["reference_histogram_distance"], 3))
  rows.append(row("reference: ground-truth persistence", drift["ground_truth_persistence"], 3))
  return table(("figure", "mean", "std", "median", "n"), rows)


def autoencoder_table(section: dict) -> str:
  """One row per clip and their mean: PSNR, SSIM, flicker, compression."""
  rows = [(c["name"], _shape(c["shape"]), _shape(c["latent_shape"]), fmt(c["psnr"], 2),
           fmt(c["ssim"], 4), fmt(c["temporal_flicker"], 2), fmt(c["compression_factor"], 1))
          for c in section["clips"]]
  s = section["summary"]
  rows.append((f"**mean of {s['clips']}**", "", "", fmt(s["psnr"], 2), fmt(s["ssim"], 4),
               fmt(s["temporal_flicker"], 2), fmt(s["compression_factor"], 1)))
  return table(("clip", "T x H x W", "latent t x h x w x C", "PSNR (dB)", "SSIM", "flicker",
                "compression"), rows)


def markdown(report: dict, plots: dict[str, str]) -> str:
  """The whole report.md: summary, per split, per cell, per noise level, conditioning,
  autoencoder, FVD, and the command and config that produced it.

  Args:
    report: the report dict.
    plots: {name: file name relative to the markdown file} of the plots that were written.
  """
  out = [f"# Evaluation of `{report['workdir']}`", ""]
  out.append(f"Checkpoint step {report.get('step')}; parts: {', '.join(report['parts'])}"
             + (f"; skipped: {', '.join(report['skipped_parts'])}" if report.get("skipped_parts") else "")
             + ".")
  out += ["", "## Summary", "", summary_table(report), ""]
  if "sampling" in report:
    out += ["## ShapesWorld scores per split", "",
            "One clip per prompt, detected by colour (`spacetime_dit/eval/shapesworld_score.py`);"
            " motion is the share of clips moving in the prompted direction, velocity residual the"
            " RMS deviation (px) of the object's track from constant velocity (lower is better).",
            "", sampling_table(report["sampling"]), ""]
    if SCORES_PLOT in plots.values():
      out += [f"![ShapesWorld scores]({SCORES_PLOT})", ""]
  if "val_loss" in report:
    val = report["val_loss"]
    st = val["settings"]
    out += ["## Validation loss", "",
            f"Rectified-flow loss of the text-only step on {st['num_clips']} unseen ShapesWorld"
            f" clips per cell (seed {st['seed']}), at {len(val['noise_levels'])} noise levels;"
            " the weighted loss weights them by the training timestep distribution of the cell"
            " (`spacetime_dit/eval/validation_loss.py`).", "",
            "### Per cell", "", cell_table(val), "",
            "### Per noise level", "", noise_level_table(val), ""]
    if LOSS_PLOT in plots.values():
      out += [f"![validation loss vs noise level]({LOSS_PLOT})", ""]
  if "conditioning" in report:
    st = report["conditioning"]["settings"]
    out += ["## Conditioning fidelity", "",
            f"{st['num_clips']} ground-truth clips of {st['frames']}x{st['height']}x{st['width']},"
            f" extension given {st['given_frames']} frames (`spacetime_dit/eval/conditioning.py`).",
            "", conditioning_table(report["conditioning"]), ""]
  if "autoencoder" in report:
    out += ["## Autoencoder reconstruction", "",
            f"Autoencoder `{report['autoencoder']['workdir']}` on unseen ShapesWorld clips"
            f" (seed {report['autoencoder']['settings']['shapesworld_seed']}).", "",
            autoencoder_table(report["autoencoder"]), ""]
  if "fvd" in report:
    fvd = report["fvd"]
    text = (f"FVD {fmt(fvd['fvd'], 2)} between {fvd['num_clips']} sampled training-prompt clips and"
            f" as many ground-truth clips, resized to {_shape(fvd['resized_to'])}; features:"
            f" {fvd['network']}." if fvd.get("fvd") is not None
            else f"FVD: {fvd.get('skipped', FVD_SKIPPED)}.")
    out += ["## FVD", "", text, ""]
  out += ["## Command and config", "", "```bash", report["command"], "```", "",
          "<details><summary>evaluation settings</summary>", "", "```json",
          json.dumps(report["settings"], indent=2), "```", "</details>", "",
          "<details><summary>the run's config.json</summary>", "", "```json",
          json.dumps(report["config"], indent=2), "```", "</details>", ""]
  return "\n".join(out)


# ----------------------------------------------------------------------------- plots


def plot_val_loss(val: dict, path: str) -> str:
  """Loss vs noise level, one line per cell and the mean over cells; log-scale loss."""
  fig = Figure(figsize=(7.6, 4.2), dpi=100)
  ax = fig.add_subplot()
  t = val["noise_levels"]
  # Colour by length, line style by frame size: 16 cells stay tellable apart.
  lengths = sorted({c["shape"][0] for c in val["cells"]})
  sizes = sorted({tuple(c["shape"][1:]) for c in val["cells"]})
  colours = matplotlib.colormaps["viridis"]
  styles = ("-", "--", ":", "-.")
  for cell in val["cells"]:
    colour = colours(lengths.index(cell["shape"][0]) / max(len(lengths) - 1, 1) * 0.9)
    style = styles[sizes.index(tuple(cell["shape"][1:])) % len(styles)]
    ax.plot(t, cell["loss"], color=colour, linestyle=style, marker="o", markersize=2.5,
            linewidth=1, label=_shape(cell["shape"]))
  means = [m if m is not None else float("nan") for m in val["by_noise_level"]]
  ax.plot(t, means, color="black", linestyle="--", linewidth=2, label="mean")
  if all(v > 0 for c in val["cells"] for v in c["loss"]):
    ax.set_yscale("log")
  ax.set_xlabel("noise level t (0 = clean, 1 = noise)")
  ax.set_ylabel("rectified-flow loss")
  ax.set_title("Validation loss per T x H x W cell")
  ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="T x H x W",
            title_fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, format="png")
  return path


def plot_scores(sampling: dict, path: str) -> str:
  """Grouped bars: each ShapesWorld score, one bar per split."""
  fig = Figure(figsize=(6.4, 3.8), dpi=100)
  ax = fig.add_subplot()
  splits = list(sampling)
  width = 0.8 / max(len(splits), 1)
  for i, split in enumerate(splits):
    s = sampling[split]["summary"]
    values = [s.get(k) if s.get(k) is not None else 0.0 for k in SCORE_KEYS]
    xs = [j + (i - (len(splits) - 1) / 2) * width for j in range(len(SCORE_KEYS))]
    bars = ax.bar(xs, values, width, label=f"{split} ({sampling[split]['num_prompts']} prompts)")
    ax.bar_label(bars, labels=[fmt(s.get(k), 2, percent=True) for k in SCORE_KEYS], fontsize=7)
  ax.set_xticks(range(len(SCORE_KEYS)), SCORE_KEYS)
  ax.set_ylim(0, 1.1)
  ax.set_ylabel("fraction of clips")
  ax.set_title("ShapesWorld scores: training vs held-out combinations")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, format="png")
  return path


def write(report: dict, out_dir: str) -> dict[str, str]:
  """Writes the plots and report.md into `out_dir`; returns {name: path} of what it wrote."""
  os.makedirs(out_dir, exist_ok=True)
  written = {}
  if report.get("val_loss", {}).get("cells"):
    written["val_loss_plot"] = plot_val_loss(report["val_loss"], os.path.join(out_dir, LOSS_PLOT))
  if report.get("sampling") and any(s["num_prompts"] for s in report["sampling"].values()):
    written["scores_plot"] = plot_scores(report["sampling"], os.path.join(out_dir, SCORES_PLOT))
  names = {k: os.path.basename(v) for k, v in written.items()}
  md_path = os.path.join(out_dir, "report.md")
  with open(md_path, "w", encoding="utf-8") as f:
    f.write(markdown(report, names))
  written["markdown"] = md_path
  return written
