"""The latent cache driver and `encode_latents`: shards per process, reload, rebuild, a real encoder."""

import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

from data_pipelines import buckets as buckets_lib
from data_pipelines import latent_shards
from data_pipelines import loader
from data_pipelines import shapesworld
from spacetime_dit import config_types
from spacetime_dit import encode_latents
from spacetime_dit.models import autoencoder as autoencoder_lib
from spacetime_dit.sharding import mesh as mesh_lib
from spacetime_dit.training import builders
from spacetime_dit.training import data as data_lib
from spacetime_dit.training import latent_cache
from spacetime_dit.training import steps


class Pool:
  """A stand-in encoder with a real latent layout (4x4 mean-pool, 3 channels) that counts calls."""

  def __init__(self, fail_after: int | None = None):
    self.batch_shapes, self.fail_after = [], fail_after

  def __call__(self, video_bthwc):
    if self.fail_after is not None and len(self.batch_shapes) >= self.fail_after:
      raise RuntimeError("preempted")
    self.batch_shapes.append(video_bthwc.shape)
    b, t, h, w, c = video_bthwc.shape
    return video_bthwc.reshape(b, t, h // 4, 4, w // 4, 4, c).mean(axis=(3, 5)).astype(np.float32)


@pytest.fixture(scope="module")
def world():
  config = shapesworld.ShapesWorldConfig(sizes=((32, 32), (24, 40)), lengths=(1, 5), max_objects=1)
  return shapesworld.ShapesWorld(config)


INDICES = list(range(0, 40, 3))


def _build(world, directory, encode, *, indices=INDICES, fingerprint="a", **kwargs):
  return latent_cache.build(world, indices, encode, batch_size=4, fingerprint=fingerprint,
                            directory=str(directory), progress=False, **kwargs)


def test_one_process_caches_latents_with_the_source_shapes_and_reloads(world, tmp_path):
  encode = Pool()
  cache = _build(world, tmp_path, encode)
  assert list(cache.indices) == INDICES and len(cache) == len(world)
  shapes = {world.shape_of(i) for i in INDICES}
  # Every call is a full batch (the last of each shape padded), so one compile per shape.
  assert {s[0] for s in encode.batch_shapes} == {4} and {s[1:4] for s in encode.batch_shapes} == shapes
  for i in INDICES:
    assert cache.shape_of(i) == world.shape_of(i)
    np.testing.assert_allclose(cache[i]["latent"], Pool()(world[i]["video"][None])[0], rtol=1e-6)
    assert cache[i]["caption"] == world[i]["caption"]
  with pytest.raises(KeyError, match="not in the latent cache"):
    cache[1]
  assert sorted(os.listdir(tmp_path)) == [
      "index-00000-of-00001.json", "latents-00000-of-00001.array_record", latent_shards.META_FILE]

  again = Pool()
  reloaded = _build(world, tmp_path, again, indices=INDICES[::-1])  # Order does not matter.
  assert again.batch_shapes == []
  for i in INDICES:
    np.testing.assert_array_equal(reloaded[i]["latent"], cache[i]["latent"])


def test_processes_encode_disjoint_shares_into_one_directory(world, tmp_path):
  alone = _build(world, tmp_path / "one", Pool())
  barrier = threading.Barrier(2)
  results, encoders = [None, None], [Pool(), Pool()]

  def process(p):  # Two "processes" as threads, meeting at a real barrier.
    results[p] = _build(world, tmp_path / "two", encoders[p], process_index=p, process_count=2,
                        barrier=lambda name: barrier.wait(timeout=60))

  threads = [threading.Thread(target=process, args=(p,)) for p in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  for p, cache in enumerate(results):
    assert list(cache.indices) == INDICES  # Each process sees every shard.
    with open(latent_shards.index_path(str(tmp_path / "two"), p, 2)) as f:
      assert json.load(f)["indices"] == sorted(INDICES[p::2], key=world.shape_of)
    for i in INDICES:
      np.testing.assert_array_equal(cache[i]["latent"], alone[i]["latent"])
  assert sum(len(e.batch_shapes) for e in encoders) > 0
  assert latent_shards.read_meta(str(tmp_path / "two"))["num_shards"] == 2
  with pytest.raises(ValueError, match="needs a barrier"):
    _build(world, tmp_path / "three", Pool(), process_count=2)


class _NaN(Pool):
  """An encoder whose latents are NaN (a diverged checkpoint): the ShardWriter refuses them."""

  def __call__(self, video_bthwc):
    return np.full_like(super().__call__(video_bthwc), np.nan)


def test_an_error_on_one_process_ends_every_process_instead_of_a_hang(world, tmp_path):
  barrier = threading.Barrier(2)
  errors, encoders = [None, None], [Pool(), _NaN()]

  def process(p):
    try:
      _build(world, tmp_path, encoders[p], process_index=p, process_count=2,
             barrier=lambda name: barrier.wait(timeout=60))
    except Exception as e:  # pylint: disable=broad-except
      errors[p] = e

  threads = [threading.Thread(target=process, args=(p,)) for p in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not barrier.broken  # Both met at both barriers: nobody timed out waiting.
  assert isinstance(errors[1], ValueError) and "non-finite latents" in str(errors[1])
  assert isinstance(errors[0], latent_shards.IncompleteLatentsError)
  assert "shard 1 of 2 is missing" in str(errors[0])
  assert not os.path.exists(tmp_path / latent_shards.META_FILE)
  assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_stale_caches_are_rebuilt(world, tmp_path):
  _build(world, tmp_path, Pool(), indices=[0, 1, 2], fingerprint="old autoencoder")
  for change in ({"fingerprint": "new autoencoder"}, {"indices": [0, 1, 3]}, {"dtype": "bfloat16"}):
    encode = Pool()
    kwargs = {"indices": [0, 1, 2], "fingerprint": "old autoencoder", **change}
    cache = _build(world, tmp_path, encode, **kwargs)
    assert encode.batch_shapes, f"{change} must re-encode"
    assert list(cache.indices) == kwargs["indices"]
    _build(world, tmp_path, Pool(), indices=[0, 1, 2], fingerprint="old autoencoder")  # Restore.


def test_an_interrupted_encode_is_rebuilt_and_old_layouts_are_removed(world, tmp_path):
  # A 2-process encode whose process 1 died: process 0 cannot mark the directory complete.
  with pytest.raises(latent_shards.IncompleteLatentsError, match="shard 1 of 2 is missing"):
    _build(world, tmp_path, Pool(), process_index=0, process_count=2, barrier=lambda name: None)
  # Then a 1-process run that is preempted mid-encode.
  with pytest.raises(RuntimeError, match="preempted"):
    _build(world, tmp_path, Pool(fail_after=1))
  with pytest.raises(latent_shards.IncompleteLatentsError, match="interrupted"):
    latent_shards.LatentShardSource(str(tmp_path))
  encode = Pool()
  cache = _build(world, tmp_path, encode)
  assert encode.batch_shapes and list(cache.indices) == INDICES
  assert not [n for n in os.listdir(tmp_path) if "-of-00002" in n or n.endswith(".tmp")]


def test_the_cache_feeds_the_bucketed_loader(world, tmp_path):
  cache = _build(world, tmp_path, Pool())
  shapes = loader.shapes_of(cache, cache.indices)
  buckets, _ = buckets_lib.compute_buckets(
      shapes, tokens_per_clip=lambda s: s[0] * s[1] * s[2] // 16, token_budget=4 * 5 * 40 * 24 // 16,
      batch_multiple=1, max_batch_size=4)
  iterator = loader.make_bucketed_iterator(
      cache, buckets=buckets, seed=0, tokenize=lambda c: (np.zeros((len(c), 1), np.int32),) * 2,
      indices=cache.indices, shapes=shapes)
  batch = next(iterator)
  assert batch["latent"].ndim == 5 and batch["latent"].shape[-1] == 3
  assert set(batch["index"].tolist()) <= set(INDICES)


# --- a real (untrained) autoencoder and the `encode_latents` entry point ---------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ae_dir(untrained_autoencoder):
  # Random weights: the shard format and the driver do not care, and training one
  # (tests/test_eval_autoencoder.py) costs ~25 s. Built once per session in conftest.py.
  return untrained_autoencoder


def test_encode_latents_writes_the_autoencoders_latents(ae_dir, tmp_path):
  out = str(tmp_path / "latents")
  summary = encode_latents.encode_dataset(ae_dir, "shapesworld", out, num_clips=10, batch_size=3,
                                          progress=False)
  assert summary["encoded"] and summary["clips"] == 10 and summary["shards"] == 1
  config, model, params, _, _ = builders.restore_params(ae_dir, *_one_device())
  data_cfg = config_types.dataclass_from_config(config_types.DataConfig, config.data, path="config.data")
  world = data_lib.make_source(data_cfg)
  cache = latent_shards.LatentShardSource(out)
  assert list(cache.indices) == list(data_lib.training_indices(data_cfg, world, 10)[0])
  ae_cfg = model.config
  info = cache.metadata["info"]
  assert info["autoencoder"] == os.path.abspath(ae_dir) and info["autoencoder_step"] == 0
  assert (info["temporal_factor"], info["spatial_factor"]) == (ae_cfg.temporal_factor, ae_cfg.spatial_factor)
  for i in cache.indices:
    latent_shape = (*autoencoder_lib.latent_shape(ae_cfg, *world.shape_of(i)), ae_cfg.latent_channels)
    assert cache.shape_of(i) == world.shape_of(i) and cache[i]["latent"].shape == latent_shape
  # The batch-padded, device-sharded encoder gives what encode_video gives for the clip alone.
  i = int(cache.indices[0])
  alone = steps.encode_video(model, params, world[i]["video"][None])[0]
  np.testing.assert_allclose(cache[i]["latent"], np.asarray(alone), rtol=1e-4, atol=1e-5)

  again = encode_latents.encode_dataset(ae_dir, "shapesworld", out, num_clips=10, batch_size=3,
                                        progress=False)
  assert not again["encoded"] and again["clips"] == 10

  # Training opens them checked against its own autoencoder.
  opened = latent_cache.open_encoded(out, ae_dir=os.path.abspath(ae_dir), ae_step=0, config=ae_cfg)
  assert list(opened.indices) == list(cache.indices)
  with pytest.raises(latent_shards.StaleLatentsError, match="at step 0, but .* at step 5"):
    latent_cache.open_encoded(out, ae_dir=ae_dir, ae_step=5, config=ae_cfg)
  # Loader settings are not part of what the latents depend on.
  tuned = dataclasses.replace(data_cfg, num_threads=8, token_budget=7)
  assert latent_cache.describe_data(tuned) == latent_cache.describe_data(data_cfg)


def _one_device():
  mesh_cfg = config_types.MeshConfig(data=1)
  return mesh_lib.make_mesh(mesh_cfg, jax.devices()[:1]), mesh_cfg.rules


def test_encode_latents_command_line(ae_dir, tmp_path):
  def run(*flags):
    return subprocess.run([sys.executable, "-m", "spacetime_dit.encode_latents", *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=300)

  out = str(tmp_path / "latents")
  result = run(f"--autoencoder={ae_dir}", "--data=shapesworld", f"--output={out}", "--num_clips=4",
               "--batch_size=2", "--dtype=bfloat16")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "4 clips encoded" in result.stdout and f"--config.data.latent_dir={out}" in result.stdout
  assert latent_shards.LatentShardSource(out).metadata["dtype"] == "bfloat16"
  result = run(f"--autoencoder={ae_dir}", f"--data={tmp_path / 'nowhere'}", f"--output={out}")
  assert result.returncode == 2
  assert "is neither 'shapesworld', 'tfds:NAME' nor a directory" in result.stderr


def test_encode_latents_reads_a_prepared_dataset(ae_dir, tmp_path, caplog):
  pytest.importorskip("data_pipelines.prepared")
  from spacetime_dit import video_io  # pylint: disable=g-import-not-at-top

  videos = tmp_path / "videos"
  # Three clips of one size and length (one encoder compile), and one of 4 frames: prepared
  # with --frame_multiple=1 it is valid data, but the tiny autoencoder needs T = 1 + 2k.
  for k, length in enumerate((5, 5, 5, 4)):
    frames = np.random.default_rng(k).integers(0, 255, (length, 32, 48, 3), dtype=np.uint8)
    video_io.write_mp4(str(videos / f"clip{k}.mp4"), frames)
    (videos / f"clip{k}.txt").write_text(f"clip number {k}")
  # A subprocess: prepare and encode_latents both define absl --output.
  result = subprocess.run(
      [sys.executable, "-m", "data_pipelines.prepare", f"--input={videos}",
       f"--output={tmp_path / 'prepared'}", "--max_frames=5", "--frame_multiple=1", "--codec=raw",
       "--num_workers=0"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  out = str(tmp_path / "latents")
  with caplog.at_level(logging.WARNING):
    summary = encode_latents.encode_dataset(ae_dir, str(tmp_path / "prepared"), out,
                                            batch_size=2, progress=False)
  # Dropped and reported like training drops it, not a refusal of the whole run.
  assert summary["encoded"] and summary["clips"] == 3 and summary["dropped"] == 1
  assert summary["shapes"] == {"5x32x48": 3}
  assert "1 clips of (4, 32, 48): video has 4 frames" in caplog.text
  cache = latent_shards.LatentShardSource(out)
  assert sorted(cache[i]["caption"] for i in cache.indices) == [f"clip number {k}" for k in range(3)]
  # tiny: tf 2, sf 4, 4 channels.
  assert cache[int(cache.indices[0])]["latent"].shape == (3, 8, 12, 4)
