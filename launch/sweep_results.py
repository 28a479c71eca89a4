"""Collecting a sweep: each trial's metrics.jsonl and eval/report.json into one table and plots.

`collect_and_write(root)` writes `<root>/results.md` and `results.csv` (one row per trial: the
knobs that vary, the final loss, steps, steps/s, wall time and every evaluation number) and
draws `loss_curves.png` and `<metric>_vs_<knob>.png`. It reads the trials from
`<root>/sweep.json` (`launch/sweep.py`), or, without one, from the run folders under `root`,
whose names give the knobs back (`learning_rate=0.001,packing=True`).
"""

import ast
import csv
import json
import math
import os
import re
import statistics
from collections.abc import Iterable
from typing import Any

from data_pipelines import atomic_files

SWEEP_FILE = "sweep.json"
_METRICS_FILE = "metrics.jsonl"
EVAL_REPORT = os.path.join("eval", "report.json")
# Sections of an evaluation report that record what it was asked to do, not what it measured.
_EVAL_INPUTS = ("settings", "config")
_FINAL_LOSS_ROWS = 10  # Final loss: mean of this many last logged rows (one row is noisy).


def short_keys(keys: Iterable[str]) -> dict[str, str]:
  """Dotted key -> its last part, or the whole key where two keys share a last part."""
  keys = list(dict.fromkeys(keys))
  last = [k.rsplit(".", 1)[-1] for k in keys]
  return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def previous_records(root: str) -> dict[str, dict[str, Any]]:
  try:
    with open(os.path.join(root, SWEEP_FILE), encoding="utf-8") as f:
      return {t["name"]: t for t in json.load(f).get("trials", [])}
  except (OSError, ValueError):
    return {}


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The rows of `workdir/metrics.jsonl` (a torn last line, from a killed run, is left out)."""
  rows = []
  try:
    with open(os.path.join(workdir, _METRICS_FILE), encoding="utf-8") as f:
      for line in f:
        try:
          rows.append(json.loads(line))
        except ValueError:
          continue
  except OSError:
    pass
  return [r for r in rows if isinstance(r, dict) and "step" in r]


def training_summary(rows: list[dict[str, Any]]) -> dict[str, float | None]:
  """final_loss (mean of the last 10 logged), steps, steps_per_sec (median, after the first row)."""
  losses = [r["loss"] for r in rows if _is_number(r.get("loss"))]
  rates = [r["steps_per_sec"] for r in rows if _is_number(r.get("steps_per_sec"))]
  return {
      "final_loss": statistics.fmean(losses[-_FINAL_LOSS_ROWS:]) if losses else None,
      "steps": max((r["step"] for r in rows), default=None),
      # The first logged interval includes compilation.
      "steps_per_sec": statistics.median(rates[1:] or rates) if rates else None,
  }


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _numeric_leaves(tree: Any, prefix: str) -> dict[str, float]:
  if _is_number(tree):
    return {prefix: float(tree)}
  if not isinstance(tree, dict):
    return {}
  out = {}
  for k, v in tree.items():
    out.update(_numeric_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


def eval_metrics(report: dict[str, Any]) -> dict[str, float]:
  """Numeric leaves of report["summary"] (any depth, by their own names) and the direct numeric
  fields of the other top-level dicts (`section.key`) but the inputs (`settings`, `config`);
  lists (per-clip rows) are left out."""
  out = _numeric_leaves(report.get("summary", {}), "")
  for section, value in report.items():
    if section not in ("summary", *_EVAL_INPUTS) and isinstance(value, dict):
      out.update({f"{section}.{k}": float(v) for k, v in value.items() if _is_number(v)})
  return out


def _parse_name(name: str) -> dict[str, Any]:
  """Overrides back from a trial name (`learning_rate=0.0004,packing=True`), for roots with no sweep.json."""
  out = {}
  for part in name.split(","):
    key, eq, text = part.partition("=")
    if not eq:
      return {}
    try:
      out[key] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      out[key] = text
  return out


def collect(root: str) -> tuple[list[dict[str, Any]], dict[str, list[tuple[int, float]]], list[str]]:
  """(one row per trial, loss curves by trial, knob columns) from sweep.json or the trial folders."""
  records = list(previous_records(root).values())
  if not records:
    records = [{"name": d, "overrides": _parse_name(d), "workdir": os.path.join(root, d)}
               for d in sorted(os.listdir(root)) if os.path.isfile(os.path.join(root, d, _METRICS_FILE))]
  short = short_keys(k for r in records for k in r.get("overrides", {}))
  knobs = [k for k in short if len({json.dumps(r.get("overrides", {}).get(k)) for r in records}) > 1]
  rows, curves = [], {}
  for record in records:
    metrics = read_metrics(record["workdir"])
    curves[record["name"]] = [(r["step"], r["loss"]) for r in metrics if _is_number(r.get("loss"))]
    row = {"trial": record["name"], "status": record.get("status", "")}
    row.update({short[k]: record.get("overrides", {}).get(k) for k in knobs})
    row.update(training_summary(metrics))
    row["wall_s"] = record.get("wall_s")
    try:
      with open(os.path.join(record["workdir"], EVAL_REPORT), encoding="utf-8") as f:
        row.update(eval_metrics(json.load(f)))
    except (OSError, ValueError):
      pass
    rows.append(row)
  return rows, curves, [short[k] for k in knobs]


def _columns(rows: list[dict[str, Any]]) -> list[str]:
  return list(dict.fromkeys(k for r in rows for k in r))


def _cell(value: Any) -> str:
  if value is None:
    return ""
  if _is_number(value) and isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def write_tables(root: str, rows: list[dict[str, Any]]) -> None:
  """results.csv (full precision) and results.md (4 significant digits), one row per trial."""
  columns = _columns(rows)
  with atomic_files.replacing(os.path.join(root, "results.csv")) as tmp, open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    writer.writerows({c: ("" if r.get(c) is None else r.get(c)) for c in columns} for r in rows)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
  atomic_files.write_bytes(os.path.join(root, "results.md"), ("\n".join(lines) + "\n").encode())


def _file_part(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def write_plots(root: str, rows, curves, knobs) -> list[str]:
  """loss_curves.png and `<metric>_vs_<knob>.png` (lines for numeric knobs, bars otherwise)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  written = []

  def save(fig, name):
    path = os.path.join(root, name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

  if any(curves.values()):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
      if points:
        ax.plot(*zip(*points), label=name, linewidth=1)
    if all(loss > 0 for points in curves.values() for _, loss in points):
      ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="training loss", title=os.path.basename(os.path.normpath(root)))
    ax.legend(fontsize=7)
    save(fig, "loss_curves.png")
  skip = {"trial", "status", "steps", *knobs}
  metrics = [c for c in _columns(rows) if c not in skip and any(_is_number(r.get(c)) for r in rows)]
  for knob in knobs:
    for metric in metrics:
      measured = [r for r in rows if _is_number(r.get(metric))]
      points = [(r.get(knob), r[metric], r["trial"]) for r in measured]
      if len({repr(x) for x, _, _ in points}) < 2:
        continue  # E.g. the knob only varies over failed trials: nothing to compare.
      # A line (or one bar per value) only where no other knob changes between these trials.
      alone = all(len({repr(r.get(k)) for r in measured}) == 1 for k in knobs if k != knob)
      fig, ax = plt.subplots(figsize=(5, 3.5))
      if all(_is_number(x) for x, _, _ in points):
        points.sort()
        xs = [x for x, _, _ in points]
        ax.plot(xs, [y for _, y, _ in points], "o-" if alone else "o")
        if min(xs) > 0 and max(xs) >= 10 * min(xs):
          ax.set_xscale("log")
      else:
        labels = [str(x) if alone else t for x, _, t in points]
        ax.bar(range(len(points)), [y for _, y, _ in points], tick_label=labels)
        ax.tick_params(axis="x", labelrotation=20, labelsize=7)
      ax.set(xlabel=knob, ylabel=metric)
      save(fig, f"{_file_part(metric)}_vs_{_file_part(knob)}.png")
  return written


def collect_and_write(root: str) -> list[dict[str, Any]]:
  rows, curves, knobs = collect(root)
  if not rows:
    raise ValueError(f"no trials in {root}: neither {SWEEP_FILE} nor any <trial>/{_METRICS_FILE} is there.")
  write_tables(root, rows)
  write_plots(root, rows, curves, knobs)
  print(f"sweep: {len(rows)} trials -> {os.path.join(root, 'results.md')}")
  return rows
