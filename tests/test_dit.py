"""Tests for spacetime_dit.models.{text, dit}: tokenizer, text encoder, diffusion transformer."""

import dataclasses
import types
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from spacetime_dit.models import dit, text
from spacetime_dit.sharding.rules import DEFAULT_RULES

TEXT = text.TextEncoderConfig(vocab_size=64, max_length=8, width=32, depth=1, num_heads=2)
TINY = dit.DiTConfig(
    width=32,
    depth=2,
    num_heads=2,
    mlp_ratio=2.0,
    mlp_multiple_of=16,
    latent_channels=4,
    text=TEXT,
)
B, THW = 2, (3, 4, 4)  # 3 * 2 * 2 = 12 tokens with patch (1, 2, 2).
TOKENIZER = text.HashTokenizer(TEXT.vocab_size, TEXT.max_length)
# Init keys: "rbg" compiles about twice as fast as threefry on CPU; no test depends on the RNG.
KEY = jax.random.key(0, impl="rbg")


def _latent(seed, thw=THW, b=B, c=4):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(b, *thw, c)), jnp.float32)


def _perturb(variables, seed, scale=0.1):
  """Adds noise to every parameter so zero-initialised layers (gates, final layer) are active."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda a: np.asarray(a) + scale * rng.normal(size=a.shape).astype(np.float32),
      nn.unbox(variables),
  )


@pytest.fixture(scope="module")
def tiny():
  """TINY model, its init variables, perturbed variables, inputs and a jitted forward `run`."""
  model = dit.DiT(TINY)
  ids, mask = map(jnp.asarray, TOKENIZER(["a red circle moving left", "a blue square"]))
  t = jnp.asarray([0.25, 0.8])
  x = _latent(0)
  variables = jax.jit(model.init)(KEY, x, t, ids, mask)
  apply = jax.jit(model.apply)

  def run(v, x=x, t=t, ids=ids, mask=mask, drop=jnp.zeros((B,), bool)):
    return apply(v, x, t, ids, mask, drop_text_b=drop)

  return types.SimpleNamespace(
      model=model, init=variables, perturbed=_perturb(variables, 1), x=x, t=t, ids=ids, mask=mask,
      run=run,
  )


# ---------------------------------------------------------------------------------------------
# Tokenizer and text encoder.
# ---------------------------------------------------------------------------------------------


def test_hash_tokenizer_pads_truncates_and_is_deterministic():
  tok = text.HashTokenizer(vocab_size=100, max_length=4)
  ids, mask = tok(["Red circle, red!", "one two three four five six", ""])
  assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape == (3, 4)
  np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
  assert ids[0, 0] == ids[0, 2] == tok.word_id("red")  # case-insensitive, punctuation splits.
  assert ids[0, 3] == 0 and (ids[2] == 0).all()
  assert ((ids[mask] >= 1) & (ids[mask] < 100)).all()
  ids2, _ = text.HashTokenizer(vocab_size=100, max_length=4)(["RED circle", "one two three four"])
  np.testing.assert_array_equal(ids2[0, :2], ids[0, :2])
  np.testing.assert_array_equal(ids2[1], ids[1])  # truncation keeps the first S words.
  assert tok.word_id("circle") == 1 + zlib.crc32(b"circle") % 99
  assert tok.collisions(["red", "Red", "circle"]) == {}
  assert text.HashTokenizer(2, 4).collisions(["red", "blue"]) == {1: ["blue", "red"]}


def test_hash_tokenizer_rejects_bad_input():
  with pytest.raises(ValueError, match="wrap a single text"):
    TOKENIZER("a red circle")
  with pytest.raises(ValueError, match="vocab_size=1"):
    text.HashTokenizer(vocab_size=1, max_length=4)


def test_text_encoder_shapes_and_masked_pooling():
  encoder = text.TextEncoder(TEXT)
  ids, mask = TOKENIZER(["a green triangle", "white"])
  abstract = jax.eval_shape(lambda: encoder.init(jax.random.key(0), ids, mask))
  variables = _perturb(jax.tree.map(lambda a: np.zeros(a.shape, np.float32), abstract), 5, 0.3)
  apply = jax.jit(encoder.apply)
  tokens, pooled = apply(variables, ids, mask)
  assert tokens.shape == (2, 8, 32) and pooled.shape == (2, 32)
  np.testing.assert_allclose(pooled[1], tokens[1, 0], atol=1e-6)  # one valid token.
  padded_changed = ids.copy()
  padded_changed[:, 5:] = 7
  tokens2, pooled2 = apply(variables, padded_changed, mask)
  np.testing.assert_allclose(pooled2, pooled, atol=1e-6)
  np.testing.assert_allclose(tokens2[0, :3], tokens[0, :3], atol=1e-6)
  with pytest.raises(ValueError, match=r"\(B, 8\)"):
    encoder.apply(variables, ids[:, :4], mask[:, :4])


# ---------------------------------------------------------------------------------------------
# Config and helpers.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(width=30, num_heads=4), "divisible by num_heads"),
        (dict(width=36, num_heads=4), "K=9"),
        (dict(dtype="float16"), "dtype"),
        (dict(attention_impl="flash"), "attention_impl"),
        (dict(mlp_activation="relu"), "mlp_activation"),
        (dict(patch_size=(1, 0, 2)), "patch_size"),
    ],
)
def test_config_validation(changes, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(TINY, **changes)


def test_num_tokens_and_mlp_width():
  assert dit.num_tokens(TINY, (7, 8, 8)) == 7 * 4 * 4
  assert dit.num_tokens(TINY, (1, 6, 12)) == 18
  with pytest.raises(ValueError, match="height H=5"):
    dit.num_tokens(TINY, (1, 5, 4))
  assert dataclasses.replace(TINY, width=768, num_heads=12, mlp_ratio=8 / 3).mlp_hidden == 2048
  assert dataclasses.replace(TINY, mlp_ratio=3.0, mlp_multiple_of=64).mlp_hidden == 128


def test_input_validation(tiny):
  with pytest.raises(ValueError, match=r"timesteps t have shape \(2, 5\)"):
    tiny.model.apply(tiny.init, tiny.x, jnp.zeros((2, 5)), tiny.ids, tiny.mask)
  with pytest.raises(ValueError, match="latent_channels=4"):
    tiny.model.apply(tiny.init, _latent(0, c=3), tiny.t, tiny.ids, tiny.mask)
  with pytest.raises(ValueError, match="width W=3"):
    tiny.model.apply(tiny.init, _latent(0, thw=(1, 4, 3)), tiny.t, tiny.ids, tiny.mask)


# ---------------------------------------------------------------------------------------------
# The DiT.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("thw", [(1, 4, 6), (2, 6, 2)])  # image/landscape, portrait video
def test_output_has_latent_shape(tiny, thw):
  x = _latent(2, thw)
  out = tiny.run(tiny.perturbed, x=x)
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert bool(jnp.isfinite(out).all()) and float(jnp.abs(out).max()) > 0


def test_init_blocks_are_identity_and_output_is_zero(tiny):
  capture = jax.jit(
      lambda v: tiny.model.apply(
          v, tiny.x, tiny.t, tiny.ids, tiny.mask, capture_intermediates=True, mutable=True
      )
  )
  out, state = capture(tiny.init)
  np.testing.assert_array_equal(out, 0.0)
  inter = state["intermediates"]
  embedded = inter["patch_embed"]["__call__"][0]
  assert float(jnp.abs(embedded).max()) > 0.1
  for i in range(TINY.depth):  # adaLN-Zero: zero gates and a zero cross-attention output.
    np.testing.assert_array_equal(inter[f"block_{i}"]["__call__"][0], embedded)


def test_per_token_t_matches_broadcast_t(tiny):
  out = tiny.run(tiny.perturbed)
  t_bl = jnp.broadcast_to(tiny.t[:, None], (B, 12))
  np.testing.assert_allclose(tiny.run(tiny.perturbed, t=t_bl), out, atol=1e-5)
  t_varied = t_bl.at[:, :4].set(0.5)  # per-token timesteps really reach the tokens.
  assert float(jnp.abs(tiny.run(tiny.perturbed, t=t_varied) - out).max()) > 1e-3


def test_text_key_mask(tiny):
  out = tiny.run(tiny.perturbed)
  assert out.shape == tiny.x.shape
  padded_changed = jnp.where(tiny.mask, tiny.ids, 13)
  np.testing.assert_allclose(tiny.run(tiny.perturbed, ids=padded_changed), out, atol=1e-6)
  valid_changed = tiny.ids.at[:, 1].set((tiny.ids[:, 1] % 60) + 2)
  change_b = jnp.abs(tiny.run(tiny.perturbed, ids=valid_changed) - out).max(axis=(1, 2, 3, 4))
  assert bool((change_b > 1e-4).all())


def test_drop_text_uses_null_embedding(tiny):
  other_ids, other_mask = TOKENIZER(["a yellow triangle moving up", "white circle static"])
  drop = jnp.ones((B,), bool)
  dropped = tiny.run(tiny.perturbed, drop=drop)
  other = tiny.run(tiny.perturbed, ids=other_ids, mask=other_mask, drop=drop)
  np.testing.assert_allclose(other, dropped, atol=1e-6)
  kept = tiny.run(tiny.perturbed)
  assert float(jnp.abs(kept - dropped).max()) > 1e-4
  half = tiny.run(tiny.perturbed, drop=jnp.asarray([True, False]))
  np.testing.assert_allclose(half[0], dropped[0], atol=1e-6)
  np.testing.assert_allclose(half[1], kept[1], atol=1e-6)


def test_adam_reduces_regression_loss(tiny):
  target = _latent(4)
  opt = optax.adam(3e-3)
  params = nn.unbox(tiny.init)["params"]
  no_drop = jnp.zeros((B,), bool)

  def loss_fn(p):
    args = (tiny.x, tiny.t, tiny.ids, tiny.mask)
    return jnp.mean((tiny.model.apply({"params": p}, *args, drop_text_b=no_drop) - target) ** 2)

  @jax.jit
  def step(p, s):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, s = opt.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  state = opt.init(params)
  losses = []
  for _ in range(25):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert losses[-1] < 0.8 * losses[0], losses


def test_scan_blocks_matches_loop(tiny):
  scanned = dit.DiT(dataclasses.replace(TINY, scan_blocks=True, remat=True))
  params = dict(tiny.perturbed["params"])
  blocks = [params.pop(f"block_{i}") for i in range(TINY.depth)]
  params["blocks"] = {"block": jax.tree.map(lambda *a: np.stack(a), *blocks)}
  args = (tiny.x, tiny.t, tiny.ids, tiny.mask)
  abstract = jax.eval_shape(scanned.init, jax.random.key(0), *args)
  assert jax.tree.structure(nn.unbox(abstract)) == jax.tree.structure({"params": params})
  out = jax.jit(scanned.apply)({"params": params}, *args, drop_text_b=jnp.zeros((B,), bool))
  np.testing.assert_allclose(out, tiny.run(tiny.perturbed), atol=1e-5)


def test_bfloat16_compute_keeps_float32_params(tiny):
  model = dit.DiT(dataclasses.replace(TINY, dtype="bfloat16"))
  args = (tiny.x, tiny.t, tiny.ids, tiny.mask)
  abstract = jax.eval_shape(model.init, jax.random.key(0), *args)
  assert {a.dtype for a in jax.tree.leaves(nn.unbox(abstract))} == {jnp.dtype(jnp.float32)}
  out = jax.jit(model.apply)(tiny.perturbed, *args, drop_text_b=jnp.zeros((B,), bool))
  ref = tiny.run(tiny.perturbed)
  assert out.dtype == jnp.float32
  assert float(jnp.abs(out - ref).max()) < 0.05 * float(jnp.abs(ref).max())


def test_sharded_init_and_forward_match_unsharded(tiny):
  mesh = jax.make_mesh(
      (1, 2, 2, 2), ("data", "fsdp", "tensor", "sequence"), axis_types=(AxisType.Auto,) * 4
  )
  args = (tiny.x, tiny.t, tiny.ids, tiny.mask)
  init_fn = lambda key: tiny.model.init(key, *args)
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    abstract = jax.eval_shape(init_fn, KEY)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, DEFAULT_RULES)
    params = jax.jit(init_fn, out_shardings=shardings)(KEY)["params"]
    gate = params["block_0"]["mlp"]["gate"].value
    assert gate.sharding.spec == P("fsdp", "tensor") and not gate.sharding.is_fully_replicated
    assert gate.addressable_shards[0].data.shape == (32 // 2, TINY.mlp_hidden // 2)
    qkv = params["block_1"]["self_attn"]["qkv"].value
    assert qkv.sharding.spec == P("fsdp", None, "tensor", None)
    sharded = jax.device_put(tiny.perturbed, shardings)
    drop = jnp.zeros((B,), bool)
    out = jax.jit(tiny.model.apply)(sharded, *args, drop_text_b=drop)
  np.testing.assert_allclose(np.asarray(out), np.asarray(tiny.run(tiny.perturbed)), atol=1e-4)
