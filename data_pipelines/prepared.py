"""Random-access sources over prepared datasets, for Grain (`grain.MapDataset.source(...)`).

- `PreparedSource` (via `open_prepared(DIR)`): a dataset written by `python -m
  data_pipelines.prepare`; all parts' TFDS data sources concatenated in part order. Shapes come
  from each part's index.json, so `shape_of`/`shapes()` (what bucketing needs) never touch the
  shards.
- `TfdsSource`: any TFDS dataset readable with `tfds.data_source` whose video feature is a uint8
  array (T, H, W, 3) or (H, W, 3), a list of frames, or bytes from `clip_codec.encode_clip`.

Both yield {"video": uint8 (T, H, W, 3), "caption": str, "index": np.int64, "source_path": str,
"clip_index": np.int32 (clip k of its source video; 0 when the dataset has no such feature)}
and satisfy `data_pipelines.loader.ShapedSource`. They are picklable (Grain worker processes):
the open TFDS data sources are dropped on pickling and reopened on first use. Neither imports
TensorFlow, JAX or Grain.
"""

import bisect
import json
import operator
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import clip_codec

# The layout's names, defined here (the reader) and imported by the writer, `prepare`.
FORMAT = "spacetime_dit.prepared/1"  # dataset.json "format"; bump when the layout changes.
DATASET_FILE = "dataset.json"  # DIR/dataset.json: written last, once every part is finished.
INDEX_FILE = "index.json"  # DIR/part-*/index.json: [T, H, W] per record, per split.


def is_prepared_dir(path: str) -> bool:
  """True when `path` holds a finished prepared dataset (a dataset.json of our format)."""
  meta = os.path.join(os.fspath(path), DATASET_FILE)
  if not os.path.isfile(meta):
    return False
  try:
    with open(meta) as f:
      return json.load(f).get("format") == FORMAT
  except (OSError, ValueError):
    return False


def open_prepared(directory: str, split: str = "train") -> "PreparedSource":
  """The clips of one split of a dataset written by `python -m data_pipelines.prepare`.

  Args:
    directory: the prepare run's --output (it holds dataset.json).
    split: "train" or "validation".

  Returns:
    A `PreparedSource` (Grain random-access source; `shape_of` reads no shard).

  Raises:
    FileNotFoundError: `directory` has no dataset.json (not prepared, or parts unfinished).
    ValueError: another format version, a split it does not have, or parts that disagree.
  """
  return PreparedSource(directory, split)


def _as_text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _check_index(index: int, length: int) -> int:
  """A non-negative index < length (negative ones count from the end, like lists)."""
  index = operator.index(index)
  if index < 0:
    index += length
  if not 0 <= index < length:
    raise IndexError(f"index {index} is out of range for a source of {length} clips.")
  return index


def _as_video(value: Any) -> np.ndarray:
  """A record's video feature as uint8 (T, H, W, 3): bytes are decoded, frame lists stacked."""
  if isinstance(value, (bytes, bytearray, np.bytes_)):
    video = clip_codec.decode_clip(bytes(value), "auto")
  elif isinstance(value, (list, tuple)):
    video = np.stack([np.asarray(f) for f in value]) if value else np.zeros((0,), np.uint8)
  else:
    video = np.asarray(value)
    if video.dtype == object and video.ndim == 0:
      return _as_video(video.item())
    if video.ndim == 3:  # An image: one frame.
      video = video[None]
  if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3 or not video.size:
    raise ValueError(f"video feature is {video.dtype} {video.shape}; the sources need uint8 "
                     "(T, H, W, 3) frames, (H, W, 3) images, a list of frames, or encode_clip "
                     "bytes. Convert the dataset's video feature to one of those.")
  return video


