"""A Grain pipeline that yields shape-homogeneous, per-process batches from shape buckets.

Grain 0.2.18 has no bucketing, so each bucket is its own random-access pipeline
(`MapDataset.source -> shuffle -> repeat -> map(load) -> batch(tokenize)`), and
`MapDataset.mix` interleaves their batches by the bucket weights. Everything stays a
`MapDataset` up to the final `to_iter_dataset`, so the iterator's whole state is the number
of batches taken: `get_state`/`set_state` (and Orbax through `grain.checkpoint`) restore the
exact next batch.

Multi-process rule: which bucket step k draws from depends only on the bucket weights and
the seed, never on the process, so every process gets the same batch shape at the same
step (one compiled shape per step across the job, as multi-process `jax.jit` requires).
The clips are split between processes: each bucket's clip indices are shuffled with a
global, seed-derived permutation and process p keeps `permuted[p::process_count]`, so the
processes read disjoint slices whose union is the whole bucket.
"""

from collections.abc import Callable, Mapping, Sequence
import functools
from typing import Any, Protocol

import grain
import numpy as np

from data_pipelines import buckets as buckets_lib

Tokenizer = Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]  # -> (ids_bs, mask_bs)

# Stream ids that keep the seeds of the independent random choices below apart.
_SHARD_STREAM = 0
_SHUFFLE_STREAM = 1
_MIX_STREAM = 2
_SAMPLE_STREAM = 3


