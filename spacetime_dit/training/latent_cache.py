"""An in-memory latent cache for the diffusion stage: encode each training clip once.

On a CPU the frozen autoencoder's encoder costs several times the DiT step itself (a
13x32x32 clip batch: ~0.9 s of encoding against ~0.2 s of DiT), so the diffusion stage
encodes a fixed sample of the training clips once, keeps their posterior means, and
trains on those. The cache is written to `W/latent_cache.npz` so a resumed run reloads it
instead of encoding again; a fingerprint of the data config and the autoencoder checkpoint
guards against reusing a stale one.
"""

import collections
import json
import logging
import os
from collections.abc import Callable, Sequence

import numpy as np
import tqdm

Shape = tuple[int, int, int]
FILE = "latent_cache.npz"


class LatentSource:
  """Random access to cached latents with the clip source's indices and native shapes.

  `shape_of(i)` is the clip's native video (T, H, W), so buckets are the same as for the
  video source; `source[i]` is `{"latent": float32 (t, h, w, C), "caption": str, "index"}`.
  Only cached indices can be read.
  """

  def __init__(self, num_examples: int, shapes: dict[int, Shape], latents: dict[int, np.ndarray],
               captions: dict[int, str]):
    self._num_examples = num_examples
    self._shapes, self._latents, self._captions = shapes, latents, captions

  def __len__(self) -> int:
    return self._num_examples

  def __repr__(self) -> str:
    return f"LatentSource({len(self._latents)} cached of {self._num_examples})"

  @property
  def indices(self) -> np.ndarray:
    return np.asarray(sorted(self._latents), np.int64)

  def shape_of(self, index: int) -> Shape:
    return self._shapes[int(index)]

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if index not in self._latents:
      raise KeyError(f"clip {index} is not in the latent cache; read only LatentSource.indices.")
    return {"latent": self._latents[index], "caption": self._captions[index], "index": np.int64(index)}


def _encode_group(encode: Callable, videos: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
  """Encodes same-shape clips in fixed-size batches (the last one padded: one compile)."""
  out = []
  for start in range(0, len(videos), batch_size):
    chunk = list(videos[start:start + batch_size])
    real = len(chunk)
    chunk += [chunk[-1]] * (batch_size - real)
    out.append(np.asarray(encode(np.stack(chunk)))[:real])
  return np.concatenate(out)


def build(
    source,
    indices: Sequence[int],
    encode: Callable[[np.ndarray], np.ndarray],
    *,
    batch_size: int = 16,
    fingerprint: str = "",
    path: str | None = None,
    write: bool = True,
) -> LatentSource:
  """Encodes `source[i]["video"]` for every i in `indices` (or reloads `path`).

  Args:
    source: random-access clip source with `shape_of`.
    indices: the clips to cache (the diffusion stage's training set).
    encode: uint8 (B, T, H, W, 3) -> float32 latent (B, t, h, w, C), e.g. a jitted encoder.
    batch_size: clips encoded together (one compile per native shape).
    fingerprint: identifies what the latents depend on; a saved cache with another is rebuilt.
    path: where to save / reload the cache; None keeps it in memory only.
    write: whether this process writes `path` (process 0 in multi-process runs).
  """
  shapes = {int(i): tuple(source.shape_of(int(i))) for i in indices}
  if path and os.path.exists(path):
    loaded = _load(path, fingerprint, len(source), shapes)
    if loaded is not None:
      logging.info("reloaded %d cached latents from %s", len(shapes), path)
      return loaded
  groups = collections.defaultdict(list)
  for index, shape in shapes.items():
    groups[shape].append(index)
  latents, captions = {}, {}
  bar = tqdm.tqdm(total=len(shapes), desc="encoding latents", leave=False)
  for shape, members in sorted(groups.items()):
    examples = [source[i] for i in members]
    encoded = _encode_group(encode, [e["video"] for e in examples], batch_size)
    for index, example, latent in zip(members, examples, encoded):
      latents[index], captions[index] = latent, str(example["caption"])
    bar.update(len(members))
  bar.close()
  cache = LatentSource(len(source), shapes, latents, captions)
  if path and write:
    _save(path, cache, fingerprint)
  return cache


def _save(path: str, cache: LatentSource, fingerprint: str) -> None:
  indices = cache.indices
  arrays = {"indices": indices, "fingerprint": np.asarray(fingerprint)}
  arrays["captions"] = np.asarray([cache[i]["caption"] for i in indices], np.str_)
  by_shape = collections.defaultdict(list)
  for i in indices:
    by_shape[cache.shape_of(i)].append(i)
  for shape, members in by_shape.items():
    key = "x".join(map(str, shape))
    arrays[f"indices_{key}"] = np.asarray(members, np.int64)
    arrays[f"latents_{key}"] = np.stack([cache[i]["latent"] for i in members])
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)  # Atomic: a crash mid-write never leaves a truncated cache.


def _load(path: str, fingerprint: str, num_examples: int, shapes: dict[int, Shape]) -> LatentSource | None:
  with np.load(path) as data:
    if str(data["fingerprint"]) != fingerprint or set(data["indices"].tolist()) != set(shapes):
      logging.info("latent cache %s is stale (other data or autoencoder): rebuilding", path)
      return None
    captions = dict(zip(data["indices"].tolist(), data["captions"].tolist()))
    latents = {}
    for name in data.files:
      if name.startswith("latents_"):
        key = name[len("latents_"):]
        latents.update(zip(data[f"indices_{key}"].tolist(), data[name]))
  return LatentSource(num_examples, shapes, latents, captions)


def fingerprint(**parts) -> str:
  """A stable string of what the cached latents depend on."""
  return json.dumps(parts, sort_keys=True, default=str)
