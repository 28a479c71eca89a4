"""The diffusion stage's latent cache: encode each training clip once, into ArrayRecord shards.

On a CPU the frozen autoencoder's encoder costs several times the DiT step itself (a
13x32x32 clip batch: ~0.9 s of encoding against ~0.2 s of DiT); at pod scale it is still a
large share of the step and of the input bandwidth. So the clips are encoded once, their
posterior means stored as `data_pipelines.latent_shards` (one shard per process, read back
at random by source index), and the DiT trains on those.

`build` spreads the work over processes: process p encodes `sorted(indices)[p::P]`, grouped by
native shape (one compile per shape; the last batch of a shape is padded, so no recompile),
writes its shard atomically, meets the others at a barrier, and process 0 then marks the
directory complete (an exception on one process ends every process, see `encode_shards`).
A second run with the same fingerprint and index set reloads the directory without encoding
(a resumed run, or a directory made by `python -m spacetime_dit.encode_latents`); anything
else (another autoencoder, other clips, an interrupted encode) rebuilds it.
"""

import collections
import concurrent.futures
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from data_pipelines import latent_shards
from spacetime_dit.config_types import DataConfig
from spacetime_dit.config_types import MeshConfig
from spacetime_dit.models import autoencoder as autoencoder_lib
from spacetime_dit.sharding import mesh as mesh_lib
from spacetime_dit.training import steps

DIRECTORY = "latents"  # W/latents: the diffusion stage's own cache.
LatentSource = latent_shards.LatentShardSource  # What `build` returns (the old name).
Shape = tuple[int, int, int]
Encode = Callable[[np.ndarray], np.ndarray]
Barrier = Callable[[str], None]


def fingerprint(**parts) -> str:
  """A stable string of what the cached latents depend on."""
  return json.dumps(parts, sort_keys=True, default=str)


def autoencoder_info(ae_dir: str, step: int, config: autoencoder_lib.AutoencoderConfig) -> dict[str, Any]:
  """What meta.json records about the encoder: where it is, its step and its shape rules."""
  return {
      "autoencoder": ae_dir, "autoencoder_step": int(step),
      "temporal_factor": config.temporal_factor, "spatial_factor": config.spatial_factor,
      "latent_channels": config.latent_channels,
      # Latent stats stay the autoencoder's (ae_dir/latent_stats.json): they are not copied.
      "latent_shape": "t = 1 + (T - 1) / temporal_factor, h = H / spatial_factor, w = W / spatial_factor",
  }


def text_encode_for(front_end) -> Callable[[list[str]], dict[str, np.ndarray]] | None:
  """What the shards store of each caption for a frozen text front end, else None.

  A frozen encoder's features (`MiniLMTextEncoder`: float32 (B, S, E)) never change, so they are
  computed once here, next to the latents, and stored as float16 (half the bytes; MiniLM's
  LayerNorm-ed features are O(1), far inside float16's range, and its 1e-3 relative rounding is
  below what a DiT cross-attention resolves) with the bool mask. The loaders reuse them
  (`loader.text_batch`) instead of running the encoder. Trainable-encoder ids cost nothing to
  recompute: nothing is stored for them (None).
  """
  if getattr(front_end, "feature_shape", None) is None:
    return None

  def text_encode(captions: list[str]) -> dict[str, np.ndarray]:
    features, mask = front_end(captions)
    return {"text_features": np.asarray(features, np.float16), "text_mask": np.asarray(mask, bool)}

  return text_encode


def describe_text(front_end) -> dict[str, Any] | None:
  """The fingerprint part of the stored text features (None when nothing is stored): another
  encoder or length rebuilds the cache."""
  if getattr(front_end, "feature_shape", None) is None:
    return None
  return {"encoder": getattr(front_end, "name", type(front_end).__name__),
          "feature_shape": list(front_end.feature_shape), "stored_dtype": "float16"}


def describe_data(config: DataConfig, source=None) -> dict[str, Any]:
  """The part of a data config (plus a prepared source's dataset.json) that decides the clips.

  For fingerprints: loader settings (threads, packing, budgets) change no latent, so they are
  left out and changing them does not force a re-encode.
  """
  fields = ("source", "split", "seed", "sizes", "lengths", "max_objects", "holdout", "camera_pan_prob",
            "tfds_data_dir")
  described = {f: getattr(config, f) for f in fields if hasattr(config, f)}
  if config.source != "shapesworld":
    if os.path.isdir(config.source):
      described["source"] = os.path.abspath(config.source)
    # Preparing the directory again rewrites dataset.json (its parts, splits, shape counts).
    described["dataset"] = getattr(source, "metadata", None)
    described["num_examples"] = None if source is None else len(source)
  return described


