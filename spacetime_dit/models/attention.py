"""Softmax attention implementations, selected by name (`DiTConfig.attention_impl`).

Every implementation computes the same function of queries q (B, L, N, K), keys k and values v
(B, S, N, K): softmax(q k^T / sqrt(K)) v per head, where query l may attend key s only when

  * `key_mask_bs[b, s]` is True (when given), and
  * `q_segment_ids_bl[b, l] == kv_segment_ids_bs[b, s]` (when given; packed rows, NaViT,
    Dehghani et al. 2023), and
  * `mask_bls[b, l, s]` is True (when given; a dense per-pair mask, O(L*S) memory).

A query row with no allowed key (an empty caption, a padding token whose text slot is empty)
outputs zeros, not a uniform average over masked keys.

Implementations (`IMPLS`):

  "xla"      `jax.nn.dot_product_attention(implementation=None)`: XLA materialises the (B, N, L, S)
             logits, so memory grows as L*S (16k tokens, 12 heads: 12 GiB of fp32 logits). On
             CPU the same math is written out with heads before tokens (`_dense_heads_major`),
             which XLA:CPU runs faster.
  "cudnn"    `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN flash attention, GPU
             only, float16/bfloat16 only. jax 0.10.2's public entry point supports a dense
             boolean mask (which it turns into a dense (B, 1, L, S) additive bias, so masks still
             cost O(L*S) memory) and per-example `query_seq_lengths`/`key_value_seq_lengths`
             (prefix padding only); packed segments (`q_offsets`/`kv_offsets`) exist only in the
             private `jax._src.cudnn.fused_attention_stablehlo` API. So here: no mask -> no bias;
             any mask or segment ids -> a dense boolean mask.
  "chunked"  memory-bounded attention on any backend: queries in chunks of `query_chunk`, keys
             in chunks of `key_chunk`, with an online softmax (Rabe & Staats 2021, "Self-attention
             does not need O(n^2) memory"; FlashAttention, Dao et al. 2022). A custom VJP saves
             only the output and the per-row log-sum-exp and recomputes each block's
             probabilities in the backward pass (FlashAttention-2, Dao 2023, Alg. 2), so forward
             and backward temporaries are O(L * chunk), not O(L * S). Masks are taken as
             segment ids and key masks, sliced per chunk; a dense `mask_bls` is accepted but is
             itself O(L*S).
  "splash"   TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`), TPU only.
             Segment ids map onto splash's `SegmentIds`; the key mask and the padding up to the
             128-token block are folded into the key segment ids.
"""

import functools
import math

import jax
import jax.numpy as jnp

IMPLS = ("xla", "cudnn", "chunked", "splash")
_CUDNN_SEQ_MULTIPLE = 64  # See pad_for_cudnn.
DEFAULT_QUERY_CHUNK = 512
DEFAULT_KEY_CHUNK = 1024
# Splash attention's default block (BlockSizes.get_default(): 128 x 128); L and S are padded to it.
_SPLASH_BLOCK = 128
# Finite "minus infinity" for masked logits: exp(_MASKED - m) underflows to 0 and, unlike -inf,
# never yields inf - inf = nan when a whole block is masked.
_MASKED = -1e30


