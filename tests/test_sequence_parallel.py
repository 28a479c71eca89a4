"""Sequence-parallel attention (Ulysses, ring) on 8 fake CPU devices against one device."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from spacetime_dit.models import layers
from spacetime_dit.models import sequence_parallel as sp
from spacetime_dit.sharding.rules import DEFAULT_RULES, MESH_AXES

# Packed rows of 4 blocks of L/4 tokens: two clips, four clips with padding (id 0), one clip,
# and padding then a clip.
SEGMENT_BLOCKS = np.array([[1, 1, 2, 2], [1, 2, 3, 0], [1, 1, 1, 1], [0, 0, 1, 1]])


def _mesh(**sizes):
  shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _inputs(b=4, length=32, n=8, k=8, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q, kk, v = (jax.random.normal(key, (b, length, n, k)) for key in keys[:3])
  # Row 1 has no valid key at all: its output (and gradient) must be zeros, not NaN.
  key_mask = jax.random.bernoulli(keys[3], 0.8, (b, length)).at[1].set(False)
  segment_ids = jnp.asarray(np.repeat(SEGMENT_BLOCKS[np.arange(b) % 4], length // 4, axis=1))
  return q, kk, v, key_mask, segment_ids


def _weighted_sum(o):
  # A loss whose gradient differs per element, so a permuted head or token shows up.
  return jnp.sum(o * jnp.cos(jnp.arange(o.size, dtype=o.dtype).reshape(o.shape)))


@jax.jit
def _reference(q, k, v, key_mask, segment_ids):
  """Single-device attention, its gradients wrt (q, k, v)."""
  mask_bls = None if segment_ids is None else segment_ids[:, :, None] == segment_ids[:, None, :]
  attend = lambda q, k, v: layers.dot_product_attention(
      q, k, v, key_mask_bs=key_mask, mask_bls=mask_bls)
  o, vjp = jax.vjp(attend, q, k, v)
  return o, vjp(jax.grad(_weighted_sum)(o))


def _collectives(hlo: str) -> dict[str, list[str]]:
  """Result shapes of each collective in compiled HLO text, e.g. {'all-gather': ['pred[4,32]']}."""
  found = {}
  for op in ("all-to-all", "all-gather", "all-reduce", "collective-permute"):
    found[op] = re.findall(rf"^\s*(?:ROOT )?%\S+ = (.*?) {op}\(", hlo, flags=re.MULTILINE)
  return found


def _assert_matches(o, grads, o_ref, grads_ref):
  np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), atol=1e-5)
  for name, g, g_ref in zip("qkv", grads, grads_ref):
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-5, err_msg=f"d{name}")


def _on_mesh(mesh, q, k, v, key_mask, segment_ids, method="ulysses"):
  """Output, gradients and compiled HLO of sequence-parallel attention on `mesh`."""
  if method == "ulysses":
    attend = lambda q, k, v: sp.ulysses_attention(
        q, k, v, attention_fn=layers.dot_product_attention, key_mask_bl=key_mask,
        segment_ids_bl=segment_ids)
  else:
    attend = lambda q, k, v: sp.ring_attention(
        q, k, v, key_mask_bl=key_mask, segment_ids_bl=segment_ids)

  def value_and_grads(q, k, v):
    o, vjp = jax.vjp(attend, q, k, v)
    return o, vjp(jax.grad(_weighted_sum)(o))

  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    # The layout `SelfAttention` gives q, k, v: batch over data+fsdp, L over sequence, heads
    # over tensor (a batch the data axes do not divide is replicated).
    batch_split = mesh.shape["data"] * mesh.shape["fsdp"]
    batch_axes = ("data", "fsdp") if q.shape[0] % batch_split == 0 else None
    sharding = NamedSharding(mesh, PartitionSpec(batch_axes, "sequence", "tensor"))
    args = [jax.device_put(x, sharding) for x in (q, k, v)]
    compiled = jax.jit(value_and_grads).lower(*args).compile()  # compiled once, run once
    o, grads = compiled(*args)
  return o, grads, compiled.as_text()


@pytest.mark.parametrize(
    "sizes, batch, masks",
    [
        (dict(sequence=8), 4, True),
        (dict(data=2, sequence=4), 4, True),
        (dict(data=2, sequence=4), 3, False),  # B=3 does not split over data=2: replicated.
        (dict(fsdp=2, tensor=2, sequence=2), 4, True),
    ],
)
def test_ulysses_matches_one_device_attention_and_its_gradients(sizes, batch, masks):
  q, k, v, key_mask, segment_ids = _inputs(b=batch)
  if not masks:
    key_mask = segment_ids = None
  o_ref, grads_ref = _reference(q, k, v, key_mask, segment_ids)
  o, grads, hlo = _on_mesh(_mesh(**sizes), q, k, v, key_mask, segment_ids)
  _assert_matches(o, grads, o_ref, grads_ref)
  if masks:
    assert not np.asarray(o)[1].any()  # the row without a valid key
  assert o.sharding.spec[1] == "sequence", o.sharding  # the output stays split along L.

  collectives = _collectives(hlo)
  # Forward q, k, v, o and backward do, dq, dk, dv go through all-to-alls over the sequence
  # axis (XLA may merge several into one multi-operand all-to-all).
  assert collectives["all-to-all"], collectives
  # Only the (B, L) masks are all-gathered; never a (B, L, N, K) float activation.
  assert len(collectives["all-gather"]) == (2 if masks else 0), collectives
  assert not any(s.startswith("f32") for s in collectives["all-gather"]), collectives


@pytest.mark.parametrize(
    "sizes, heads",
    [
        (dict(sequence=8), 4),  # fewer heads than sequence devices: Ulysses would refuse.
        (dict(fsdp=2, tensor=2, sequence=2), 8),
    ],
)
def test_ring_attention_matches_one_device_attention_and_its_gradients(sizes, heads):
  q, k, v, key_mask, segment_ids = _inputs(n=heads)
  o_ref, grads_ref = _reference(q, k, v, key_mask, segment_ids)
  o, grads, hlo = _on_mesh(_mesh(**sizes), q, k, v, key_mask, segment_ids, method="ring")
  _assert_matches(o, grads, o_ref, grads_ref)
  assert not np.asarray(o)[1].any()  # the row without a valid key
  assert o.sharding.spec[1] == "sequence", o.sharding
  collectives = _collectives(hlo)
  # Key/value blocks travel by collective-permute; nothing is all-gathered or all-to-all'd.
  assert collectives["collective-permute"], collectives
  assert not collectives["all-to-all"] and not collectives["all-gather"], collectives


def test_ring_attention_off_mesh_is_one_block_of_the_same_softmax():
  q, k, v, key_mask, segment_ids = (
      x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x for x in _inputs())
  o = jax.jit(sp.ring_attention)(q, k, v, key_mask_bl=key_mask, segment_ids_bl=segment_ids)
  o_ref, _ = _reference(q, k, v, key_mask, segment_ids)
  assert o.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(o_ref, np.float32), atol=2e-2)
  with jax.set_mesh(_mesh(sequence=8)):
    with pytest.raises(ValueError, match=r"ring attention splits L=12 .* 8 does not divide 12"):
      sp.ring_attention(q[:, :12], k[:, :12], v[:, :12])


def test_native_segment_id_attention_receives_gathered_ids():
  q, k, v, key_mask, segment_ids = _inputs()
  o_ref, _ = _reference(q, k, v, key_mask, segment_ids)
  seen = []

  def with_segment_ids(q, k, v, *, key_mask_bs, q_segment_ids, kv_segment_ids):
    seen.append((q.shape, q_segment_ids.shape, kv_segment_ids.shape))
    mask_bls = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return layers.dot_product_attention(q, k, v, key_mask_bs=key_mask_bs, mask_bls=mask_bls)

  with jax.set_mesh(_mesh(sequence=8)):
    o = jax.jit(functools.partial(
        sp.ulysses_attention, attention_fn=with_segment_ids, attention_takes_segment_ids=True,
        key_mask_bl=key_mask, segment_ids_bl=segment_ids))(q, k, v)
  np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), atol=1e-5)
  # Inside: the whole sequence (L=32) for N/P = 1 head, and the whole (B, L) of segment ids.
  assert seen == [((4, 32, 1, 8), (4, 32), (4, 32))]


def test_bfloat16_keeps_its_dtype_and_matches():
  q, k, v, key_mask, segment_ids = (
      x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x for x in _inputs())
  o_ref, _ = _reference(q, k, v, key_mask, segment_ids)
  with jax.set_mesh(_mesh(data=2, sequence=4)):
    o = jax.jit(functools.partial(
        sp.ulysses_attention, attention_fn=layers.dot_product_attention, key_mask_bl=key_mask,
        segment_ids_bl=segment_ids))(q, k, v)
  assert o.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(o_ref, np.float32), atol=2e-2)


def test_explicit_mesh_without_set_mesh_or_rules():
  """`mesh=` works outside `jax.set_mesh`; the default rules then give the batch/head axes."""
  q, k, v, key_mask, segment_ids = _inputs()
  mesh = _mesh(data=2, sequence=4)
  o = jax.jit(functools.partial(
      sp.ulysses_attention, attention_fn=layers.dot_product_attention, mesh=mesh,
      key_mask_bl=key_mask, segment_ids_bl=segment_ids))(q, k, v)
  o_ref, _ = _reference(q, k, v, key_mask, segment_ids)
  np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), atol=1e-5)
  assert o.sharding.spec[1] == "sequence", o.sharding


@pytest.mark.parametrize("mesh", [None, "sequence=1"])
def test_without_a_sequence_axis_calls_attention_directly(mesh):
  q, k, v, key_mask, segment_ids = _inputs()
  calls = []

  def attention(q, k, v, **masks):
    calls.append(q.shape)
    return layers.dot_product_attention(q, k, v, **masks)

  attend = functools.partial(sp.ulysses_attention, attention_fn=attention, key_mask_bl=key_mask,
                             segment_ids_bl=segment_ids)
  if mesh is None:
    o = attend(q, k, v)
  else:
    with jax.set_mesh(_mesh(data=8)):
      o = jax.jit(attend)(q, k, v)
  o_ref, _ = _reference(q, k, v, key_mask, segment_ids)
  np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), atol=1e-6)
  assert calls == [q.shape]  # the full (B, L, N, K): no split, no shard_map


def test_errors_name_the_sizes_and_the_fix():
  attend = functools.partial(sp.ulysses_attention, attention_fn=layers.dot_product_attention)
  q = jnp.zeros((2, 12, 8, 8))
  with jax.set_mesh(_mesh(sequence=8)):
    with pytest.raises(ValueError, match=r"8 does not divide 12\. Pad the token axis"):
      attend(q, q, q)
  q = jnp.zeros((2, 16, 4, 8))
  with jax.set_mesh(_mesh(tensor=2, sequence=4)), nn.logical_axis_rules(DEFAULT_RULES):
    with pytest.raises(ValueError, match=r"N=4 .* multiple of 2 x 4 = 8\. Choose num_heads"):
      attend(q, q, q)
  with pytest.raises(ValueError, match=r"must all be \(B, L, N, K\)"):
    attend(q, q[:, :8], q[:, :8])
  with pytest.raises(ValueError, match=r"key_mask_bl has shape \(2, 8\); it must be"):
    attend(q, q, q, key_mask_bl=jnp.ones((2, 8), bool))


def test_cross_attention_to_replicated_text_needs_no_sequence_collectives():
  """Queries split along L, text keys replicated: plain GSPMD attention is local per device."""
  keys = jax.random.split(jax.random.PRNGKey(1), 4)
  q = jax.random.normal(keys[0], (4, 32, 8, 8))
  k, v = (jax.random.normal(key, (4, 6, 8, 8)) for key in keys[1:3])
  text_mask = jax.random.bernoulli(keys[3], 0.7, (4, 6))
  attend = functools.partial(layers.dot_product_attention, key_mask_bs=text_mask)
  mesh = _mesh(data=2, sequence=4)
  with jax.set_mesh(mesh):
    # The DiT's layout: video tokens split over batch and sequence, text only over batch.
    q_split = jax.device_put(q, NamedSharding(mesh, PartitionSpec("data", "sequence")))
    k_text, v_text = (jax.device_put(x, NamedSharding(mesh, PartitionSpec("data"))) for x in (k, v))
    compiled = jax.jit(attend).lower(q_split, k_text, v_text).compile()
    o = compiled(q_split, k_text, v_text)
    hlo = compiled.as_text()
  np.testing.assert_allclose(np.asarray(o), np.asarray(attend(q, k, v)), atol=1e-6)
  assert o.sharding.spec[:2] == ("data", "sequence")
  assert not any(_collectives(hlo).values()), _collectives(hlo)
