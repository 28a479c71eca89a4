"""The diffusion stage's latent cache: same shapes as the source, saved, reloaded, rebuilt when stale."""

import numpy as np
import pytest

from data_pipelines import shapesworld
from spacetime_dit.training import latent_cache


def _pool(video_bthwc):
  """A stand-in encoder with a real latent layout: 4x4 mean-pool of the frames, 3 channels."""
  b, t, h, w, c = video_bthwc.shape
  return video_bthwc.reshape(b, t, h // 4, 4, w // 4, 4, c).mean(axis=(3, 5)).astype(np.float32)


def _fail(_):
  raise AssertionError("a valid saved cache must be reloaded, not encoded again")


@pytest.fixture
def world():
  config = shapesworld.ShapesWorldConfig(sizes=((32, 32), (24, 40)), lengths=(1, 5), max_objects=1)
  return shapesworld.ShapesWorld(config)


def test_cache_serves_latents_with_the_source_shapes_and_reloads(world, tmp_path):
  path = str(tmp_path / latent_cache.FILE)
  indices = list(range(0, 40, 3))
  cache = latent_cache.build(world, indices, _pool, batch_size=4, fingerprint="a", path=path)
  assert list(cache.indices) == indices and len(cache) == len(world)
  for i in indices:
    t, h, w = world.shape_of(i)
    assert cache.shape_of(i) == (t, h, w)
    np.testing.assert_allclose(cache[i]["latent"], _pool(world[i]["video"][None])[0], rtol=1e-6)
    assert cache[i]["caption"] == world[i]["caption"]
  with pytest.raises(KeyError, match="not in the latent cache"):
    cache[1]
  reloaded = latent_cache.build(world, indices, _fail, fingerprint="a", path=path)
  for i in indices:
    np.testing.assert_array_equal(reloaded[i]["latent"], cache[i]["latent"])


def test_a_stale_cache_is_rebuilt(world, tmp_path):
  path = str(tmp_path / latent_cache.FILE)
  latent_cache.build(world, [0, 1, 2], _pool, fingerprint="old autoencoder", path=path)
  with pytest.raises(AssertionError, match="reloaded, not encoded"):
    latent_cache.build(world, [0, 1, 2], _fail, fingerprint="new autoencoder", path=path)
  with pytest.raises(AssertionError, match="reloaded, not encoded"):
    latent_cache.build(world, [0, 1, 3], _fail, fingerprint="old autoencoder", path=path)
