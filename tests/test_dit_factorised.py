"""Tests for the DiT's factorised spatial-then-temporal attention (`attention_layout`)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spacetime_dit.models import dit, text

TEXT = text.TextEncoderConfig(vocab_size=64, max_length=8, width=32, depth=1, num_heads=2)
FACTORISED = dit.DiTConfig(
    width=32, depth=2, num_heads=2, mlp_ratio=2.0, mlp_multiple_of=16, latent_channels=4,
    text=TEXT, attention_layout="factorised",
)
B, THW = 2, (3, 4, 4)  # (T', H', W') = (3, 2, 2): 12 tokens, 4 per frame.
KEY = jax.random.key(0, impl="rbg")


def _inputs():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(B, *THW, 4)), jnp.float32)
  t = jnp.asarray([0.3, 0.7], jnp.float32)
  ids = jnp.asarray(rng.integers(1, 64, size=(B, 8)), jnp.int32)
  return x, t, ids, jnp.ones((B, 8), bool)


@pytest.fixture(scope="module")
def params():
  """Random N(0, 0.1^2) parameters (every gate open), without compiling an init."""
  abstract = nn.unbox(jax.eval_shape(dit.DiT(FACTORISED).init, KEY, *_inputs()))["params"]
  rng = np.random.default_rng(1)
  return jax.tree.map(lambda a: 0.1 * rng.normal(size=a.shape).astype(np.float32), abstract)


def test_blocks_have_spatial_and_temporal_attention_and_keep_shapes(params):
  block = params["block_0"]
  assert {"spatial_attn", "temporal_attn"} <= set(block) and "self_attn" not in block
  # The same projections as one full attention, twice.
  assert block["spatial_attn"]["qkv"].shape == (32, 3, 2, 16)
  out = jax.jit(dit.DiT(FACTORISED).apply)({"params": params}, *_inputs())
  assert out.shape == (B, *THW, 4) and out.dtype == jnp.float32
  assert np.isfinite(np.asarray(out)).all()


def test_spatial_step_keeps_frames_apart(params):
  """With the temporal attention silenced, a frame's output ignores every other frame."""
  model = jax.jit(dit.DiT(FACTORISED).apply)
  x, t, ids, mask = _inputs()
  x2 = x.at[:, 1:].add(1.0)  # Change frames 1 and 2 only.
  silenced = jax.tree.map(lambda a: a, params)
  for i in range(FACTORISED.depth):
    out = silenced[f"block_{i}"]["temporal_attn"]["out"]
    silenced[f"block_{i}"]["temporal_attn"]["out"] = jnp.zeros_like(out)
  a, b = model({"params": silenced}, x, t, ids, mask), model({"params": silenced}, x2, t, ids, mask)
  np.testing.assert_allclose(a[:, 0], b[:, 0], atol=1e-6)
  assert float(jnp.abs(a[:, 1] - b[:, 1]).max()) > 1e-3
  # The temporal step is what carries information across frames.
  a, b = model({"params": params}, x, t, ids, mask), model({"params": params}, x2, t, ids, mask)
  assert float(jnp.abs(a[:, 0] - b[:, 0]).max()) > 1e-4


def test_scanned_remat_gradients_run_and_packed_mode_is_refused(params):
  config = dataclasses.replace(FACTORISED, scan_blocks=True, remat_policy="full")
  blocks = [params[f"block_{i}"] for i in range(FACTORISED.depth)]
  stacked = {k: v for k, v in params.items() if not k.startswith("block_")}
  stacked["blocks"] = {"block": jax.tree.map(lambda *a: jnp.stack(a), *blocks)}
  model = dit.DiT(config)
  args = _inputs()
  grads = jax.jit(jax.grad(lambda p: jnp.mean(model.apply({"params": p}, *args) ** 2)))(stacked)
  g = grads["blocks"]["block"]["temporal_attn"]["qkv"]
  assert g.shape[0] == FACTORISED.depth and float(jnp.abs(g).max()) > 0
  tokens = jnp.zeros((1, 12, 16))
  with pytest.raises(ValueError, match="attention_layout='factorised'.*packing"):
    model.apply(
        {"params": stacked}, tokens, jnp.zeros((1, 12)), jnp.zeros((1, 2, 8), jnp.int32),
        jnp.ones((1, 2, 8), bool), segment_ids=jnp.ones((1, 12), jnp.int32),
        positions=jnp.zeros((1, 12, 3), jnp.int32))