def open_encoded(directory: str, *, ae_dir: str, ae_step: int,
                 config: autoencoder_lib.AutoencoderConfig) -> latent_shards.LatentShardSource:
  """Opens latents made by `encode_latents` for training, checking they are this autoencoder's.

  Raises:
    StaleLatentsError: they come from another checkpoint step, or factors / channels differ.
  """
  cache = latent_shards.LatentShardSource(directory)
  info = cache.metadata.get("info", {})
  expected = autoencoder_info(ae_dir, ae_step, config)
  keys = ("autoencoder_step", "temporal_factor", "spatial_factor", "latent_channels")
  differ = {k: (info.get(k), expected[k]) for k in keys if info.get(k) != expected[k]}
  if differ:
    raise latent_shards.StaleLatentsError(
        f"latents in {directory} were encoded by {info.get('autoencoder')} at step"
        f" {info.get('autoencoder_step')}, but this run's autoencoder is {ae_dir} at step {ae_step}"
        f" (differences, encoded vs now: {differ}). Re-encode with `python -m"
        f" spacetime_dit.encode_latents --autoencoder={ae_dir} --output={directory} --data=...`.")
  if os.path.realpath(str(info.get("autoencoder"))) != os.path.realpath(ae_dir):
    # Same step and shapes: most likely the same run, moved. Worth a line, not a refusal.
    logging.warning("latents in %s were encoded by %s, this run's autoencoder is %s (same step %d)",
                    directory, info.get("autoencoder"), ae_dir, ae_step)
  return cache


def make_local_encoder(autoencoder: nn.Module, params: Any, *, rules=MeshConfig().rules,
                       devices: Sequence[jax.Device] | None = None) -> Encode:
  """A jitted uint8 (B, T, H, W, 3) -> float32 (B, t, h, w, C) encoder on this process's devices.

  `build` has each process encode a different share of clips, at its own pace and shapes, so
  the encoder must not be a collective over a global mesh (processes would deadlock or mix
  their data). The parameters are copied whole to every local device (gathered from the
  other processes first when they are sharded across them: that gather is collective, so
  every process must call this at the same point), and the batch is split over the local
  devices, padded to a multiple of their count.
  """
  devices = list(jax.local_devices() if devices is None else devices)
  if not all(leaf.is_fully_addressable for leaf in jax.tree.leaves(params) if isinstance(leaf, jax.Array)):
    params = multihost_utils.process_allgather(params, tiled=True)
  mesh = mesh_lib.make_mesh(MeshConfig(data=len(devices), rules=tuple(rules)), devices)
  params = jax.device_put(params, mesh_lib.replicated(mesh))
  in_sharding = mesh_lib.batch_sharding(mesh, rules, 5)
  encode_fn = jax.jit(functools.partial(steps.encode_video, autoencoder))

  def encode(video_bthwc: np.ndarray) -> np.ndarray:
    real = len(video_bthwc)
    pad = -real % len(devices)
    if pad:
      video_bthwc = np.concatenate([video_bthwc, np.repeat(video_bthwc[-1:], pad, axis=0)])
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      latents = encode_fn(params, jax.device_put(video_bthwc, in_sharding))
    return np.asarray(jax.device_get(latents), np.float32)[:real]

  return encode


def _no_barrier(name: str) -> None:
  del name  # One process: nothing to wait for.


def _read_batches(source, chunks: Sequence[Sequence[int]], num_threads: int) -> Iterator[list[dict]]:
  """Yields [source[i] for i in chunk] per chunk, reading the next chunk while this one encodes.

  (Decoding a prepared clip costs as much as encoding it on an accelerator; threads overlap
  the two, as the GIL is released in both the decoders and XLA.)
  """
  with concurrent.futures.ThreadPoolExecutor(max_workers=num_threads) as pool:
    pending = collections.deque()
    upcoming = iter(chunks)
    for chunk in upcoming:
      pending.append([pool.submit(source.__getitem__, int(i)) for i in chunk])
      if len(pending) == 2:
        break
    while pending:
      futures = pending.popleft()
      nxt = next(upcoming, None)
      if nxt is not None:
        pending.append([pool.submit(source.__getitem__, int(i)) for i in nxt])
      yield [f.result() for f in futures]


