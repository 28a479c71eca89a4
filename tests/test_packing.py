"""Tests for data_pipelines.bin_packing (packing math) and data_pipelines.packing (numpy patchify,
the packed iterator)."""

import functools
import json
import logging
import time
import zlib

import grain
import numpy as np
import pytest

from data_pipelines import bin_packing
from data_pipelines import latent_shards
from data_pipelines import loader
from data_pipelines import packing
from spacetime_dit.models import patchify as patchify_lib

PATCH = (1, 2, 2)
CHANNELS = 4
# Native video (T, H, W) of the ShapesWorld `:cpu` mix; with autoencoder factors (2, 4, 4) and
# patch (1, 2, 2) their latents (1,8,8), (3,6,10), (5,10,6), (7,6,12) make 16, 45, 75, 126 tokens.
VIDEO_SHAPES = ((1, 32, 32), (5, 24, 40), (9, 40, 24), (13, 24, 48))
TOKENS = {(1, 32, 32): 16, (5, 24, 40): 45, (9, 40, 24): 75, (13, 24, 48): 126}
SEQ_LEN, SEGMENTS, ROWS = 128, 4, 3


def latent_shape_of(video_thw):
  """A causal autoencoder with 2x time and 4x space reduction."""
  t, h, w = video_thw
  return 1 + (t - 1) // 2, h // 4, w // 4


class FakeLatents:
  """An in-memory latent source: `shape_of` gives the native video shape, like LatentSource."""

  def __init__(self, num_clips, *, seed=0, shapes=VIDEO_SHAPES, offset=10):
    rng = np.random.default_rng(seed)
    # Sparse, non-contiguous indices, like a cache of a sample of a larger source.
    self.indices = np.arange(num_clips, dtype=np.int64) * 3 + offset
    self._shapes = {int(i): shapes[k % len(shapes)] for k, i in enumerate(self.indices)}
    self._latents = {
        i: rng.normal(size=(*latent_shape_of(s), CHANNELS)).astype(np.float32)
        for i, s in self._shapes.items()
    }

  def __len__(self):
    return int(self.indices[-1]) + 1

  def shape_of(self, index):
    return self._shapes[int(index)]

  def __getitem__(self, index):
    index = int(index)
    return {"latent": self._latents[index], "caption": f"clip number {index}", "index": index}


class WordTokenizer:
  """Captions -> (ids (N, S), mask (N, S)) by hashing words; picklable for worker processes."""

  max_length = 5

  def __call__(self, captions):
    ids = np.zeros((len(captions), self.max_length), np.int32)
    for n, caption in enumerate(captions):
      words = caption.split()[: self.max_length]
      ids[n, : len(words)] = [zlib.crc32(w.encode()) % 97 + 1 for w in words]
    return ids, ids > 0


def make_iterator(source, **overrides):
  kwargs = dict(
      patch_size=PATCH, seq_len=SEQ_LEN, max_segments=SEGMENTS, rows_per_batch=ROWS, seed=3,
      tokenize=WordTokenizer(), latent_shape_of=latent_shape_of, num_packing_bins=4,
  )
  return packing.make_packed_iterator(source, **(kwargs | overrides))


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def emitted_indices(batches):
  """Source indices in emission order (row-major, slot order), empty slots dropped."""
  return [int(i) for b in batches for i in b["index"].reshape(-1) if i >= 0]


@pytest.fixture(scope="module")
def source():
  return FakeLatents(24)


# ----------------------------------------------------------------------------- patches


@pytest.mark.parametrize(
    "shape, patch",
    [((3, 6, 10, 4), (1, 2, 2)), ((1, 8, 8, 2), (1, 2, 2)), ((4, 6, 4, 3), (2, 3, 2)),
     ((2, 2, 2, 1), (2, 2, 2))],
)
def test_patchify_clip_equals_model_patchify(shape, patch):
  x_thwc = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  expected = np.asarray(patchify_lib.patchify(x_thwc[None], patch))[0]
  np.testing.assert_array_equal(packing.patchify_clip(x_thwc, patch), expected)
  grid = packing.patch_grid(shape[:3], patch)
  assert grid == patchify_lib.patch_grid(shape[:3], patch)
  np.testing.assert_array_equal(packing.grid_positions(grid), patchify_lib.grid_positions(grid))
  assert packing.latent_tokens(shape[:3], patch) == len(expected)


def test_indivisible_latent_names_axis_and_fix():
  with pytest.raises(ValueError, match=r"width w=5 is not a positive multiple of the patch size 2"):
    packing.latent_tokens((3, 6, 5), PATCH)
  with pytest.raises(ValueError, match="three positive integers"):
    packing.patch_grid((3, 6, 6), (1, 0, 2))


# ----------------------------------------------------------------------------- bin packing


