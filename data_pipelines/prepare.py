r"""Prepare a training dataset from a folder or manifest of captioned videos.

  python -m data_pipelines.prepare --input=FOLDER_OR_MANIFEST --output=DIR

writes ArrayRecord shards through the TFDS builder `spacetime_videos` (tfds_builder.py), a
report of every accepted and skipped file, and an index of clip shapes:

  DIR/dataset.json        format, options, parts, clips per split, clips per (T, H, W)
  DIR/report.json         all parts: files seen/accepted, every skip {path, reason, detail},
                          clips per split and shape, seconds
  DIR/part-00000-of-00002/
      spacetime_videos/<config>/1.0.0/   TFDS files (dataset_info.json, *.array_record-*)
      index.json          {"train": [[T, H, W], ...], ...} in the data source's record order
      report.json         this part's report (written last: its presence = the part is done)

Read it with `data_pipelines.prepared.open_prepared(DIR)`; train on it with
`--config.data.source=DIR`.

Parallelism, two levels:
- Within a process, `--num_workers` worker processes (default: all cores) decode, resize and
  x264-encode files (`tfds_builder.DecodePool`, forkserver/spawn, never importing JAX), feeding
  TFDS's sequential writer; the writer, not decoding, is then the only serial part.
- Across processes or machines, parts: `--num_parts=N --part=i` prepares only the files whose
  stable path hash % N == i into DIR/part-i-of-N (each part is a complete TFDS data_dir, so no
  two writers ever share a file). Run one command per part (e.g. one per machine on a shared
  file system), then `--merge` (or let the last part to finish merge automatically) writes
  DIR/dataset.json and the merged report. `--part=-1` (default) builds every part here, one
  after the other, then merges; with N > 1 that also makes an interrupted run resumable at part
  granularity: a part whose report.json exists is kept, unless `--overwrite`.

Why processes per part and not TFDS's Apache Beam path: apache-beam is not installed, and
PyPI's 2.77.0 would bring 16 packages (`pip install --dry-run apache-beam`, checked here):
grpcio, pymongo, fastavro, ... and it would DOWNGRADE protobuf 7.36 -> 6.33, pyarrow 26 -> 25
and pillow 13 -> 12.3 under the rest of the stack. On one machine Beam's DirectRunner
parallelises no better than a process pool and adds its own serialisation; on a cluster it
needs a runner service (Dataflow, Flink, Spark) that TPU VMs and Slurm GPU nodes do not have.
A part is the same command with two more flags: it fits any scheduler (one task per part,
retried per part) and every part is a standard TFDS data_dir. What Beam would add (dynamic
work rebalancing, a global shuffle) is not needed here: TFDS shuffles records by key within a
part, and training samples across all parts.
"""

import collections
import contextlib
import dataclasses
import datetime
import json
import logging as pylogging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from absl import flags
from absl import logging
import tensorflow_datasets as tfds
import tqdm

from data_pipelines import atomic_files
from data_pipelines import ingest
from data_pipelines import prepared
from data_pipelines import tfds_builder as builder_lib
from spacetime_dit import cli

REPORT_FILE = "report.json"
_PART_RE = re.compile(r"^part-(\d{5})-of-(\d{5})$")
_READ_BATCH = 64  # Records per read-back request.
_SUMMARY_SKIPS = 20  # Skips listed in the printed summary (all are in report.json).


class PrepareError(ValueError):
  """An input, output or part problem the user fixes; the message says how."""


# ----------------------------------------------------------------------------- small helpers


def part_name(part: int, num_parts: int) -> str:
  """The folder of part `part` of `num_parts`, e.g. "part-00001-of-00004"."""
  return f"part-{part:05d}-of-{num_parts:05d}"


