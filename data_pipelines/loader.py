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

Cropped buckets (`compute_buckets(max_buckets=...)`): a clip larger than its bucket is
centre-cropped in H and W (the caption describes the scene, and the centre keeps most of
what it describes) and cut to a window of the bucket's T frames: a seeded random window by
default (`temporal_crop="random"`; the window is a pure function of the seed, the bucket and
the clip's position in the repeated stream, so it changes every epoch and survives
checkpoint/restore), or the first frames (`"first"`). Latent clips are always cut to their
first latent frames: a causal autoencoder's latents of the first 1 + k*tf frames are exactly
the prefix of the whole clip's latents, which holds for no other window.

Worker processes (`num_workers` > 0) run the whole per-batch pipeline in grain `mp_prefetch`
processes; each worker takes every num_workers-th batch and grain interleaves them back in
order, so the stream is the same as with threads.
"""

from collections.abc import Callable, Mapping, Sequence
import functools
from typing import Any, Protocol

from absl import flags
import grain
import numpy as np

from data_pipelines import buckets as buckets_lib

# The text front end: captions -> (ids int (B, S) or frozen features float (B, S, E), mask (B, S)).
Tokenizer = Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]

# Stream ids for `derived_seed`: every seeded random choice of the data pipelines has its
# own, so that no two choices made from one seed (here or in data_pipelines.packing) are
# correlated by accident. All ids live here; add a new one rather than reuse one.
SHARD_STREAM = 0  # Permutation of a bucket's clips before the split across processes.
SHUFFLE_STREAM = 1  # Per-bucket epoch shuffles.
MIX_STREAM = 2  # Window shuffle of the bucket order.
SAMPLE_STREAM = 3  # select_indices' sample of a large source.
CROP_STREAM = 4  # Temporal crop windows of clips larger than their bucket.
PACK_SHUFFLE_STREAM = 5  # packing: epoch shuffles of a process's clips.
PACK_BINS_STREAM = 6  # packing: order of the emitted packed rows.

TEMPORAL_CROPS = ("random", "first")  # Which frames a clip longer than its bucket keeps.


class ShapedSource(Protocol):
  """A Grain random-access source that also reports clip shapes without decoding them."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> Mapping[str, Any]:
    ...  # {"video": uint8 (T, H, W, 3), "caption": str, ...}

  def shape_of(self, index: int) -> tuple[int, int, int]:
    ...  # (T, H, W)


def derived_seed(seed: int, *stream: int) -> int:
  """An independent 32-bit seed for one random choice (bucket k's shuffle, the mix, ...).

  `stream` is one of the *_STREAM ids above, optionally followed by a sub-id (the bucket).
  """
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
  rng = np.random.default_rng(derived_seed(seed, SAMPLE_STREAM))
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
  """For each bucket, the int64 indices (in `indices` order) whose shape it serves.

  A bucket serves its own shape and the larger shapes cropped into it (`Bucket.members`).
  Indices whose shape has no bucket (rejected by compute_buckets) are left out.
  """
  if len(indices) != len(shapes):
    raise ValueError(
        f"got {len(indices)} indices but {len(shapes)} shapes; pass one (T, H, W) per index."
    )
  position = {}
  for k, b in enumerate(buckets):
    for member in b.members:
      if member in position:
        raise ValueError(
            f"shape {member} is served by two buckets, {buckets[position[member]].shape} and "
            f"{b.shape}; build the buckets with compute_buckets."
        )
      position[member] = k
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
  rng = np.random.default_rng(derived_seed(seed, SHARD_STREAM, bucket_id))
  return rng.permutation(members)[process_index::process_count]


def _crop_video(video_thwc: np.ndarray, shape: tuple[int, int, int], start: int) -> np.ndarray:
  """Frames [start, start + T) of the bucket shape, centre-cropped to its H and W."""
  t, h, w = shape
  top, left = (video_thwc.shape[1] - h) // 2, (video_thwc.shape[2] - w) // 2
  return video_thwc[start:start + t, top:top + h, left:left + w]


