"""The packed DiT with sequence-parallel self-attention matches one device (loss and gradients)."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spacetime_dit.config_types import MeshConfig
from spacetime_dit.models import dit, text
from spacetime_dit.sharding import mesh as mesh_lib

RULES = MeshConfig().rules
TEXT = text.TextEncoderConfig(vocab_size=64, max_length=8, width=32, depth=1, num_heads=2)
BASE = dit.DiTConfig(
    width=64, depth=2, num_heads=4, mlp_ratio=2.0, mlp_multiple_of=16, latent_channels=4, text=TEXT
)


def _inputs(cfg):
  """Four packed rows of 32 tokens with padding and 2 caption slots each."""
  b, length, g = 4, 32, 2
  rng = np.random.default_rng(0)
  segments = np.repeat(
      np.array([[1, 1, 2, 2], [1, 2, 2, 0], [1, 1, 1, 1], [0, 1, 1, 2]]), length // 4, axis=1
  ).astype(np.int32)
  return (
      rng.normal(size=(b, length, cfg.patch_dim)).astype(np.float32),
      rng.uniform(size=(b, length)).astype(np.float32),
      rng.integers(1, 64, size=(b, g, 8)).astype(np.int32),
      rng.uniform(size=(b, g, 8)) < 0.8,
      segments,
      rng.integers(0, 4, size=(b, length, 3)).astype(np.int32),
      rng.normal(size=(b, length, cfg.patch_dim)).astype(np.float32),
  )


def _loss_and_grads(cfg, mesh_config, devices=None):
  model = dit.DiT(cfg)
  x, t, ids, mask, seg, pos, target = _inputs(cfg)
  init = lambda: model.init(jax.random.key(0), x, t, ids, mask, segment_ids=seg, positions=pos)
  params = nn.unbox(init())
  # Perturbed, so that the zero-initialised gates do not hide the attention path.
  params = jax.tree.map(
      lambda a: a + 0.05 * np.random.default_rng(a.size).normal(size=a.shape).astype(np.float32),
      params,
  )

  def loss(p, x, t, ids, mask, seg, pos, target):
    y = model.apply(p, x, t, ids, mask, segment_ids=seg, positions=pos)
    return jnp.mean(jnp.where(seg[..., None] > 0, (y - target) ** 2, 0.0))

  mesh = mesh_lib.make_mesh(mesh_config, devices)
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    p = jax.device_put(params, mesh_lib.tree_shardings(mesh, RULES, jax.eval_shape(init)))
    args = [
        jax.device_put(a, mesh_lib.batch_sharding(mesh, RULES, a.ndim))
        for a in (x, t, ids, mask, seg, pos, target)
    ]
    f = jax.jit(jax.value_and_grad(loss))
    value, grads = f(p, *args)
    hlo = f.lower(p, *args).compile().as_text()
  return float(value), jax.device_get(grads), hlo


@pytest.fixture(scope="module")
def one_device():
  value, grads, _ = _loss_and_grads(BASE, MeshConfig(data=1), jax.devices()[:1])
  return value, grads


@pytest.mark.parametrize("mode", ["ulysses", "ring"])
@pytest.mark.parametrize(
    "mesh", [MeshConfig(data=2, sequence=4), MeshConfig(data=1, fsdp=2, tensor=2, sequence=2)],
    ids=["data2_sequence4", "fsdp2_tensor2_sequence2"],
)
def test_sequence_parallel_dit_matches_one_device(one_device, mode, mesh):
  value_1, grads_1 = one_device
  value, grads, hlo = _loss_and_grads(dataclasses.replace(BASE, sequence_parallel=mode), mesh)
  np.testing.assert_allclose(value, value_1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_1)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
  collective = "all-to-all" if mode == "ulysses" else "collective-permute"
  assert re.search(collective, hlo), f"no {collective} in the compiled step: not sequence parallel"