def _read_json(path: str) -> dict[str, Any]:
  """A JSON file this tool wrote; a PrepareError naming it when it cannot be read or parsed."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except OSError as e:
    raise PrepareError(f"cannot read {path} ({e.strerror or e}); check that this user may read "
                       "it (ls -l), or rerun with --overwrite to rebuild it.") from None
  except ValueError as e:
    raise PrepareError(f"{path} is not valid JSON ({e}); it was damaged after prepare wrote it "
                       "(prepare writes it atomically). Delete it, or rerun with --overwrite."
                       ) from None


def _by_shape(counts: dict[str, int]) -> dict[str, int]:
  """{"TxHxW": n} sorted by (T, H, W) numerically (so 9x... comes before 13x...)."""
  return dict(sorted(counts.items(), key=lambda kv: tuple(int(d) for d in kv[0].split("x"))))


_READ_FIX = "check that this user may read it (ls -ld, chmod a+rX) or pass another --input"
_WRITE_FIX = ("check that this user may write there and the disk has room (ls -ld, chmod u+w, "
              "df -h; a read-only mount cannot hold the output) or pass another --output")


@contextlib.contextmanager
def _os_errors(flag: str, value: str, doing: str, fix: str) -> Iterator[None]:
  """Turns an OSError in the block (permission, read-only or full disk, ...) into a PrepareError
  naming the flag's folder, the file inside it, the OS error and the fix, not a traceback."""
  try:
    yield
  except OSError as e:
    inside = e.filename and os.path.abspath(os.fspath(e.filename)) != os.path.abspath(value)
    where = f" ({e.filename})" if inside else ""
    raise PrepareError(f"--{flag} {value}: cannot {doing}{where}: {e.strerror or e}; {fix}."
                       ) from None


def check_input(input_path: str) -> str:
  """The absolute input path; a clear error when it is missing, unreadable or an empty folder."""
  if not input_path:
    raise PrepareError("--input is empty; pass a folder of videos with caption <stem>.txt "
                       "files, or a .csv (path,caption) / .jsonl ({path, caption}) manifest.")
  path = os.path.abspath(os.path.expanduser(input_path))
  if not os.path.exists(path):
    raise PrepareError(f"--input {input_path} does not exist; pass a folder of videos or a "
                       ".csv/.jsonl manifest.")
  with _os_errors("input", input_path, "read it", _READ_FIX):  # os.walk would say "empty".
    os.listdir(path) if os.path.isdir(path) else open(path, "rb").close()
  if os.path.isdir(path) and not any(files for _, _, files in os.walk(path)):
    raise PrepareError(f"--input {input_path} is an empty folder (no files in it or below); "
                       "put the videos and their caption .txt files there.")
  return path


def _our_entries(output_dir: str) -> list[str]:
  """The entries of output_dir this tool writes (dataset.json, report.json, part dirs)."""
  if not os.path.isdir(output_dir):
    return []
  return sorted(e for e in os.listdir(output_dir)
                if e in (prepared.DATASET_FILE, REPORT_FILE) or _PART_RE.match(e))


def _existing_parts(output_dir: str) -> dict[str, tuple[int, int]]:
  return {e: (int(m.group(1)), int(m.group(2))) for e in _our_entries(output_dir)
          if (m := _PART_RE.match(e))}


