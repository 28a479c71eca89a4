"""Autoencoder latents on disk: ArrayRecord shards written by many processes, read at random.

The diffusion stage trains on the frozen autoencoder's posterior means. Encoding them once
and storing them turns the data pipeline into a read of a few kilobytes per clip (a 17x256x256
clip is 3.3 MB of pixels but 5x32x32x16 = 0.3 MB of float32 latents, half that in bfloat16),
and takes the encoder off the training step. Each writing process owns one shard, so N
processes (one per host) encode disjoint shares in parallel without coordination, and the
directory is usable only once the last step, `meta.json` with `complete: true`, exists:

  DIR/latents-00000-of-00002.array_record   records of process 0 (ArrayRecord, group_size:1)
  DIR/index-00000-of-00002.json             {"indices", "shapes", "latent_shapes"} in record order
  DIR/latents-00001-of-00002.array_record   ... process 1
  DIR/index-00001-of-00002.json
  DIR/meta.json                             written last, by one process, after every shard exists

A record is msgpack bytes in flax.serialization's format (so `flax.serialization.msgpack_restore`
reads it too; this module needs no JAX): a map
  {"latent": float32 or bfloat16 (t, h, w, C), "index": int (the source index),
   "shape": [T, H, W] (the clip's native VIDEO shape), "caption": str,
   optional "text_features" (S, D), "text_mask" (S,), "text_pooled" (D,) arrays}.
The text arrays are a frozen text encoder's caption features, stored ahead of time (float16
features and a bool mask from `spacetime_dit.training.latent_cache.text_encode_for`); the
loaders hand them to the DiT as "text_features" instead of running the encoder.
An array is msgpack ExtType 1 holding msgpack (shape, dtype name, C-order bytes).

group_size:1 makes every record its own compressed chunk, so reading one record decodes only
that record (grain warns about anything else: random access would decode whole groups).

Reading: `LatentShardSource(DIR)` is a Grain random-access source keyed by SOURCE index (the
clip's index in the video source it was encoded from), with the video source's `shape_of`, so
the shape buckets are those of the videos.
"""

import glob
import hashlib
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import ml_dtypes
import msgpack
import numpy as np
from array_record.python import array_record_module

from data_pipelines import atomic_files

FORMAT = "spacetime_dit.latent_shards/1"
META_FILE = "meta.json"
DTYPES = ("float32", "bfloat16")
TEXT_KEYS = ("text_features", "text_mask", "text_pooled")
# One record per chunk (random access); zstd at ArrayRecord's default level: latents compress
# little, but the header and caption do, and decompression costs far less than the read.
WRITER_OPTIONS = "group_size:1"
_EXT_NDARRAY = 1  # flax.serialization._MsgpackExtType.ndarray
# A shard, an index, or a temporary file of either (named by `atomic_files.temp_path`).
_SHARD_RE = re.compile(
    r"^(latents|index)-(\d{5})-of-(\d{5})\.(array_record|json)(\.[0-9a-f]+\.tmp)?$")

Shape = tuple[int, int, int]


class IncompleteLatentsError(FileNotFoundError):
  """The directory has no finished set of shards (no meta.json, or it is not complete)."""


class StaleLatentsError(ValueError):
  """The shards were encoded from other data or another autoencoder than asked for."""


def shard_path(directory: str, shard: int, num_shards: int) -> str:
  """DIR/latents-<shard>-of-<num_shards>.array_record: the records of one writing process."""
  return os.path.join(directory, f"latents-{shard:05d}-of-{num_shards:05d}.array_record")


def index_path(directory: str, shard: int, num_shards: int) -> str:
  """DIR/index-<shard>-of-<num_shards>.json: that shard's indices and shapes, in record order."""
  return os.path.join(directory, f"index-{shard:05d}-of-{num_shards:05d}.json")


def indices_digest(indices: Sequence[int]) -> str:
  """sha256 of the sorted unique source indices: compares index sets without listing them."""
  values = np.unique(np.asarray(indices, np.int64))
  return hashlib.sha256(values.astype("<i8").tobytes()).hexdigest()


# --- records -------------------------------------------------------------------------------


def _pack_ext(value):
  if isinstance(value, np.generic):
    return value.item()  # numpy scalars (an np.int64 index) as plain msgpack numbers.
  if isinstance(value, np.ndarray):
    if value.dtype.hasobject:
      raise ValueError(f"cannot store an object array (dtype {value.dtype}) in a latent record.")
    value = np.ascontiguousarray(value)
    payload = msgpack.packb((value.shape, value.dtype.name, value.tobytes("C")), use_bin_type=True)
    return msgpack.ExtType(_EXT_NDARRAY, payload)
  raise TypeError(f"cannot store {type(value).__name__} in a latent record.")