def test_first_fit_closed_form():
  counts = [6, 5, 4, 3, 2]
  rows = bin_packing.first_fit(counts, seq_len=10, max_segments=3)
  assert rows == [[0, 2], [1, 3, 4]]
  assert bin_packing.padding_fraction(rows, counts, seq_len=10) == 0.0
  # Two segments per row: the last item cannot join a row that has room but is full of clips.
  rows = bin_packing.first_fit(counts, seq_len=10, max_segments=2)
  assert rows == [[0, 2], [1, 3], [4]]
  assert bin_packing.padding_fraction(rows, counts, seq_len=10) == pytest.approx(1 - 20 / 30)


def test_first_fit_online_closes_all_bins_when_an_item_fits_none():
  # Offline, 4 joins the first row; grain's online policy with one bin has emitted it already.
  assert bin_packing.first_fit([6, 5, 4], seq_len=10, max_segments=4) == [[0, 2], [1]]
  assert bin_packing.first_fit([6, 5, 4], seq_len=10, max_segments=4, num_bins=1) == [[0], [1, 2]]
  # Two bins: 6 and 5 open them; 4 fits the first; 7 fits none, so both close.
  rows = bin_packing.first_fit([6, 5, 4, 7, 3], seq_len=10, max_segments=4, num_bins=2)
  assert rows == [[0, 2], [1], [3, 4]]


def test_best_fit_picks_the_fullest_row():
  counts = [5, 7, 3, 2]
  assert bin_packing.first_fit(counts, seq_len=10, max_segments=4) == [[0, 2, 3], [1]]
  assert bin_packing.best_fit(counts, seq_len=10, max_segments=4) == [[0, 3], [1, 2]]


def test_every_item_is_packed_once_within_limits():
  counts = np.random.default_rng(0).integers(1, 40, size=500).tolist()
  for fn in (bin_packing.first_fit, bin_packing.best_fit):
    for bins in (None, 1, 8):
      rows = fn(counts, seq_len=64, max_segments=3, num_bins=bins)
      assert sorted(i for row in rows for i in row) == list(range(len(counts)))
      assert all(len(r) <= 3 and sum(counts[i] for i in r) <= 64 for r in rows)


def test_first_fit_reproduces_grain_first_fit_packer():
  counts = np.random.default_rng(1).integers(1, 30, size=300).tolist()
  dataset = grain.experimental.FirstFitPackIterDataset(
      grain.MapDataset.source(list(range(len(counts))))
      .map(lambda i: {"tokens": np.zeros((counts[i], 1), np.float32), "id": i})
      .to_iter_dataset(),
      length_struct={"tokens": 32}, num_packing_bins=5, shuffle_bins=False,
      meta_features=("id",), max_sequences_per_bin=3,
  )
  grain_rows = [list(row["id"]) for row in dataset]
  assert grain_rows == bin_packing.first_fit(counts, seq_len=32, max_segments=3, num_bins=5)


def test_bad_counts_name_the_item_and_the_fix():
  with pytest.raises(ValueError, match=r"item 1 with 11 tokens.*Raise seq_len.*at least 11"):
    bin_packing.first_fit([3, 11, 2], seq_len=10, max_segments=2)
  with pytest.raises(ValueError, match=r"item 0 with 0 tokens"):
    bin_packing.best_fit([0], seq_len=10, max_segments=2)
  with pytest.raises(ValueError, match="max_segments=0"):
    bin_packing.first_fit([1], seq_len=10, max_segments=0)
  with pytest.raises(ValueError, match="no rows"):
    bin_packing.padding_fraction([], [], seq_len=8)
  with pytest.raises(ValueError, match="cannot fit"):
    bin_packing.padding_fraction([[0, 1]], [6, 6], seq_len=8)


def test_packing_report_lists_oversized_shapes():
  shapes = [(1, 8, 8), (7, 6, 12), (5, 10, 6), (7, 6, 12)]
  report = bin_packing.packing_report(
      shapes, functools.partial(packing.latent_tokens, patch=PATCH), 100, indices=[4, 5, 6, 7]
  )
  assert report.num_clips == 4 and report.num_tokens == 16 + 126 + 75 + 126
  assert report.oversized == (
      bin_packing.OversizedShape(shape=(7, 6, 12), tokens=126, count=2, example_indices=(5, 7)),
  )
  assert report.num_oversized == 2
  assert "(7, 6, 12): 126 tokens > 100, 2 clips [5, 7]" in report.describe()
  json.dumps(report.to_dict())


# ----------------------------------------------------------------------------- iterator


