"""Sequence (context) parallel self-attention: Ulysses all-to-all over heads, or ring attention.

Long videos are split along the token axis L over the mesh axis `sequence` (the rules map
`ACT_TOKENS` to it). Everything in a DiT block is token-wise except self-attention, which needs
every key for every query. Ulysses (Jacobs et al. 2023, "DeepSpeed Ulysses", arXiv 2309.14509,
§3.1) re-partitions q, k and v with one all-to-all from "L/P tokens, all N heads" to "all L
tokens, N/P heads" on each of the P devices, runs ordinary attention per head, and swaps back
with a second all-to-all. Each all-to-all moves 1/P of the activations per device, so the
communication volume per device stays constant when L and P grow together, unlike all-gathering
k and v (which moves all of k and v to every device).

    q, k, v (B, L/P, N, K) per device --all_to_all--> (B, L, N/P, K) --attention_fn-->
    (B, L, N/P, K) --all_to_all--> (B, L/P, N, K)

`ring_attention` is the alternative when the heads do not split over tensor x sequence (e.g.
16 heads on tensor=4, sequence=8): queries stay put and key/value blocks circulate (see there).

Cross-attention needs none of this: its queries are the (sequence-sharded) video tokens and its
keys and values are the text tokens, which the rules replicate (`ACT_TEXT -> None`). Every query
block already sees all keys, so plain GSPMD runs it locally with no communication on `sequence`.

Implementation notes (jax 0.10.2):
* `jax.shard_map(f, mesh=None, in_specs=..., out_specs=..., axis_names=...)` takes the mesh from
  `jax.set_mesh` when `mesh` is None; `axis_names` lists the manual axes (empty: all of them).
* The shard_map here is manual over every mesh axis, not only `sequence`. With only `sequence`
  manual (the `axis_names={"sequence"}` partial-auto mode), XLA's partitioner all-gathered the
  operands of each all-to-all over the remaining auto axes (batch over fsdp and heads over tensor
  in a (fsdp=2, tensor=2, sequence=2) probe: 4 all-gathers beside the 2 all-to-alls), which
  defeats the purpose. So the batch and head axes get explicit specs, taken from the logical
  rules (`ACT_BATCH`, `ACT_HEADS`) in the same way as the constraints `SelfAttention` puts on
  q, k and v, so no resharding is needed at the boundary.
* Heads split over the tensor axes T and then over the P sequence devices: a device holds
  N / (T P) heads during attention, so N must be a multiple of T * P.
"""

import functools
import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from spacetime_dit.sharding import axes
from spacetime_dit.sharding import rules as rules_lib

# attention_fn(q_blnk, k_bsnk, v_bsnk, *, key_mask_bs, mask_bls) -> o_blnk, where the masks
# may be None; `layers.dot_product_attention` (optionally with `impl` bound) has this signature.
# With `attention_takes_segment_ids`, (q, k, v, *, key_mask_bs, q_segment_ids, kv_segment_ids).
AttentionFn = Callable[..., jnp.ndarray]


def _mesh_axes_of(logical: str, mesh_shape: dict[str, int]) -> tuple[str, ...]:
  """Mesh axes that the logical rules in context (default: DEFAULT_RULES) give `logical`."""
  rules = nn.get_logical_axis_rules() or rules_lib.DEFAULT_RULES
  (mesh_axes,) = nn.logical_to_mesh_axes((logical,), rules)
  if mesh_axes is None:
    return ()
  mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
  return tuple(a for a in mesh_axes if a in mesh_shape)


def _spec_entry(mesh_axes: Sequence[str]) -> str | tuple[str, ...] | None:
  if not mesh_axes:
    return None
  return mesh_axes[0] if len(mesh_axes) == 1 else tuple(mesh_axes)