def _unpack_ext(code: int, data: bytes):
  if code != _EXT_NDARRAY:
    return msgpack.ExtType(code, data)
  shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
  # bfloat16 is not a numpy dtype name; ml_dtypes provides it (what jnp.bfloat16 is).
  dtype = ml_dtypes.bfloat16 if dtype_name == b"bfloat16" else np.dtype(dtype_name.decode())
  return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def encode_record(record: Mapping[str, Any]) -> bytes:
  """A record map -> msgpack bytes (arrays as flax.serialization's ndarray ExtType)."""
  return msgpack.packb(dict(record), default=_pack_ext, use_bin_type=True)


def decode_record(data: bytes) -> dict[str, Any]:
  """msgpack bytes -> the record map; arrays are read-only views of `data`."""
  return msgpack.unpackb(data, ext_hook=_unpack_ext, raw=False, strict_map_key=False)


# --- writing -------------------------------------------------------------------------------


class ShardWriter:
  """Writes one process's shard: `DIR/latents-<shard>-of-<num>.array_record` + its index json.

  Records go to a uniquely named temporary file (`atomic_files`) that `close()` renames into
  place, and the index json is written after the rename, so a shard that exists is whole. Use as a context manager: an
  exception inside the block deletes the temporary file instead of committing it.
  """

  def __init__(self, directory: str, shard: int, num_shards: int, *, dtype: str = "float32"):
    if not 0 <= shard < num_shards:
      raise ValueError(f"shard={shard} must be in [0, num_shards={num_shards}).")
    if dtype not in DTYPES:
      raise ValueError(f"latent dtype {dtype!r} is not one of {DTYPES}.")
    os.makedirs(directory, exist_ok=True)
    self.directory, self.shard, self.num_shards, self.dtype = directory, shard, num_shards, dtype
    self.path = shard_path(directory, shard, num_shards)
    self._tmp = atomic_files.temp_path(self.path)
    self._writer = array_record_module.ArrayRecordWriter(self._tmp, WRITER_OPTIONS)
    self._indices: list[int] = []
    self._shapes: list[list[int]] = []
    self._latent_shapes: list[list[int]] = []
    self._start = time.perf_counter()

  def __len__(self) -> int:
    return len(self._indices)

  def write(self, latent_thwc: np.ndarray, *, index: int, shape: Sequence[int], caption: str,
            text: Mapping[str, np.ndarray] | None = None) -> None:
    """Appends one clip.

    Args:
      latent_thwc: the posterior mean, float (t, h, w, C).
      index: the clip's index in the video source.
      shape: the clip's native video (T, H, W).
      caption: its caption.
      text: optional precomputed text encodings, keys among TEXT_KEYS.
    """
    latent = np.asarray(latent_thwc, np.float32)
    if latent.ndim != 4:
      raise ValueError(f"clip {index}: latent shape {latent.shape} is not (t, h, w, C).")
    if not np.isfinite(latent).all():
      # A NaN latent would silently poison every DiT step that draws it.
      raise ValueError(
          f"clip {index}: the encoder returned non-finite latents; the autoencoder checkpoint"
          " is broken (diverged?). Encode with a healthy checkpoint.")
    if len(shape) != 3:
      raise ValueError(f"clip {index}: native shape {tuple(shape)} is not (T, H, W).")
    record = {
        "latent": latent.astype(ml_dtypes.bfloat16) if self.dtype == "bfloat16" else latent,
        "index": int(index), "shape": [int(n) for n in shape], "caption": str(caption),
    }
    for key, value in (text or {}).items():
      if key not in TEXT_KEYS:
        raise ValueError(f"text key {key!r} is not one of {TEXT_KEYS}.")
      record[key] = np.asarray(value)
    self._writer.write(encode_record(record))
    self._indices.append(int(index))
    self._shapes.append(record["shape"])
    self._latent_shapes.append(list(latent.shape))

  def close(self) -> str:
    """Commits the shard (rename) and writes its index json; returns the shard's path."""
    self._writer.close()
    atomic_files.commit(self._tmp, self.path)
    atomic_files.write_json(index_path(self.directory, self.shard, self.num_shards), {
        "format": FORMAT, "shard": self.shard, "num_shards": self.num_shards, "dtype": self.dtype,
        "indices": self._indices, "shapes": self._shapes, "latent_shapes": self._latent_shapes,
        "seconds": round(time.perf_counter() - self._start, 3),
    })
    return self.path

  def abort(self) -> None:
    """Drops everything written (the shard keeps whatever committed version it had)."""
    self._writer.close()
    atomic_files.discard(self._tmp)

  def __enter__(self) -> "ShardWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()


