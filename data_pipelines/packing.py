"""NaViT-style packing of latent clips of any shape into fixed-length token rows.

Patch n' Pack (Dehghani et al. 2023, "NaViT") trains on images of their native size by cutting
each into patches and packing the patch sequences of several images into one fixed-length row;
attention is masked to each image's own tokens (segment ids) and every token keeps the position
of its own image's grid. Here the items are latent clips (t, h, w, C) cut into (pt, ph, pw)
spacetime patches: one compiled shape serves every mix of clip shapes, and the padding a batch
of shape buckets wastes (and the crops that coarse buckets cost) mostly disappears.

Per-process batch (one fixed shape for every step):
  "tokens":      float32 (B, L, P)  patchified latents, P = pt*ph*pw*C ordered (pt, ph, pw, C)
                                     exactly like spacetime_dit.models.patchify.patchify
  "positions":   int32   (B, L, 3)  each clip's own (t, h, w) grid coordinates; 0 at padding
  "segment_ids": int32   (B, L)     1..G for the clip slots of a row, 0 = padding
  "text_ids":    int32   (B, G, S), "text_mask": bool (B, G, S)  caption tokens of slot g
                                     (mask all False for an empty slot); with a frozen text
                                     front end "text_features" float32 (B, G, S, E) instead,
                                     the clips' stored features when the latents carry them
  "grid":        int32   (B, G, 3)  (gt, gh, gw) of slot g, 0 for an empty slot
  "index":       int64   (B, G)     source index of slot g, -1 for an empty slot
  "caption":     str     (B, G)     "" for an empty slot (for logging; keep it off devices)
Slot g of a row holds the clip whose tokens have segment id g + 1.

Why grain's packer: `grain.experimental.FirstFitPackIterDataset` (grain 0.2.18,
grain/_src/python/dataset/transformations/packing*.py) packs N-D features along axis 0 (here
"tokens" (n, P) and "positions" (n, 3)), writes per-feature segment ids, caps the clips per row
(`max_sequences_per_bin` = G) and collects non-sequence "meta features" (grid, index, caption)
per row in slot order. Its iterator state is the parent's state at the start of the packed
batch being emitted plus the row within it, and its parent here is a `MapDataset` whose state
is a single position, so `get_state`/`set_state` restore the exact next batch (it re-reads at
most one packed batch of clips). Its policy is online: `num_packing_bins` rows are open; each
clip goes to the first row it fits; when a clip fits none, all open rows are emitted and a new
set starts with that clip. On the ShapesWorld `:cpu` mix (4,000 clips in a seeded order,
G = 16) that wastes 6.6% of a 256-token row with 8 bins and 3.4% with 32 (offline first-fit over
all clips: 2.3%); at 512 tokens 2.4% and 1.6% (1.4%). A plan-then-load packer first-fitting
windows of 64 clips wastes 6.3% and 6.9%, so writing our own would not pay.
`bin_packing.first_fit(..., num_bins=N)` reproduces grain's rows exactly from token counts
alone (tested), which gives the padding estimate of `PackingReport` without reading any clip.

Patches: `patch_grid`, `latent_tokens`, `patchify_clip` and `grid_positions` are the numpy
twins of `spacetime_dit.models.patchify` (data_pipelines must not import the library that
depends on it; tests check both agree). They are the only copy in data_pipelines.

Determinism and processes: the output is a pure function of (source, indices, seed,
process_index, process_count, arguments). Process p packs only its own clips: the same
permute-then-stride rule as `loader.shard_members`, so the processes' clip sets are disjoint
and their union is every clip. Each epoch of a process's clips is a fresh seeded shuffle.

Resuming: with `num_workers` > 0 each worker process packs its own share of the clips, so
the batches depend on the worker count, and grain's iterator state has another format per
count. A state restores only into an iterator with the num_workers it was saved with
(`set_state` raises a ValueError naming the saved value otherwise).
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools
import logging
import math
from typing import Any, Protocol

from absl import flags
import grain
import numpy as np

from data_pipelines import bin_packing
from data_pipelines import loader

Shape = tuple[int, int, int]
Patch = tuple[int, int, int]

# Padding estimates pack at most this many clips: enough for a figure to 0.1%, and bounded
# construction time for a source of 1e6 clips.
_ESTIMATE_CLIPS = 20_000


class LatentSource(Protocol):
  """A random-access source of latent clips (e.g. latent_shards.LatentShardSource)."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> Mapping[str, Any]:
    ...  # {"latent": float (t, h, w, C), "caption": str, "index": int}

  def shape_of(self, index: int) -> Shape:
    ...  # native VIDEO (T, H, W)

  # Optional: latent_shape_of(index) -> (t, h, w, C) without reading the latent (as
  # latent_shards.LatentShardSource has); used when no video -> latent shape rule is given.