def crop_latent(
    latent_thwc: np.ndarray, native: Sequence[int], shape: Sequence[int]
) -> np.ndarray:
  """The latent of a clip of native (T, H, W) cropped to the bucket (T', H', W').

  The autoencoder's factors are read off the two shapes (H / h, W / w, (T - 1) / (t - 1)).
  Time keeps the first latent frames (exact for a causal autoencoder, see the module
  docstring); space is centre-cropped in latent cells, which matches the video centre crop
  when the crop offsets are multiples of the spatial factor and is close otherwise.
  """
  native_t, native_h, native_w = (int(d) for d in native)
  t, h, w = latent_thwc.shape[:3]
  if native_h % h or native_w % w or (t > 1 and (native_t - 1) % (t - 1)):
    raise ValueError(
        f"latent {latent_thwc.shape} does not divide its native video shape {tuple(native)}; "
        "a latent source must report the video's (T, H, W) in shape_of."
    )
  sh, sw = native_h // h, native_w // w
  st = (native_t - 1) // (t - 1) if t > 1 else 1
  bt, bh, bw = shape
  if bh % sh or bw % sw or (bt - 1) % st:
    raise ValueError(
        f"bucket {tuple(shape)} is not a whole number of latent cells of factors "
        f"(t={st}, h={sh}, w={sw}); use bucket sizes that are multiples of the autoencoder's "
        "factors (T = 1 + k*t)."
    )
  target = (1 + (bt - 1) // st, bh // sh, bw // sw)
  return _crop_video(latent_thwc, target, 0)


def _load(
    index: int,
    rng: np.random.Generator | None = None,
    *,
    source: ShapedSource,
    shape: tuple[int, int, int],
    members: frozenset[tuple[int, int, int]] = frozenset(),
    temporal_crop: str = "random",
) -> dict[str, Any]:
  """Reads one clip, checks it has a shape its bucket serves and crops it to the bucket.

  A source yields either a uint8 "video" (T, H, W, 3), or a "latent" (t, h, w, C) of that
  clip (a latent cache), whose native shape (`shape_of`) is still the video's.
  """
  members = members or frozenset([shape])
  example = source[int(index)]
  row = {"caption": str(example["caption"]), "index": np.int64(index)}
  # Frozen text features stored with the clip (latent shards) travel to `text_batch`.
  row.update({k: example[k] for k in ("text_features", "text_mask") if k in example})
  if "latent" in example:
    row["latent"] = np.asarray(example["latent"], np.float32)
    if row["latent"].ndim != 4:
      raise ValueError(
          f"source[{int(index)}] has a latent of shape {row['latent'].shape}; it must be "
          "(t, h, w, C)."
      )
    if len(members) > 1:  # Only then may the clip be larger than the bucket.
      native = tuple(int(d) for d in source.shape_of(int(index)))
      if native != shape:
        row["latent"] = crop_latent(row["latent"], native, shape)
    return row
  video_thwc = np.asarray(example["video"])
  native = video_thwc.shape[:3]
  if video_thwc.ndim != 4 or video_thwc.shape[3] != 3 or native not in members or (
      video_thwc.dtype != np.uint8):
    expected = " or ".join(str((*m, 3)) for m in sorted(members))
    raise ValueError(
        f"source[{int(index)}] has video {video_thwc.dtype} {video_thwc.shape}, but shape_of put "
        f"it in bucket {shape} (expected uint8 {expected}). shape_of and __getitem__ must agree."
    )
  if native != shape:
    start = 0
    if temporal_crop == "random" and rng is not None:
      start = int(rng.integers(0, native[0] - shape[0] + 1))
    video_thwc = _crop_video(video_thwc, shape, start)
  row["video"] = video_thwc
  return row


def _state_layout(state: Mapping[str, Any]) -> tuple[tuple[str, int], ...]:
  """Top-level keys of a grain iterator state with the length of each list value.

  This is what tells the state formats apart: an in-process pipeline's state is its
  dataset's (e.g. {"next_index": n}), an `mp_prefetch` one's holds per-worker lists
  ("iterators_in_use_states", "exhausted", ...) with one entry per worker (grain 0.2.18).
  """
  return tuple(sorted(
      (str(k), len(v) if isinstance(v, (list, tuple)) else -1) for k, v in state.items()
  ))


def _saved_workers(state: Mapping[str, Any]) -> int:
  """The num_workers a state was saved with (0: no mp_prefetch, whose state lists workers)."""
  return len(state.get("iterators_in_use_states", ()))


class _ResumeCheckedIterator(grain.DatasetIterator):
  """Passes batches and state through; `set_state` first checks the state's format.

  Grain's own error for a state saved with another worker count is a bare KeyError or
  IndexError from deep in its iterators; this one says what to change.
  """

  def __init__(self, parent: grain.DatasetIterator, num_workers: int):
    super().__init__(parent)
    self._num_workers = num_workers
    # A fresh iterator's state has the layout every later state of it has (cheap: no
    # worker is started by get_state).
    self._layout = _state_layout(parent.get_state())

  def __next__(self):
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    if _state_layout(state) != self._layout:
      saved = _saved_workers(state)
      raise ValueError(
          f"this data iterator state was saved by a pipeline with num_workers={saved}, but "
          f"this one runs with num_workers={self._num_workers}; grain's state format (and "
          "with packing, the batches) depend on the worker count. Resume with "
          f"--config.data.num_workers={saved} (the value the checkpoint was written with)."
      )
    self._parent.set_state(state)


def check_resume_workers(
    iterator: grain.DatasetIterator, num_workers: int
) -> grain.DatasetIterator:
  """`iterator` whose `set_state` raises a clear ValueError for a state saved with another
  `num_workers` (threads vs `mp_prefetch`, or another worker count) instead of grain's
  KeyError. Batches and `get_state` are unchanged."""
  return _ResumeCheckedIterator(iterator, num_workers)


def text_batch(captions: Sequence[str], tokenize: Tokenizer,
               stored: Sequence[Mapping[str, Any]] | None = None) -> dict[str, np.ndarray]:
  """The text fields of B captions: {"text_ids": int32 (B, S)} or {"text_features": float32
  (B, S, E)}, plus "text_mask" bool (B, S).

  Features a frozen encoder computed ahead of time (the latent shards' "text_features" /
  "text_mask" per clip, in `stored`) are used when every clip has them and their (S, E) is the
  front end's `feature_shape`; otherwise `tokenize` (the front end) runs on the captions.
  """
  b = len(captions)
  shape = getattr(tokenize, "feature_shape", None)
  if (stored and shape is not None and len(stored) == b
      and all("text_features" in e and "text_mask" in e for e in stored)
      and all(tuple(np.shape(e["text_features"])) == tuple(shape) for e in stored)):
    text = np.stack([np.asarray(e["text_features"], np.float32) for e in stored])
    mask = np.stack([np.asarray(e["text_mask"], bool) for e in stored])
  else:
    text, mask = (np.asarray(a) for a in tokenize(list(captions)))
  features = np.issubdtype(text.dtype, np.floating)
  if text.ndim != (3 if features else 2) or text.shape[0] != b or mask.shape != text.shape[:2]:
    raise ValueError(
        f"the text front end returned {text.dtype} {text.shape} and mask {mask.shape} for {b}"
        f" captions; it must return two arrays of shape ({b}, S) (ids, mask) or ({b}, S, E) and"
        f" ({b}, S) (features, mask)."
    )
  if features:
    return {"text_features": text.astype(np.float32), "text_mask": mask.astype(bool)}
  return {"text_ids": text.astype(np.int32), "text_mask": mask.astype(bool)}


def _collate(elements: Sequence[dict[str, Any]], *, tokenize: Tokenizer) -> dict[str, np.ndarray]:
  """Stacks clips of one shape and encodes their captions (or takes stored features) as one batch."""
  captions = [e["caption"] for e in elements]
  field = "latent" if "latent" in elements[0] else "video"
  return {
      field: np.stack([e[field] for e in elements]),
      **text_batch(captions, tokenize, elements),
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
    temporal_crop: str = "random",
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
  if temporal_crop not in TEMPORAL_CROPS:
    raise ValueError(
        f"temporal_crop={temporal_crop!r} is not one of {TEMPORAL_CROPS}: 'random' takes a seeded "
        "random window of the bucket's length, 'first' the first frames."
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
    clips = (
        grain.MapDataset.source(local)
        .shuffle(seed=derived_seed(seed, SHUFFLE_STREAM, k))
        .repeat()
    )
    load = functools.partial(
        _load, source=source, shape=tuple(bucket.shape), members=frozenset(bucket.members),
        temporal_crop=temporal_crop,
    )
    if len(bucket.members) > 1:
      # random_map seeds each element's generator from (seed, position in the repeated
      # stream): the temporal window is deterministic, differs between epochs, and is
      # reproduced exactly after set_state.
      clips = clips.random_map(load, seed=derived_seed(seed, CROP_STREAM, k))
    else:
      clips = clips.map(load)
    per_bucket.append(
        clips.batch(
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
        mixed, window_size=mix_window, seed=derived_seed(seed, MIX_STREAM)
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
    temporal_crop: str = "random",
    num_workers: int = 0,
) -> grain.DatasetIterator:
  """An endless, checkpointable iterator of shape-homogeneous per-process batches.

  Each batch is one bucket's shape:
    {"video": uint8 (B, T, H, W, 3), "text_ids": int32 (B, S), "text_mask": bool (B, S),
     "index": int64 (B,), "caption": str (B,)}
  ("latent" float32 (B, t, h, w, C) instead of "video" from a latent source; "text_features"
  float32 (B, S, E) instead of "text_ids" from a frozen text front end, see `text_batch`.)
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
    tokenize: the text front end, captions -> (ids int (B, S) or features float (B, S, E), mask
      bool (B, S)), e.g. a `HashTokenizer` or `MiniLMTextEncoder`.
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
    temporal_crop: for clips longer than their (cropped) bucket: "random" (a seeded window
      per clip and epoch) or "first" (the first T frames). Space is always centre-cropped.
    num_workers: 0 reads with `num_threads` threads in this process; N > 0 runs the
      pipeline in N grain `mp_prefetch` worker processes (each with `num_threads` threads)
      that produce every N-th batch. The batches are the same either way. Workers pay a
      spawn (1-2 s each, they re-import everything) and a shared-memory copy per batch;
      they pay off when decoding is heavier than the copy and there are spare cores. The
      source and `tokenize` must be picklable. Close the iterator (`close()`) when done.
      The iterator state's format depends on whether workers are used and how many, so a
      run must resume with the num_workers it saved with (set_state raises a ValueError
      naming the saved value otherwise).

  Returns:
    A `grain.DatasetIterator` with `get_state()` / `set_state()`.
  """
  if num_threads < 1 or prefetch_batches < 1 or num_workers < 0:
    raise ValueError(
        f"num_threads={num_threads} and prefetch_batches={prefetch_batches} must both be >= 1 "
        f"and num_workers={num_workers} >= 0 (0 = threads only)."
    )
  dataset = make_bucketed_dataset(
      source, buckets=buckets, seed=seed, tokenize=tokenize, process_index=process_index,
      process_count=process_count, indices=indices, num_index_samples=num_index_samples,
      shapes=shapes, mix_window=mix_window, temporal_crop=temporal_crop,
  )
  read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches)
  iter_dataset = dataset.to_iter_dataset(read_options)
  if num_workers:
    # grain reads an absl flag (--grain_enable_multiprocess_worker_profiling) when it starts
    # workers and raises UnparsedFlagAccessError outside an absl app (a notebook, a test).
    # Marking the flags parsed keeps every flag at its default.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    iter_dataset = iter_dataset.mp_prefetch(
        grain.MultiprocessingOptions(
            num_workers=num_workers,
            per_worker_buffer_size=max(1, prefetch_batches // num_workers),
        )
    )
  return check_resume_workers(iter(iter_dataset), num_workers)
