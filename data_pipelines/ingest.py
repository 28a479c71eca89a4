"""Ingest: video/image files + captions on disk -> fixed-shape training clips, or a counted skip.

`discover(input)` lists the inputs (a folder, a CSV or JSONL manifest, or one file);
`process(item, options)` / `iter_clips(item, options)` turn one input into `Clip`s of valid
shapes (T = 1 + k * frame_multiple frames, H and W multiples of size_multiple) or raise
`SkipFile` with one of `SKIP_REASONS`. `python -m data_pipelines.prepare` drives both and
writes the shards and the report; nothing here writes files.

Per file, in order (the first failing rule decides the skip reason):
  1. The file itself: "unreadable", "empty_file", "truncated" by its header
     (`media_checks.check_file`).
  2. The caption: "missing_caption" when there is none and `caption_policy="require"`.
  3. Decoding the first frame: "not_video", "corrupt" (`video_decode` docstring: the content
     decides, never the extension).
  4. Size: "too_small" when the upright shorter side < min_size, or an image when
     min_frames > 1.
  5. Streaming: frames are resampled to `fps`, cropped/resized to `target_size`, and cut into
     consecutive clips of `valid_length(max_frames)` plus a shorter last clip when
     `split_lengths` keeps one. "truncated"
     when decoding fails after a good frame or ends short of the header's frame count;
     "too_small" when the whole video gives fewer than `min_frames` frames.

Truncated files are skipped whole, never trained on in part: a file cut mid-way is a failed
copy or download, and its caption describes the whole video, which the decodable prefix may
not show. Re-muxing it (`ffmpeg -i IN -c copy OUT.mp4`) keeps the prefix deliberately.
"""

import csv
import dataclasses
import json
import math
import os
from typing import Iterator

import av
import numpy as np

from data_pipelines import media_checks
from data_pipelines import video_decode

SKIP_REASONS = ("empty_file", "truncated", "corrupt", "not_video", "unreadable", "too_small",
                "missing_caption", "duplicate")
CAPTION_POLICIES = ("require", "filename")
MANIFEST_SUFFIXES = (".csv", ".jsonl")
CAPTION_SUFFIX = ".txt"

# How to fix each skip, appended to every detail (the report then names file, rule and fix).
_FIXES = {
    "empty_file": "re-copy or re-download it, or delete it.",
    "unreadable": ("check that it exists and that this user may read it (ls -l, chmod a+r),"
                   " or remove it from the input."),
    "not_video": "remove it from the input: only video and image files belong there.",
    "corrupt": ("re-download it or re-encode it (ffmpeg -i IN -c:v libx264 OUT.mp4), or delete"
                " it."),
    "truncated": ("re-download or re-copy the complete file; to train on the decodable part on"
                  " purpose, re-mux it (ffmpeg -i IN -c copy OUT.mp4) and ingest that."),
    "missing_caption": ("write the caption to <stem>.txt beside it (folder input) or to the"
                        " manifest's caption field, or use caption_policy='filename'."),
    "too_small": "drop it, or lower min_size / min_frames if such inputs are wanted.",
    "duplicate": "list each file once.",
}


@dataclasses.dataclass(frozen=True)
class IngestOptions:
  """How files become clips (module docstring). Defaults suit the autoencoder at pod scale."""

  fps: float = 8.0  # Target frame rate; every video is resampled to it (nearest timestamp).
  max_frames: int = 33  # Longest clip; longer videos are split into consecutive clips.
  frame_multiple: int = 4  # Clip lengths are 1 + k * frame_multiple (tail frames dropped).
  min_frames: int = 1  # Videos giving fewer frames are "too_small"; images pass iff == 1.
  size_multiple: int = 16  # H and W of every clip are multiples of this.
  max_pixels: int = 256 * 256  # Area cap; larger frames are downscaled, aspect kept.
  min_size: int = 32  # Upright shorter side below this -> "too_small".
  aspect_tolerance: float = 0.05  # Max relative aspect error of the rounded size, else crop.
  max_clips_per_video: int = 0  # Keep at most this many clips per file; 0 = all.
  caption_policy: str = "require"  # "require": no caption -> skip; "filename": use the stem.

  def __post_init__(self):
    def need(ok: bool, rule: str):
      if not ok:
        raise ValueError(f"IngestOptions: {rule}; got {self}.")

    need(math.isfinite(self.fps) and self.fps > 0, f"fps={self.fps} must be a positive number")
    need(self.frame_multiple >= 1, f"frame_multiple={self.frame_multiple} must be >= 1")
    need(self.max_frames >= 1, f"max_frames={self.max_frames} must be >= 1")
    need(1 <= self.min_frames <= self.clip_frames,
         f"min_frames={self.min_frames} must be in [1, {self.clip_frames}] (the longest valid"
         f" clip, valid_length(max_frames={self.max_frames}, {self.frame_multiple})); raise"
         " max_frames or lower min_frames")
    need(self.size_multiple >= 1, f"size_multiple={self.size_multiple} must be >= 1")
    need(self.max_pixels >= self.size_multiple ** 2,
         f"max_pixels={self.max_pixels} must hold one size_multiple^2 ="
         f" {self.size_multiple ** 2} frame")
    need(self.min_size >= 1, f"min_size={self.min_size} must be >= 1")
    need(0 <= self.aspect_tolerance < 1, f"aspect_tolerance={self.aspect_tolerance} must be in"
         " [0, 1)")
    need(self.max_clips_per_video >= 0,
         f"max_clips_per_video={self.max_clips_per_video} must be >= 0 (0 = all)")
    need(self.caption_policy in CAPTION_POLICIES,
         f"caption_policy={self.caption_policy!r} must be one of {CAPTION_POLICIES}")

  @property
  def clip_frames(self) -> int:
    """Frames of a full clip: the longest valid length <= max_frames."""
    return valid_length(self.max_frames, self.frame_multiple)