def attention(
    q_blnk: jnp.ndarray,
    k_bsnk: jnp.ndarray,
    v_bsnk: jnp.ndarray,
    *,
    key_mask_bs: jnp.ndarray | None = None,
    q_segment_ids_bl: jnp.ndarray | None = None,
    kv_segment_ids_bs: jnp.ndarray | None = None,
    mask_bls: jnp.ndarray | None = None,
    impl: str = "xla",
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    key_chunk: int = DEFAULT_KEY_CHUNK,
) -> jnp.ndarray:
  """Masked softmax attention with the implementation `impl` (see the module docstring).

  Args:
    q_blnk: queries (B, L, N, K).
    k_bsnk: keys (B, S, N, K).
    v_bsnk: values (B, S, N, K).
    key_mask_bs: optional bool (B, S); False keys get no attention weight.
    q_segment_ids_bl: optional int (B, L); given together with `kv_segment_ids_bs`.
    kv_segment_ids_bs: optional int (B, S); query l sees key s only when their ids are equal.
    mask_bls: optional bool (B, L, S) per query and key.
    impl: one of `IMPLS`.
    query_chunk: queries per chunk ("chunked" only).
    key_chunk: keys per chunk ("chunked" only).

  Returns:
    (B, L, N, K) in q's dtype.
  """
  if impl not in IMPLS:
    raise ValueError(f"attention_impl={impl!r} is unknown; choose one of {IMPLS}.")
  b, length, n, k = q_blnk.shape
  s = k_bsnk.shape[1]
  if k_bsnk.shape != (b, s, n, k) or v_bsnk.shape != k_bsnk.shape:
    raise ValueError(
        f"attention needs q (B, L, N, K) and k, v (B, S, N, K) with equal B, N, K; got q "
        f"{q_blnk.shape}, k {k_bsnk.shape}, v {v_bsnk.shape}.")
  if (q_segment_ids_bl is None) != (kv_segment_ids_bs is None):
    raise ValueError(
        "attention: q_segment_ids_bl and kv_segment_ids_bs must be given together (for "
        "self-attention pass the same (B, L) ids twice).")
  for name, value, shape in (("key_mask_bs", key_mask_bs, (b, s)),
                             ("q_segment_ids_bl", q_segment_ids_bl, (b, length)),
                             ("kv_segment_ids_bs", kv_segment_ids_bs, (b, s)),
                             ("mask_bls", mask_bls, (b, length, s))):
    if value is not None and tuple(value.shape) != shape:
      raise ValueError(
          f"attention: {name} has shape {tuple(value.shape)}; it must be {shape} for q "
          f"{q_blnk.shape} and k {k_bsnk.shape}.")
  masks = dict(key_mask_bs=key_mask_bs, q_segment_ids_bl=q_segment_ids_bl,
               kv_segment_ids_bs=kv_segment_ids_bs, mask_bls=mask_bls)
  if impl == "xla":
    return xla_attention(q_blnk, k_bsnk, v_bsnk, **masks)
  if impl == "cudnn":
    return cudnn_attention(q_blnk, k_bsnk, v_bsnk, **masks)
  if impl == "chunked":
    return chunked_attention(q_blnk, k_bsnk, v_bsnk, **masks, query_chunk=query_chunk,
                             key_chunk=key_chunk)
  return splash_attention(q_blnk, k_bsnk, v_bsnk, **masks)


# ---------------------------------------------------------------------------------------------
# Dense implementations: XLA and cuDNN through jax.nn.dot_product_attention.
# ---------------------------------------------------------------------------------------------


def _dense_mask(key_mask_bs, q_segment_ids_bl, kv_segment_ids_bs, mask_bls):
  """Combines every mask form into one bool (B, L, S) mask, (B, 1, S) for a key mask alone,
  or None when there is no mask."""
  mask = mask_bls
  if q_segment_ids_bl is not None:
    same = q_segment_ids_bl[:, :, None] == kv_segment_ids_bs[:, None, :]
    mask = same if mask is None else mask & same
  if key_mask_bs is not None:
    keys = key_mask_bs.astype(bool)[:, None, :]
    mask = keys if mask is None else mask & keys
  return None if mask is None else mask.astype(bool)


def _dense_heads_major(q_blnk, k_bsnk, v_bsnk, mask):
  """`jax.nn.dot_product_attention`'s XLA math (fp32 logits, scale, softmax in fp32, probabilities
  in v's dtype) with the heads moved before the tokens: q, k, v as (B, N, L, K).

  XLA:CPU's dot wants the batch dims (B, N) major in both operands. In (B, L, N, K) form it
  transposes the (B, N, L, S) logits, probabilities and their gradients around every dot; moving
  the small q, k, v instead made one block's attention fwd+bwd (L=1,024, 12 x 64, float32,
  2-core dev box, loaded) 1.4-2.6x faster. A masked pair gets logit _MASKED.
  """
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q_blnk, k_bsnk, v_bsnk))
  scale = 1.0 / math.sqrt(q.shape[-1])
  logits = jnp.einsum("bnlk,bnsk->bnls", q, k, preferred_element_type=jnp.float32)
  logits = logits * jnp.asarray(scale, jnp.float32)
  if mask is not None:
    logits = jnp.where(mask[:, None], logits, _MASKED)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  o = jnp.einsum("bnls,bnsk->bnlk", probs, v)
  return jnp.swapaxes(o, 1, 2).astype(q_blnk.dtype)


