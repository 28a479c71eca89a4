"""Tests for data_pipelines.loader: homogeneous batches, mix, determinism, sharding, restore."""

import collections
import threading

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from data_pipelines import buckets as buckets_lib
from data_pipelines import loader

_SHAPES = ((1, 4, 6), (3, 4, 4), (3, 6, 4), (5, 8, 8), (9, 32, 32))  # the last never fits


class TinySource:
  """A random-access source whose clip i is a pure function of i (a ShapesWorld stand-in).

  Clip i is filled with (i % 256, (i // 256) % 256, 7) so a test can tell from the pixels which
  clip it got; `reads` records every index read, to check which clips are never touched.
  """

  def __init__(self, num_examples: int = 240):
    self._num_examples = num_examples
    self.reads: list[int] = []
    self._lock = threading.Lock()

  def __len__(self):
    return self._num_examples

  def shape_of(self, index):
    # Unequal shares: 40% 1x4x6, 20% 3x4x4, 10% 3x6x4, 20% 5x8x8, 10% 9x32x32.
    return _SHAPES[(0, 0, 0, 0, 1, 1, 2, 3, 3, 4)[index % 10]]

  def __getitem__(self, index):
    with self._lock:
      self.reads.append(int(index))
    video = np.empty((*self.shape_of(index), 3), np.uint8)
    video[...] = (index % 256, (index // 256) % 256, 7)
    return {"video": video, "caption": f"clip {index}", "index": np.int64(index)}


def _tokenize(captions):
  """(B, 3) ids: the clip number, its length in characters, padding."""
  ids_bs = np.array([[int(c.split()[1]) + 1, len(c), 0] for c in captions], np.int32)
  return ids_bs, ids_bs != 0


def _tokens(shape):
  t, h, w = shape
  return t * h * w


def _buckets(source, batch_multiple=2):
  shapes = loader.shapes_of(source, range(len(source)))
  return buckets_lib.compute_buckets(
      shapes, tokens_per_clip=_tokens, token_budget=800, batch_multiple=batch_multiple,
      max_batch_size=16,
  )


def _iterator(source, buckets, **kwargs):
  kwargs = dict(seed=0, tokenize=_tokenize) | kwargs
  return loader.make_bucketed_iterator(source, buckets=buckets, **kwargs)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batches_are_homogeneous_and_match_their_clips():
  source = TinySource()
  buckets, report = _buckets(source)
  assert (9, 32, 32) in {r.shape for r in report.rejected}
  sizes = {b.shape: b.batch_size for b in buckets}
  for batch in _take(_iterator(source, buckets), 40):
    video = batch["video"]
    b = video.shape[0]
    assert video.dtype == np.uint8 and video.shape[1:] == (*video.shape[1:4], 3)
    assert sizes[video.shape[1:4]] == b
    assert batch["text_ids"].dtype == np.int32 and batch["text_ids"].shape == (b, 3)
    assert batch["text_mask"].dtype == bool and batch["text_mask"].shape == (b, 3)
    assert batch["index"].dtype == np.int64 and batch["index"].shape == (b,)
    for j, i in enumerate(batch["index"]):
      assert source.shape_of(int(i)) == video.shape[1:4]
      assert video[j, ..., 0].min() == video[j, ..., 0].max() == i % 256
      assert batch["caption"][j] == f"clip {i}"
      assert batch["text_ids"][j, 0] == i + 1
    np.testing.assert_array_equal(batch["text_mask"][:, 2], False)
  assert not any(source.shape_of(i) == (9, 32, 32) for i in source.reads)


def test_buckets_appear_in_proportion_to_weights_and_cover_every_clip():
  source = TinySource()
  buckets, _ = _buckets(source)
  batches = _take(_iterator(source, buckets, num_threads=1), 200)
  counts = collections.Counter(b["video"].shape[1:4] for b in batches)
  for bucket in buckets:
    assert counts[bucket.shape] / len(batches) == pytest.approx(bucket.weight, abs=0.03)
  seen = {int(i) for b in batches for i in b["index"]}
  accepted = {i for i in range(len(source)) if source.shape_of(i) != (9, 32, 32)}
  assert seen == accepted


def test_same_seed_same_batches_other_seed_differs():
  source = TinySource()
  buckets, _ = _buckets(source)
  first = _take(_iterator(source, buckets, seed=3), 12)
  again = _take(_iterator(source, buckets, seed=3, num_threads=1), 12)
  _assert_batches_equal(first, again)
  other = _take(_iterator(source, buckets, seed=4), 12)
  assert [b["index"].tolist() for b in first] != [b["index"].tolist() for b in other]


def test_processes_share_the_bucket_schedule_and_read_disjoint_clips():
  source = TinySource()
  buckets, _ = _buckets(source, batch_multiple=4)
  sizes = {b.shape: b.batch_size for b in buckets}
  per_process = [
      _take(_iterator(source, buckets, seed=1, process_index=p, process_count=2), 40)
      for p in range(2)
  ]
  shapes = [[b["video"].shape for b in batches] for batches in per_process]
  assert shapes[0] == shapes[1]
  assert all(s[0] == sizes[s[1:4]] // 2 for s in shapes[0])
  seen = [{int(i) for b in batches for i in b["index"]} for batches in per_process]
  assert seen[0] and seen[1] and not seen[0] & seen[1]
  # Within one epoch of a bucket, the two halves together are that bucket's clips.
  single = {int(i) for b in _take(_iterator(source, buckets, seed=1), 40) for i in b["index"]}
  assert seen[0] | seen[1] == single


def test_shard_members_partitions_each_bucket():
  members = np.arange(10, 40, dtype=np.int64)
  parts = [
      loader.shard_members(members, bucket_id=2, seed=5, process_index=p, process_count=3)
      for p in range(3)
  ]
  assert sorted(np.concatenate(parts).tolist()) == members.tolist()
  assert [len(p) for p in parts] == [10, 10, 10]


def test_get_state_set_state_restores_the_exact_next_batch():
  source = TinySource()
  buckets, _ = _buckets(source)
  iterator = _iterator(source, buckets, seed=2)
  _take(iterator, 5)
  state = iterator.get_state()
  expected = _take(iterator, 3)
  fresh = _iterator(source, buckets, seed=2)
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 3), expected)


def test_orbax_checkpoint_restores_the_exact_next_batch(tmp_path):
  source = TinySource()
  buckets, _ = _buckets(source)
  iterator = _iterator(source, buckets, seed=2)
  _take(iterator, 5)
  with ocp.CheckpointManager(tmp_path, item_names=("data",)) as manager:
    manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
  expected = _take(iterator, 3)
  fresh = _iterator(source, buckets, seed=2)
  with ocp.CheckpointManager(tmp_path, item_names=("data",)) as manager:
    assert manager.latest_step() == 5
    manager.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  _assert_batches_equal(_take(fresh, 3), expected)


def test_index_sampling_reads_only_the_sampled_clips():
  source = TinySource(num_examples=100_000)
  indices = loader.select_indices(len(source), num_samples=300, seed=0)
  assert len(np.unique(indices)) == 300 and indices.min() >= 0 and indices.max() < 100_000
  np.testing.assert_array_equal(indices, loader.select_indices(100_000, num_samples=300, seed=0))
  shapes = loader.shapes_of(source, indices)
  buckets, _ = buckets_lib.compute_buckets(
      shapes, tokens_per_clip=_tokens, token_budget=800, batch_multiple=2, max_batch_size=16
  )
  iterator = _iterator(source, buckets, num_index_samples=300)
  seen = {int(i) for b in _take(iterator, 20) for i in b["index"]}
  assert seen <= set(indices.tolist())
  # Passing the same indices (and their shapes) explicitly gives the same stream.
  explicit = _iterator(source, buckets, indices=indices, shapes=shapes)
  sampled = _iterator(source, buckets, num_index_samples=300)
  _assert_batches_equal(_take(sampled, 6), _take(explicit, 6))


def test_bad_arguments_raise_clear_errors():
  source = TinySource()
  buckets, _ = _buckets(source, batch_multiple=2)
  odd = [
      buckets_lib.Bucket(
          shape=(1, 4, 6), batch_size=6, weight=1.0, num_clips=1, tokens_per_clip=24
      )
  ]
  with pytest.raises(ValueError, match="not divisible by process_count=4"):
    _iterator(source, odd, process_count=4)
  with pytest.raises(ValueError, match="process_index=2"):
    _iterator(source, buckets, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="either indices or num_index_samples"):
    _iterator(source, buckets, indices=[0, 1], num_index_samples=2)
  with pytest.raises(ValueError, match="gets none"):
    _iterator(source, buckets, indices=[0, 5])


def test_shape_of_disagreeing_with_the_clip_is_an_error():
  class LyingSource(TinySource):

    def __getitem__(self, index):
      return {"video": np.zeros((2, 2, 2, 3), np.uint8), "caption": "clip 0"}

  source = LyingSource(num_examples=20)
  buckets, _ = _buckets(source)
  with pytest.raises(ValueError, match="shape_of and __getitem__ must agree"):
    next(_iterator(source, buckets))


def test_bad_tokenizer_output_is_an_error():
  source = TinySource(num_examples=20)
  buckets, _ = _buckets(source)
  with pytest.raises(ValueError, match=r"must return two arrays of shape"):
    next(_iterator(source, buckets, tokenize=lambda captions: (np.zeros((1, 3)), np.zeros((1, 3)))))



def test_mix_window_shuffles_bucket_order_but_keeps_window_counts():
  source = TinySource()
  buckets, _ = _buckets(source)

  def shapes(mix_window):
    batches = _take(_iterator(source, buckets, mix_window=mix_window), 32)
    return [b["video"].shape[1:4] for b in batches]

  fixed, shuffled = shapes(1), shapes(16)
  assert fixed != shuffled
  for start in (0, 16):
    window = slice(start, start + 16)
    assert collections.Counter(fixed[window]) == collections.Counter(shuffled[window])


def test_loader_over_shapesworld():
  from data_pipelines import shapesworld  # pylint: disable=g-import-not-at-top

  source = shapesworld.ShapesWorld(shapesworld.ShapesWorldConfig(seed=0))
  indices = loader.select_indices(len(source), num_samples=300, seed=0)
  shapes = loader.shapes_of(source, indices)

  def latent_tokens(shape):  # a causal autoencoder's 4x time, 8x space reduction, patch 1
    t, h, w = shape
    return (1 + (t - 1) // 4) * (h // 8) * (w // 8)

  buckets, report = buckets_lib.compute_buckets(
      shapes, tokens_per_clip=latent_tokens, token_budget=256, batch_multiple=2,
      max_batch_size=16,
  )
  assert report.total_clips == 300 and report.accepted_clips == 300
  assert len({b.shape[1:] for b in buckets}) > 1 and len({b.shape[0] for b in buckets}) > 1

  def make(process_index, process_count=2):
    return _iterator(
        source, buckets, indices=indices, shapes=shapes, process_index=process_index,
        process_count=process_count, tokenize=lambda c: _tokenize([f"clip {len(x)}" for x in c]),
    )

  iterators = [make(0), make(1)]
  per_process = [_take(it, 4) for it in iterators]
  assert [b["video"].shape for b in per_process[0]] == [b["video"].shape for b in per_process[1]]
  seen = [{int(i) for b in batches for i in b["index"]} for batches in per_process]
  assert not seen[0] & seen[1] and seen[0] | seen[1] <= set(indices.tolist())
  for batch in per_process[0]:
    for j, i in enumerate(batch["index"]):
      assert batch["video"][j].shape == (*source.shape_of(int(i)), 3)
      assert batch["caption"][j] == source[int(i)]["caption"]
      shapesworld.parse_caption(str(batch["caption"][j]))  # raises on text outside the grammar
  state = iterators[0].get_state()
  expected = _take(iterators[0], 2)
  restored = make(0)
  restored.set_state(state)
  _assert_batches_equal(_take(restored, 2), expected)


# --- Crop-to-bucket and worker processes ----------------------------------------------------


class CoordSource:
  """Clip i's pixel (t, y, x) holds (t, y, x): a test can read off which window it got.

  Picklable (no lock), so grain worker processes can use it. Shapes cycle through `shapes`.
  """

  def __init__(self, shapes, num_examples=60):
    self._shapes = tuple(shapes)
    self._num_examples = num_examples

  def __len__(self):
    return self._num_examples

  def shape_of(self, index):
    return self._shapes[index % len(self._shapes)]

  def __getitem__(self, index):
    t, h, w = self.shape_of(index)
    video = np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij"), -1)
    return {"video": video.astype(np.uint8), "caption": f"clip {index}"}


def _cropped_buckets(source):
  shapes = loader.shapes_of(source, range(len(source)))
  buckets, report = buckets_lib.compute_buckets(
      shapes, tokens_per_clip=_tokens, token_budget=2000, batch_multiple=2, max_batch_size=4,
      max_buckets=1,
  )
  return buckets, report


def _windows(batch):
  """(index, first frame, top row, left column) of every clip of a batch."""
  video = batch["video"].astype(int)
  return [(int(i), int(v[0, 0, 0, 0]), int(v[0, 0, 0, 1]), int(v[0, 0, 0, 2]))
          for i, v in zip(batch["index"], video)]


@pytest.mark.parametrize("temporal_crop", ["random", "first"])
def test_larger_clips_are_centre_cropped_to_their_bucket(temporal_crop):
  source = CoordSource([(5, 8, 8), (5, 8, 8), (9, 10, 10), (9, 11, 10)])
  buckets, report = _cropped_buckets(source)
  assert [b.members for b in buckets] == [((5, 8, 8), (9, 10, 10), (9, 11, 10))]
  assert report.cropped_clips == 30
  starts = collections.defaultdict(set)
  for batch in _take(_iterator(source, buckets, temporal_crop=temporal_crop), 40):
    assert batch["video"].shape[1:] == (5, 8, 8, 3)
    for (index, t0, top, left), video in zip(_windows(batch), batch["video"].astype(int)):
      t, h, w = source.shape_of(index)
      # Centre crop ((11 - 8) // 2 = 1 row above), and a contiguous window of frames.
      assert (top, left) == ((h - 8) // 2, (w - 8) // 2)
      np.testing.assert_array_equal(video[:, 0, 0, 0], np.arange(t0, t0 + 5))
      assert 0 <= t0 <= t - 5
      starts[index].add(t0)
  if temporal_crop == "first":
    assert all(s == {0} for s in starts.values())
  else:
    # Long clips get different windows in different epochs (30 clips, ~5 epochs here).
    long_clips = [i for i in starts if source.shape_of(i)[0] == 9]
    assert any(len(starts[i]) > 1 for i in long_clips)
    assert set().union(*(starts[i] for i in long_clips)) == set(range(5))


def test_random_windows_are_deterministic_and_restored_exactly():
  source = CoordSource([(5, 8, 8), (5, 8, 8), (9, 8, 8)])
  buckets, _ = _cropped_buckets(source)
  first = _take(_iterator(source, buckets, seed=3), 10)
  _assert_batches_equal(first, _take(_iterator(source, buckets, seed=3, num_threads=1), 10))
  iterator = _iterator(source, buckets, seed=3)
  _take(iterator, 4)
  restored = _iterator(source, buckets, seed=3)
  restored.set_state(iterator.get_state())
  _assert_batches_equal(_take(restored, 6), first[4:])


def test_latents_crop_to_the_bucket_latent_prefix_and_centre():
  # Factors t=2, h=w=4: a (5, 16, 24) video has a (3, 4, 6) latent; bucket (3, 8, 16) -> (2, 2, 4).
  latent = np.arange(3 * 4 * 6 * 2, dtype=np.float32).reshape(3, 4, 6, 2)
  cropped = loader.crop_latent(latent, (5, 16, 24), (3, 8, 16))
  np.testing.assert_array_equal(cropped, latent[:2, 1:3, 1:5])
  with pytest.raises(ValueError, match="multiples of the autoencoder's factors"):
    loader.crop_latent(latent, (5, 16, 24), (3, 6, 16))


def test_temporal_crop_must_be_known():
  source = CoordSource([(5, 8, 8)])
  buckets, _ = _cropped_buckets(source)
  with pytest.raises(ValueError, match="temporal_crop='middle'"):
    _iterator(source, buckets, temporal_crop="middle")


def test_worker_processes_give_the_same_batches_and_restore_exactly():
  # 5x8x8 and 3x8x8 get buckets; 9x8x8 clips are cropped (random windows) into 5x8x8.
  source = CoordSource([(5, 8, 8), (5, 8, 8), (3, 8, 8), (3, 8, 8), (9, 8, 8)])
  shapes = loader.shapes_of(source, range(len(source)))
  buckets, _ = buckets_lib.compute_buckets(
      shapes, tokens_per_clip=_tokens, token_budget=2000, batch_multiple=2, max_batch_size=4,
      max_buckets=2,
  )
  expected = _take(_iterator(source, buckets, seed=5), 8)
  workers = _iterator(source, buckets, seed=5, num_workers=1)
  try:
    got = _take(workers, 4)
    state = workers.get_state()
    _assert_batches_equal(got, expected[:4])
  finally:
    workers.close()
  restored = _iterator(source, buckets, seed=5, num_workers=1)
  try:
    restored.set_state(state)
    _assert_batches_equal(_take(restored, 4), expected[4:])
  finally:
    restored.close()


def test_state_of_another_worker_count_is_a_clear_error():
  source = TinySource()
  buckets, _ = _buckets(source)
  threads = _iterator(source, buckets)
  _take(threads, 2)
  one, two = (_iterator(source, buckets, num_workers=n) for n in (1, 2))
  try:  # set_state checks before any worker starts.
    with pytest.raises(ValueError, match=r"saved by a pipeline with num_workers=0.*runs with "
                       r"num_workers=1.*--config.data.num_workers=0"):
      one.set_state(threads.get_state())
    with pytest.raises(ValueError, match=r"num_workers=2.*--config.data.num_workers=2"):
      one.set_state(two.get_state())
    with pytest.raises(ValueError, match=r"num_workers=1.*--config.data.num_workers=1"):
      threads.set_state(one.get_state())
  finally:
    for iterator in (threads, one, two):
      iterator.close()


def test_stream_ids_are_distinct():
  streams = {k: v for k, v in vars(loader).items() if k.endswith("_STREAM")}
  assert len(streams) >= 7 and len(set(streams.values())) == len(streams)


def test_latent_sources_are_cropped_in_the_pipeline():
  class LatentSource:
    """Latents of a 2x4x4 autoencoder for native videos of (5, 16, 16) and (9, 16, 20)."""

    def __len__(self):
      return 24

    def shape_of(self, index):
      return ((5, 16, 16), (5, 16, 16), (9, 16, 20))[index % 3]

    def __getitem__(self, index):
      t, h, w = self.shape_of(index)
      latent = np.full((1 + (t - 1) // 2, h // 4, w // 4, 2), index, np.float32)
      return {"latent": latent, "caption": f"clip {index}", "index": np.int64(index)}

  source = LatentSource()
  shapes = loader.shapes_of(source, range(len(source)))
  buckets, report = buckets_lib.compute_buckets(
      shapes, tokens_per_clip=_tokens, token_budget=10_000, batch_multiple=2, max_batch_size=4,
      max_buckets=1,
  )
  assert report.cropped_clips == 8
  for batch in _take(_iterator(source, buckets), 6):
    assert batch["latent"].shape == (4, 3, 4, 4, 2)  # (5, 16, 16) in latent cells
    for i, latent in zip(batch["index"], batch["latent"]):
      np.testing.assert_array_equal(latent, i)