class PreparedSource:
  """All clips of one split of a prepared dataset (module docstring).

  __getitem__(i) -> {"video": uint8 (T, H, W, 3), "caption": str, "index": np.int64(i),
  "source_path": str, "clip_index": np.int32}; shape_of(i) -> (T, H, W) from the index,
  without reading the shards.
  """

  def __init__(self, directory: str, split: str = "train"):
    self.directory = os.path.abspath(os.fspath(directory))
    meta_path = os.path.join(self.directory, DATASET_FILE)
    if not os.path.isfile(meta_path):
      raise FileNotFoundError(
          f"{self.directory} has no {DATASET_FILE}, so it is not a finished prepared dataset. "
          "Prepare one with python -m data_pipelines.prepare --input=... --output=DIR (or run "
          "--merge there once all parts are done).")
    with open(meta_path) as f:
      self.metadata: dict[str, Any] = json.load(f)
    if self.metadata.get("format") != FORMAT:
      raise ValueError(f"{meta_path} has format {self.metadata.get('format')!r}; this reader "
                       f"reads {FORMAT!r}. Prepare the dataset again with this version.")
    splits = self.metadata["splits"]
    if split not in splits:
      raise ValueError(f"split {split!r} is not in {self.directory}; it has {sorted(splits)}.")
    self.split = split
    self.codec = self.metadata["options"]["codec"]
    self._tfds_dirs = [os.path.join(self.directory, d) for d in self.metadata["tfds_dirs"]]
    self._shapes: list[tuple[int, int, int]] = []
    self._offsets = [0]  # Part k holds global indices offsets[k] .. offsets[k+1] - 1.
    for part in self.metadata["parts"]:
      with open(os.path.join(self.directory, part, INDEX_FILE)) as f:
        part_shapes = json.load(f).get(split, [])
      self._shapes.extend(tuple(int(d) for d in s) for s in part_shapes)
      self._offsets.append(len(self._shapes))
    if len(self._shapes) != splits[split]:
      raise ValueError(f"{self.directory}: the parts' index.json list {len(self._shapes)} "
                       f"{split} clips, dataset.json says {splits[split]}; the dataset is "
                       "inconsistent. Run prepare --merge, or prepare it again.")
    self._sources: list[Any] | None = None

  def __len__(self) -> int:
    return len(self._shapes)

  def __repr__(self) -> str:
    return (f"PreparedSource({self.directory!r}, split={self.split!r}, clips={len(self)}, "
            f"parts={len(self._tfds_dirs)})")

  def __getstate__(self):
    return {**self.__dict__, "_sources": None}  # Reopened lazily in each worker.

  def _source(self, part: int):
    if self._sources is None:
      self._sources = [None] * len(self._tfds_dirs)
    if self._sources[part] is None:
      builder = tfds.builder_from_directory(self._tfds_dirs[part])
      source = builder.as_data_source(self.split)
      expected = self._offsets[part + 1] - self._offsets[part]
      if len(source) != expected:
        raise ValueError(f"{self._tfds_dirs[part]} holds {len(source)} {self.split} records but "
                         f"its index.json lists {expected}; prepare that part again.")
      self._sources[part] = source
    return self._sources[part]

  def shape_of(self, index: int) -> tuple[int, int, int]:
    """(T, H, W) of clip `index`, from index.json (no decoding)."""
    return self._shapes[_check_index(index, len(self))]

  def shapes(self) -> list[tuple[int, int, int]]:
    """(T, H, W) of every clip, in index order."""
    return list(self._shapes)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = _check_index(index, len(self))
    part = bisect.bisect_right(self._offsets, index) - 1
    record = self._source(part)[index - self._offsets[part]]
    video = clip_codec.decode_clip(record["video"], self.codec)
    if video.shape != (*self._shapes[index], 3):
      raise ValueError(
          f"clip {index} of {self.directory} ({_as_text(record['source_path'])} #"
          f"{int(record['clip_index'])}) decodes to {video.shape}, but index.json says "
          f"{(*self._shapes[index], 3)}. The shards and the index disagree; prepare the dataset "
          "again.")
    return {"video": video, "caption": _as_text(record["caption"]), "index": np.int64(index),
            "source_path": _as_text(record["source_path"]),
            "clip_index": np.int32(record["clip_index"])}


class TfdsSource:
  """Any `tfds.data_source(name, data_dir=..., split=...)` with a video and a caption feature.

  Args:
    name: TFDS name, e.g. "spacetime_videos/<config>" or "my_videos:1.0.0".
    data_dir: where the prepared TFDS data lives.
    split: e.g. "train", "validation[:10%]".
    video_key, caption_key: the feature names.
  """

  def __init__(self, name: str, data_dir: str | None = None, split: str = "train", *,
               video_key: str = "video", caption_key: str = "caption"):
    self.name, self.data_dir, self.split = name, data_dir, split
    self.video_key, self.caption_key = video_key, caption_key
    self._source = None
    length = len(self._data_source())
    if length < 1:
      raise ValueError(f"TFDS {name!r} split {split!r} in {data_dir} has no records.")
    record = self._data_source()[0]
    missing = [k for k in (video_key, caption_key) if k not in record]
    if missing:
      raise ValueError(f"TFDS {name!r} records have features {sorted(record)}, not {missing}; "
                       "pass video_key= / caption_key= naming the right ones.")

  def _data_source(self):
    if self._source is None:
      self._source = tfds.data_source(self.name, data_dir=self.data_dir, split=self.split)
    return self._source

  def __getstate__(self):
    return {**self.__dict__, "_source": None}

  def __len__(self) -> int:
    return len(self._data_source())

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, data_dir={self.data_dir!r}, split={self.split!r})"

  def shape_of(self, index: int) -> tuple[int, int, int]:
    """(T, H, W): from num_frames/height/width features when the dataset has them (ours does),
    else by decoding the clip."""
    record = self._data_source()[_check_index(index, len(self))]
    if all(k in record for k in ("num_frames", "height", "width")):
      return int(record["num_frames"]), int(record["height"]), int(record["width"])
    return tuple(int(d) for d in _as_video(record[self.video_key]).shape[:3])

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = _check_index(index, len(self))
    record = self._data_source()[index]
    source_path = record.get("source_path", f"{self.name}/{self.split}[{index}]")
    return {"video": _as_video(record[self.video_key]),
            "caption": _as_text(record[self.caption_key]), "index": np.int64(index),
            "source_path": _as_text(source_path),
            "clip_index": np.int32(record.get("clip_index", 0))}