def _dense(q_blnk, k_bsnk, v_bsnk, mask, implementation):
  if implementation is None and jax.default_backend() == "cpu":
    o = _dense_heads_major(q_blnk, k_bsnk, v_bsnk, mask)
    if mask is None:
      return o
    any_key = mask.any(axis=-1)
    return jnp.where(any_key[:, :, None, None], o, jnp.zeros_like(o))
  if mask is None:
    return jax.nn.dot_product_attention(q_blnk, k_bsnk, v_bsnk, implementation=implementation)
  o = jax.nn.dot_product_attention(
      q_blnk, k_bsnk, v_bsnk, mask=mask[:, None, :, :], implementation=implementation)
  # Rows with no allowed key: jax returns a uniform average over the masked keys; make them 0.
  any_key = mask.any(axis=-1)  # (B, L) or (B, 1).
  return jnp.where(any_key[:, :, None, None], o, jnp.zeros_like(o))


def xla_attention(q_blnk, k_bsnk, v_bsnk, *, key_mask_bs=None, q_segment_ids_bl=None,
                  kv_segment_ids_bs=None, mask_bls=None):
  """`jax.nn.dot_product_attention(implementation=None)`; O(B*N*L*S) logits. See `attention`."""
  mask = _dense_mask(key_mask_bs, q_segment_ids_bl, kv_segment_ids_bs, mask_bls)
  return _dense(q_blnk, k_bsnk, v_bsnk, mask, None)


def cudnn_attention(q_blnk, k_bsnk, v_bsnk, *, key_mask_bs=None, q_segment_ids_bl=None,
                    kv_segment_ids_bs=None, mask_bls=None):
  """cuDNN flash attention through `jax.nn.dot_product_attention`; GPU, fp16/bf16 only.

  Masks become a dense (B, 1, L, S) boolean mask (see the module docstring for why).

  Raises:
    ValueError: at trace time on a non-GPU backend, or for float32 inputs.
  """
  backend = jax.default_backend()
  if backend != "gpu":
    raise ValueError(
        f"attention_impl='cudnn' needs a CUDA GPU, but the JAX backend is {backend!r}; use "
        "attention_impl='chunked' (memory-bounded, any backend) or 'xla'.")
  if q_blnk.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(
        f"attention_impl='cudnn' supports float16/bfloat16 inputs only (cuDNN flash attention), "
        f"got {q_blnk.dtype}; set DiTConfig.dtype='bfloat16' or use attention_impl='xla'.")
  mask = _dense_mask(key_mask_bs, q_segment_ids_bl, kv_segment_ids_bs, mask_bls)
  if mask is not None:
    mask = jnp.broadcast_to(mask, (q_blnk.shape[0], q_blnk.shape[1], k_bsnk.shape[1]))
  length = q_blnk.shape[1]
  q_blnk, k_bsnk, v_bsnk, mask = pad_for_cudnn(q_blnk, k_bsnk, v_bsnk, mask)
  return _dense(q_blnk, k_bsnk, v_bsnk, mask, "cudnn")[:, :length]