# ----------------------------------------------------------------------------- patches


def patch_grid(latent_thw: Sequence[int], patch: Sequence[int]) -> Shape:
  """(t/pt, h/ph, w/pw): the token grid of one latent clip, checking that the patch divides it.

  Raises:
    ValueError: the patch is not three positive integers, or an axis is not a multiple of it.
  """
  if len(patch) != 3 or any(int(p) < 1 for p in patch):
    raise ValueError(
        f"patch size {tuple(patch)} must be three positive integers (pt, ph, pw), e.g. (1, 2, 2)."
    )
  if len(latent_thw) != 3:
    raise ValueError(f"latent shape {tuple(latent_thw)} must be (t, h, w).")
  grid = []
  for name, size, p in zip(("frames t", "height h", "width w"), latent_thw, patch):
    if int(size) < 1 or int(size) % int(p):
      raise ValueError(
          f"latent {tuple(latent_thw)}: {name}={size} is not a positive multiple of the patch "
          f"size {p} (patch {tuple(patch)}). Crop or pad the clips so every latent axis divides, "
          "or choose a patch size that divides the latent shapes."
      )
    grid.append(int(size) // int(p))
  return tuple(grid)


def latent_tokens(latent_thw: Sequence[int], patch: Sequence[int]) -> int:
  """Tokens of one latent clip: (t/pt)(h/ph)(w/pw)."""
  return math.prod(patch_grid(latent_thw, patch))


def patchify_clip(x_thwc: np.ndarray, patch: Sequence[int]) -> np.ndarray:
  """Numpy twin of spacetime_dit.models.patchify.patchify for one clip (no batch axis).

  data_pipelines must not import spacetime_dit (the model package depends on this one), so
  the five lines are repeated here; tests check both give identical tokens.

  Args:
    x_thwc: latent (t, h, w, C).
    patch: (pt, ph, pw).

  Returns:
    x_lp: (L, P), tokens t-major then h then w, P = pt*ph*pw*C ordered (pt, ph, pw, C).
  """
  if x_thwc.ndim != 4:
    raise ValueError(f"patchify_clip needs a latent (t, h, w, C); got shape {x_thwc.shape}.")
  gt, gh, gw = patch_grid(x_thwc.shape[:3], patch)
  pt, ph, pw = (int(p) for p in patch)
  c = x_thwc.shape[3]
  x = x_thwc.reshape(gt, pt, gh, ph, gw, pw, c).transpose(0, 2, 4, 1, 3, 5, 6)
  return x.reshape(gt * gh * gw, pt * ph * pw * c)


def grid_positions(grid: Sequence[int]) -> np.ndarray:
  """int32 (L, 3) (t, h, w) coordinates of every token, in patchify_clip's order."""
  coords = np.meshgrid(*(np.arange(int(g), dtype=np.int32) for g in grid), indexing="ij")
  return np.stack([c.reshape(-1) for c in coords], axis=-1)


# ----------------------------------------------------------------------------- pipeline


def _latent_shapes(
    source: LatentSource,
    indices: np.ndarray,
    shapes: Sequence[Sequence[int]] | None,
    latent_shape_of: Callable[[Shape], Sequence[int]] | None,
) -> list[Shape]:
  """Latent (t, h, w) per index, cheapest first.

  From the native shapes when a video -> latent rule is given; else from the source's own
  `latent_shape_of(index)` (a shard source's index, no record read); else by reading every
  latent once.
  """
  if latent_shape_of is None:
    if callable(getattr(source, "latent_shape_of", None)):
      return [tuple(int(d) for d in source.latent_shape_of(int(i))[:3]) for i in indices]
    # Neither a rule nor an index: read each latent once (slow for a large stored source).
    logging.info("packing: reading %d latents for their shapes", len(indices))
    return [tuple(int(d) for d in np.shape(source[int(i)]["latent"])[:3]) for i in indices]
  if shapes is None:
    shapes = loader.shapes_of(source, indices)
  if len(shapes) != len(indices):
    raise ValueError(f"got {len(shapes)} shapes for {len(indices)} indices; pass one per index.")
  by_native: dict[Shape, Shape] = {}
  out = []
  for shape in shapes:
    shape = tuple(int(d) for d in shape)
    if shape not in by_native:
      by_native[shape] = tuple(int(d) for d in latent_shape_of(shape))
    out.append(by_native[shape])
  return out


def _stored_text_shape(source: LatentSource, index: int, tokenize: loader.Tokenizer) -> bool:
  """True when clip `index` carries frozen text features the front end `tokenize` can reuse."""
  shape = getattr(tokenize, "feature_shape", None)
  if shape is None:
    return False
  example = source[int(index)]
  return ("text_mask" in example and "text_features" in example
          and tuple(np.shape(example["text_features"])) == tuple(shape))


def _load_clip(
    index: int, *, source: LatentSource, patch: Patch, latent_shapes: Mapping[int, Shape],
    stored_text: bool = False,
) -> dict[str, Any]:
  """Reads one latent clip and cuts it into tokens with their grid positions (and, when
  `stored_text`, its precomputed text features and mask)."""
  example = source[int(index)]
  latent_thwc = np.asarray(example["latent"], np.float32)
  expected = latent_shapes[int(index)]
  if latent_thwc.ndim != 4 or latent_thwc.shape[:3] != expected:
    raise ValueError(
        f"source[{int(index)}] has a latent of shape {latent_thwc.shape}, but its shape was "
        f"computed as {expected} (t, h, w) when packing was planned. latent_shape_of (or the "
        "source's shape_of) and __getitem__ must agree."
    )
  grid = patch_grid(expected, patch)
  clip = {
      "tokens": patchify_clip(latent_thwc, patch),
      "positions": grid_positions(grid),
      "grid": np.asarray(grid, np.int32),
      "index": np.int64(index),
      "caption": str(example["caption"]),
  }
  if stored_text:
    if "text_features" not in example or "text_mask" not in example:
      raise ValueError(
          f"source[{int(index)}] has no stored text features, but the first clip had them: the"
          " latent shards are mixed. Re-encode them with one text encoder.")
    clip["text_features"] = np.asarray(example["text_features"], np.float32)
    clip["text_mask"] = np.asarray(example["text_mask"], bool)
  return clip


def _collate(
    rows: Sequence[Mapping[str, Any]], *, tokenize: loader.Tokenizer, max_segments: int
) -> dict[str, np.ndarray]:
  """Stacks packed rows and spreads each row's per-clip metadata over its G slots."""
  b, g = len(rows), max_segments
  grid_bg3 = np.zeros((b, g, 3), np.int32)
  index_bg = np.full((b, g), -1, np.int64)
  caption_bg = [[""] * g for _ in range(b)]
  slots, captions, stored = [], [], []
  for r, row in enumerate(rows):
    for s, (grid, index, caption) in enumerate(zip(row["grid"], row["index"], row["caption"])):
      grid_bg3[r, s], index_bg[r, s], caption_bg[r][s] = grid, index, caption
      slots.append((r, s))
      captions.append(caption)
      if "text_features" in row:
        stored.append({"text_features": row["text_features"][s], "text_mask": row["text_mask"][s]})
  # One front-end call per batch (or the stored features), real slots only: empty slots keep
  # zeros and a False mask.
  text = loader.text_batch(captions, tokenize, stored)
  key = "text_features" if "text_features" in text else "text_ids"
  values_n, mask_n = text[key], text["text_mask"]
  text_bgs = np.zeros((b, g, *values_n.shape[1:]), values_n.dtype)
  text_mask_bgs = np.zeros((b, g, mask_n.shape[1]), bool)
  rr, ss = (np.asarray(a, np.int64) for a in zip(*slots))
  text_bgs[rr, ss], text_mask_bgs[rr, ss] = values_n, mask_n
  return {
      "tokens": np.stack([row["tokens"] for row in rows]),
      "positions": np.stack([row["positions"] for row in rows]).astype(np.int32),
      "segment_ids": np.stack([row["tokens_segment_ids"] for row in rows]).astype(np.int32),
      key: text_bgs,
      "text_mask": text_mask_bgs,
      "grid": grid_bg3,
      "index": index_bg,
      "caption": np.asarray(caption_bg, dtype=np.str_),
  }


def make_packed_dataset(
    source: LatentSource,
    *,
    patch_size: Sequence[int],
    seq_len: int,
    max_segments: int,
    rows_per_batch: int,
    seed: int,
    tokenize: loader.Tokenizer,
    indices: Sequence[int] | None = None,
    shapes: Sequence[Sequence[int]] | None = None,
    latent_shape_of: Callable[[Shape], Sequence[int]] | None = None,
    process_index: int = 0,
    process_count: int = 1,
    num_packing_bins: int = 32,
    num_threads: int = 2,
    prefetch_batches: int = 4,
    skip_oversized: bool = False,
) -> tuple[grain.IterDataset, bin_packing.PackingReport]:
  """The endless `IterDataset` of packed per-process batches, and its `PackingReport`.

  See `make_packed_iterator` for the arguments and the batch format. The report lists the
  clips too long for a row and the padding this process's rows are expected to have.
  """
  patch = tuple(int(p) for p in patch_size)
  bin_packing.check_positive(
      seq_len=seq_len, max_segments=max_segments, rows_per_batch=rows_per_batch,
      num_packing_bins=num_packing_bins, num_threads=num_threads,
      prefetch_batches=prefetch_batches,
  )
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index={process_index} must be in [0, process_count={process_count}); pass "
        "jax.process_index() and jax.process_count()."
    )
  if indices is None:
    indices = getattr(source, "indices", None)
    indices = np.arange(len(source)) if indices is None else indices
  indices = np.asarray(indices, np.int64)
  if not len(indices):
    raise ValueError("no clips to pack: indices is empty.")
  latent_shapes = _latent_shapes(source, indices, shapes, latent_shape_of)
  report = bin_packing.packing_report(
      latent_shapes, functools.partial(latent_tokens, patch=patch), seq_len, indices=indices
  )
  tokens_of_shape = {s: latent_tokens(s, patch) for s in set(latent_shapes)}
  tokens_of = {int(i): tokens_of_shape[s] for i, s in zip(indices, latent_shapes)}
  kept = indices
  if report.oversized:
    if not skip_oversized:
      raise ValueError(
          f"{report.num_oversized} of {report.num_clips} clips have more tokens than a packed "
          f"row holds (seq_len={seq_len}, patch {patch}); latent (t, h, w): tokens, clips, "
          f"example indices:\n{report.describe()}\nRaise the row length (data.pack_length) to "
          f"at least {report.oversized[0].tokens}, or pass skip_oversized=True to leave these "
          "clips out (they are then reported, not trained on)."
      )
    kept = np.asarray([i for i in indices if tokens_of[int(i)] <= seq_len], np.int64)
    if not len(kept):
      raise ValueError(
          f"skip_oversized=True leaves no clip: all {report.num_clips} have more than "
          f"seq_len={seq_len} tokens:\n{report.describe()}\nRaise data.pack_length to at least "
          f"{report.oversized[-1].tokens} to keep the shortest clips "
          f"({report.oversized[0].tokens} keeps them all)."
      )
    logging.warning(
        "packing: leaving out %d clips longer than seq_len=%d:\n%s",
        report.num_oversized, seq_len, report.describe(),
    )
  # One "bucket" holding every clip: the loader's permute-then-stride split across processes.
  local = loader.shard_members(
      kept, bucket_id=0, seed=seed, process_index=process_index, process_count=process_count
  )
  if not len(local):
    raise ValueError(
        f"{len(kept)} packable clips for {process_count} processes leaves process "
        f"{process_index} none; use at least {process_count} clips."
    )

  # Expected padding of grain's policy on one shuffled epoch of this process's clips.
  order = np.random.default_rng(seed).permutation(local)[:_ESTIMATE_CLIPS]
  counts = [tokens_of[int(i)] for i in order]
  rows = bin_packing.first_fit(
      counts, seq_len=seq_len, max_segments=max_segments, num_bins=num_packing_bins
  )
  report = dataclasses.replace(
      report, padding_fraction=bin_packing.padding_fraction(rows, counts, seq_len=seq_len),
      clips_per_row=len(counts) / len(rows),
  )
  # Clips read ahead = `prefetch_batches` batches' worth, so the bound is in batches, like the
  # bucketed loader's, whatever the clip sizes.
  read_ahead = max(1, math.ceil(prefetch_batches * rows_per_batch * report.clips_per_row))

  stored_text = _stored_text_shape(source, int(local[0]), tokenize)
  load = functools.partial(
      _load_clip, source=source, patch=patch,
      latent_shapes={int(i): s for i, s in zip(indices, latent_shapes)}, stored_text=stored_text,
  )
  # shuffle-then-repeat: grain reseeds the shuffle with the epoch number, so each epoch is a
  # fresh order and the dataset stays one random-access `MapDataset` (state = one position).
  clips = (
      grain.MapDataset.source(local)
      .shuffle(seed=loader.derived_seed(seed, loader.PACK_SHUFFLE_STREAM))
      .repeat()
      .map(load)
      .to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=read_ahead))
  )
  packed = grain.experimental.FirstFitPackIterDataset(
      clips,
      length_struct={"tokens": seq_len, "positions": seq_len},
      num_packing_bins=num_packing_bins,
      seed=loader.derived_seed(seed, loader.PACK_BINS_STREAM),
      # First-fit fills the first bins with the big clips and leaves the small ones to the last
      # bins; shuffling the emitted rows keeps each batch a mix.
      shuffle_bins=True,
      meta_features=("grid", "index", "caption") + (("text_features", "text_mask") if stored_text else ()),
      max_sequences_per_bin=max_segments,
  )
  batches = packed.batch(
      rows_per_batch, drop_remainder=True,
      batch_fn=functools.partial(_collate, tokenize=tokenize, max_segments=max_segments),
  )
  return batches, report