def remove_stale(directory: str, num_shards: int) -> None:
  """Prepares `directory` for a new set of `num_shards` shards.

  Deletes meta.json first (so the directory reads as incomplete from this moment), then every
  shard and index file of another layout (a previous run with another process count). Files
  of this layout are left to their own writers, which replace them: deleting them here could
  race with a faster process that already wrote its new shard.
  """
  meta = os.path.join(directory, META_FILE)
  if os.path.exists(meta):
    os.remove(meta)
  for path in glob.glob(os.path.join(directory, "*")):
    match = _SHARD_RE.match(os.path.basename(path))
    if match and int(match.group(3)) != num_shards:
      os.remove(path)


def _read_indices(directory: str, num_shards: int) -> list[dict]:
  tables = []
  for shard in range(num_shards):
    path = index_path(directory, shard, num_shards)
    if not os.path.exists(path) or not os.path.exists(shard_path(directory, shard, num_shards)):
      raise IncompleteLatentsError(
          f"{directory}: shard {shard} of {num_shards} is missing ({os.path.basename(path)} or its"
          " .array_record): the process writing it did not finish. Rerun the encode"
          " (python -m spacetime_dit.encode_latents ... or the training command) to rebuild it.")
    with open(path, encoding="utf-8") as f:
      tables.append(json.load(f))
  return tables


def write_meta(directory: str, *, num_shards: int, fingerprint: str, num_examples: int,
               info: Mapping[str, Any] | None = None) -> dict:
  """Marks the directory complete: checks every shard, then writes meta.json (the last file).

  Call it from one process after all processes have closed their shard (a barrier).

  Args:
    directory: the shard directory.
    num_shards: shards expected (the writing process count).
    fingerprint: what the latents depend on (data + autoencoder); readers can demand it.
    num_examples: size of the video source the indices refer to (`len(source)`).
    info: extra JSON-able facts, e.g. the autoencoder directory, step and factors.

  Raises:
    IncompleteLatentsError: a shard or its index is missing.
    ValueError: two shards hold the same source index.
  """
  tables = _read_indices(directory, num_shards)
  indices = [i for t in tables for i in t["indices"]]
  if len(set(indices)) != len(indices):
    counts = np.unique(np.asarray(indices), return_counts=True)
    raise ValueError(
        f"{directory}: source indices {counts[0][counts[1] > 1][:10].tolist()} are in more than"
        " one shard; every process must encode a disjoint share. Rerun the encode.")
  dtypes = {t["dtype"] for t in tables}
  if len(dtypes) > 1:
    raise ValueError(f"{directory}: shards were written with different dtypes {sorted(dtypes)}.")
  shape_counts: dict[str, int] = {}
  for t in tables:
    for shape in t["shapes"]:
      key = "x".join(map(str, shape))
      shape_counts[key] = shape_counts.get(key, 0) + 1
  latent_shapes = [s for t in tables for s in t["latent_shapes"]]
  meta = {
      "format": FORMAT,
      "complete": True,
      "fingerprint": fingerprint,
      "num_shards": num_shards,
      "num_examples": int(num_examples),
      "num_latents": len(indices),
      "indices_sha256": indices_digest(indices),
      "dtype": dtypes.pop() if dtypes else "float32",
      "latent_channels": latent_shapes[0][-1] if latent_shapes else None,
      "shapes": dict(sorted(shape_counts.items())),
      # The slowest shard bounds the wall time of the (parallel) encode.
      "encode_seconds": max((t.get("seconds", 0.0) for t in tables), default=0.0),
      "info": dict(info or {}),
  }
  atomic_files.write_json(os.path.join(directory, META_FILE), meta)
  return meta


def read_meta(directory: str) -> dict:
  """The directory's meta.json.

  Raises:
    IncompleteLatentsError: no meta.json, or it does not say complete (an interrupted encode).
  """
  path = os.path.join(directory, META_FILE)
  if not os.path.exists(path):
    what = ("has shards but no meta.json" if glob.glob(os.path.join(directory, "latents-*"))
            else "holds no latent shards")
    raise IncompleteLatentsError(
        f"{directory} {what}: the encode was interrupted or never ran. Rerun"
        " `python -m spacetime_dit.encode_latents --autoencoder=... --data=... --output="
        f"{directory}` (or the training command that builds it); it rewrites the shards.")
  with open(path, encoding="utf-8") as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise IncompleteLatentsError(
        f"{path} has format {meta.get('format')!r}, not {FORMAT!r}. Re-encode into a new directory.")
  if not meta.get("complete"):
    raise IncompleteLatentsError(
        f"{path} is not marked complete: the encode was interrupted; rerun it (same command).")
  return meta