def check_output(output_dir: str, config: builder_lib.SpacetimeVideosConfig, num_parts: int,
                 overwrite: bool, parts: list[int]) -> str:
  """Checks DIR holds nothing but a compatible prepared dataset; returns its absolute path.

  With `overwrite`, deletes dataset.json, report.json, the part folders of `parts` (the ones
  this run builds) and parts of another num_parts; other parts of this num_parts are left to
  the machines that build them (merge checks that all parts agree). Only entries this tool
  writes are ever deleted, never the folder: a mistaken --output loses nothing else.
  """
  path = os.path.abspath(os.path.expanduser(output_dir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise PrepareError(f"--output {output_dir} is a file; pass a folder (created if missing).")
  with _os_errors("output", output_dir, "create, list or write the folder", _WRITE_FIX):
    os.makedirs(path, exist_ok=True)
    foreign = sorted(set(os.listdir(path)) - set(_our_entries(path)))
    # Fail now, not after decoding every file: an unwritable folder (mode bits, a read-only
    # mount; root ignores the former) shows up only when something is created in it.
    tempfile.TemporaryFile(dir=path).close()
  if foreign:
    raise PrepareError(f"--output {output_dir} holds {foreign[:5]}, which are not a prepared "
                       "dataset; choose an empty or new folder.")
  if overwrite:
    stale = {prepared.DATASET_FILE, REPORT_FILE} | {part_name(p, num_parts) for p in parts} | {
        name for name, (_, count) in _existing_parts(path).items() if count != num_parts}
    with _os_errors("output", output_dir, "delete the old dataset (--overwrite)",
                    _WRITE_FIX):
      for entry in set(_our_entries(path)) & stale:
        target = os.path.join(path, entry)
        shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
  for name, (_, count) in _existing_parts(path).items():
    if count != num_parts:
      raise PrepareError(f"--output {output_dir} holds {name}, from a run with num_parts={count}; "
                         f"this run has num_parts={num_parts}. Use --num_parts={count}, another "
                         "--output, or --overwrite to start over.")
  for stored in [] if overwrite else _stored_configs(path):
    if stored["config"] != config.name:
      raise PrepareError(
          f"--output {output_dir} holds a dataset prepared with other options "
          f"({_options_diff(stored['options'], builder_lib.config_values(config))}); use another "
          "--output, the same options, or --overwrite to replace it.")
  return path


def _stored_configs(path: str) -> list[dict[str, Any]]:
  """{config, options} of dataset.json and every finished part's report in `path`."""
  files = [os.path.join(path, prepared.DATASET_FILE)] + [
      os.path.join(path, name, REPORT_FILE) for name in _existing_parts(path)]
  return [_read_json(f) for f in files if os.path.exists(f)]


def _options_diff(stored: dict[str, Any], wanted: dict[str, Any]) -> str:
  diff = [f"{k}: stored {stored.get(k)!r}, asked {wanted.get(k)!r}"
          for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)]
  return "; ".join(diff) or "same values, other code version"


# ----------------------------------------------------------------------------- one part


def _read_back(builder: builder_lib.SpacetimeVideos) -> dict[str, list[list[int]]]:
  """[T, H, W] of every record in data-source order, checking the shards hold exactly the clips
  the generator wrote (TFDS shuffles records by key hash on write, so the order is only known
  by reading back)."""
  index = {}
  for split in builder.info.splits:
    source = builder.as_data_source(split)
    shapes, keys = [], []
    for start in range(0, len(source), _READ_BATCH):
      for record in source.__getitems__(range(start, min(start + _READ_BATCH, len(source)))):
        shapes.append([int(record["num_frames"]), int(record["height"]), int(record["width"])])
        keys.append((record["source_path"].decode(), int(record["clip_index"])))
    written = builder.written_keys.get(split, [])
    if collections.Counter(keys) != collections.Counter(written):
      raise RuntimeError(
          f"read-back of split {split!r} in {builder.data_dir} found {len(keys)} records, but "
          f"{len(written)} clips were written (or other keys); the shards are inconsistent. "
          "Delete the part folder and run again.")
    index[split] = shapes
  return index


def _part_report(builder, *, input_path, part_dir, part, num_parts, seconds, crashes
                 ) -> dict[str, Any]:
  skips = sorted(builder.skips, key=lambda s: s["path"])
  by_reason = collections.Counter(s["reason"] for s in skips)
  clips = {s: sum(builder.clip_shapes[s].values()) for s in builder_lib.SPLITS}
  return {
      "format": prepared.FORMAT, "part": part, "num_parts": num_parts, "input": input_path,
      "config": builder.builder_config.name,
      "options": builder_lib.config_values(builder.builder_config),
      "tfds_dir": os.path.relpath(builder.data_dir, part_dir),
      "files_seen": builder.files_seen, "accepted": len(builder.accepted),
      "skipped_count": len(skips), "skipped_by_reason": dict(sorted(by_reason.items())),
      "clips": clips,
      "shapes": {s: _by_shape(builder.clip_shapes[s]) for s in builder_lib.SPLITS},
      "seconds": round(seconds, 3), "worker_seconds": round(builder.worker_seconds, 3),
      "unexpected_errors": builder.unexpected_errors, "worker_crashes": crashes,
      "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "skipped": skips,
  }


def prepare_part(input_path: str, output_dir: str, config: builder_lib.SpacetimeVideosConfig, *,
                 part: int, num_parts: int, pool: builder_lib.DecodePool,
                 discovered=None, on_result=None) -> dict[str, Any]:
  """Builds DIR/part-i-of-N from scratch; returns its report (also written to report.json)."""
  part_dir = os.path.join(output_dir, part_name(part, num_parts))
  # Input files that fail to read are skips (ingest); an OSError here is the output's.
  with _os_errors("output", output_dir, f"write part {part}", _WRITE_FIX):
    if os.path.exists(part_dir):  # Unfinished (no report.json): nothing in it can be trusted.
      shutil.rmtree(part_dir)
    start = time.perf_counter()
    crashes_before = pool.crashes
    builder = builder_lib.SpacetimeVideos(
        data_dir=part_dir, config=config, input_path=input_path, part=part,
        num_parts=num_parts, discovered=discovered, pool=pool, on_result=on_result)
    builder.download_and_prepare(download_dir=os.path.join(part_dir, "downloads"))
    shutil.rmtree(os.path.join(part_dir, "downloads"), ignore_errors=True)  # Always empty.
    index = _read_back(builder)
    report = _part_report(builder, input_path=input_path, part_dir=part_dir, part=part,
                          num_parts=num_parts, seconds=time.perf_counter() - start,
                          crashes=pool.crashes - crashes_before)
    atomic_files.write_json(os.path.join(part_dir, prepared.INDEX_FILE), index, compact=True)
    # Last: its presence marks the part finished.
    atomic_files.write_json(os.path.join(part_dir, REPORT_FILE), report)
  return report


def part_is_done(output_dir: str, part: int, num_parts: int) -> bool:
  """True when the part's report.json exists (written last, so the part is complete)."""
  return os.path.exists(os.path.join(output_dir, part_name(part, num_parts), REPORT_FILE))


# ----------------------------------------------------------------------------- merge


def merge(output_dir: str) -> dict[str, Any]:
  """Writes DIR/dataset.json and the merged DIR/report.json from the finished parts.

  Raises:
    PrepareError: no parts, parts of different runs, or some part unfinished (the message
      gives the command that builds it).
  """
  path = os.path.abspath(output_dir)
  with _os_errors("output", output_dir, "list the folder", _WRITE_FIX):
    parts = _existing_parts(path)
  if not parts:
    raise PrepareError(f"--output {output_dir} has no part-XXXXX-of-YYYYY folders; run prepare "
                       "with --input first.")
  counts = {n for _, n in parts.values()}
  if len(counts) != 1:
    raise PrepareError(f"{output_dir} mixes parts of runs with num_parts {sorted(counts)}; "
                       "delete the stale ones or rerun with --overwrite.")
  (num_parts,) = counts
  reports, missing = [], []
  for i in range(num_parts):
    report_path = os.path.join(path, part_name(i, num_parts), REPORT_FILE)
    (reports.append(_read_json(report_path)) if os.path.exists(report_path) else missing.append(i))
  if missing:
    hint = reports[0]["input"] if reports else "FOLDER_OR_MANIFEST"
    raise PrepareError(
        f"{len(missing)} of {num_parts} parts are not finished: {missing[:10]}. Build each with "
        f"python -m data_pipelines.prepare --input={hint} --output={output_dir} "
        f"--num_parts={num_parts} --part=I (same options), then --merge.")
  if len({r["config"] for r in reports}) != 1:
    raise PrepareError(f"the parts in {output_dir} were prepared with different options "
                       f"({sorted({r['config'] for r in reports})}); rerun with --overwrite.")
  report = merge_reports(reports)
  first = reports[0]
  dataset = {
      "format": prepared.FORMAT, "builder": builder_lib.NAME, "config": first["config"],
      "version": str(builder_lib.SpacetimeVideos.VERSION), "options": first["options"],
      "input": first["input"], "parts": [part_name(i, num_parts) for i in range(num_parts)],
      "tfds_dirs": [os.path.join(part_name(i, num_parts), r["tfds_dir"])
                    for i, r in enumerate(reports)],
      "splits": report["clips"], "shapes": report["shapes"],
  }
  with _os_errors("output", output_dir, "write the merged report", _WRITE_FIX):
    atomic_files.write_json(os.path.join(path, REPORT_FILE), report)
    atomic_files.write_json(os.path.join(path, prepared.DATASET_FILE), dataset)
  return report


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
  """Sums the parts' counts; concatenates their skips (sorted by path)."""
  def total(key):
    return sum(r[key] for r in reports)

  def add_nested(key):
    out = {s: collections.Counter() for s in builder_lib.SPLITS}
    for r in reports:
      for split, counts in r[key].items():
        out[split].update(counts)
    return {s: _by_shape(c) for s, c in out.items()}

  by_reason = collections.Counter()
  for r in reports:
    by_reason.update(r["skipped_by_reason"])
  clips = {s: sum(r["clips"].get(s, 0) for r in reports) for s in builder_lib.SPLITS}
  seconds = total("seconds")
  return {
      "format": prepared.FORMAT, "input": reports[0]["input"], "config": reports[0]["config"],
      "options": reports[0]["options"], "num_parts": len(reports),
      "files_seen": total("files_seen"), "accepted": total("accepted"),
      "skipped_count": total("skipped_count"), "skipped_by_reason": dict(sorted(by_reason.items())),
      "clips": clips, "shapes": add_nested("shapes"),
      "seconds": round(seconds, 3), "part_seconds": [r["seconds"] for r in reports],
      "clips_per_second": round(sum(clips.values()) / seconds, 3) if seconds else None,
      "worker_seconds": round(total("worker_seconds"), 3),
      "unexpected_errors": total("unexpected_errors"), "worker_crashes": total("worker_crashes"),
      "skipped": sorted((s for r in reports for s in r["skipped"]), key=lambda s: s["path"]),
  }


# ----------------------------------------------------------------------------- the whole run


def prepare(input_path: str, output_dir: str, *, options: ingest.IngestOptions | None = None,
            codec: str = "mp4", crf: int = 18, preset: str = "medium",
            validation_fraction: float = 0.0, num_parts: int = 1, part: int = -1,
            num_workers: int | None = None, overwrite: bool = False,
            progress: bool = True) -> dict[str, Any]:
  """Prepares `input_path` into `output_dir` (module docstring); the python API of the CLI.

  Args:
    input_path: folder (recursive; captions in <stem>.txt) or .csv/.jsonl manifest.
    output_dir: created if missing; must be empty or hold this same dataset (resume).
    options: how videos become clips (fps, max_frames, size rules...); default IngestOptions().
    codec, crf, preset: record encoding (clip_codec).
    validation_fraction: share of files (by path hash) in the "validation" split.
    num_parts: parts the files are split into (stable path hash % num_parts).
    part: the part to build, or -1 for all of them (then merged).
    num_workers: decoding processes; None = all cores; 0 = in this process.
    overwrite: rebuild the parts this run builds (all for part=-1) instead of keeping finished
      ones; see `check_output`.
    progress: show a tqdm bar over files (TFDS's own bars are turned off either way).

  Returns:
    The merged report when every part is finished, else this part's report.
  """
  if num_parts < 1:
    raise PrepareError(f"--num_parts is {num_parts}; it must be >= 1.")
  if not -1 <= part < num_parts:
    raise PrepareError(f"--part is {part}; it must be -1 (all parts) or in 0..{num_parts - 1}.")
  config = builder_lib.make_config(options, codec=codec, crf=crf, preset=preset,
                                   validation_fraction=validation_fraction)
  input_path = check_input(input_path)
  parts = list(range(num_parts)) if part < 0 else [part]
  output_dir = check_output(output_dir, config, num_parts, overwrite, parts)
  _check_same_input(output_dir, input_path)
  todo = [p for p in parts if not part_is_done(output_dir, p, num_parts)]
  tfds.disable_progress_bar()  # One bar (ours, over files) instead of TFDS's per-split bars.
  if todo:
    discovered = ingest.discover(input_path)
    items, pre_skips = discovered
    if not items and not pre_skips:
      raise PrepareError(f"--input {input_path} lists no video or image files; check the "
                         "extensions and the manifest.")
    _run_parts(input_path, output_dir, config, todo, num_parts, discovered, num_workers, progress)
  if _all_parts_done(output_dir, num_parts, config.name):
    return merge(output_dir)
  return _read_json(os.path.join(output_dir, part_name(part, num_parts), REPORT_FILE))


def _all_parts_done(output_dir: str, num_parts: int, config_name: str) -> bool:
  """Every part finished with this config (parts still holding other options, e.g. before
  their machines rerun them with --overwrite, mean: not done yet)."""
  reports = [os.path.join(output_dir, part_name(p, num_parts), REPORT_FILE)
             for p in range(num_parts)]
  return all(os.path.exists(r) and _read_json(r)["config"] == config_name for r in reports)


def _check_same_input(output_dir: str, input_path: str):
  """Warns only: machines may mount one input at different paths (parts use relative keys)."""
  others = {s["input"] for s in _stored_configs(output_dir)} - {input_path}
  if others:
    logging.warning("%s holds finished parts prepared from --input=%s (this run: %s); they are "
                    "kept. If that is another dataset, rerun with --overwrite.", output_dir,
                    sorted(others), input_path)


def _run_parts(input_path, output_dir, config, todo, num_parts, discovered, num_workers,
               progress):
  """Builds the parts in `todo` one after the other, sharing one pool of decoding processes."""
  root = builder_lib.input_root(input_path)
  todo_set = set(todo)

  def count(paths):
    return sum(builder_lib.part_of(builder_lib.source_key(p, root), num_parts) in todo_set
               for p in paths)

  known_bad = count(s["path"] for s in discovered[1])  # Skipped by discover, before decoding.
  bar = tqdm.tqdm(total=count(i.path for i in discovered[0]) + known_bad, initial=known_bad,
                  unit=" files", disable=not progress, dynamic_ncols=True,
                  desc=f"preparing {len(todo)} part(s)")
  counts = collections.Counter(skipped=known_bad)

  def on_result(result: builder_lib.ItemResult):
    counts["clips"] += len(result.examples)
    counts["skipped"] += result.skip is not None
    bar.set_postfix(clips=counts["clips"], skipped=counts["skipped"], refresh=False)
    bar.update(1)

  workers = builder_lib.default_num_workers() if num_workers is None else num_workers
  try:
    with builder_lib.DecodePool(workers) as pool:
      for part in todo:
        prepare_part(input_path, output_dir, config, part=part, num_parts=num_parts, pool=pool,
                     discovered=discovered, on_result=on_result)
  finally:
    bar.close()


# ----------------------------------------------------------------------------- summary


def format_summary(report: dict[str, Any], output_dir: str = "") -> str:
  """A plain-text table of a (part or merged) report."""
  clips = report["clips"]
  lines = [
      f"prepared {output_dir or ''} config {report['config']}".replace("  ", " "),
      f"files seen {report['files_seen']}   accepted {report['accepted']}   skipped "
      f"{report['skipped_count']}   clips: " + ", ".join(f"{s} {n}" for s, n in clips.items())
      + f"   {report['seconds']:.1f} s",
  ]
  if report["skipped_by_reason"]:
    lines += ["", f"  {'skip reason':<18}{'files':>7}"]
    lines += [f"  {r:<18}{n:>7}" for r, n in report["skipped_by_reason"].items()]
  shapes = sorted({k for counts in report["shapes"].values() for k in counts},
                  key=lambda k: tuple(int(d) for d in k.split("x")))
  if shapes:
    splits = list(report["shapes"])
    lines += ["", f"  {'clip shape TxHxW':<18}" + "".join(f"{s:>12}" for s in splits)]
    lines += [f"  {k:<18}" + "".join(f"{report['shapes'][s].get(k, 0):>12}" for s in splits)
              for k in shapes]
  if report["skipped"]:
    lines += ["", "  skipped files (reason: path -- detail):"]
    lines += [f"    {s['reason']}: {s['path']} -- {s['detail']}"
              for s in report["skipped"][:_SUMMARY_SKIPS]]
    if len(report["skipped"]) > _SUMMARY_SKIPS:
      lines.append(f"    ... {len(report['skipped']) - _SUMMARY_SKIPS} more in report.json")
  if report.get("unexpected_errors"):
    lines += ["", f"  WARNING: {report['unexpected_errors']} file(s) failed with an unexpected "
              "error (detail starts with 'unexpected'); this may be a bug, not bad data."]
  return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI

_OPTION_HELP = {
    "fps": "Frame rate every video is resampled to.",
    "max_frames": "Longest clip; longer videos are cut into consecutive clips.",
    "frame_multiple": "Clip lengths are 1 + k * frame_multiple.",
    "min_frames": "Videos yielding fewer frames are skipped as too_small.",
    "size_multiple": "H and W are multiples of this.",
    "max_pixels": "Frames larger than this area are downscaled (aspect kept).",
    "min_size": "Shorter side below this (pixels) is too_small.",
    "aspect_tolerance": "Max relative aspect error of the rounded size before centre-cropping.",
    "max_clips_per_video": "Clips kept per video (0 = all).",
    "caption_policy": "'require' (missing caption = skip) or 'filename' (use the file stem).",
}


def define_flags() -> tuple[dict[str, flags.FlagHolder], dict[str, flags.FlagHolder]]:
  """Defines the CLI flags: (run flags, one flag per IngestOptions field).

  Called only when this module runs as the program, so importing it (tests, the trainer, the
  worker processes that re-import __main__) defines no global absl flags that could clash with
  another entry point's (e.g. sample.py's --fps).
  """
  run = {
      "input": flags.DEFINE_string("input", None, "Folder of videos/images with caption "
                                   "<stem>.txt sidecars (recursive), or a .csv (path,caption) / "
                                   ".jsonl manifest."),
      "output": flags.DEFINE_string("output", None, "Output folder (created; resumable)."),
      "codec": flags.DEFINE_enum("codec", "mp4", ["mp4", "raw"], "Record encoding: mp4 (x264, "
                                 "small, lossy) or raw (zlib'd pixels, lossless, 30-35x larger)."),
      "crf": flags.DEFINE_integer("crf", 18, "x264 constant rate factor (0 best .. 51)."),
      "preset": flags.DEFINE_string("preset", "medium", "x264 preset (ultrafast .. veryslow). "
                                    "veryfast encodes 2.3-2.7x faster than medium at the same "
                                    "crf, for 0.1-0.9 dB lower PSNR and about the same size."),
      "validation_fraction": flags.DEFINE_float("validation_fraction", 0.0,
                                                "Share of files in the 'validation' split."),
      "num_parts": flags.DEFINE_integer("num_parts", 1, "Parts the files are split into."),
      "part": flags.DEFINE_integer("part", -1, "Part to build (0..num_parts-1); -1 = all of "
                                   "them, then merge."),
      "num_workers": flags.DEFINE_integer("num_workers", None, "Decoding processes (default: "
                                          "all cores; 0 = decode in this process)."),
      "merge": flags.DEFINE_bool("merge", False, "Only (re)write dataset.json + report.json from "
                                 "the finished parts in --output."),
      "overwrite": flags.DEFINE_bool("overwrite", False, "Rebuild the part(s) this run builds "
                                     "(and drop dataset.json) instead of keeping finished ones."),
      "progress": flags.DEFINE_bool("progress", True, "Show a progress bar."),
  }
  options = {}
  for field in dataclasses.fields(ingest.IngestOptions):  # The CLI follows the API's fields.
    define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
              str: flags.DEFINE_string}.get(type(field.default))
    if define is not None:
      options[field.name] = define(field.name, field.default,
                                   _OPTION_HELP.get(field.name, f"IngestOptions.{field.name}."))
  return run, options