def make_packed_iterator(
    source: LatentSource,
    *,
    patch_size: Sequence[int],
    seq_len: int,
    max_segments: int,
    rows_per_batch: int,
    seed: int,
    tokenize: loader.Tokenizer,
    indices: Sequence[int] | None = None,
    shapes: Sequence[Sequence[int]] | None = None,
    latent_shape_of: Callable[[Shape], Sequence[int]] | None = None,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 2,
    prefetch_batches: int = 4,
    num_workers: int = 0,
    num_packing_bins: int = 32,
    skip_oversized: bool = False,
) -> grain.DatasetIterator:
  """An endless, checkpointable iterator of packed per-process batches (format: module doc).

  B = rows_per_batch rows of L = seq_len tokens, each holding at most G = max_segments clips.
  The state (`get_state`/`set_state`, or Orbax through grain.checkpoint) restores the exact
  next batch into an iterator built with the same arguments. Close it (`it.close()`) when
  done, which matters with `num_workers > 0`.

  Args:
    source: latent clips: `source[i]` -> {"latent": (t, h, w, C), "caption": str, ...}.
    patch_size: (pt, ph, pw) of the DiT; must divide every latent (t, h, w).
    seq_len: tokens per row (data.pack_length).
    max_segments: most clips per row, G (data.max_clips_per_pack).
    rows_per_batch: rows per process per step, B.
    seed: seeds the process split, the epoch shuffles and the row order.
    tokenize: captions -> (ids int (N, S), mask bool (N, S)), e.g. a HashTokenizer.
    indices: source indices to pack; default `source.indices` (a latent source), else all.
    shapes: native video (T, H, W) per index, if known (saves a `shape_of` pass).
    latent_shape_of: native video (T, H, W) -> latent (t, h, w), e.g.
      functools.partial(autoencoder.latent_shape, ae_config). None asks the source's
      `latent_shape_of(index)` -> (t, h, w, C) if it has one (LatentShardSource reads it
      from its index), else reads every latent once (slow for a large source).
    process_index: this process, `jax.process_index()`.
    process_count: number of processes, `jax.process_count()`.
    num_threads: Grain threads reading clips.
    prefetch_batches: batches prepared ahead (clips read ahead are the same number of
      batches' worth).
    num_workers: 0 packs in a background thread; > 0 runs the pipeline in that many worker
      processes (grain mp_prefetch), each packing its own share of the clips, so the batches
      differ from num_workers=0 (still deterministic). On 2 cores threads are faster
      (notes/env-probe.md section 5). A checkpointed state restores only with the same
      num_workers (set_state raises a ValueError naming the saved value otherwise).
    num_packing_bins: rows grain's packer keeps open (see module doc: more bins, less
      padding, more memory: num_packing_bins * seq_len * P floats).
    skip_oversized: clips with more than seq_len tokens raise a ValueError listing their
      shapes unless this is True; then they are left out with a logged warning (and listed in
      make_packed_dataset's report).

  Returns:
    A `grain.DatasetIterator` with `get_state()` / `set_state()`.
  """
  if num_workers < 0:
    raise ValueError(f"num_workers={num_workers} must be >= 0 (0 = threads only).")
  dataset, report = make_packed_dataset(
      source, patch_size=patch_size, seq_len=seq_len, max_segments=max_segments,
      rows_per_batch=rows_per_batch, seed=seed, tokenize=tokenize, indices=indices,
      shapes=shapes, latent_shape_of=latent_shape_of, process_index=process_index,
      process_count=process_count, num_packing_bins=num_packing_bins, num_threads=num_threads,
      prefetch_batches=prefetch_batches, skip_oversized=skip_oversized,
  )
  logging.info(
      "packing: %d clips, %.1f clips per %d-token row, expected padding %.1f%%",
      report.num_clips - report.num_oversized, report.clips_per_row, seq_len,
      100 * report.padding_fraction,
  )
  if num_workers:
    # mp_prefetch reads absl flags, unparsed outside absl.app.run (UnparsedFlagAccessError,
    # notes/env-probe.md section 5); marking them parsed keeps every flag at its default.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(
        grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=prefetch_batches
        )
    )
  else:
    # Packing and collation run in this thread, off the training loop's thread.
    dataset = grain.experimental.ThreadPrefetchIterDataset(
        dataset, prefetch_buffer_size=prefetch_batches
    )
  return loader.check_resume_workers(iter(dataset), num_workers)
