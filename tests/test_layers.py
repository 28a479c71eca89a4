"""Tests for spacetime_dit.models.layers: rope, norms, attention, MLP, timestep features."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spacetime_dit.models import layers


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _unit(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _random_params(module, *args, **kwargs):
  """Random normal(0, 0.3) parameters of the right shapes, without compiling an init."""
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
  rng = np.random.default_rng(0)
  return jax.tree.map(
      lambda a: jnp.asarray(0.3 * rng.normal(size=a.shape), jnp.float32), nn.unbox(abstract)
  )


@pytest.mark.parametrize("k, dims", [(32, (8, 12, 12)), (64, (16, 24, 24)), (128, (32, 48, 48))])
def test_rope_axes_dims(k, dims):
  assert layers.rope_axes_dims(k) == dims


@pytest.mark.parametrize("k", [6, 16, 48, 96, 160])
def test_rope_axes_dims_even_and_complete(k):
  dims = layers.rope_axes_dims(k)
  assert sum(dims) == k and all(d % 2 == 0 and d >= 2 for d in dims)


@pytest.mark.parametrize("k", [4, 33])
def test_rope_axes_dims_rejects_bad_head_dim(k):
  with pytest.raises(ValueError, match=f"K={k}"):
    layers.rope_axes_dims(k)


def _scores(q_lnk, k_lnk, positions, dims):
  q = layers.apply_rope(q_lnk[None], positions, dims)[0]
  k = layers.apply_rope(k_lnk[None], positions, dims)[0]
  return jnp.einsum("lnk,mnk->nlm", q, k)


def test_rope_scores_depend_only_on_relative_position():
  length, n, k = 24, 2, 32
  dims = layers.rope_axes_dims(k)
  q, kk = _unit(_normal(0, (length, n, k))), _unit(_normal(1, (length, n, k)))
  positions = np.random.default_rng(2).integers(0, 12, size=(length, 3)).astype(np.int32)
  base = _scores(q, kk, positions, dims)
  for offset in ([3, 0, 0], [0, 5, 0], [0, 0, 7], [2, -4, 9]):
    shifted = _scores(q, kk, positions + np.asarray(offset, np.int32), dims)
    np.testing.assert_allclose(shifted, base, atol=1e-5)
  # Moving only some tokens changes relative positions, so the scores must change.
  moved = positions.copy()
  moved[: length // 2] += np.asarray([1, 2, 3], np.int32)
  assert float(jnp.abs(_scores(q, kk, moved, dims) - base).max()) > 1e-2


def test_rope_each_axis_rotates_its_own_pairs():
  dims = layers.rope_axes_dims(32)  # (8, 12, 12): dims [0, 8) t, [8, 20) h, [20, 32) w.
  x = _normal(3, (1, 1, 1, 32))
  for axis, (lo, hi) in enumerate([(0, 8), (8, 20), (20, 32)]):
    pos = np.zeros((1, 3), np.int32)
    pos[0, axis] = 5
    delta = jnp.abs(layers.apply_rope(x, pos, dims) - x)[0, 0, 0]
    pair_delta = jnp.maximum(delta[0::2], delta[1::2])  # pair i is (2i, 2i + 1).
    assert float(pair_delta[lo // 2 : hi // 2].min()) > 1e-4
    assert float(jnp.concatenate([delta[:lo], delta[hi:]]).max()) == 0.0


def test_rope_preserves_norms_and_position_zero_is_identity():
  dims = layers.rope_axes_dims(64)
  x = _normal(4, (2, 10, 3, 64))
  positions = np.random.default_rng(5).integers(0, 50, size=(10, 3)).astype(np.int32)
  y = layers.apply_rope(x, positions, dims)
  np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(layers.apply_rope(x, np.zeros((10, 3), np.int32), dims), x, atol=1e-7)


def test_rope_batched_positions_match_shared_positions():
  dims = layers.rope_axes_dims(16)
  x = _normal(6, (2, 5, 2, 16))
  positions = np.random.default_rng(7).integers(0, 9, size=(5, 3)).astype(np.int32)
  shared = layers.apply_rope(x, positions, dims)
  batched = layers.apply_rope(x, np.stack([positions, positions]), dims)
  np.testing.assert_allclose(batched, shared, atol=1e-7)
  traced = jax.jit(lambda p: layers.apply_rope(x, p, dims))(jnp.asarray(positions))
  np.testing.assert_allclose(traced, shared, atol=1e-5)


def test_rope_frequencies_are_geometric():
  freqs = layers.rope_frequencies((4, 8, 8), theta=100.0)
  assert [f.shape for f in freqs] == [(2,), (4,), (4,)]
  np.testing.assert_allclose(freqs[1], 100.0 ** (-np.arange(0, 8, 2) / 8), rtol=1e-6)


@pytest.mark.parametrize(
    "subscripts, w_shape", [("md,dpnk->mpnk", (8, 3, 2, 4)), ("mnk,nkd->md", (2, 4, 8))]
)
def test_token_einsum_cpu_and_accelerator_paths_agree(monkeypatch, subscripts, w_shape):
  x = _normal(20, (2, 5, 8) if subscripts.startswith("md") else (2, 5, 2, 4))
  w = _normal(21, w_shape)
  merged = layers.token_einsum(subscripts, x, w)
  monkeypatch.setattr(layers.jax, "default_backend", lambda: "tpu")
  unmerged = layers.token_einsum(subscripts, x, w)
  expected = jnp.einsum(subscripts.replace("m", "bl"), x, w)
  assert merged.shape == expected.shape
  np.testing.assert_allclose(merged, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(unmerged, expected, rtol=1e-5, atol=1e-5)


def test_layer_norm_standardises():
  y = layers.layer_norm(_normal(8, (3, 7, 64)) * 5 + 2)
  np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(y.var(-1), 1.0, atol=1e-3)


def test_timestep_sinusoid():
  feats = layers.timestep_sinusoid(jnp.zeros((2, 5)), 16)
  assert feats.shape == (2, 5, 16)
  np.testing.assert_array_equal(feats[..., :8], 1.0)
  np.testing.assert_array_equal(feats[..., 8:], 0.0)
  a, b = layers.timestep_sinusoid(jnp.asarray([0.1, 0.2]), 16)
  assert float(jnp.abs(a - b).max()) > 0.1


def test_self_attention_with_rope_is_translation_equivariant():
  attn = layers.SelfAttention(num_heads=2, head_dim=16)
  x = _normal(9, (1, 6, 32))
  positions = np.random.default_rng(10).integers(0, 4, size=(6, 3)).astype(np.int32)
  params = _random_params(attn, x, positions)
  apply = jax.jit(attn.apply)
  y = apply(params, x, positions)
  assert y.shape == (1, 6, 32)
  np.testing.assert_allclose(apply(params, x, positions + 3), y, atol=1e-5)


def test_self_attention_key_mask_hides_masked_tokens():
  attn = layers.SelfAttention(num_heads=2, head_dim=8, rope_theta=None)
  x = _normal(11, (2, 5, 16))
  mask = jnp.asarray([[True, True, True, False, False]] * 2)
  params = _random_params(attn, x, key_mask_bl=mask)
  apply = jax.jit(lambda p, x: attn.apply(p, x, key_mask_bl=mask))
  y = apply(params, x)
  x2 = x.at[:, 3:].set(_normal(12, (2, 2, 16)))
  np.testing.assert_allclose(apply(params, x2)[:, :3], y[:, :3], atol=1e-6)


def test_cross_attention_key_mask():
  attn = layers.CrossAttention(num_heads=2, head_dim=8)
  x, ctx = _normal(13, (2, 4, 16)), _normal(14, (2, 6, 24))
  mask = jnp.asarray([[True] * 4 + [False] * 2, [True] * 2 + [False] * 4])
  params = _random_params(attn, x, ctx, mask)
  apply = jax.jit(attn.apply)
  y = apply(params, x, ctx, mask)
  assert y.shape == (2, 4, 16)
  padded_changed = ctx.at[0, 4:].add(3.0).at[1, 2:].add(3.0)
  np.testing.assert_allclose(apply(params, x, padded_changed, mask), y, atol=1e-6)
  valid_changed = ctx.at[:, 0].add(3.0)
  change_b = jnp.abs(apply(params, x, valid_changed, mask) - y).max(axis=(1, 2))
  assert bool((change_b > 1e-3).all())
  empty = apply(params, x, ctx, mask.at[1].set(False))  # no valid key: no contribution.
  np.testing.assert_array_equal(empty[1], 0.0)
  np.testing.assert_allclose(empty[0], y[0], atol=1e-6)


def test_unknown_attention_impl_raises():
  q = jnp.zeros((1, 2, 1, 8))
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    layers.dot_product_attention(q, q, q, impl="flash")


@pytest.mark.parametrize("activation", layers.MLP_ACTIVATIONS)
def test_gated_mlp(activation):
  mlp = layers.GatedMLP(hidden=24, activation=activation)
  x = _normal(15, (2, 3, 8))
  params = _random_params(mlp, x)
  assert params["params"]["gate"].shape == (8, 24)
  y = jax.jit(mlp.apply)(params, x)
  assert y.shape == x.shape and float(jnp.abs(y).max()) > 0


def test_gated_mlp_rejects_unknown_activation():
  mlp = layers.GatedMLP(hidden=8, activation="relu")
  with pytest.raises(ValueError, match="'relu'"):
    mlp.init(jax.random.key(0), jnp.zeros((1, 2, 4)))


def test_timestep_embedding_shapes():
  emb = layers.TimestepEmbedding(width=32)
  params = _random_params(emb, jnp.zeros((3,)))
  assert emb.apply(params, jnp.zeros((3,))).shape == (3, 32)
  assert emb.apply(params, jnp.zeros((3, 7))).shape == (3, 7, 32)