@dataclasses.dataclass(frozen=True)
class InputItem:
  """One input file and its caption as discovered (nothing decoded yet)."""

  path: str
  caption: str | None  # Whitespace-normalised; None when there is none.
  line: int | None  # 1-based manifest line; None for folder inputs.


@dataclasses.dataclass(frozen=True, eq=False)
class Clip:
  """One training clip cut from a source file."""

  frames: np.ndarray  # uint8 (T, H, W, 3), T = 1 + k * frame_multiple, upright RGB.
  caption: str
  source_path: str
  clip_index: int  # 0, 1, ... in time order within the source file.
  fps: float  # Frame rate of `frames` (the ingest target rate).


class SkipFile(Exception):
  """A file that gives no clips.

  `reason` is one of SKIP_REASONS; `detail` is one sentence naming the file, the rule it breaks
  (with the values) and the fix, e.g. "/data/a.mp4 has 16x16 frames (upright); the shorter side
  must be >= min_size=32 px; fix: ...". `path` is the file ("" until known).
  """

  def __init__(self, reason: str, detail: str, path: str = "", *, rule: str = ""):
    if reason not in SKIP_REASONS:
      raise ValueError(f"unknown skip reason {reason!r}; expected one of {SKIP_REASONS}.")
    super().__init__(reason, detail, path)
    self.reason = reason
    self.detail = detail
    self.path = path
    self.rule = rule  # The detail without file name and fix (re-used once the path is known).

  def __str__(self) -> str:
    return self.detail

  def record(self) -> dict:
    """The report entry: {"path", "reason", "detail"}."""
    return skip_record(self.path, self.reason, self.detail)


def skip_record(path: str, reason: str, detail: str) -> dict:
  """One report.json "skipped" entry: {"path", "reason" (one of SKIP_REASONS), "detail"}."""
  return {"path": path, "reason": reason, "detail": detail}


def _skip(reason: str, path: str, rule: str) -> SkipFile:
  """SkipFile whose detail reads "<path> <rule>; fix: <how>" (rule phrased about the file)."""
  return SkipFile(reason, f"{path or 'the file'} {rule}; fix: {_FIXES[reason]}", path, rule=rule)


# ----------------------------------------------------------------------------------------------
# Shapes (pure).


def valid_length(n: int, frame_multiple: int) -> int:
  """The largest 1 + k * frame_multiple <= n (k >= 0); 0 when n < 1."""
  if frame_multiple < 1:
    raise ValueError(f"frame_multiple={frame_multiple} must be >= 1.")
  return 0 if n < 1 else 1 + (n - 1) // frame_multiple * frame_multiple


def _keep_tail(length: int, clips_before: int, options: IngestOptions) -> bool:
  """Whether the last, partial clip of `length` valid frames is kept.

  As the only clip it needs min_frames (1: a very short video becomes an image-like 1-frame
  clip). After full clips it must also be a real video (>= 1 + frame_multiple frames): a
  1-frame tail would add a still of the video's last instant as an "image".
  """
  if clips_before == 0:
    return length >= max(1, options.min_frames)
  return length >= max(options.min_frames, 1 + options.frame_multiple)


