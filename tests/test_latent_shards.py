"""Latent shards on disk: record format, atomic shards, completeness, random access by source index."""

import os
import pickle

import flax.serialization
import grain
import ml_dtypes
import numpy as np
import pytest

from data_pipelines import latent_shards


def _latent(i, shape=(2, 3, 4, 5)):
  return np.random.default_rng(i).normal(size=shape).astype(np.float32)


def _write(directory, shards, *, num_examples=100, fingerprint="f", dtype="float32", shape=(2, 3, 4, 5)):
  """shards: one list of source indices per shard; clip i has shape (1 + 2*(i%2), 8, 8)."""
  for k, members in enumerate(shards):
    with latent_shards.ShardWriter(str(directory), k, len(shards), dtype=dtype) as writer:
      for i in members:
        writer.write(_latent(i, shape), index=i, shape=(1 + 2 * (i % 2), 8, 8), caption=f"clip {i}",
                     text={"text_mask": np.arange(4) < i % 4})
  return latent_shards.write_meta(str(directory), num_shards=len(shards), fingerprint=fingerprint,
                                  num_examples=num_examples, info={"autoencoder": "ae", "autoencoder_step": 7})


def test_records_round_trip_and_are_flax_msgpack():
  record = {"latent": _latent(0).astype(ml_dtypes.bfloat16), "index": np.int64(3), "shape": [5, 8, 8],
            "caption": "a red square", "text_features": np.ones((2, 3), np.float16)}
  data = latent_shards.encode_record(record)
  ours, theirs = latent_shards.decode_record(data), flax.serialization.msgpack_restore(data)
  for decoded in (ours, theirs):
    assert decoded["index"] == 3 and decoded["shape"] == [5, 8, 8] and decoded["caption"] == "a red square"
    assert decoded["latent"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(decoded["latent"], record["latent"])
    np.testing.assert_array_equal(decoded["text_features"], record["text_features"])


def test_source_reads_every_shard_by_source_index(tmp_path):
  meta = _write(tmp_path, [[7, 2, 30], [11, 4]])
  source = latent_shards.LatentShardSource(str(tmp_path), fingerprint="f")
  assert meta["complete"] and meta["num_latents"] == 5 and meta["info"]["autoencoder_step"] == 7
  assert meta["shapes"] == {"1x8x8": 3, "3x8x8": 2} and meta["latent_channels"] == 5
  assert source.indices.dtype == np.int64 and list(source.indices) == [2, 4, 7, 11, 30]
  assert len(source) == 100  # The video source's size: indices refer to it.
  for i in source.indices:
    example = source[i]
    np.testing.assert_array_equal(example["latent"], _latent(i))
    assert example["latent"].dtype == np.float32 and example["index"] == i
    assert example["caption"] == f"clip {i}"
    np.testing.assert_array_equal(example["text_mask"], np.arange(4) < i % 4)
    assert source.shape_of(i) == (1 + 2 * (i % 2), 8, 8) and source.latent_shape_of(i) == (2, 3, 4, 5)
  with pytest.raises(KeyError, match="clip 3 is not in the latent cache"):
    source[3]
  with pytest.raises(KeyError, match="not in the latent cache"):
    source.shape_of(31)
  # Grain reads it in threads and pickles it for worker processes.
  clone = pickle.loads(pickle.dumps(source))
  np.testing.assert_array_equal(clone[30]["latent"], _latent(30))
  dataset = grain.MapDataset.source(list(source.indices)).map(lambda i: source[i]["index"])
  assert list(dataset.to_iter_dataset(grain.ReadOptions(num_threads=2))) == list(source.indices)


def test_bfloat16_storage_halves_the_shards(tmp_path):
  for dtype in latent_shards.DTYPES:
    # ArrayRecord files grow in 128 KiB steps: ~1.3 MB of float32 makes the ratio visible.
    _write(tmp_path / dtype, [list(range(40))], dtype=dtype, shape=(4, 16, 16, 8))
  directory = str(tmp_path / "bfloat16")
  as_float = latent_shards.LatentShardSource(directory)[1]["latent"]
  stored = latent_shards.LatentShardSource(directory, dtype=None)[1]["latent"]
  assert latent_shards.LatentShardSource(directory).metadata["dtype"] == "bfloat16"
  assert as_float.dtype == np.float32 and stored.dtype == ml_dtypes.bfloat16
  np.testing.assert_allclose(as_float, _latent(1, (4, 16, 16, 8)), rtol=1e-2, atol=1e-2)
  size = {d: os.path.getsize(latent_shards.shard_path(str(tmp_path / d), 0, 1)) for d in latent_shards.DTYPES}
  assert size["bfloat16"] < 0.6 * size["float32"], size


def test_incomplete_and_stale_directories_are_refused(tmp_path):
  with pytest.raises(latent_shards.IncompleteLatentsError, match="holds no latent shards"):
    latent_shards.LatentShardSource(str(tmp_path / "none"))
  with latent_shards.ShardWriter(str(tmp_path), 0, 2) as writer:
    writer.write(_latent(0), index=0, shape=(1, 8, 8), caption="")
  with pytest.raises(latent_shards.IncompleteLatentsError, match="the encode was interrupted"):
    latent_shards.LatentShardSource(str(tmp_path))
  with pytest.raises(latent_shards.IncompleteLatentsError, match="shard 1 of 2 is missing"):
    latent_shards.write_meta(str(tmp_path), num_shards=2, fingerprint="f", num_examples=10)
  with latent_shards.ShardWriter(str(tmp_path), 1, 2):
    pass  # A process with no clips still writes its (empty) shard.
  latent_shards.write_meta(str(tmp_path), num_shards=2, fingerprint="old", num_examples=10)
  assert list(latent_shards.LatentShardSource(str(tmp_path)).indices) == [0]
  with pytest.raises(latent_shards.StaleLatentsError, match="encoded for old, not for new"):
    latent_shards.LatentShardSource(str(tmp_path), fingerprint="new")


def test_a_failed_writer_leaves_no_shard(tmp_path):
  with pytest.raises(RuntimeError):
    with latent_shards.ShardWriter(str(tmp_path), 0, 1) as writer:
      writer.write(_latent(0), index=0, shape=(1, 8, 8), caption="")
      raise RuntimeError("encoder crashed")
  assert os.listdir(tmp_path) == []
  with pytest.raises(ValueError, match="non-finite"):
    with latent_shards.ShardWriter(str(tmp_path), 0, 1) as writer:
      writer.write(np.full((1, 2, 2, 3), np.nan), index=5, shape=(1, 8, 8), caption="")


def test_duplicate_indices_across_shards_are_refused(tmp_path):
  with pytest.raises(ValueError, match=r"source indices \[2\] are in more than one shard"):
    _write(tmp_path, [[1, 2], [2, 3]])


def test_remove_stale_keeps_only_this_layout(tmp_path):
  _write(tmp_path, [[1], [2], [3]])
  _write(tmp_path, [[1], [2]])
  latent_shards.remove_stale(str(tmp_path), num_shards=2)
  assert sorted(os.listdir(tmp_path)) == [
      "index-00000-of-00002.json", "index-00001-of-00002.json",
      "latents-00000-of-00002.array_record", "latents-00001-of-00002.array_record"]