class ShapedSource(Protocol):
  """A Grain random-access source that also reports clip shapes without decoding them."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> Mapping[str, Any]:
    ...  # {"video": uint8 (T, H, W, 3), "caption": str, ...}

  def shape_of(self, index: int) -> tuple[int, int, int]:
    ...  # (T, H, W)


def _derived_seed(seed: int, *stream: int) -> int:
  """An independent 32-bit seed for one random choice (bucket k's shuffle, the mix, ...)."""
  return int(np.random.SeedSequence([seed, *stream]).generate_state(1)[0])


def select_indices(
    num_examples: int, *, num_samples: int | None = None, seed: int = 0
) -> np.ndarray:
  """The source indices the loader reads, sorted int64 (N,).

  `num_samples=None` keeps all `num_examples`. Otherwise a seeded uniform sample without
  replacement of `num_samples` indices: for a huge virtual source, calling `shape_of` on
  every index is too slow (ShapesWorld: about 0.3 ms each, so 5 minutes for its 1e6
  examples), and a sample of, say, 1e4-1e5 clips is both a faithful estimate of the shape
  distribution and the training set itself (the loader then reads only these indices, epoch
  after epoch). The sample is uniform, so it also suits sources stored in a meaningful order.
  """
  if num_examples < 1:
    raise ValueError(f"the source has {num_examples} examples; the loader needs at least one.")
  if num_samples is None or num_samples >= num_examples:
    return np.arange(num_examples, dtype=np.int64)
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1 (or None for all examples), got {num_samples}.")
  rng = np.random.default_rng(_derived_seed(seed, _SAMPLE_STREAM))
  return np.sort(rng.choice(num_examples, size=num_samples, replace=False)).astype(np.int64)


def shapes_of(source: ShapedSource, indices: Sequence[int]) -> list[tuple[int, int, int]]:
  """`source.shape_of(i)` for every index, as (T, H, W) tuples (the input of compute_buckets)."""
  if not hasattr(source, "shape_of"):
    raise ValueError(
        f"{type(source).__name__} has no shape_of(index) -> (T, H, W); bucketing needs clip "
        "shapes without decoding. Add shape_of to the source."
    )
  return [tuple(int(d) for d in source.shape_of(int(i))) for i in indices]


def bucket_members(
    indices: Sequence[int], shapes: Sequence[Sequence[int]], buckets: Sequence[buckets_lib.Bucket]
) -> list[np.ndarray]:
  """For each bucket, the int64 indices (in `indices` order) whose shape is the bucket's.

  Indices whose shape has no bucket (rejected by compute_buckets) are left out.
  """
  if len(indices) != len(shapes):
    raise ValueError(
        f"got {len(indices)} indices but {len(shapes)} shapes; pass one (T, H, W) per index."
    )
  position = {tuple(b.shape): k for k, b in enumerate(buckets)}
  if len(position) != len(buckets):
    raise ValueError(f"two buckets share a shape: {[b.shape for b in buckets]}.")
  members: list[list[int]] = [[] for _ in buckets]
  for index, shape in zip(indices, shapes):
    k = position.get(tuple(int(d) for d in shape))
    if k is not None:
      members[k].append(int(index))
  return [np.asarray(m, dtype=np.int64) for m in members]


def shard_members(
    members: np.ndarray, *, bucket_id: int, seed: int, process_index: int, process_count: int
) -> np.ndarray:
  """This process's disjoint slice of one bucket's indices.

  A permutation seeded by (seed, bucket_id) -- identical on every process -- then a strided
  slice `permuted[process_index::process_count]`. The shuffle first spreads any ordering of
  the source (e.g. files sorted by date) evenly over the processes.
  """
  rng = np.random.default_rng(_derived_seed(seed, _SHARD_STREAM, bucket_id))
  return rng.permutation(members)[process_index::process_count]


def _load(index: int, *, source: ShapedSource, shape: tuple[int, int, int]) -> dict[str, Any]:
  """Reads one clip and checks it has the shape its bucket promises.

  A source yields either a uint8 "video" (T, H, W, 3) of exactly `shape`, or a "latent"
  (t, h, w, C) of that clip (a latent cache), whose native shape is still `shape`.
  """
  example = source[int(index)]
  row = {"caption": str(example["caption"]), "index": np.int64(index)}
  if "latent" in example:
    row["latent"] = np.asarray(example["latent"], np.float32)
    if row["latent"].ndim != 4:
      raise ValueError(
          f"source[{int(index)}] has a latent of shape {row['latent'].shape}; it must be (t, h, w, C)."
      )
    return row
  video_thwc = np.asarray(example["video"])
  if video_thwc.shape != (*shape, 3) or video_thwc.dtype != np.uint8:
    raise ValueError(
        f"source[{int(index)}] has video {video_thwc.dtype} {video_thwc.shape}, but shape_of said "
        f"{shape} (expected uint8 {(*shape, 3)}). shape_of and __getitem__ must agree."
    )
  row["video"] = video_thwc
  return row


def _collate(elements: Sequence[dict[str, Any]], *, tokenize: Tokenizer) -> dict[str, np.ndarray]:
  """Stacks clips of one shape and tokenizes their captions as one batch."""
  captions = [e["caption"] for e in elements]
  ids_bs, mask_bs = (np.asarray(a) for a in tokenize(captions))
  b = len(elements)
  if ids_bs.ndim != 2 or ids_bs.shape[0] != b or mask_bs.shape != ids_bs.shape:
    raise ValueError(
        f"tokenize({b} captions) returned ids {ids_bs.shape} and mask {mask_bs.shape}; it must "
        f"return two arrays of shape ({b}, S)."
    )
  field = "latent" if "latent" in elements[0] else "video"
  return {
      field: np.stack([e[field] for e in elements]),
      "text_ids": ids_bs.astype(np.int32),
      "text_mask": mask_bs.astype(bool),
      "index": np.asarray([e["index"] for e in elements], dtype=np.int64),
      "caption": np.asarray(captions, dtype=np.str_),
  }


def _check_processes(buckets: Sequence[buckets_lib.Bucket], process_index: int, process_count: int):
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index={process_index} must be in [0, process_count={process_count}); pass "
        "jax.process_index() and jax.process_count()."
    )
  if not buckets:
    raise ValueError("no buckets; build them with compute_buckets.")
  for b in buckets:
    if b.batch_size % process_count:
      raise ValueError(
          f"bucket {b.shape} has global batch_size={b.batch_size}, not divisible by "
          f"process_count={process_count}; include the process count in compute_buckets' "
          "batch_multiple."
      )