class _QuietTfds(pylogging.Filter):
  """Drops TFDS's INFO lines (one per shard) and its custom-config warning from the CLI output;
  the progress bar and the summary say the same once."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    if "/tensorflow_datasets/" not in record.pathname:
      return True
    return record.levelno > pylogging.WARNING or (
        record.levelno == pylogging.WARNING
        and "Using custom data configuration" not in str(record.msg))


def main(run: dict[str, Any], option_values: dict[str, Any]) -> None:
  """The CLI: prepare (or --merge), then print the summary table."""
  logging.get_absl_handler().addFilter(_QuietTfds())
  if not run["output"]:
    raise PrepareError("--output is required: the folder the prepared dataset goes to.")
  if run["merge"]:
    report = merge(run["output"])
  else:
    if not run["input"]:
      raise PrepareError("--input is required: a folder of captioned videos or a manifest "
                         "(or pass --merge to only merge finished parts).")
    report = prepare(run["input"], run["output"], options=ingest.IngestOptions(**option_values),
                     codec=run["codec"], crf=run["crf"], preset=run["preset"],
                     validation_fraction=run["validation_fraction"], num_parts=run["num_parts"],
                     part=run["part"], num_workers=run["num_workers"],
                     overwrite=run["overwrite"], progress=run["progress"])
  output_dir = os.path.abspath(run["output"])
  print(format_summary(report, output_dir))
  report_dir = output_dir
  if "part" in report:  # Only this part is finished (a merged report has no "part").
    report_dir = os.path.join(output_dir, part_name(report["part"], report["num_parts"]))
    print(f"\npart {report['part']} of {report['num_parts']} done; the dataset is complete once "
          "every part is (the last one merges, or run --merge).")
  print(f"\nreport: {os.path.join(report_dir, REPORT_FILE)}")
  sys.stdout.flush()


if __name__ == "__main__":
  _RUN, _OPTIONS = define_flags()
  cli.run(lambda argv: main({k: h.value for k, h in _RUN.items()},
                            {k: h.value for k, h in _OPTIONS.items()}))
