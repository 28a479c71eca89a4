"""Transformer building blocks: 3D rope, attention, norms, gated MLP, timestep embedding.

Parameters are always float32 and carry logical axis names from `spacetime_dit.sharding.axes`;
multi-dimensional kernels are written with `self.param` + `jnp.einsum` (not `nn.DenseGeneral`,
which breaks under `jax.set_mesh` with >2-D logical kernels, google/flax#3676). Computation runs
in the module's `dtype` (float32 or bfloat16); norms, rotary angles and softmax statistics are
computed in float32.
"""

import functools
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spacetime_dit.models import attention as attention_lib
from spacetime_dit.models import sequence_parallel
from spacetime_dit.sharding import axes

ATTENTION_IMPLS = attention_lib.IMPLS
MLP_ACTIVATIONS = ("swiglu", "geglu")

# DiT (Peebles & Xie 2023) initialises its linear layers with Xavier-uniform.
xavier_uniform = nn.initializers.xavier_uniform


def layer_norm(x: jnp.ndarray, eps: float = 1e-6) -> jnp.ndarray:
  """LayerNorm over the last axis without a learned affine (adaLN supplies shift and scale).

  Args:
    x: (..., D) in any float dtype.
    eps: variance floor.

  Returns:
    Normalised x in x's dtype; statistics are computed in float32.
  """
  x32 = x.astype(jnp.float32)
  mean = x32.mean(axis=-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(axis=-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x: jnp.ndarray, shift: jnp.ndarray, scale: jnp.ndarray) -> jnp.ndarray:
  """adaLN modulation `x * (1 + scale) + shift` (DiT, Peebles & Xie 2023, §3.2)."""
  return x * (1 + scale) + shift


def token_einsum(subscripts: str, x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
  """`jnp.einsum` of tokens x (B, L, ...) with a weight; `m` in `subscripts` stands for (B, L).

  E.g. "md,dpnk->mpnk" projects (B, L, D) to (B, L, 3, N, K). On CPU the (B, L) axes are merged
  into one before the einsum: XLA:CPU materialises transposed copies for the weight gradient of
  a 3-D einsum, and a gated MLP (fwd+bwd, B*L=1280, D=128, F=512) took 42-49 ms with (b, l)
  against 20-25 ms merged on the 2-core target. Elsewhere the einsum keeps (B, L) separate,
  because merging a batch axis and a sequence-sharded token axis would force a reshard.

  Args:
    subscripts: einsum spec whose first operand and output start with `m`.
    x: (B, L, ...).
    w: weight.

  Returns:
    (B, L, ...) result.
  """
  if jax.default_backend() != "cpu":
    return jnp.einsum(subscripts.replace("m", "BL"), x, w)
  b, length = x.shape[:2]
  y = jnp.einsum(subscripts, x.reshape(b * length, *x.shape[2:]), w)
  return y.reshape(b, length, *y.shape[1:])


class Linear(nn.Module):
  """`x @ W + b` over the last axis, with a logically partitioned 2-D kernel.

  Token inputs (B, L, d_in) go through `token_einsum`; other ranks through a plain einsum.

  Attributes:
    features: output width.
    kernel_axes: logical names of the (in, out) kernel axes; the bias uses the second.
    kernel_init: kernel initialiser.
    dtype: compute dtype.
  """

  features: int
  kernel_axes: tuple[str | None, str | None]
  kernel_init: Callable = xavier_uniform()
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Args: x (..., d_in). Returns (..., features) in `dtype`."""
    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
        (x.shape[-1], self.features),
    )
    bias = self.param(
        "bias",
        nn.with_logical_partitioning(nn.initializers.zeros, (self.kernel_axes[1],)),
        (self.features,),
    )
    x = x.astype(self.dtype)
    kernel, bias = kernel.astype(self.dtype), bias.astype(self.dtype)
    if x.ndim == 3:
      return token_einsum("md,df->mf", x, kernel) + bias
    return jnp.einsum("...d,df->...f", x, kernel) + bias


def _norm_init(init: Callable) -> Callable:
  return nn.with_logical_partitioning(init, (axes.NORM,))


class LayerNorm(nn.Module):
  """LayerNorm with a learned scale and bias (used by the text encoder).

  Attributes:
    eps: variance floor.
    dtype: output dtype.
  """

  eps: float = 1e-6
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    d = x.shape[-1]
    scale = self.param("scale", _norm_init(nn.initializers.ones), (d,))
    bias = self.param("bias", _norm_init(nn.initializers.zeros), (d,))
    y = layer_norm(x.astype(jnp.float32), self.eps) * scale + bias
    return y.astype(self.dtype)


class RMSNorm(nn.Module):
  """RMSNorm with a learned scale (Zhang & Sennrich 2019), used for QK normalisation.

  Attributes:
    eps: mean-square floor.
    dtype: output dtype.
  """

  eps: float = 1e-6
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    d = x.shape[-1]
    scale = self.param("scale", _norm_init(nn.initializers.ones), (d,))
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(axis=-1, keepdims=True) + self.eps) * scale
    return y.astype(self.dtype)


# ---------------------------------------------------------------------------------------------
# 3D rotary position embedding.
# ---------------------------------------------------------------------------------------------


def rope_axes_dims(head_dim: int) -> tuple[int, int, int]:
  """Splits the head dim K into (t, h, w) rotary sub-dims, each even.

  Time gets about K/4 and each spatial axis about 3K/8: spatial grids are larger than temporal
  ones and need more distinct frequencies (a similar uneven split is used by Wan 2.1's 3D rope).
  For K=64 this is (16, 24, 24); for K=128, (32, 48, 48); for K=32, (8, 12, 12).

  Args:
    head_dim: K, even and at least 6.

  Returns:
    (kt, kh, kw) with kt + kh + kw == K.

  Raises:
    ValueError: when K is odd or too small to give every axis a rotation pair.
  """
  if head_dim % 2 or head_dim < 6:
    raise ValueError(
        f"head dim K={head_dim} must be even and >= 6 for 3D rotary embeddings (one rotation pair "
        "per axis at least); choose width and num_heads so that width / num_heads is even."
    )
  kt = max(2, 2 * round(head_dim / 8))
  kh = max(2, 2 * ((head_dim - kt) // 4))
  return kt, kh, head_dim - kt - kh


def rope_frequencies(
    axes_dims: Sequence[int], theta: float = 10_000.0
) -> tuple[np.ndarray, ...]:
  """Per-axis rotary inverse frequencies (RoFormer, Su et al. 2021, eq. 15).

  Args:
    axes_dims: even sub-dims (kt, kh, kw) of the head dim.
    theta: base wavelength.

  Returns:
    One float32 array of shape (k_a / 2,) per axis: theta^(-2i / k_a), i = 0 .. k_a/2 - 1.
  """
  return tuple(
      (theta ** (-np.arange(0, k, 2, dtype=np.float64) / k)).astype(np.float32) for k in axes_dims
  )


def rope_angles(
    positions: np.ndarray | jnp.ndarray, axes_dims: Sequence[int], theta: float = 10_000.0
) -> np.ndarray | jnp.ndarray:
  """Rotation angle of each token for each rotary pair.

  Computed with numpy when `positions` is a numpy array (a static grid: the angles, and their
  cos/sin, become compile-time constants), with jnp otherwise (e.g. packed sequences).

  Args:
    positions: integer (L, 3) or (B, L, 3) patch coordinates (t, h, w).
    axes_dims: (kt, kh, kw) from `rope_axes_dims`.
    theta: base wavelength.

  Returns:
    float32 (L, K/2) or (B, L, K/2): pairs [0, kt/2) rotate with t, then h, then w.
  """
  xp = np if isinstance(positions, np.ndarray) else jnp
  pos = xp.asarray(positions).astype(xp.float32)
  freqs = rope_frequencies(axes_dims, theta)
  return xp.concatenate([pos[..., a, None] * freqs[a] for a in range(3)], axis=-1)


def apply_rope(
    x_blnk: jnp.ndarray,
    positions: np.ndarray | jnp.ndarray,
    axes_dims: Sequence[int],
    theta: float = 10_000.0,
) -> jnp.ndarray:
  """Rotates adjacent pairs (x[2i], x[2i+1]) of x's head dim by each token's 3D position.

  Because each pair is rotated by an angle linear in the position, the score
  <rope(q, p), rope(k, p')> depends only on p - p' (RoFormer, Su et al. 2021, §3.4.2). Positions
  need no learned table, so any (t, h, w) grid is accepted.

  Args:
    x_blnk: queries or keys (B, L, N, K).
    positions: integer (L, 3) shared by the batch, or (B, L, 3) per example.
    axes_dims: (kt, kh, kw) summing to K.
    theta: base wavelength.

  Returns:
    The rotated x, same shape and dtype; norms are preserved.
  """
  b, length, n, k = x_blnk.shape
  if sum(axes_dims) != k:
    raise ValueError(f"rotary axes dims {tuple(axes_dims)} must sum to the head dim K={k}.")
  angles = rope_angles(positions, axes_dims, theta)
  xp = np if isinstance(angles, np.ndarray) else jnp
  # (L, K/2) -> (1, L, 1, K/2); (B, L, K/2) -> (B, L, 1, K/2).
  angles = angles[..., None, :] if angles.ndim == 3 else angles[None, :, None, :]
  cos, sin = xp.cos(angles), xp.sin(angles)
  pairs = x_blnk.astype(jnp.float32).reshape(b, length, n, k // 2, 2)
  x0, x1 = pairs[..., 0], pairs[..., 1]
  rotated = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
  return rotated.reshape(b, length, n, k).astype(x_blnk.dtype)


# ---------------------------------------------------------------------------------------------
# Attention.
# ---------------------------------------------------------------------------------------------


def dot_product_attention(
    q_blnk: jnp.ndarray,
    k_bsnk: jnp.ndarray,
    v_bsnk: jnp.ndarray,
    *,
    key_mask_bs: jnp.ndarray | None = None,
    mask_bls: jnp.ndarray | None = None,
    q_segment_ids: jnp.ndarray | None = None,
    kv_segment_ids: jnp.ndarray | None = None,
    impl: str = "xla",
) -> jnp.ndarray:
  """Softmax attention dispatched on `impl` (implementations in `spacetime_dit.models.attention`).

  Args:
    q_blnk: queries (B, L, N, K).
    k_bsnk: keys (B, S, N, K).
    v_bsnk: values (B, S, N, K).
    key_mask_bs: optional bool (B, S); False keys get no attention weight.
    mask_bls: optional bool (B, L, S) per query and key, e.g. "same packed clip" from segment
      ids (NaViT, Dehghani et al. 2023); combined with the other masks when given. It costs
      O(L*S) memory whatever `impl` is: prefer segment ids.
    q_segment_ids: optional int (B, L); with `kv_segment_ids` (B, S), query l sees key s only
      when their ids are equal. Memory-bounded under impl="chunked" (no (B, L, S) mask is built).
    kv_segment_ids: optional int (B, S); given together with `q_segment_ids`.
    impl: one of ATTENTION_IMPLS: "xla" (`jax.nn.dot_product_attention`, XLA picks), "cudnn"
      (GPU flash attention, bf16/fp16), "chunked" (memory-bounded, any backend), "splash" (TPU).

  A query row with no valid key (an empty caption, a padding token of a packed row whose text
  slot is empty) outputs zeros rather than a uniform average over masked keys.

  Returns:
    (B, L, N, K).
  """
  return attention_lib.attention(
      q_blnk, k_bsnk, v_bsnk, key_mask_bs=key_mask_bs, q_segment_ids_bl=q_segment_ids,
      kv_segment_ids_bs=kv_segment_ids, mask_bls=mask_bls, impl=impl)


def _constrain_heads(x: jnp.ndarray, token_axis: str) -> jnp.ndarray:
  return nn.with_logical_constraint(x, (axes.ACT_BATCH, token_axis, axes.ACT_HEADS, None))


class SelfAttention(nn.Module):
  """Multi-head self-attention with optional QK RMS-norm, 3D rope and key mask.

  Attributes:
    num_heads: N.
    head_dim: K.
    qk_norm: RMS-normalise q and k per head before rope (SD3, Esser et al. 2024, §5.3.2;
      ViT-22B, Dehghani et al. 2023): keeps attention logits bounded at scale.
    rope_theta: rotary base wavelength; None disables rope (e.g. text with a position table).
    attention_impl: see `dot_product_attention`.
    token_axis: logical activation axis of the sequence (ACT_TOKENS or ACT_TEXT).
    out_init: initialiser of the output projection (N, K, D).
    dtype: compute dtype.
  """

  num_heads: int
  head_dim: int
  qk_norm: bool = True
  rope_theta: float | None = 10_000.0
  attention_impl: str = "xla"
  token_axis: str = axes.ACT_TOKENS
  out_init: Callable = xavier_uniform(in_axis=(0, 1), out_axis=2)
  sequence_parallel: str = "none"
  dtype: str = "float32"

  @nn.compact
  def __call__(
      self,
      x_bld: jnp.ndarray,
      positions: jnp.ndarray | None = None,
      key_mask_bl: jnp.ndarray | None = None,
      mask_bll: jnp.ndarray | None = None,
      segment_ids_bl: jnp.ndarray | None = None,
  ) -> jnp.ndarray:
    """Args: x (B, L, D); positions int (L, 3) or (B, L, 3) when rope is on; key mask (B, L);
    mask_bll bool (B, L, L) per query and key (packed clips attend only within themselves).

    Returns: (B, L, D) in `dtype`.
    """
    d, n, k = x_bld.shape[-1], self.num_heads, self.head_dim
    w_qkv = self.param(
        "qkv",
        nn.with_logical_partitioning(
            xavier_uniform(in_axis=0, out_axis=(2, 3), batch_axis=(1,)),
            (axes.EMBED, None, axes.HEADS, axes.HEAD_DIM),
        ),
        (d, 3, n, k),
    )
    w_out = self.param(
        "out",
        nn.with_logical_partitioning(self.out_init, (axes.HEADS, axes.HEAD_DIM, axes.EMBED)),
        (n, k, d),
    )
    x = x_bld.astype(self.dtype)
    qkv = token_einsum("md,dpnk->mpnk", x, w_qkv.astype(self.dtype))
    q, kk, v = (_constrain_heads(qkv[:, :, i], self.token_axis) for i in range(3))
    if self.qk_norm:
      q = RMSNorm(dtype=self.dtype, name="q_norm")(q)
      kk = RMSNorm(dtype=self.dtype, name="k_norm")(kk)
    if self.rope_theta is not None:
      if positions is None:
        raise ValueError("SelfAttention with rope needs token positions (L, 3) or (B, L, 3).")
      dims = rope_axes_dims(k)
      q = apply_rope(q, positions, dims, self.rope_theta)
      kk = apply_rope(kk, positions, dims, self.rope_theta)
    attend = functools.partial(dot_product_attention, impl=self.attention_impl)
    if self.sequence_parallel != "none" and mask_bll is not None:
      raise ValueError(
          f"SelfAttention(sequence_parallel={self.sequence_parallel!r}) takes segment_ids_bl, not"
          " a dense mask_bll: the (B, L, L) mask would have to be all-gathered whole.")
    if self.sequence_parallel == "ulysses":
      o = sequence_parallel.ulysses_attention(
          q, kk, v, attention_fn=attend, key_mask_bl=key_mask_bl, segment_ids_bl=segment_ids_bl,
          attention_takes_segment_ids=True)
    elif self.sequence_parallel == "ring":
      o = sequence_parallel.ring_attention(
          q, kk, v, key_mask_bl=key_mask_bl, segment_ids_bl=segment_ids_bl)
    else:
      o = attend(q, kk, v, key_mask_bs=key_mask_bl, mask_bls=mask_bll,
                 q_segment_ids=segment_ids_bl, kv_segment_ids=segment_ids_bl)
    return token_einsum("mnk,nkd->md", o, w_out.astype(self.dtype))


class CrossAttention(nn.Module):
  """Multi-head attention from spacetime tokens to (masked) text tokens, with QK RMS-norm.

  No rope: text order is already encoded in the text features (PixArt-alpha, Chen et al. 2023).

  Attributes:
    num_heads: N.
    head_dim: K.
    qk_norm: RMS-normalise q and k per head.
    attention_impl: see `dot_product_attention`.
    out_init: initialiser of the output projection (N, K, D); zeros makes the layer start at 0.
    dtype: compute dtype.
  """

  num_heads: int
  head_dim: int
  qk_norm: bool = True
  attention_impl: str = "xla"
  out_init: Callable = xavier_uniform(in_axis=(0, 1), out_axis=2)
  dtype: str = "float32"

  @nn.compact
  def __call__(
      self, x_bld: jnp.ndarray, context_bsd: jnp.ndarray, context_mask_bs: jnp.ndarray
  ) -> jnp.ndarray:
    """Args: x (B, L, D); context (B, S, D); context mask bool (B, S), or (B, L, S) per query
    (a packed row's tokens see only their own clip's caption). Returns (B, L, D)."""
    d, n, k = x_bld.shape[-1], self.num_heads, self.head_dim
    w_q = self.param(
        "q",
        nn.with_logical_partitioning(
            xavier_uniform(in_axis=0, out_axis=(1, 2)), (axes.EMBED, axes.HEADS, axes.HEAD_DIM)
        ),
        (d, n, k),
    )
    w_kv = self.param(
        "kv",
        nn.with_logical_partitioning(
            xavier_uniform(in_axis=0, out_axis=(2, 3), batch_axis=(1,)),
            (axes.EMBED, None, axes.HEADS, axes.HEAD_DIM),
        ),
        (context_bsd.shape[-1], 2, n, k),
    )
    w_out = self.param(
        "out",
        nn.with_logical_partitioning(self.out_init, (axes.HEADS, axes.HEAD_DIM, axes.EMBED)),
        (n, k, d),
    )
    q = token_einsum("md,dnk->mnk", x_bld.astype(self.dtype), w_q.astype(self.dtype))
    kv = token_einsum("md,dpnk->mpnk", context_bsd.astype(self.dtype), w_kv.astype(self.dtype))
    q = _constrain_heads(q, axes.ACT_TOKENS)
    kk, v = (_constrain_heads(kv[:, :, i], axes.ACT_TEXT) for i in range(2))
    if self.qk_norm:
      q = RMSNorm(dtype=self.dtype, name="q_norm")(q)
      kk = RMSNorm(dtype=self.dtype, name="k_norm")(kk)
    if context_mask_bs.ndim == 3:
      o = dot_product_attention(q, kk, v, mask_bls=context_mask_bs, impl=self.attention_impl)
    else:
      o = dot_product_attention(q, kk, v, key_mask_bs=context_mask_bs, impl=self.attention_impl)
    return token_einsum("mnk,nkd->md", o, w_out.astype(self.dtype))


# ---------------------------------------------------------------------------------------------
# MLP and timestep embedding.
# ---------------------------------------------------------------------------------------------


class GatedMLP(nn.Module):
  """Gated MLP `W_out (act(x W_gate) * (x W_up))` (GLU variants, Shazeer 2020).

  Attributes:
    hidden: F.
    activation: "swiglu" (SiLU gate) or "geglu" (tanh-GELU gate).
    token_axis: logical activation axis of the sequence (ACT_TOKENS or ACT_TEXT).
    out_init: initialiser of the (F, D) output kernel.
    dtype: compute dtype.
  """

  hidden: int
  activation: str = "swiglu"
  token_axis: str = axes.ACT_TOKENS
  out_init: Callable = xavier_uniform()
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x_bld: jnp.ndarray) -> jnp.ndarray:
    """Args: x (B, L, D). Returns (B, L, D) in `dtype`."""
    if self.activation not in MLP_ACTIVATIONS:
      raise ValueError(f"mlp activation {self.activation!r} is unknown; choose {MLP_ACTIVATIONS}.")
    d, f = x_bld.shape[-1], self.hidden
    kernel = lambda name, init, shape, names: self.param(
        name, nn.with_logical_partitioning(init, names), shape
    ).astype(self.dtype)
    w_gate = kernel("gate", xavier_uniform(), (d, f), (axes.EMBED, axes.MLP))
    w_up = kernel("up", xavier_uniform(), (d, f), (axes.EMBED, axes.MLP))
    w_out = kernel("out", self.out_init, (f, d), (axes.MLP, axes.EMBED))
    x = x_bld.astype(self.dtype)
    act = nn.silu if self.activation == "swiglu" else lambda a: nn.gelu(a, approximate=True)
    h = act(token_einsum("md,df->mf", x, w_gate)) * token_einsum("md,df->mf", x, w_up)
    h = nn.with_logical_constraint(h, (axes.ACT_BATCH, self.token_axis, axes.ACT_MLP))
    return token_einsum("mf,fd->md", h, w_out)


def timestep_sinusoid(
    t: jnp.ndarray, dim: int, *, scale: float = 1000.0, max_period: float = 10_000.0
) -> jnp.ndarray:
  """Sinusoidal features of a continuous timestep (DDPM/DiT style, Vaswani et al. 2017 §3.5).

  Args:
    t: float timesteps of any shape (...), in [0, 1] for rectified flow.
    dim: even feature count.
    scale: t is multiplied by this first so that [0, 1] spans the usual 0..1000 range.
    max_period: longest wavelength.

  Returns:
    float32 (..., dim): [cos(t*s*f_i), sin(t*s*f_i)] with f_i = max_period^(-i / (dim/2)).
  """
  if dim % 2:
    raise ValueError(f"timestep feature dim {dim} must be even.")
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[..., None] * scale * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedding(nn.Module):
  """Sinusoidal features of t, then Linear -> SiLU -> Linear to width D (DiT, §3.2).

  Attributes:
    width: D.
    frequency_dim: number of sinusoidal features.
  """

  width: int
  frequency_dim: int = 256

  @nn.compact
  def __call__(self, t: jnp.ndarray) -> jnp.ndarray:
    """Args: t float (...) in [0, 1]. Returns float32 (..., D)."""
    h = timestep_sinusoid(t, self.frequency_dim)
    init = nn.initializers.normal(0.02)  # DiT initialises the timestep MLP with std 0.02.
    h = Linear(self.width, (None, axes.EMBED), init, name="fc1")(h)
    return Linear(self.width, (None, axes.EMBED), init, name="fc2")(nn.silu(h))