def load_if_current(directory: str, fingerprint: str, indices: Sequence[int],
                    dtype: str = "float32") -> latent_shards.LatentShardSource | None:
  """The cache in `directory` if it is complete and was built from exactly this request, else None.

  "This request" is the same fingerprint, the same set of source indices and the same dtype.
  """
  try:
    cache = latent_shards.LatentShardSource(directory, fingerprint=fingerprint)
  except latent_shards.IncompleteLatentsError:
    logging.info("no complete latent cache in %s (absent or interrupted): encoding", directory)
    return None
  except ValueError as e:  # Stale fingerprint, or shards that disagree with meta.json.
    logging.info("latent cache %s is stale: %s", directory, e)
    return None
  if cache.metadata["indices_sha256"] != latent_shards.indices_digest(indices):
    logging.info("latent cache %s holds other clips than asked for: rebuilding", directory)
    return None
  if cache.metadata["dtype"] != dtype:
    logging.info("latent cache %s is %s, not %s: rebuilding", directory, cache.metadata["dtype"], dtype)
    return None
  return cache


def _check_run(process_index: int, process_count: int, barrier: Barrier | None, batch_size: int,
               dtype: str) -> None:
  """Argument checks every process fails alike (so none waits for another at a barrier)."""
  if process_count > 1 and barrier is None:
    raise ValueError(
        f"process_count={process_count} needs a barrier so no process reads the cache before all"
        " shards exist; pass barrier=jax.experimental.multihost_utils.sync_global_devices.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1.")
  if dtype not in latent_shards.DTYPES:
    raise ValueError(f"latent dtype {dtype!r} is not one of {latent_shards.DTYPES}.")


def build(
    source,
    indices: Sequence[int],
    encode: Encode,
    *,
    fingerprint: str,
    directory: str,
    batch_size: int = 16,
    process_index: int = 0,
    process_count: int = 1,
    barrier: Barrier | None = None,
    progress: bool = True,
    dtype: str = "float32",
    info: dict[str, Any] | None = None,
    text_encode: Callable[[list[str]], dict[str, np.ndarray]] | None = None,
    num_threads: int = 2,
) -> latent_shards.LatentShardSource:
  """The cache of `indices` in `directory`: reloaded when current (`load_if_current`), else
  encoded (`encode_shards`, whose docstring describes the arguments and the failure modes).

  Every process calls it with the same arguments but its own `process_index`; they all read
  the same files, so they all take the same branch.
  """
  _check_run(process_index, process_count, barrier, batch_size, dtype)
  cache = load_if_current(directory, fingerprint, indices, dtype)
  if cache is not None:
    logging.info("reloaded %d cached latents from %s", len(cache.indices), directory)
    return cache
  return encode_shards(
      source, indices, encode, fingerprint=fingerprint, directory=directory,
      batch_size=batch_size, process_index=process_index, process_count=process_count,
      barrier=barrier, progress=progress, dtype=dtype, info=info, text_encode=text_encode,
      num_threads=num_threads)


def _encode_share(source, mine: np.ndarray, encode: Encode, writer: latent_shards.ShardWriter, *,
                  batch_size: int, progress: bool, text_encode, num_threads: int) -> None:
  """Encodes this process's clips `mine` into `writer`, grouped by native shape."""
  shapes = {int(i): tuple(int(n) for n in source.shape_of(int(i))) for i in mine}
  groups = collections.defaultdict(list)
  for index, shape in shapes.items():
    groups[shape].append(index)
  chunks = [members[s:s + batch_size]
            for _, members in sorted(groups.items()) for s in range(0, len(members), batch_size)]
  with tqdm.tqdm(total=len(mine), desc="encoding latents", leave=False,
                 disable=not progress) as bar:
    for chunk, examples in zip(chunks, _read_batches(source, chunks, num_threads)):
      videos = [np.asarray(e["video"]) for e in examples]
      for i, video in zip(chunk, videos):
        if video.shape[:3] != shapes[i]:
          raise ValueError(
              f"clip {i}: source.shape_of gives {shapes[i]} but its video is {video.shape[:3]};"
              " the source's index is out of date. Re-prepare the data.")
      # Pad to the full batch with the last clip: every call of a shape compiles once.
      batch = np.stack(videos + [videos[-1]] * (batch_size - len(videos)))
      latents = np.asarray(encode(batch))[:len(chunk)]
      captions = [str(e["caption"]) for e in examples]
      text = text_encode(captions) if text_encode is not None else {}
      for k, (i, caption, latent) in enumerate(zip(chunk, captions, latents)):
        writer.write(latent, index=i, shape=shapes[i], caption=caption,
                     text={key: value[k] for key, value in text.items()})
      bar.update(len(chunk))