def test_batches_have_one_fixed_shape_and_the_spec_format(source):
  batches = take(make_iterator(source), 6)
  for batch in batches:
    # Captions are a str array for logging (width = longest caption); all else is fixed.
    assert batch["caption"].shape == (ROWS, SEGMENTS) and batch["caption"].dtype.kind == "U"
    assert {k: (v.shape, v.dtype) for k, v in batch.items() if k != "caption"} == {
        "tokens": ((ROWS, SEQ_LEN, 4 * CHANNELS), np.float32),
        "positions": ((ROWS, SEQ_LEN, 3), np.int32),
        "segment_ids": ((ROWS, SEQ_LEN), np.int32),
        "text_ids": ((ROWS, SEGMENTS, WordTokenizer.max_length), np.int32),
        "text_mask": ((ROWS, SEGMENTS, WordTokenizer.max_length), bool),
        "grid": ((ROWS, SEGMENTS, 3), np.int32),
        "index": ((ROWS, SEGMENTS), np.int64),
    }


def test_each_slot_holds_its_clip_tokens_positions_and_caption(source):
  tokenize = WordTokenizer()
  for batch in take(make_iterator(source), 8):
    for r in range(ROWS):
      segment_ids_l = batch["segment_ids"][r]
      used = int((segment_ids_l > 0).sum())
      # Clips are contiguous, in slot order, with all padding at the end.
      assert np.all(np.diff(segment_ids_l[:used]) >= 0) and np.all(segment_ids_l[used:] == 0)
      assert np.all(batch["tokens"][r, used:] == 0) and np.all(batch["positions"][r, used:] == 0)
      for g in range(SEGMENTS):
        index = int(batch["index"][r, g])
        here = segment_ids_l == g + 1
        if index < 0:
          assert not here.any() and not batch["text_mask"][r, g].any()
          assert batch["caption"][r, g] == "" and np.all(batch["grid"][r, g] == 0)
          continue
        example = source[index]
        grid = packing.patch_grid(example["latent"].shape[:3], PATCH)
        np.testing.assert_array_equal(batch["grid"][r, g], grid)
        tokens_lp = np.asarray(patchify_lib.patchify(example["latent"][None], PATCH))[0]
        np.testing.assert_array_equal(batch["tokens"][r][here], tokens_lp)
        positions_l3 = patchify_lib.grid_positions(grid)
        np.testing.assert_array_equal(batch["positions"][r][here], positions_l3)
        assert batch["caption"][r, g] == example["caption"]
        ids, mask = tokenize([example["caption"]])
        np.testing.assert_array_equal(batch["text_ids"][r, g], ids[0])
        np.testing.assert_array_equal(batch["text_mask"][r, g], mask[0])


def test_endless_epochs_cover_every_clip_with_a_fresh_order(source):
  batches = take(make_iterator(source), 40)
  order = emitted_indices(batches)
  n = len(source.indices)
  assert len(order) >= 3 * n
  counts = np.unique(order, return_counts=True)
  assert set(counts[0].tolist()) == set(source.indices.tolist())
  # Every clip is read once per epoch; rows straddling an epoch end blur this by a little.
  assert counts[1].max() - counts[1].min() <= 2
  assert order[:n] != order[n : 2 * n]


def test_deterministic_and_seed_dependent(source):
  assert_batches_equal(take(make_iterator(source), 4), take(make_iterator(source), 4))
  other = take(make_iterator(source, seed=4), 4)
  assert emitted_indices(other) != emitted_indices(take(make_iterator(source), 4))


def test_processes_read_disjoint_clip_sets_whose_union_is_all(source):
  seen = []
  for p in range(2):
    order = emitted_indices(take(make_iterator(source, process_index=p, process_count=2), 20))
    expected = loader.shard_members(
        source.indices, bucket_id=0, seed=3, process_index=p, process_count=2
    )
    assert set(order) == set(expected.tolist())
    seen.append(set(order))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(source.indices.tolist())


@pytest.mark.parametrize("taken", [0, 1, 5])
def test_state_restores_the_exact_next_batches(source, taken):
  iterator = make_iterator(source)
  take(iterator, taken)
  state = iterator.get_state()
  json.dumps(state)  # grain.checkpoint stores it as JSON
  expected = take(iterator, 3)
  restored = make_iterator(source)
  take(restored, 2)  # a restored iterator forgets where it was
  restored.set_state(state)
  assert_batches_equal(take(restored, 3), expected)


def test_reading_latent_shapes_gives_the_same_batches(source):
  assert_batches_equal(
      take(make_iterator(source, latent_shape_of=None), 3), take(make_iterator(source), 3)
  )


class CountingShardSource(latent_shards.LatentShardSource):
  """A real shard source that counts the records it decodes."""

  reads = 0

  def __getitem__(self, index):
    type(self).reads += 1
    return super().__getitem__(index)