def pad_for_cudnn(q_blnk, k_bsnk, v_bsnk, mask_bls, multiple: int = _CUDNN_SEQ_MULTIPLE):
  """Pads L and S so that cuDNN's fused attention trains on them, masking the padded keys out.

  jax's cuDNN path refuses to train odd lengths once a mask (a bias) is given: on one H200 (jax
  0.11.2, `benchmarks/gpu_check.sh`) a masked cross-attention of Q 1,024 x KV 77, i.e. text
  cross-attention, raised "Unsupported sequence length". With a mask both lengths are padded to
  a multiple of `multiple` (64: what passed there, forward and gradients). Without one, only an
  odd length is padded (to even), since padding then needs a dense mask, which costs O(L*S)
  memory. Padded keys are masked out and the caller slices off the padded query rows, so the
  result is the unpadded attention.

  Returns:
    (q (B, L', N, K), k (B, S', N, K), v (B, S', N, K), mask (B, L', S') or None when nothing
    was padded and no mask was given).
  """
  b, l, s = q_blnk.shape[0], q_blnk.shape[1], k_bsnk.shape[1]
  if mask_bls is None and l % 2 == 0 and s % 2 == 0:
    return q_blnk, k_bsnk, v_bsnk, None
  step = multiple if mask_bls is not None else 2
  lp, sp = -(-l // step) * step, -(-s // step) * step
  if (lp, sp) == (l, s):
    return q_blnk, k_bsnk, v_bsnk, mask_bls
  if mask_bls is None:
    mask_bls = jnp.ones((b, l, s), bool)
  mask = jnp.pad(mask_bls, ((0, 0), (0, lp - l), (0, sp - s)), constant_values=False)
  return _pad_tokens(q_blnk, lp), _pad_tokens(k_bsnk, sp), _pad_tokens(v_bsnk, sp), mask


def _pad_tokens(x_btnk: jax.Array, length: int) -> jax.Array:
  """Zeros appended along axis 1 up to `length`."""
  return jnp.pad(x_btnk, ((0, 0), (0, length - x_btnk.shape[1]), (0, 0), (0, 0)))


# ---------------------------------------------------------------------------------------------
# Chunked (memory-bounded) attention with a FlashAttention-style custom VJP.
# ---------------------------------------------------------------------------------------------


def _pad_axis1(x, size, value):
  if x is None:
    return None
  pad = size - x.shape[1]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _chunks(x, chunk):
  """(B, C*chunk, ...) -> (C, B, chunk, ...): the scan axis first; None stays None."""
  if x is None:
    return None
  b, total = x.shape[:2]
  return jnp.moveaxis(x.reshape(b, total // chunk, chunk, *x.shape[2:]), 1, 0)


def _unchunk(x):
  """(C, B, chunk, ...) -> (B, C*chunk, ...)."""
  c, b, chunk = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape(b, c * chunk, *x.shape[3:])


def _allowed(qseg_bq, kseg_bs, kvalid_bs, mask_bqs):
  """bool (B, 1, cq, ck): which (query, key) pairs of a block may attend (the 1 is heads);
  None when every pair may (no segment ids, key mask or dense mask: nothing to select)."""
  allowed = None
  if qseg_bq is not None:
    allowed = (qseg_bq[:, :, None] == kseg_bs[:, None, :]) & kvalid_bs[:, None, :]
  if mask_bqs is not None:
    allowed = mask_bqs if allowed is None else allowed & mask_bqs
  return None if allowed is None else allowed[:, None]


def _scores(q, k, scale):
  """fp32 logits (B, N, cq, ck) of a query chunk (B, cq, N, K) and a key chunk (B, ck, N, K)."""
  return jnp.einsum("bqnk,bsnk->bnqs", q, k, preferred_element_type=jnp.float32) * scale


def _flash_forward(q, k, v, qseg, kseg, kvalid, mask, query_chunk, key_chunk):
  """Output (B, L, N, K) and log-sum-exp (B, N, L) of padded inputs (L, S multiples of chunks)."""
  b, length, n, kd = q.shape
  scale = 1.0 / math.sqrt(kd)
  k_c, v_c = _chunks(k, key_chunk), _chunks(v, key_chunk)
  kseg_c, kvalid_c = _chunks(kseg, key_chunk), _chunks(kvalid, key_chunk)

  def query_block(_, xs):
    q_i, qseg_i, mask_i = xs  # (B, cq, N, K), (B, cq), (B, cq, S) or None.
    mask_i_c = None if mask_i is None else jnp.moveaxis(
        mask_i.reshape(b, q_i.shape[1], -1, key_chunk), 2, 0)

    def key_block(carry, ys):
      m, l, acc = carry  # (B, N, cq), (B, N, cq), (B, N, cq, K) fp32.
      k_j, v_j, kseg_j, kvalid_j, mask_ij = ys
      allowed = _allowed(qseg_i, kseg_j, kvalid_j, mask_ij)
      s = _scores(q_i, k_j, scale)
      if allowed is not None:
        s = jnp.where(allowed, s, _MASKED)
      m_new = jnp.maximum(m, s.max(axis=-1))
      p = jnp.exp(s - m_new[..., None])
      if allowed is not None:
        # Explicit zeros at masked pairs: a fully masked block would otherwise give exp(0) = 1.
        p = jnp.where(allowed, p, 0.0)
      correction = jnp.exp(m - m_new)
      l = l * correction + p.sum(axis=-1)
      pv = jnp.einsum("bnqs,bsnk->bnqk", p.astype(v_j.dtype), v_j,
                      preferred_element_type=jnp.float32)
      return (m_new, l, acc * correction[..., None] + pv), None

    cq = q_i.shape[1]
    init = (jnp.full((b, n, cq), _MASKED, jnp.float32), jnp.zeros((b, n, cq), jnp.float32),
            jnp.zeros((b, n, cq, kd), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(key_block, init, (k_c, v_c, kseg_c, kvalid_c, mask_i_c))
    nonempty = l > 0
    o = jnp.where(nonempty[..., None], acc / jnp.where(nonempty, l, 1.0)[..., None], 0.0)
    lse = jnp.where(nonempty, m + jnp.log(jnp.where(nonempty, l, 1.0)), 0.0)
    return None, (jnp.einsum("bnqk->bqnk", o).astype(q.dtype), lse)

  mask_c = None if mask is None else _chunks(mask, query_chunk)
  _, (o_c, lse_c) = jax.lax.scan(
      query_block, None, (_chunks(q, query_chunk), _chunks(qseg, query_chunk), mask_c))
  # lse_c: (C, B, N, cq) -> (B, N, L).
  lse = jnp.moveaxis(lse_c, 0, 2).reshape(b, n, length)
  return _unchunk(o_c), lse


def _flash_backward(q, k, v, qseg, kseg, kvalid, mask, o, lse, do, query_chunk, key_chunk):
  """dq, dk, dv of padded inputs (FlashAttention-2, Dao 2023, Alg. 2), one query chunk at a time.

  The outer scan runs over query chunks and carries fp32 dk, dv accumulators for all keys; the
  inner scan over key chunks recomputes p = exp(s - lse) and adds that block's contributions.
  """
  b, length, n, kd = q.shape
  s_len = k.shape[1]
  scale = 1.0 / math.sqrt(kd)
  # D_l = sum_k dO_lk O_lk = sum_s p_ls dp_ls: the softmax backward's row term (Alg. 2, line 4).
  delta = jnp.einsum("blnk,blnk->bnl", do.astype(jnp.float32), o.astype(jnp.float32))
  nk = s_len // key_chunk
  k_c, v_c = _chunks(k, key_chunk), _chunks(v, key_chunk)
  kseg_c, kvalid_c = _chunks(kseg, key_chunk), _chunks(kvalid, key_chunk)

  def query_block(carry, xs):
    dk_c, dv_c = carry  # (nK, B, ck, N, K) fp32.
    q_i, qseg_i, do_i, lse_i, delta_i, mask_i = xs
    cq = q_i.shape[1]
    mask_i_c = None if mask_i is None else jnp.moveaxis(
        mask_i.reshape(b, cq, nk, key_chunk), 2, 0)

    def key_block(dq_i, ys):
      k_j, v_j, kseg_j, kvalid_j, mask_ij, dk_j, dv_j = ys
      allowed = _allowed(qseg_i, kseg_j, kvalid_j, mask_ij)
      p = jnp.exp(_scores(q_i, k_j, scale) - lse_i[..., None])  # (B, N, cq, ck).
      if allowed is not None:
        p = jnp.where(allowed, p, 0.0)
      dv_j = dv_j + jnp.einsum("bnqs,bqnk->bsnk", p.astype(do_i.dtype), do_i,
                               preferred_element_type=jnp.float32)
      dp = jnp.einsum("bqnk,bsnk->bnqs", do_i, v_j, preferred_element_type=jnp.float32)
      ds = (p * (dp - delta_i[..., None]) * scale).astype(q_i.dtype)
      dq_i = dq_i + jnp.einsum("bnqs,bsnk->bqnk", ds, k_j, preferred_element_type=jnp.float32)
      dk_j = dk_j + jnp.einsum("bnqs,bqnk->bsnk", ds, q_i, preferred_element_type=jnp.float32)
      return dq_i, (dk_j, dv_j)

    dq_i, (dk_c, dv_c) = jax.lax.scan(
        key_block, jnp.zeros((b, cq, n, kd), jnp.float32),
        (k_c, v_c, kseg_c, kvalid_c, mask_i_c, dk_c, dv_c))
    return (dk_c, dv_c), dq_i

  lse_c = jnp.moveaxis(lse.reshape(b, n, length // query_chunk, query_chunk), 2, 0)
  delta_c = jnp.moveaxis(delta.reshape(b, n, length // query_chunk, query_chunk), 2, 0)
  zeros = jnp.zeros((nk, b, key_chunk, n, kd), jnp.float32)
  mask_c = None if mask is None else _chunks(mask, query_chunk)
  (dk_c, dv_c), dq_c = jax.lax.scan(
      query_block, (zeros, zeros),
      (_chunks(q, query_chunk), _chunks(qseg, query_chunk), _chunks(do, query_chunk), lse_c,
       delta_c, mask_c))
  return (_unchunk(dq_c).astype(q.dtype), _unchunk(dk_c).astype(k.dtype),
          _unchunk(dv_c).astype(v.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _flash(q, k, v, qseg, kseg, kvalid, mask, query_chunk, key_chunk):
  return _flash_forward(q, k, v, qseg, kseg, kvalid, mask, query_chunk, key_chunk)[0]


def _flash_fwd(q, k, v, qseg, kseg, kvalid, mask, query_chunk, key_chunk):
  o, lse = _flash_forward(q, k, v, qseg, kseg, kvalid, mask, query_chunk, key_chunk)
  return o, (q, k, v, qseg, kseg, kvalid, mask, o, lse)


def _flash_bwd(query_chunk, key_chunk, residuals, do):
  q, k, v, qseg, kseg, kvalid, mask, o, lse = residuals
  dq, dk, dv = _flash_backward(q, k, v, qseg, kseg, kvalid, mask, o, lse, do, query_chunk,
                               key_chunk)
  # Integer / bool mask inputs have no cotangent.
  return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def chunked_attention(q_blnk, k_bsnk, v_bsnk, *, key_mask_bs=None, q_segment_ids_bl=None,
                      kv_segment_ids_bs=None, mask_bls=None,
                      query_chunk: int = DEFAULT_QUERY_CHUNK,
                      key_chunk: int = DEFAULT_KEY_CHUNK):
  """Memory-bounded attention on any backend (see the module docstring and `attention`).

  L and S need not be multiples of the chunks: chunks larger than the sequence shrink to it,
  and the sequences are padded up to a multiple of the chunk internally (padded keys are
  masked, padded queries dropped).

  Args:
    q_blnk, k_bsnk, v_bsnk, key_mask_bs, q_segment_ids_bl, kv_segment_ids_bs, mask_bls: see
      `attention`.
    query_chunk: queries per chunk (temporaries scale with query_chunk * key_chunk * N).
    key_chunk: keys per chunk.

  Returns:
    (B, L, N, K) in q's dtype.
  """
  if query_chunk < 1 or key_chunk < 1:
    raise ValueError(
        f"chunked attention needs query_chunk >= 1 and key_chunk >= 1, got {query_chunk} and "
        f"{key_chunk}; e.g. {DEFAULT_QUERY_CHUNK} and {DEFAULT_KEY_CHUNK}.")
  b, length = q_blnk.shape[:2]
  s = k_bsnk.shape[1]
  cq, ck = min(query_chunk, length), min(key_chunk, s)
  lp, sp = cq * math.ceil(length / cq), ck * math.ceil(s / ck)
  if q_segment_ids_bl is None and key_mask_bs is None and sp == s:
    # Every key is valid for every query: no (cq, ck) mask is built or selected per block.
    qseg = kseg = kvalid = None
  elif q_segment_ids_bl is None:
    qseg = jnp.zeros((b, length), jnp.int32)
    kseg = jnp.zeros((b, s), jnp.int32)
  else:
    qseg = q_segment_ids_bl.astype(jnp.int32)
    kseg = kv_segment_ids_bs.astype(jnp.int32)
  if qseg is not None:
    kvalid = jnp.ones((b, s), bool) if key_mask_bs is None else key_mask_bs.astype(bool)
  mask = None if mask_bls is None else mask_bls.astype(bool)
  if mask is not None:
    mask = _pad_axis1(jnp.swapaxes(_pad_axis1(jnp.swapaxes(mask, 1, 2), sp, False), 1, 2),
                      lp, False)
  o = _flash(_pad_axis1(q_blnk, lp, 0), _pad_axis1(k_bsnk, sp, 0), _pad_axis1(v_bsnk, sp, 0),
             _pad_axis1(qseg, lp, 0), _pad_axis1(kseg, sp, 0), _pad_axis1(kvalid, sp, False),
             mask, cq, ck)
  return o[:, :length]


# ---------------------------------------------------------------------------------------------
# Splash attention (TPU).
# ---------------------------------------------------------------------------------------------


def splash_attention(q_blnk, k_bsnk, v_bsnk, *, key_mask_bs=None, q_segment_ids_bl=None,
                     kv_segment_ids_bs=None, mask_bls=None, interpret: bool = False):
  """TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`).

  Splash takes per-example (N, L, K) queries and (N, S, K) keys, a static mask (here
  `FullMask`) and dynamic `SegmentIds(q=(L,), kv=(S,))`; it has no scale argument (q is
  pre-scaled) and needs L, S in multiples of its 128-token block. The key mask is folded into
  the key segment ids (a masked key gets id -1, which no query has), and every sequence is
  padded with at least one key of id -2 and value 0: a query with no allowed key is given id -2,
  so its row is never empty (splash requires that, see `SegmentIds`) and its output is exactly
  0 with zero gradients. Segment ids must therefore be >= 0 (the packer's are: 0 = padding).

  Args:
    q_blnk, k_bsnk, v_bsnk, key_mask_bs, q_segment_ids_bl, kv_segment_ids_bs: see `attention`.
    mask_bls: not supported (a dense mask has no segment-id form); raises.
    interpret: run the Pallas kernel in interpret mode (for debugging off TPU).

  Raises:
    ValueError: at trace time on a non-TPU backend (unless `interpret`), or with `mask_bls`.
  """
  backend = jax.default_backend()
  if backend != "tpu" and not interpret:
    raise ValueError(
        f"attention_impl='splash' needs a TPU, but the JAX backend is {backend!r}; use "
        "attention_impl='chunked' (memory-bounded, any backend) or 'xla' (or 'cudnn' on GPU).")
  if mask_bls is not None:
    raise ValueError(
        "attention_impl='splash' takes masks as key masks and segment ids, not a dense mask_bls "
        "(B, L, S); pass q_segment_ids_bl / kv_segment_ids_bs instead.")
  # Imported here: Pallas TPU kernels are not needed (nor always importable) elsewhere.
  # pylint: disable-next=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  b, length, n, kd = q_blnk.shape
  s = k_bsnk.shape[1]
  lp = _SPLASH_BLOCK * math.ceil(length / _SPLASH_BLOCK)
  sp = _SPLASH_BLOCK * math.ceil((s + 1) / _SPLASH_BLOCK)  # >= 1 padded key (id -2).
  if q_segment_ids_bl is None:
    qseg = jnp.zeros((b, length), jnp.int32)
    kseg = jnp.zeros((b, s), jnp.int32)
  else:
    qseg = q_segment_ids_bl.astype(jnp.int32)
    kseg = kv_segment_ids_bs.astype(jnp.int32)
  if key_mask_bs is not None:
    kseg = jnp.where(key_mask_bs.astype(bool), kseg, -1)

  def has_key(qs, ks):
    # Whether each query id occurs among the allowed key ids: a sorted search, O(L log S),
    # rather than an (L, S) comparison.
    ks = jnp.sort(ks)
    return ks[jnp.clip(jnp.searchsorted(ks, qs), 0, ks.shape[0] - 1)] == qs

  qseg = jnp.where(jax.vmap(has_key)(qseg, kseg), qseg, -2)
  qseg = _pad_axis1(qseg, lp, -2)
  kseg = _pad_axis1(kseg, sp, -2)
  scale = 1.0 / math.sqrt(kd)
  q = _pad_axis1(q_blnk * jnp.asarray(scale, q_blnk.dtype), lp, 0)
  k = _pad_axis1(k_bsnk, sp, 0)
  v = _pad_axis1(v_bsnk, sp, 0)
  mask = splash.MultiHeadMask([splash.FullMask((lp, sp)) for _ in range(n)])
  kernel = splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, interpret=interpret)
  # (B, L, N, K) -> per example (N, L, K).
  o = jax.vmap(lambda qi, ki, vi, qs, ks: kernel(qi, ki, vi, splash.SegmentIds(q=qs, kv=ks)))(
      jnp.swapaxes(q, 1, 2), jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), qseg, kseg)
  return jnp.swapaxes(o, 1, 2)[:, :length].astype(q_blnk.dtype)