def sequence_axis_size(axis: str = "sequence", mesh=None) -> int:
  """Size of mesh axis `axis` in `mesh` (default: the `jax.set_mesh` mesh); 1 off-mesh."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh.empty or axis not in mesh.axis_names:
    return 1
  return dict(mesh.shape)[axis]


def _check_self_attention_inputs(name, q_blnk, k_blnk, v_blnk, key_mask_bl, segment_ids_bl):
  if not (q_blnk.shape == k_blnk.shape == v_blnk.shape) or q_blnk.ndim != 4:
    raise ValueError(
        f"{name} is self-attention: q {q_blnk.shape}, k {k_blnk.shape} and v {v_blnk.shape}"
        " must all be (B, L, N, K). Cross-attention to replicated text needs no sequence"
        " parallelism: call the attention function directly."
    )
  b, length = q_blnk.shape[:2]
  for arg, m in (("key_mask_bl", key_mask_bl), ("segment_ids_bl", segment_ids_bl)):
    if m is not None and m.shape != (b, length):
      raise ValueError(f"{arg} has shape {m.shape}; it must be (B, L) = {(b, length)}.")


def _manual_specs(name, shape_blnk, abstract_mesh, axis, batch_axes, head_axes, heads_unit):
  """PartitionSpecs of the (B, L, N, K) and (B, L) inputs inside the fully manual shard_map.

  Args:
    name: the caller, for error messages.
    shape_blnk: q's shape.
    abstract_mesh: the mesh, with `axis` of size P > 1.
    axis: the mesh axis that splits L.
    batch_axes, head_axes: mesh axes of B and N, or None to read them from the logical rules.
    heads_unit: the local heads N / T must be a multiple of this (P for Ulysses, 1 for ring).

  Returns:
    (spec_blnk, spec_bl).
  """
  b, length, n, _ = shape_blnk
  mesh_shape = dict(abstract_mesh.shape)
  p = mesh_shape[axis]
  if length % p:
    raise ValueError(
        f"{name} splits L={length} tokens over mesh axis {axis!r} of size {p}, but {p} does not"
        f" divide {length}. Pad the token axis to a multiple of {p} (packed rows: choose"
        f" pack_length as a multiple of {p}) or use a smaller {axis!r} axis."
    )
  if batch_axes is None:
    batch_axes = _mesh_axes_of(axes.ACT_BATCH, mesh_shape)
  if head_axes is None:
    head_axes = _mesh_axes_of(axes.ACT_HEADS, mesh_shape)
  batch_axes, head_axes = tuple(batch_axes), tuple(head_axes)
  if axis in batch_axes + head_axes:
    raise ValueError(
        f"mesh axis {axis!r} splits L, so it cannot also split the batch {batch_axes} or the"
        f" heads {head_axes}; fix the logical rules (ACT_BATCH, ACT_HEADS)."
    )
  # A batch that its axes do not divide is replicated over them (as `even_logical_constraint`).
  if b % math.prod(mesh_shape[a] for a in batch_axes):
    batch_axes = ()
  t = math.prod(mesh_shape[a] for a in head_axes)
  if n % (t * heads_unit):
    raise ValueError(
        f"{name} needs the heads N={n} to split over the head axes"
        f" {dict((a, mesh_shape[a]) for a in head_axes)} times {heads_unit}:"
        f" N must be a multiple of {t} x {heads_unit} = {t * heads_unit}. Choose num_heads as a"
        f" multiple of {t * heads_unit}, or make the tensor or sequence axis smaller"
        + ("." if heads_unit == 1 else ", or use ring attention (no head constraint).")
    )
  return (PartitionSpec(_spec_entry(batch_axes), axis, _spec_entry(head_axes), None),
          PartitionSpec(_spec_entry(batch_axes), axis))


def ulysses_attention(
    q_blnk: jnp.ndarray,
    k_blnk: jnp.ndarray,
    v_blnk: jnp.ndarray,
    *,
    attention_fn: AttentionFn,
    mesh=None,
    axis: str = "sequence",
    key_mask_bl: jnp.ndarray | None = None,
    segment_ids_bl: jnp.ndarray | None = None,
    attention_takes_segment_ids: bool = False,
    batch_axes: Sequence[str] | None = None,
    head_axes: Sequence[str] | None = None,
) -> jnp.ndarray:
  """Self-attention with q, k, v split along L over mesh axis `axis` (DeepSpeed-Ulysses).

  Equal to `attention_fn` on the whole arrays (up to float rounding), with each device holding
  L/P tokens before and after, and all L tokens of N/(T P) heads while attending.

  Args:
    q_blnk, k_blnk, v_blnk: (B, L, N, K) queries, keys and values of the same L tokens.
    attention_fn: attention on one device, called as
      `attention_fn(q, k, v, key_mask_bs=..., mask_bls=...)` on (B', L, N', K) arrays, e.g.
      `layers.dot_product_attention` or a `functools.partial` of it binding `impl`.
    mesh: a `Mesh` or `AbstractMesh`; None uses the one set by `jax.set_mesh`. With no mesh, no
      `axis` in it, or `axis` of size 1, `attention_fn` is called directly.
    axis: the mesh axis that splits L.
    key_mask_bl: optional bool (B, L): False keys get no weight. All-gathered along L (it is
      B*L bools, tiny next to k and v).
    segment_ids_bl: optional int (B, L) of packed rows (NaViT, Dehghani et al. 2023): a query
      attends only to keys with the same id. All-gathered along L; the (B, L, L) mask is built on
      each device after the all-to-all, for its own heads, instead of being passed in: a dense
      (B, L, L) input mask would have to be all-gathered whole (quadratic in L).
    attention_takes_segment_ids: call `attention_fn(q, k, v, key_mask_bs=..., q_segment_ids=ids,
      kv_segment_ids=ids)` with the gathered (B, L) ids instead of building `mask_bls`, for
      implementations that take segment ids natively (memory-bounded chunked attention, splash
      attention) and never need the quadratic mask.
    batch_axes: mesh axes that split B; None takes them from the logical rules in context
      (`ACT_BATCH`, default rules when none are set). Axes that do not divide B are dropped
      (B is then replicated over them, and each replica computes the same rows).
    head_axes: mesh axes that split N outside attention (tensor parallelism); None takes them
      from the rules' `ACT_HEADS`.

  Returns:
    (B, L, N, K), split along L like q.

  Raises:
    ValueError: shapes differ, L is not a multiple of the sequence axis size, or N is not a
      multiple of (head axes size) x (sequence axis size).
  """
  _check_self_attention_inputs(
      "ulysses_attention", q_blnk, k_blnk, v_blnk, key_mask_bl, segment_ids_bl)
  abstract = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  p = sequence_axis_size(axis, abstract)

  def local_attention(q, k, v, key_mask, segment_ids):
    if attention_takes_segment_ids:
      return attention_fn(q, k, v, key_mask_bs=key_mask, q_segment_ids=segment_ids,
                          kv_segment_ids=segment_ids)
    mask_bls = None
    if segment_ids is not None:
      mask_bls = segment_ids[:, :, None] == segment_ids[:, None, :]
    return attention_fn(q, k, v, key_mask_bs=key_mask, mask_bls=mask_bls)

  if p == 1:
    return local_attention(q_blnk, k_blnk, v_blnk, key_mask_bl, segment_ids_bl)
  spec_blnk, spec_bl = _manual_specs(
      "Ulysses sequence parallelism", q_blnk.shape, abstract, axis, batch_axes, head_axes, p)
  has_mask, has_segments = key_mask_bl is not None, segment_ids_bl is not None

  def body(q, k, v, *masks):
    # Local blocks: (B/Db, L/P, N/T, K). The all-to-all splits the local heads into P groups
    # and sends group j to sequence device j, which concatenates the L/P blocks it receives in
    # device order: token order, since L is split contiguously. The second all-to-all is its
    # inverse.
    to_heads = functools.partial(jax.lax.all_to_all, axis_name=axis, split_axis=2,
                                 concat_axis=1, tiled=True)
    to_tokens = functools.partial(jax.lax.all_to_all, axis_name=axis, split_axis=1,
                                  concat_axis=2, tiled=True)
    q, k, v = to_heads(q), to_heads(k), to_heads(v)  # (B/Db, L, N/(T P), K)
    masks = [jax.lax.all_gather(m, axis_name=axis, axis=1, tiled=True) for m in masks]
    key_mask = masks.pop(0) if has_mask else None
    segment_ids = masks.pop(0) if has_segments else None
    o = local_attention(q, k, v, key_mask, segment_ids)
    return to_tokens(o)  # (B/Db, L/P, N/T, K)

  masks = [m for m in (key_mask_bl, segment_ids_bl) if m is not None]
  # Manual over every mesh axis (see the module docstring for why not only `axis`).
  mapped = jax.shard_map(
      body,
      mesh=mesh,
      in_specs=(spec_blnk,) * 3 + (spec_bl,) * len(masks),
      out_specs=spec_blnk,
  )
  return mapped(q_blnk, k_blnk, v_blnk, *masks)


def ring_attention(
    q_blnk: jnp.ndarray,
    k_blnk: jnp.ndarray,
    v_blnk: jnp.ndarray,
    *,
    mesh=None,
    axis: str = "sequence",
    key_mask_bl: jnp.ndarray | None = None,
    segment_ids_bl: jnp.ndarray | None = None,
    batch_axes: Sequence[str] | None = None,
    head_axes: Sequence[str] | None = None,
) -> jnp.ndarray:
  """Self-attention with q, k, v split along L over mesh axis `axis` (ring attention).

  Each device keeps its L/P queries and passes its key/value block around the ring of the P
  sequence devices (`ppermute`), folding each block into a running softmax (online softmax,
  Milakov & Gimelshein 2018; blockwise ring attention, Liu et al. 2023, arXiv 2310.01889).
  Unlike Ulysses it puts no constraint on the number of heads (only L must split over P) and
  never holds more than L/P keys at once; it sends k and v P - 1 times per layer instead of
  two all-to-alls. The softmax is computed here in float32 with XLA einsums (not a pluggable
  kernel); the backward pass is plain autodiff, which stores each step's (B, N, L/P, L/P)
  probabilities: (B, N, L, L)/P per device, as Ulysses with the "xla" attention does.

  Args:
    q_blnk, k_blnk, v_blnk: (B, L, N, K).
    mesh: a `Mesh` or `AbstractMesh`; None uses the `jax.set_mesh` one. Off-mesh, or with an
      `axis` of size 1, the same online softmax runs in one block.
    axis: the mesh axis that splits L.
    key_mask_bl: optional bool (B, L); travels around the ring with its keys.
    segment_ids_bl: optional int (B, L): a query attends only to keys with the same id.
    batch_axes, head_axes: as in `ulysses_attention`.

  Returns:
    (B, L, N, K) in q's dtype, split along L like q. A query with no valid key gets zeros (as
    `layers.dot_product_attention`).

  Raises:
    ValueError: shapes differ, or L is not a multiple of the sequence axis size.
  """
  _check_self_attention_inputs(
      "ring_attention", q_blnk, k_blnk, v_blnk, key_mask_bl, segment_ids_bl)
  abstract = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  p = sequence_axis_size(axis, abstract)
  has_mask, has_segments = key_mask_bl is not None, segment_ids_bl is not None
  masks = [m for m in (key_mask_bl, segment_ids_bl) if m is not None]

  def body(q, k, v, *masks):
    masks = list(masks)
    key_mask = masks.pop(0) if has_mask else None
    segment_ids = masks.pop(0) if has_segments else None
    # Device i holds key block i at step 0 and block i - s (mod P) at step s.
    ring = [(i, (i + 1) % p) for i in range(p)]
    scale = q.shape[-1] ** -0.5
    q32 = q.astype(jnp.float32) * scale
    b, length, n, _ = q.shape
    # Running max m and sum l per (b, n, query); -inf max means "no valid key yet".
    m = jnp.full((b, n, length), -jnp.inf, jnp.float32)
    l = jnp.zeros((b, n, length), jnp.float32)
    acc = jnp.zeros(q.shape, jnp.float32)
    k_mask, k_segments = key_mask, segment_ids
    for step in range(p):
      if step:
        k, v = (jax.lax.ppermute(x, axis, ring) for x in (k, v))
        k_mask = None if k_mask is None else jax.lax.ppermute(k_mask, axis, ring)
        k_segments = None if k_segments is None else jax.lax.ppermute(k_segments, axis, ring)
      s = jnp.einsum("blnk,bsnk->bnls", q32, k.astype(jnp.float32))
      valid = None
      if k_mask is not None:
        valid = k_mask[:, None, None, :].astype(bool)
      if k_segments is not None:
        same = (segment_ids[:, :, None] == k_segments[:, None, :])[:, None]
        valid = same if valid is None else valid & same
      if valid is not None:
        s = jnp.where(valid, s, -jnp.inf)
      # The output does not depend on the max (it cancels), so no gradient flows through it.
      m_new = jax.lax.stop_gradient(jnp.maximum(m, s.max(axis=-1)))
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      probs = jnp.exp(s - m_safe[..., None])  # masked keys: exp(-inf) = 0
      correction = jnp.exp(m - m_safe)  # first valid block: exp(-inf) = 0
      l = l * correction + probs.sum(axis=-1)
      acc = (acc * correction.transpose(0, 2, 1)[..., None]
             + jnp.einsum("bnls,bsnk->blnk", probs, v.astype(jnp.float32)))
      m = m_new
    l_bln = l.transpose(0, 2, 1)[..., None]
    o = jnp.where(l_bln > 0, acc / jnp.where(l_bln > 0, l_bln, 1.0), 0.0)
    return o.astype(q.dtype)

  if p == 1:
    return body(q_blnk, k_blnk, v_blnk, *masks)
  spec_blnk, spec_bl = _manual_specs(
      "ring attention", q_blnk.shape, abstract, axis, batch_axes, head_axes, 1)
  mapped = jax.shard_map(
      body,
      mesh=mesh,
      in_specs=(spec_blnk,) * 3 + (spec_bl,) * len(masks),
      out_specs=spec_blnk,
  )
  return mapped(q_blnk, k_blnk, v_blnk, *masks)