def encode_shards(
    source,
    indices: Sequence[int],
    encode: Encode,
    *,
    fingerprint: str,
    directory: str,
    batch_size: int = 16,
    process_index: int = 0,
    process_count: int = 1,
    barrier: Barrier | None = None,
    progress: bool = True,
    dtype: str = "float32",
    info: dict[str, Any] | None = None,
    text_encode: Callable[[list[str]], dict[str, np.ndarray]] | None = None,
    num_threads: int = 2,
) -> latent_shards.LatentShardSource:
  """Encodes `source[i]["video"]` for every i in `indices` into `directory`, replacing its shards.

  Every process calls it with the same arguments but its own `process_index`; process p
  encodes `sorted(indices)[p::process_count]` into its own shard.

  Failures with several processes. A process whose share fails with an exception (a NaN
  latent refused by the ShardWriter, a clip whose decoded shape disagrees with `shape_of`, a
  full disk, an encoder error) still meets the others at both barriers, writes no shard and
  raises its error afterwards; process 0 then does not mark the directory complete, and every
  other process raises IncompleteLatentsError naming the missing shard. So an error ends the
  whole job instead of leaving the other processes blocked. What remains: a process that dies
  outright (killed, out of memory, preempted, a crash in native code) or hangs never reaches
  the barrier, and the others wait in it for good (`sync_global_devices` has no timeout); the
  launcher must then stop the job. Arguments that would fail on every process alike are
  checked before any work.

  Args:
    source: random-access clip source with `shape_of(i) -> (T, H, W)` and `len()`;
      `source[i]` is {"video": uint8 (T, H, W, 3), "caption": str, ...}.
    indices: the source indices to cache (the diffusion stage's training set); every native
      shape must be one the encoder takes (drop others first, e.g. `data.usable_indices`).
    encode: uint8 (B, T, H, W, 3) -> float (B, t, h, w, C), local to this process (see
      `make_local_encoder`); called with B = batch_size always.
    fingerprint: identifies what the latents depend on (`load_if_current` compares it).
    directory: where the shards live.
    batch_size: clips encoded together (one compile per native shape).
    process_index, process_count: this process and how many share the work.
    barrier: `name -> None` that returns once every process has called it with that name,
      e.g. `jax.experimental.multihost_utils.sync_global_devices`; required with several
      processes (they must all have written their shard before the directory is marked
      complete, and it must be complete before anyone reads it).
    progress: show a tqdm bar (process 0 only).
    dtype: stored latent dtype, "float32" or "bfloat16" (half the disk and read bandwidth).
    info: extra facts for meta.json (e.g. `autoencoder_info(...)`).
    text_encode: optional captions (B,) -> {"text_features": (B, S, D), ...} stored per clip.
    num_threads: threads that read source clips ahead of the encoder.

  Returns:
    The whole directory (every process's shard) as a `LatentShardSource`.
  """
  _check_run(process_index, process_count, barrier, batch_size, dtype)
  barrier = barrier or _no_barrier
  mine = np.unique(np.asarray(indices, np.int64))[process_index::process_count]
  start = time.perf_counter()
  error = None
  try:
    if process_index == 0:
      latent_shards.remove_stale(directory, process_count)
    with latent_shards.ShardWriter(directory, process_index, process_count, dtype=dtype) as writer:
      _encode_share(source, mine, encode, writer, batch_size=batch_size,
                    progress=progress and process_index == 0, text_encode=text_encode,
                    num_threads=num_threads)
  except Exception as e:  # pylint: disable=broad-except  (re-raised after the barriers)
    error = e
    logging.error("process %d failed to encode its %d clips: %s", process_index, len(mine), e)
  else:
    seconds = time.perf_counter() - start
    logging.info("process %d encoded %d clips in %.1f s (%.1f clips/s)", process_index,
                 len(mine), seconds, len(mine) / max(seconds, 1e-9))

  barrier("latent_cache:shards_written")
  if process_index == 0 and error is None:
    try:
      latent_shards.write_meta(directory, num_shards=process_count, fingerprint=fingerprint,
                               num_examples=len(source), info=info)
    except Exception as e:  # pylint: disable=broad-except  (re-raised after the barrier)
      error = e
  barrier("latent_cache:meta_written")
  if error is not None:
    raise error
  try:
    return latent_shards.LatentShardSource(directory, fingerprint=fingerprint)
  except latent_shards.IncompleteLatentsError as e:
    raise latent_shards.IncompleteLatentsError(
        f"{directory} was not marked complete: another process failed to encode its share (its"
        f" log has the error). Fix that and rerun the same command. ({e})") from e