def split_lengths(num_frames: int, options: IngestOptions) -> list[int]:
  """Clip lengths a video that resamples to `num_frames` frames is cut into, in time order.

  Consecutive, non-overlapping clips of `options.clip_frames`; the remaining frames form a
  last clip of `valid_length(rest)` when `_keep_tail` allows; at most max_clips_per_video.
  `iter_clips` cuts exactly these lengths (tested).
  """
  full, rest = divmod(max(0, num_frames), options.clip_frames)
  lengths = [options.clip_frames] * full
  tail = valid_length(rest, options.frame_multiple)
  if tail and _keep_tail(tail, full, options):
    lengths.append(tail)
  if options.max_clips_per_video:
    lengths = lengths[:options.max_clips_per_video]
  return lengths


def target_size(height: int, width: int,
                options: IngestOptions) -> tuple[int, int, tuple[int, int, int, int] | None]:
  """Output (H', W') of an upright height x width video, and the crop box taken before resizing.

  Policy, with m = size_multiple, A = max_pixels, r = width / height:
    1. Too small: min(height, width) < min_size raises SkipFile("too_small").
    2. Ideal size: scale s = min(1, sqrt(A / (height * width))): the area cap, aspect kept,
       never upscaled.
    3. Candidates: H' in {floor(s h / m) m, that + m} (at least m), W' likewise, plus for each
       H' the widest multiple-of-m W' with H' W' <= A (and for each W' the tallest H'), kept
       when H' W' <= A and neither side exceeds the original (sides below m may grow to m: the
       only upscale).
    4. The candidate with the smallest relative aspect error e = |(W'/H') / r - 1| wins (ties:
       the larger area).
    5. e <= aspect_tolerance: the whole frame is resized to (H', W') (its aspect changes by e at
       most; crop is None). Otherwise the frame is first centre-cropped to the box of aspect
       W'/H' that spans its full width (target wider than r) or full height (target taller),
       so the result has exactly the right aspect and loses about e of the frame.

  Args:
    height, width: upright display size in pixels.
    options: size_multiple, max_pixels, min_size, aspect_tolerance are used.

  Returns:
    (H', W', crop): crop = (top, left, box_height, box_width) in upright pixels, or None.

  Raises:
    SkipFile: "too_small".
  """
  m, area_cap = options.size_multiple, options.max_pixels
  if min(height, width) < options.min_size:
    raise _skip("too_small", "", f"has {height}x{width} frames (upright); the shorter side must"
                f" be >= min_size={options.min_size} px")
  scale = min(1.0, math.sqrt(area_cap / (height * width)))
  max_h, max_w = max(height, m) // m * m, max(width, m) // m * m
  low_h = max(m, math.floor(height * scale / m) * m)
  low_w = max(m, math.floor(width * scale / m) * m)
  heights, widths = {low_h, low_h + m}, {low_w, low_w + m}
  pairs = {(h, w) for h in heights for w in widths}
  pairs |= {(h, min(max_w, area_cap // h // m * m)) for h in heights}
  pairs |= {(min(max_h, area_cap // w // m * m), w) for w in widths}
  aspect = width / height
  candidates = [(abs((w / h) / aspect - 1), -h * w, h, w) for h, w in pairs
                if m <= h <= max_h and m <= w <= max_w and h * w <= area_cap]
  # Non-empty: (m, m) always qualifies because max_pixels >= m^2 (IngestOptions checks it).
  error, _, out_h, out_w = min(candidates)
  if error <= options.aspect_tolerance:
    return out_h, out_w, None
  if out_w / out_h > aspect:  # Target is wider: keep the full width, crop rows.
    box_h, box_w = min(height, max(1, round(width * out_h / out_w))), width
  else:  # Target is taller: keep the full height, crop columns.
    box_h, box_w = height, min(width, max(1, round(height * out_w / out_h)))
  return out_h, out_w, ((height - box_h) // 2, (width - box_w) // 2, box_h, box_w)


# ----------------------------------------------------------------------------------------------
# Discovery.


def _normalise_caption(text: str | None) -> str | None:
  """One line, single spaces; None when nothing is left."""
  if text is None:
    return None
  text = " ".join(str(text).split())
  return text or None


def _read_sidecar(media_path: str) -> str | None:
  """Caption in <stem>.txt beside `media_path`; None when absent. Raises SkipFile if broken."""
  sidecar = os.path.splitext(media_path)[0] + CAPTION_SUFFIX
  if not os.path.exists(sidecar):
    return None
  try:
    with open(sidecar, encoding="utf-8-sig") as f:
      return _normalise_caption(f.read())
  except (OSError, UnicodeDecodeError) as e:
    raise _skip("missing_caption", media_path,
                f"has a caption file {sidecar} that cannot be read as UTF-8 text ({e})") from None


def _walk(folder: str) -> Iterator[str]:
  """Non-hidden files under `folder`, sorted, following directory symlinks once each."""
  seen = set()
  for root, dirs, files in os.walk(folder, followlinks=True):
    real = os.path.realpath(root)
    if real in seen:  # A symlink loop or a second link to the same folder.
      dirs[:] = []
      continue
    seen.add(real)
    # Hidden entries (.git, .DS_Store, editor swap files) are not inputs.
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for name in sorted(files):
      if not name.startswith("."):
        yield os.path.join(root, name)


def _discover_folder(folder: str) -> tuple[list[InputItem], list[dict]]:
  """Every non-hidden file that is not a .txt caption is an input (content decides later)."""
  items, skips = [], []
  for path in _walk(folder):
    if path.lower().endswith(CAPTION_SUFFIX):
      continue
    if not os.path.exists(path):
      skips.append(_skip("unreadable", path, "is a symlink to a missing target").record())
      continue
    try:
      items.append(InputItem(path, _read_sidecar(path), None))
    except SkipFile as e:
      skips.append(e.record())
  return items, skips


def _manifest_rows(manifest: str) -> Iterator[tuple[int, object, object, str | None]]:
  """(line, path value, caption value, problem) per manifest row."""
  if manifest.lower().endswith(".csv"):
    with open(manifest, newline="", encoding="utf-8-sig") as f:
      reader = csv.DictReader(f)
      columns = reader.fieldnames or []
      if "path" not in columns:
        raise ValueError(
            f"manifest {manifest} has columns {columns}; a CSV manifest needs a header row with"
            " a 'path' column and a 'caption' column (path,caption).")
      for row in reader:
        yield reader.line_num, row.get("path"), row.get("caption"), None
    return
  with open(manifest, encoding="utf-8-sig") as f:
    for line, text in enumerate(f, start=1):
      if not text.strip():
        continue
      try:
        row = json.loads(text)
      except json.JSONDecodeError as e:
        yield line, None, None, f"is not valid JSON ({e.msg} at column {e.colno})"
        continue
      if not isinstance(row, dict):
        yield line, None, None, f"is a JSON {type(row).__name__}, not an object"
        continue
      yield line, row.get("path"), row.get("caption"), None


def _discover_manifest(manifest: str) -> tuple[list[InputItem], list[dict]]:
  """Rows of a CSV (path,caption) or JSONL ({"path", "caption"}) manifest, in file order.

  Relative paths are resolved against the manifest's folder, so a dataset folder with its
  manifest can be moved as a whole.
  """
  base = os.path.dirname(os.path.abspath(manifest))
  items, skips, first_line = [], [], {}
  for line, path, caption, problem in _manifest_rows(manifest):
    where = f"{manifest}:{line}"
    if problem is None and not (isinstance(path, str) and path.strip()):
      problem = f"has no 'path' string (got {path!r})"
    if problem is None and caption is not None and not isinstance(caption, str):
      problem = f"has a {type(caption).__name__} caption; captions must be strings"
    if problem:
      skips.append(skip_record(where, "unreadable", f"{where}: manifest line {line} {problem};"
                               " fix: correct the line (CSV: path,caption; JSONL: {\"path\": ...,"
                               " \"caption\": ...})."))
      continue
    resolved = os.path.normpath(os.path.join(base, os.path.expanduser(path.strip())))
    if not os.path.exists(resolved):
      skips.append(_skip("unreadable", resolved,
                         f"does not exist (manifest line {line} names {path!r}; relative paths"
                         f" are resolved against {base})").record())
      continue
    key = os.path.realpath(resolved)
    if key in first_line:
      skips.append(_skip("duplicate", resolved, f"is listed again on manifest line {line}; the"
                         f" listing on line {first_line[key]} was kept").record())
      continue
    first_line[key] = line
    items.append(InputItem(resolved, _normalise_caption(caption), line))
  return items, skips


def discover(input_path: str) -> tuple[list[InputItem], list[dict]]:
  """Lists the inputs of a folder, a manifest or a single file.

  - Folder: every non-hidden file below it (recursively, sorted by path; directory symlinks
    followed once) except .txt files; captions come from the sidecar <stem>.txt. Files of any
    extension are inputs: FFmpeg decides what is a video, and the rest are reported as
    "not_video" rather than dropped unseen.
  - `.csv`: header row with columns path,caption (others ignored). `.jsonl`: one
    {"path": ..., "caption": ...} object per line. Relative paths are resolved against the
    manifest's folder; a duplicate listing of the same file is a "duplicate" skip.
  - Any other file: that one file, with its sidecar caption.

  Args:
    input_path: the folder, manifest or file.

  Returns:
    (items, skips): the inputs to `process`, and skip records {"path", "reason", "detail"} for
    entries already known to be bad (a missing file -> "unreadable", an unreadable sidecar
    caption -> "missing_caption", a malformed manifest line -> "unreadable" with path
    "<manifest>:<line>").

  Raises:
    ValueError: the input does not exist, or a CSV manifest has no 'path' column.
  """
  if os.path.isdir(input_path):
    return _discover_folder(input_path)
  if not os.path.exists(input_path):
    raise ValueError(
        f"input {input_path!r} does not exist; pass a folder of videos/images with <stem>.txt"
        " captions, a .csv (path,caption) or .jsonl manifest, or one video file.")
  if input_path.lower().endswith(MANIFEST_SUFFIXES):
    return _discover_manifest(input_path)
  try:
    return [InputItem(input_path, _read_sidecar(input_path), None)], []
  except SkipFile as e:
    return [], [e.record()]


# ----------------------------------------------------------------------------------------------
# Processing one input.


def _caption(item: InputItem, options: IngestOptions) -> str:
  if item.caption:
    return item.caption
  if options.caption_policy == "filename":
    # "my_dog-runs.mp4" -> "my dog runs": a weak caption, but a caption.
    stem = os.path.splitext(os.path.basename(item.path))[0]
    caption = _normalise_caption(stem.replace("_", " ").replace("-", " "))
    if caption:
      return caption
  if item.line is not None:
    where = f"manifest line {item.line} leaves it empty"
  else:
    sidecar = os.path.splitext(os.path.basename(item.path))[0] + CAPTION_SUFFIX
    where = f"{sidecar} beside it is missing or empty"
  raise _skip("missing_caption", item.path, f"has no caption ({where}) and caption_policy="
              f"{options.caption_policy!r} requires one")


def iter_clips(item: InputItem, options: IngestOptions) -> Iterator[Clip]:
  """Streams the clips of one input as they fill: memory holds one clip, not the video.

  Clips are cut by `split_lengths` from the video resampled to `options.fps` and resized by
  `target_size` (module docstring for the order of checks).

  Contract: SkipFile can be raised after some clips were yielded ("truncated" is only known
  once the stream ends); a consumer must then discard that file's clips, e.g. by buffering
  them (encoded) until the generator finishes. `process` does exactly that in memory.

  Raises:
    SkipFile: with one of SKIP_REASONS.
  """
  path = item.path
  try:
    checked = media_checks.check_file(path)  # File problems are reported before captions.
    caption = _caption(item, options)
    with video_decode.VideoReader(path, checked=checked) as reader:
      info = reader.info
      if info.is_image and options.min_frames > 1:
        raise _skip("too_small", path, f"is an image (1 frame) and min_frames="
                    f"{options.min_frames}; images are clips only when min_frames=1")
      height, width, crop = target_size(info.height, info.width, options)
      full = options.clip_frames
      buffer, produced, total = [], 0, 0
      for frame in reader.frames(options.fps, size=(height, width), crop=crop):
        buffer.append(frame)
        total += 1
        if len(buffer) == full:
          yield Clip(np.stack(buffer), caption, path, produced, float(options.fps))
          buffer, produced = [], produced + 1
          if produced == options.max_clips_per_video:
            return  # The rest is never decoded (nor checked for truncation).
      tail = valid_length(len(buffer), options.frame_multiple)
      if tail and _keep_tail(tail, produced, options):
        yield Clip(np.stack(buffer[:tail]), caption, path, produced, float(options.fps))
      elif produced == 0:
        raise _skip("too_small", path, f"gives {total} frames at fps={options.fps} (duration"
                    f" x fps); min_frames={options.min_frames}")
  except SkipFile as e:
    if e.path:
      raise
    raise _skip(e.reason, path, e.rule) from None  # Raised by a path-less helper.
  except media_checks.DecodeError as e:
    raise _skip(e.reason, path, e.detail) from None
  except av.FFmpegError as e:  # Any other FFmpeg failure on this file: never fatal to a run.
    raise _skip("corrupt", path, f"makes FFmpeg fail ({e.strerror or e})") from None


def process(item: InputItem, options: IngestOptions) -> list[Clip]:
  """All clips of one input (`iter_clips`, collected: a skip yields no partial result).

  Holds the whole file's clips in memory (T x H' x W' x 3 bytes: about 200 KB per frame at
  256x256, so ~1 GB for a 10-minute video at 8 fps); for long videos use `iter_clips`.

  Raises:
    SkipFile: with one of SKIP_REASONS.
  """
  return list(iter_clips(item, options))