def make_bucketed_dataset(
    source: ShapedSource,
    *,
    buckets: Sequence[buckets_lib.Bucket],
    seed: int,
    tokenize: Tokenizer,
    process_index: int = 0,
    process_count: int = 1,
    indices: Sequence[int] | None = None,
    num_index_samples: int | None = None,
    shapes: Sequence[Sequence[int]] | None = None,
    mix_window: int = 32,
) -> grain.MapDataset:
  """The infinite `MapDataset` of per-process batches behind `make_bucketed_iterator`.

  See `make_bucketed_iterator` for the arguments and the batch format.
  """
  _check_processes(buckets, process_index, process_count)
  if indices is not None and num_index_samples is not None:
    raise ValueError("pass either indices or num_index_samples, not both.")
  if indices is None:
    indices = select_indices(len(source), num_samples=num_index_samples, seed=seed)
  if shapes is None:
    shapes = shapes_of(source, indices)
  if mix_window < 1:
    raise ValueError(
        f"mix_window must be >= 1 batch (1 keeps grain's fixed order), got {mix_window}."
    )

  per_bucket = []
  for k, (bucket, members) in enumerate(zip(buckets, bucket_members(indices, shapes, buckets))):
    local = shard_members(
        members, bucket_id=k, seed=seed, process_index=process_index, process_count=process_count
    )
    if not len(local):
      raise ValueError(
          f"bucket {bucket.shape} has {len(members)} clips among the given indices, so process "
          f"{process_index} of {process_count} gets none. Use more indices (num_index_samples) "
          f"or a larger compute_buckets min_count (>= {process_count})."
      )
    # Repeat before batching: a batch may straddle two epochs of the bucket, so no clip is
    # dropped at an epoch end and a bucket smaller than its batch still yields full batches.
    per_bucket.append(
        grain.MapDataset.source(local)
        .shuffle(seed=_derived_seed(seed, _SHUFFLE_STREAM, k))
        .repeat()
        .map(functools.partial(_load, source=source, shape=tuple(bucket.shape)))
        .batch(
            bucket.batch_size // process_count,
            drop_remainder=True,
            batch_fn=functools.partial(_collate, tokenize=tokenize),
        )
    )
  # mix() interleaves deterministically from the weights alone (no process data), so every
  # process picks the same bucket at the same step. The window shuffle then breaks the fixed
  # periodic bucket order (it could alias with logging or eval periods) while keeping each
  # window's bucket counts, and it too depends only on the seed.
  mixed = grain.MapDataset.mix(per_bucket, weights=[b.weight for b in buckets])
  if mix_window > 1:
    mixed = grain.experimental.WindowShuffleMapDataset(
        mixed, window_size=mix_window, seed=_derived_seed(seed, _MIX_STREAM)
    )
  return mixed


def make_bucketed_iterator(
    source: ShapedSource,
    *,
    buckets: Sequence[buckets_lib.Bucket],
    seed: int,
    tokenize: Tokenizer,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 2,
    prefetch_batches: int = 4,
    indices: Sequence[int] | None = None,
    num_index_samples: int | None = None,
    shapes: Sequence[Sequence[int]] | None = None,
    mix_window: int = 32,
) -> grain.DatasetIterator:
  """An endless, checkpointable iterator of shape-homogeneous per-process batches.

  Each batch is one bucket's shape:
    {"video": uint8 (B, T, H, W, 3), "text_ids": int32 (B, S), "text_mask": bool (B, S),
     "index": int64 (B,), "caption": str (B,)}
  with B = bucket.batch_size // process_count. "caption" is a numpy str array for logging
  and evaluation; drop it before putting a batch on devices.

  Which indices are read: `indices` if given; else a seeded sample of `num_index_samples`
  indices (see `select_indices`); else all of `range(len(source))`, which calls `shape_of`
  on every example (too slow for a virtual source of 1e6 clips: sample instead). Build the
  buckets from the shapes of the same indices, and pass those shapes as `shapes` to skip a
  second `shape_of` pass. Clips whose shape has no bucket are never read.

  Determinism and processes: the output is a pure function of (source, buckets, indices,
  seed, process_index, process_count). Step k draws from the same bucket on every process;
  each process reads a disjoint slice of every bucket (see `shard_members`). The iterator
  state is the number of batches taken, so a checkpoint restores only into a pipeline built
  with the same arguments.

  Args:
    source: random-access source with `__len__`, `__getitem__` and `shape_of`.
    buckets: from `compute_buckets` (identical on every process).
    seed: seeds the sharding permutation, per-bucket shuffles and bucket order.
    tokenize: captions -> (ids int (B, S), mask bool (B, S)), e.g. a `HashTokenizer`.
    process_index: this process, `jax.process_index()`.
    process_count: number of processes, `jax.process_count()`.
    num_threads: Grain reader threads (threads, not processes: on 2 CPU cores worker
      processes were 2x slower, see notes/env-probe.md section 5).
    prefetch_batches: batches read ahead; each is a whole video batch, so keep it small.
    indices: explicit source indices to read.
    num_index_samples: read a seeded random sample of this many indices.
    shapes: (T, H, W) of each entry of `indices` (or of the sample), if already known.
    mix_window: bucket order is shuffled within windows of this many batches (1 keeps
      grain's fixed weighted interleave).

  Returns:
    A `grain.DatasetIterator` with `get_state()` / `set_state()`.
  """
  if num_threads < 1 or prefetch_batches < 1:
    raise ValueError(
        f"num_threads={num_threads} and prefetch_batches={prefetch_batches} must both be >= 1."
    )
  dataset = make_bucketed_dataset(
      source, buckets=buckets, seed=seed, tokenize=tokenize, process_index=process_index,
      process_count=process_count, indices=indices, num_index_samples=num_index_samples,
      shapes=shapes, mix_window=mix_window,
  )
  read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches)
  return iter(dataset.to_iter_dataset(read_options))