# --- reading -------------------------------------------------------------------------------


class LatentShardSource:
  """Random access to the latents of a complete shard directory, by source index.

  `source[i]` is {"latent": (t, h, w, C), "caption": str, "index": np.int64(i)} plus any
  stored text arrays; `shape_of(i)` is the clip's native VIDEO (T, H, W) (so shape buckets
  match the video source's); `latent_shape_of(i)` is (t, h, w, C) without reading the record.
  Only the source indices in `indices` (sorted int64) are present; `len(source)` is the size
  of the video source they index (like `range(len(video_source))`), not the number of latents.
  Thread-safe for Grain's reader threads and picklable for its worker processes.
  """

  def __init__(self, directory: str, *, fingerprint: str | None = None, dtype: Any = np.float32):
    """Opens `directory`.

    Args:
      directory: written by `ShardWriter`s + `write_meta`.
      fingerprint: if given, must equal the one recorded (else StaleLatentsError).
      dtype: latents are returned as this dtype (float32 by default, whatever is stored);
        None returns the stored dtype (bfloat16 if it was stored so).

    Raises:
      IncompleteLatentsError: the encode did not finish.
      StaleLatentsError: the fingerprint differs.
      ValueError: shards and meta.json disagree (files replaced after the encode).
    """
    self.directory = directory
    self.metadata = read_meta(directory)
    if fingerprint is not None and self.metadata["fingerprint"] != fingerprint:
      raise StaleLatentsError(
          f"latents in {directory} were encoded for {self.metadata['fingerprint']}, not for"
          f" {fingerprint}. Re-encode them (other data or autoencoder) or point at the right"
          " directory.")
    self._dtype = dtype
    num_shards = self.metadata["num_shards"]
    tables = _read_indices(directory, num_shards)
    keys = np.asarray([i for t in tables for i in t["indices"]], np.int64)
    if len(keys) != self.metadata["num_latents"] or indices_digest(keys) != self.metadata["indices_sha256"]:
      raise ValueError(
          f"{directory}: the shard index files do not match meta.json (shards replaced after the"
          " encode finished?). Re-encode the directory.")
    order = np.argsort(keys, kind="stable")
    self._indices = keys[order]
    self._records_of = order.astype(np.int64)  # Global record key of self._indices[k].
    self._shapes = np.asarray([s for t in tables for s in t["shapes"]], np.int64).reshape(-1, 3)[order]
    self._latent_shapes = np.asarray(
        [s for t in tables for s in t["latent_shapes"]], np.int64).reshape(-1, 4)[order]
    paths = [shard_path(directory, k, num_shards) for k in range(num_shards)]
    self._records = grain.sources.ArrayRecordDataSource(paths) if len(keys) else None
    if self._records is not None and len(self._records) != len(keys):
      raise ValueError(
          f"{directory}: the shards hold {len(self._records)} records but their index files list"
          f" {len(keys)}. Re-encode the directory.")

  def __len__(self) -> int:
    return int(self.metadata["num_examples"])

  def __repr__(self) -> str:
    return (f"LatentShardSource({self.directory!r}: {len(self._indices)} latents of"
            f" {len(self)} source clips, {self.metadata['num_shards']} shards)")

  @property
  def indices(self) -> np.ndarray:
    """The source indices present, sorted int64 (N,)."""
    return self._indices

  def _position(self, index: int) -> int:
    index = int(index)
    k = int(np.searchsorted(self._indices, index))
    if k == len(self._indices) or self._indices[k] != index:
      raise KeyError(
          f"clip {index} is not in the latent cache {self.directory} ({len(self._indices)} latents);"
          " read only LatentShardSource.indices.")
    return k

  def shape_of(self, index: int) -> Shape:
    """The clip's native VIDEO (T, H, W), from the index (no record read)."""
    return tuple(int(n) for n in self._shapes[self._position(index)])

  def latent_shape_of(self, index: int) -> tuple[int, int, int, int]:
    """The stored latent's (t, h, w, C), from the index (no record read)."""
    return tuple(int(n) for n in self._latent_shapes[self._position(index)])

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = decode_record(self._records[int(self._records_of[self._position(index)])])
    if record["index"] != int(index):
      raise ValueError(
          f"{self.directory}: record for clip {index} holds clip {record['index']}; the shards are"
          " corrupt. Re-encode the directory.")
    latent = record["latent"]
    example = {
        "latent": latent if self._dtype is None else latent.astype(self._dtype),
        "caption": record["caption"],
        "index": np.int64(index),
    }
    example.update({k: record[k] for k in TEXT_KEYS if k in record})
    return example