def test_shard_source_latent_shapes_come_from_its_index_not_its_records(source, tmp_path):
  with latent_shards.ShardWriter(str(tmp_path), 0, 1) as writer:
    for i in source.indices:
      example = source[i]
      writer.write(example["latent"], index=int(i), shape=source.shape_of(i),
                   caption=example["caption"])
  latent_shards.write_meta(str(tmp_path), num_shards=1, fingerprint="f", num_examples=len(source))
  shards = CountingShardSource(str(tmp_path))
  _, report = packing.make_packed_dataset(
      shards, patch_size=PATCH, seq_len=SEQ_LEN, max_segments=SEGMENTS, rows_per_batch=ROWS,
      seed=3, tokenize=WordTokenizer(), num_packing_bins=4,
  )
  assert CountingShardSource.reads == 0 and report.num_clips == len(source.indices)
  assert_batches_equal(
      take(make_iterator(shards, latent_shape_of=None), 3), take(make_iterator(source), 3)
  )


def test_oversized_clips_raise_with_shapes_and_fix(source):
  expected = r"(?s)6 of 24 clips.*\(7, 6, 12\): 126 tokens > 100.*pack_length"
  with pytest.raises(ValueError, match=expected):
    make_iterator(source, seq_len=100)


def test_skip_oversized_reports_and_never_yields_them(source, caplog):
  big = {int(i) for i in source.indices if source.shape_of(i) == (13, 24, 48)}
  with caplog.at_level(logging.WARNING):
    iterator = make_iterator(source, seq_len=100, skip_oversized=True)
  assert "leaving out 6 clips" in caplog.text and "(7, 6, 12)" in caplog.text
  order = emitted_indices(take(iterator, 10))
  assert not big & set(order)
  assert set(order) == set(source.indices.tolist()) - big
  _, report = packing.make_packed_dataset(
      source, patch_size=PATCH, seq_len=100, max_segments=SEGMENTS, rows_per_batch=ROWS, seed=3,
      tokenize=WordTokenizer(), latent_shape_of=latent_shape_of, skip_oversized=True,
  )
  assert report.num_oversized == 6 and report.oversized[0].shape == (7, 6, 12)


def test_skip_oversized_with_no_clip_left_says_how_long_rows_must_be(source):
  with pytest.raises(ValueError, match=r"(?s)leaves no clip: all 24.*at least 16.*126 keeps them"):
    make_iterator(source, seq_len=15, skip_oversized=True)


def test_latent_shape_disagreement_is_a_clear_error(source):
  iterator = make_iterator(source, latent_shape_of=lambda s: (1, 8, 8))
  with pytest.raises(ValueError, match="must agree"):
    next(iterator)


def test_report_padding_estimate_matches_the_iterator(source):
  dataset, report = packing.make_packed_dataset(
      source, patch_size=PATCH, seq_len=SEQ_LEN, max_segments=SEGMENTS, rows_per_batch=ROWS,
      seed=3, tokenize=WordTokenizer(), latent_shape_of=latent_shape_of, num_packing_bins=4,
  )
  batches = take(iter(dataset), 40)
  measured = np.mean([(b["segment_ids"] == 0).mean() for b in batches])
  assert report.num_clips == 24 and not report.oversized
  assert abs(report.padding_fraction - measured) < 0.1
  assert report.clips_per_row == pytest.approx(
      len(emitted_indices(batches)) / (40 * ROWS), abs=0.3
  )


def test_bad_arguments_raise(source):
  with pytest.raises(ValueError, match="process_index=2"):
    make_iterator(source, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="rows_per_batch=0"):
    make_iterator(source, rows_per_batch=0)
  with pytest.raises(ValueError, match="num_workers=-1"):
    make_iterator(source, num_workers=-1)
  with pytest.raises(ValueError, match="leaves process 2 none"):
    make_iterator(FakeLatents(2), process_index=2, process_count=3)


def test_state_of_another_worker_count_names_the_config_fix(source):
  threads = make_iterator(source)
  workers = make_iterator(source, num_workers=1, prefetch_batches=2)
  try:  # No batch is taken, so no worker process starts.
    with pytest.raises(ValueError, match=r"num_workers=0.*--config.data.num_workers=0"):
      workers.set_state(threads.get_state())
    with pytest.raises(ValueError, match=r"num_workers=1.*--config.data.num_workers=1"):
      threads.set_state(workers.get_state())
  finally:
    workers.close()
    threads.close()


def test_worker_process_batches_restore_exactly(source):
  start = time.perf_counter()
  iterator = make_iterator(source, num_workers=1, prefetch_batches=2)
  try:
    first = take(iterator, 2)
    state = iterator.get_state()
    expected = take(iterator, 2)
  finally:
    iterator.close()
  restored = make_iterator(source, num_workers=1, prefetch_batches=2)
  try:
    restored.set_state(state)
    assert_batches_equal(take(restored, 2), expected)
  finally:
    restored.close()
  assert first[0]["tokens"].shape == (ROWS, SEQ_LEN, 4 * CHANNELS)
  assert time.perf_counter() - start < 60
