"""Diffusion transformer over spacetime patches (v0).

Data flow for a latent x (B,T,H,W,C), timesteps t (B,) or (B,L), and text ids (B,S) or frozen
text features (B,S,E) with their mask (B,S) (see `models.text` for the text interface):

  patchify -> linear patch embedding -> x (B,L,D), 3D patch positions (L,3)
  text encoder (ids) or frozen features -> tokens (B,S,E), pooled (B,E) (masked mean for
  features); caption dropout swaps in a learned null text
  c = TimestepMLP(sinusoid(1000 t)) + PooledMLP(pooled)       (B,1,D) or per token (B,L,D)
  shared modulation m = Linear(SiLU(c)) -> (B,L|1,6,D)         computed once for all blocks
  depth x block: adaLN-Zero self-attention (QK-norm, 3D rope), cross-attention to text,
                 adaLN-Zero gated MLP
  final: LayerNorm, shift/scale from (table + c), zero-initialised Linear(D -> P), unpatchify

The block design follows DiT (Peebles & Xie 2023) with PixArt-alpha's "adaLN-single"
(Chen et al. 2023, §2.3): one projection of the conditioning to the six modulation vectors is
shared by every block, and each block only adds its own learned (6, D) table. That keeps
per-token timesteps (diffusion forcing, per-frame noise) cheap: the (B,L,6D) modulation is
computed once instead of once per block. Tables and the shared projection start at zero, so every
gate is zero and every block is the identity at initialisation (adaLN-Zero).

The output has the latent's shape; whether it is a velocity or a clean latent is decided by
`spacetime_dit.diffusion`, not here.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from spacetime_dit.models import layers
from spacetime_dit.models import patchify as patchify_lib
from spacetime_dit.models import text as text_lib
from spacetime_dit.sharding import axes

DTYPES = ("float32", "bfloat16")

# What each block keeps for the backward pass (`jax.checkpoint` policies,
# https://docs.jax.dev/en/latest/gradient-checkpointing.html):
#   "none": no remat; every intermediate is stored (fastest, most memory).
#   "full": only the block input is stored; the whole block is recomputed in the backward pass
#     (about +1/3 FLOPs per step; activation memory is one (B, L, D) per block).
#   "dots": matmul outputs are stored, elementwise work (norms, rope, activations) is recomputed.
#     Attention logits are a (batched) matmul too, so they are stored: memory grows as L^2.
#   "dots_no_batch": only matmuls without batch dimensions are stored, i.e. the projections of
#     tokens by weights; attention's (B, N, L, S) logits are recomputed, so memory stays linear in
#     L while the expensive projections are not redone (the usual LLM setting, cf. MaxText's
#     "minimal" / Megatron's selective recomputation, Korthikanti et al. 2022).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_LAYOUTS = ("full", "factorised")
SEQUENCE_PARALLEL = ("none", "ulysses", "ring")


def checkpoint_policy(name: str):
  """The `jax.checkpoint` policy of a `DiTConfig.remat_policy` other than "none" (None = full)."""
  return {
      "full": None,
      "dots": jax.checkpoint_policies.dots_saveable,
      "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  }[name]


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  """Diffusion transformer hyper-parameters. Defaults are the tiny CPU model."""

  width: int = 128  # D: residual stream width.
  depth: int = 4  # number of transformer blocks.
  num_heads: int = 4  # N: attention heads; head dim K = width / num_heads must be even, >= 6.
  mlp_ratio: float = 4.0  # gated-MLP width F ~= mlp_ratio * D (8/3 has a 4x GELU MLP's params).
  mlp_multiple_of: int = 64  # F is rounded up to a multiple of this (even tensor-parallel splits).
  mlp_activation: str = "swiglu"  # "swiglu" or "geglu".
  patch_size: tuple[int, int, int] = (1, 2, 2)  # (pt, ph, pw) latent voxels per token.
  latent_channels: int = 8  # C of the autoencoder latent.
  text: text_lib.TextEncoderConfig = text_lib.TextEncoderConfig()  # jointly trained text encoder.
  qk_norm: bool = True  # RMS-normalise queries and keys (SD3 §5.3.2): stable logits at scale.
  rope_theta: float = 10_000.0  # base wavelength of the 3D rotary embedding.
  timestep_frequency_dim: int = 256  # sinusoidal features of t before the timestep MLP.
  attention_impl: str = "xla"  # see layers.ATTENTION_IMPLS.
  dtype: str = "float32"  # compute dtype ("float32" or "bfloat16"); params are always float32.
  remat_policy: str = "none"  # what each block stores for the backward pass; REMAT_POLICIES.
  remat: bool = False  # deprecated: True means remat_policy="full" (when that is left "none").
  # "full": one spacetime self-attention over all L tokens; "factorised": spatial attention
  # within each latent frame, then temporal attention across frames (grid mode only).
  attention_layout: str = "full"
  # Self-attention over tokens split along the mesh axis `sequence` (models/sequence_parallel.py):
  # "none" (GSPMD decides), "ulysses" (all-to-all to heads split; num_heads must be a multiple
  # of tensor x sequence) or "ring" (key/value blocks passed around the ring; any num_heads).
  # Ulysses and ring are no-ops off-mesh or with a sequence axis of size 1.
  sequence_parallel: str = "none"
  scan_blocks: bool = False  # nn.scan over blocks: one compiled block, params stacked on axis 0.

  def __post_init__(self):
    for name in ("width", "depth", "num_heads", "latent_channels", "mlp_multiple_of"):
      if getattr(self, name) < 1:
        raise ValueError(f"DiTConfig.{name}={getattr(self, name)} must be >= 1.")
    if self.width % self.num_heads:
      raise ValueError(
          f"DiTConfig.width={self.width} must be divisible by num_heads={self.num_heads}; "
          f"e.g. width={self.num_heads * max(1, round(self.width / self.num_heads))}."
      )
    layers.rope_axes_dims(self.head_dim)  # raises when K is odd or < 6.
    if self.mlp_ratio <= 0:
      raise ValueError(f"DiTConfig.mlp_ratio={self.mlp_ratio} must be > 0.")
    if self.mlp_activation not in layers.MLP_ACTIVATIONS:
      raise ValueError(
          f"DiTConfig.mlp_activation={self.mlp_activation!r}; "
          f"choose one of {layers.MLP_ACTIVATIONS}."
      )
    if len(self.patch_size) != 3 or any(int(p) != p or p < 1 for p in self.patch_size):
      raise ValueError(
          f"DiTConfig.patch_size={self.patch_size} must be 3 positive ints (pt, ph, pw)."
      )
    # Configs built from ml_collections may hold lists; a tuple keeps the config hashable.
    object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
    if self.attention_impl not in layers.ATTENTION_IMPLS:
      raise ValueError(
          f"DiTConfig.attention_impl={self.attention_impl!r}; "
          f"choose one of {layers.ATTENTION_IMPLS}."
      )
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(
          f"DiTConfig.remat_policy={self.remat_policy!r}; choose one of {REMAT_POLICIES}."
      )
    if self.remat and self.remat_policy == "none":
      # The old boolean keeps working: configs and checkpoints written before remat_policy.
      object.__setattr__(self, "remat_policy", "full")
    if self.attention_layout not in ATTENTION_LAYOUTS:
      raise ValueError(
          f"DiTConfig.attention_layout={self.attention_layout!r}; "
          f"choose one of {ATTENTION_LAYOUTS}."
      )
    if self.sequence_parallel not in SEQUENCE_PARALLEL:
      raise ValueError(
          f"DiTConfig.sequence_parallel={self.sequence_parallel!r}; "
          f"choose one of {SEQUENCE_PARALLEL}."
      )
    if self.sequence_parallel != "none" and self.attention_layout != "full":
      raise ValueError(
          f"DiTConfig.sequence_parallel={self.sequence_parallel!r} needs attention_layout='full'"
          f" (got {self.attention_layout!r}); use sequence_parallel='none' for the factorised"
          " layout."
      )
    if self.dtype not in DTYPES:
      raise ValueError(f"DiTConfig.dtype={self.dtype!r}; choose one of {DTYPES}.")
    if self.rope_theta <= 1:
      raise ValueError(f"DiTConfig.rope_theta={self.rope_theta} must be > 1.")
    if self.timestep_frequency_dim < 2 or self.timestep_frequency_dim % 2:
      raise ValueError(
          f"DiTConfig.timestep_frequency_dim={self.timestep_frequency_dim} must be even and >= 2."
      )

  @property
  def head_dim(self) -> int:
    """K."""
    return self.width // self.num_heads

  @property
  def mlp_hidden(self) -> int:
    """F: mlp_ratio * width rounded up to a multiple of mlp_multiple_of."""
    m = self.mlp_multiple_of
    return m * math.ceil(round(self.mlp_ratio * self.width) / m)

  @property
  def patch_dim(self) -> int:
    """P = pt * ph * pw * C."""
    return math.prod(self.patch_size) * self.latent_channels


def num_tokens(config: DiTConfig, latent_thw: tuple[int, int, int]) -> int:
  """L for a latent of (T, H, W); raises ValueError when the patch does not divide it."""
  return math.prod(patchify_lib.patch_grid(latent_thw, config.patch_size))


def count_params(params) -> int:
  """Number of parameters in a (possibly boxed or abstract) parameter tree."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(params)))


def _constrain_residual(x_bld: jnp.ndarray) -> jnp.ndarray:
  return nn.with_logical_constraint(x_bld, (axes.ACT_BATCH, axes.ACT_TOKENS, axes.ACT_EMBED))


class DiTBlock(nn.Module):
  """adaLN-Zero transformer block: self-attention, cross-attention, gated MLP.

  Attributes:
    config: DiTConfig.
  """

  config: DiTConfig
  grid: tuple[int, int, int] | None = None  # (T', H', W') token grid; factorised layout only.

  def _attention(self, name, x_bld, positions):
    cfg = self.config
    return layers.SelfAttention(
        cfg.num_heads,
        cfg.head_dim,
        qk_norm=cfg.qk_norm,
        rope_theta=cfg.rope_theta,
        attention_impl=cfg.attention_impl,
        dtype=cfg.dtype,
        name=name,
    )(x_bld, positions)

  def _factorised_attention(self, h_bld, x_bld, shift, scale, gate):
    """Spatial attention within each frame, then temporal attention across frames.

    The STDiT block of Open-Sora 1.0 (hpcaitech/Open-Sora, opensora/models/stdit/stdit.py) and
    Latte's spatial/temporal split (Ma et al. 2024): a (T'H'W')^2 attention becomes
    T' (H'W')^2 + H'W' T'^2. Both residual updates share the block's attention shift, scale and
    gate, as STDiT's do; unlike STDiT the temporal step reads a normalised, modulated residual
    (its input is otherwise the raw stream), so both attention inputs have unit scale.

    Rope: tokens of one frame share t, so the spatial step's scores depend on (h, w) offsets
    only; the temporal step rotates by t alone (its h, w coordinates are 0).

    Args:
      h_bld: the modulated, normalised residual (B, L, D), tokens in t-major order.
      x_bld: float32 residual stream (B, L, D).
      shift, scale, gate: the attention modulation (B, 1|L, D).

    Returns:
      The residual after both steps, float32 (B, L, D).
    """
    gt, gh, gw = self.grid
    b, length, d = x_bld.shape
    s = gh * gw
    spatial = self._attention(
        "spatial_attn", h_bld.reshape(b * gt, s, d), patchify_lib.grid_positions((1, gh, gw))
    )
    x_bld = x_bld + gate * spatial.reshape(b, length, d).astype(jnp.float32)
    h = layers.modulate(layers.layer_norm(x_bld), shift, scale)
    h_bsd = h.reshape(b, gt, s, d).transpose(0, 2, 1, 3).reshape(b * s, gt, d)
    temporal = self._attention("temporal_attn", h_bsd, patchify_lib.grid_positions((gt, 1, 1)))
    temporal = temporal.reshape(b, s, gt, d).transpose(0, 2, 1, 3).reshape(b, length, d)
    return x_bld + gate * temporal.astype(jnp.float32)

  @nn.compact
  def __call__(self, x_bld, mod_bl6d, text_bsd, text_mask_bs, positions, self_segment_ids_bl=None):
    """Applies the block.

    Args:
      x_bld: float32 residual stream (B, L, D).
      mod_bl6d: float32 shared modulation (B, L, 6, D) or (B, 1, 6, D).
      text_bsd: text tokens projected to width D (B, S, D).
      text_mask_bs: bool (B, S), or (B, L, S) per token for packed rows.
      positions: int (L, 3) or (B, L, 3) patch coordinates for rope.
      self_segment_ids_bl: optional int (B, L) segment ids of packed rows: a token attends only
        to the tokens of its own clip.

    Returns:
      float32 (B, L, D).
    """
    cfg = self.config
    zeros = nn.initializers.zeros
    table = self.param(
        "modulation",
        nn.with_logical_partitioning(zeros, (axes.MODULATION, axes.EMBED)),
        (6, cfg.width),
    )
    mod = mod_bl6d + table
    shift_attn, scale_attn, gate_attn = mod[:, :, 0], mod[:, :, 1], mod[:, :, 2]
    shift_mlp, scale_mlp, gate_mlp = mod[:, :, 3], mod[:, :, 4], mod[:, :, 5]

    h = layers.modulate(layers.layer_norm(x_bld), shift_attn, scale_attn)
    if cfg.attention_layout == "factorised":
      if self.grid is None or self_segment_ids_bl is not None:
        raise ValueError(
            "DiTConfig.attention_layout='factorised' needs the token grid of grid mode; packed"
            " rows (segment ids) have none. Use attention_layout='full' with packing."
        )
      x_bld = self._factorised_attention(h, x_bld, shift_attn, scale_attn, gate_attn)
    else:
      h = layers.SelfAttention(
          cfg.num_heads,
          cfg.head_dim,
          qk_norm=cfg.qk_norm,
          rope_theta=cfg.rope_theta,
          attention_impl=cfg.attention_impl,
          sequence_parallel=cfg.sequence_parallel,
          dtype=cfg.dtype,
          name="self_attn",
      )(h, positions, segment_ids_bl=self_segment_ids_bl)
      x_bld = x_bld + gate_attn * h.astype(jnp.float32)

    # Cross-attention is not modulated (PixArt-alpha); its zero output projection keeps the
    # block the identity at initialisation.
    h = layers.CrossAttention(
        cfg.num_heads,
        cfg.head_dim,
        qk_norm=cfg.qk_norm,
        attention_impl=cfg.attention_impl,
        out_init=zeros,
        dtype=cfg.dtype,
        name="cross_attn",
    )(layers.layer_norm(x_bld), text_bsd, text_mask_bs)
    x_bld = x_bld + h.astype(jnp.float32)

    h = layers.modulate(layers.layer_norm(x_bld), shift_mlp, scale_mlp)
    h = layers.GatedMLP(cfg.mlp_hidden, cfg.mlp_activation, dtype=cfg.dtype, name="mlp")(h)
    x_bld = x_bld + gate_mlp * h.astype(jnp.float32)
    return _constrain_residual(x_bld)


def block_class(config: DiTConfig, *, in_scan: bool = False) -> type[nn.Module]:
  """DiTBlock, wrapped in `nn.remat` with the config's policy unless it is "none".

  Inside `nn.scan` CSE cannot merge the recomputation with the forward pass across iterations,
  so `prevent_cse=False` is safe there and lets XLA optimise the block freely (JAX's
  `jax.checkpoint` docs recommend it under scan).
  """
  if config.remat_policy == "none":
    return DiTBlock
  return nn.remat(
      DiTBlock, policy=checkpoint_policy(config.remat_policy), prevent_cse=not in_scan
  )


class _ScannedBlock(nn.Module):
  """DiTBlock in nn.scan's (carry, inputs) -> (carry, outputs) form."""

  config: DiTConfig
  grid: tuple[int, int, int] | None = None

  @nn.compact
  def __call__(self, x_bld, mod_bl6d, text_bsd, text_mask_bs, positions, segment_ids_bl):
    block = block_class(self.config, in_scan=True)
    x_bld = block(self.config, self.grid, name="block")(
        x_bld, mod_bl6d, text_bsd, text_mask_bs, positions, segment_ids_bl
    )
    return x_bld, None


class DiT(nn.Module):
  """Text-conditioned diffusion transformer over spacetime latent patches.

  Attributes:
    config: DiTConfig.
  """

  config: DiTConfig

  def _check_text(self, text, text_mask, lead):
    """`text` must be what the configured encoder takes: ids (*lead, S) or features (*lead, S, E)."""
    tcfg = self.config.text
    s = tcfg.max_length
    if tcfg.frozen:
      want, kind = (*lead, s, tcfg.feature_width), f"float features of the frozen {tcfg.encoder!r} encoder"
      fix = f"pass what text_lib.make_front_end(config.text) returns ({tcfg.encoder} features)"
    else:
      want, kind = (*lead, s), "int token ids of HashTokenizer"
      fix = ("pass HashTokenizer ids, or set DiTConfig.text.encoder (config.model.text.encoder) to"
             " the frozen encoder that made the features")
    if text_lib.is_features(text) != tcfg.frozen or tuple(text.shape) != want:
      raise ValueError(
          f"DiT text input is {text.dtype} {tuple(text.shape)}; text.encoder={tcfg.encoder!r} needs"
          f" {kind} of shape {want} (S = text.max_length): {fix}."
      )
    if tuple(text_mask.shape) != want[: len(lead) + 1]:
      raise ValueError(f"text mask has shape {tuple(text_mask.shape)}; it must be {want[:len(lead) + 1]}.")

  def _check_inputs(self, x_bthwc, t, text_bs, text_mask_bs, drop_text_b):
    cfg = self.config
    if x_bthwc.ndim != 5 or x_bthwc.shape[-1] != cfg.latent_channels:
      raise ValueError(
          f"DiT input has shape {x_bthwc.shape}; it needs a latent (B, T, H, W, "
          f"{cfg.latent_channels}) (DiTConfig.latent_channels={cfg.latent_channels})."
      )
    b, *thw, _ = x_bthwc.shape
    grid = patchify_lib.patch_grid(tuple(thw), cfg.patch_size)
    length = math.prod(grid)
    if t.shape not in ((b,), (b, length)):
      raise ValueError(
          f"timesteps t have shape {t.shape}; the DiT needs (B,)=({b},) or per token "
          f"(B, L)=({b}, {length}) for a latent of (T, H, W)={tuple(thw)} "
          f"with patch {cfg.patch_size}."
      )
    self._check_text(text_bs, text_mask_bs, (b,))
    if drop_text_b is not None and drop_text_b.shape != (b,):
      raise ValueError(f"drop_text_b has shape {drop_text_b.shape}; it must be bool (B,)=({b},).")
    return grid

  def _text(self, text_bs, text_mask_bs, drop_text_b):
    """Encodes text, applies caption dropout; returns tokens (B,S,D), mask, pooled (B,1,D).

    `text_bs` is int ids (B, S) for the trainable encoder, or a frozen encoder's float features
    (B, S, E), used as they are (no gradient reaches them); the pooled vector is then their masked
    mean, the sentence embedding such encoders are trained to give (Reimers & Gurevych 2019).
    """
    cfg = self.config
    mask_bs = text_mask_bs.astype(bool)
    if text_lib.is_features(text_bs):
      tokens_bse = jax.lax.stop_gradient(text_bs.astype(jnp.float32))
      tokens_bse = nn.with_logical_constraint(tokens_bse, (axes.ACT_BATCH, axes.ACT_TEXT, axes.ACT_EMBED))
      pooled_be = text_lib.masked_mean(tokens_bse, mask_bs)
    else:
      tokens_bse, pooled_be = text_lib.TextEncoder(cfg.text, dtype=cfg.dtype, name="text_encoder")(
          text_bs, text_mask_bs
      )
    # Learned "null caption" for classifier-free guidance (Ho & Salimans 2022): the dropped
    # condition is a trained sequence with every position valid, not an empty (all-masked) one.
    init = nn.initializers.normal(0.02)
    null_tokens = self.param(
        "null_text_tokens",
        nn.with_logical_partitioning(init, (None, axes.EMBED)),
        (cfg.text.max_length, cfg.text.feature_width),
    )
    null_pooled = self.param(
        "null_text_pooled", nn.with_logical_partitioning(init, (axes.EMBED,)), (cfg.text.feature_width,)
    )
    if drop_text_b is not None:
      drop = drop_text_b.astype(bool)
      tokens_bse = jnp.where(drop[:, None, None], null_tokens[None], tokens_bse)
      mask_bs = jnp.where(drop[:, None], True, mask_bs)
      pooled_be = jnp.where(drop[:, None], null_pooled[None], pooled_be)

    # Caption projection E -> D (PixArt-alpha): Linear, tanh-GELU, Linear.
    linear = lambda name, dtype=cfg.dtype: layers.Linear(
        cfg.width, (None, axes.EMBED), dtype=dtype, name=name
    )
    h = linear("text_proj_1")(tokens_bse)
    text_bsd = linear("text_proj_2")(nn.gelu(h, approximate=True))
    text_bsd = nn.with_logical_constraint(text_bsd, (axes.ACT_BATCH, axes.ACT_TEXT, axes.ACT_EMBED))
    h = linear("pooled_proj_1", "float32")(pooled_be)
    pooled_bd = linear("pooled_proj_2", "float32")(nn.silu(h))
    return text_bsd, mask_bs, pooled_bd[:, None, :]

  def _check_packed(self, x_blp, t, text_bgs, text_mask_bgs, drop_text_bg, positions,
                    segment_ids_bl):
    cfg = self.config
    if x_blp.ndim != 3 or x_blp.shape[-1] != cfg.patch_dim:
      raise ValueError(
          f"packed DiT input has shape {x_blp.shape}; it needs patch tokens (B, L, P={cfg.patch_dim})"
          f" (patch {cfg.patch_size} x {cfg.latent_channels} latent channels)."
      )
    b, length, _ = x_blp.shape
    for name, value, shape in (
        ("segment_ids", segment_ids_bl, (b, length)),
        ("positions", positions, (b, length, 3)),
        ("t", t, (b, length)),
    ):
      if value is None or tuple(value.shape) != shape:
        got = None if value is None else tuple(value.shape)
        raise ValueError(
            f"packed DiT input: {name} has shape {got}; it must be {shape} for tokens "
            f"{tuple(x_blp.shape)} (per-token values; see data_pipelines.packing)."
        )
    if text_bgs.ndim < 3 or text_bgs.shape[0] != b:
      raise ValueError(
          f"packed DiT input: text {tuple(text_bgs.shape)} must be (B={b}, G, S) ids or"
          f" (B={b}, G, S, E) features: one caption per clip slot of the row."
      )
    self._check_text(text_bgs, text_mask_bgs, tuple(text_bgs.shape[:2]))
    if drop_text_bg is not None and drop_text_bg.shape != text_bgs.shape[:2]:
      raise ValueError(
          f"drop_text has shape {drop_text_bg.shape}; in packed mode it must be (B, G)="
          f"{text_bgs.shape[:2]}."
      )

  def _conditioning(self, t, pooled_b1d_or_bld):
    """c = TimestepMLP(t) + pooled text, (B, 1|L, D); then the shared modulation (B, 1|L, 6, D)."""
    cfg = self.config
    temb = layers.TimestepEmbedding(cfg.width, cfg.timestep_frequency_dim, name="t_embed")(t)
    c = (temb[:, None, :] if t.ndim == 1 else temb) + pooled_b1d_or_bld
    w_mod = self.param(
        "shared_modulation",
        nn.with_logical_partitioning(nn.initializers.zeros, (axes.EMBED, axes.MODULATION, None)),
        (cfg.width, 6, cfg.width),
    )
    return c, layers.token_einsum("md,dco->mco", nn.silu(c), w_mod)

  def _trunk(self, x_blp, c, mod_bl6d, text_bsd, text_mask, positions, segment_ids_bl, grid=None):
    """Patch embedding, the blocks and the final layer: tokens (B, L, P) -> (B, L, P).

    `grid` (T', H', W') is the token grid in grid mode (None for packed rows).
    """
    cfg = self.config
    x_bld = layers.Linear(
        cfg.width, (axes.PATCH, axes.EMBED), dtype=cfg.dtype, name="patch_embed"
    )(x_blp)
    x_bld = _constrain_residual(x_bld.astype(jnp.float32))
    if cfg.scan_blocks:
      x_bld, _ = nn.scan(
          _ScannedBlock,
          variable_axes={"params": 0},
          split_rngs={"params": True},
          in_axes=(nn.broadcast,) * 5,
          length=cfg.depth,
          metadata_params={nn.PARTITION_NAME: None},
      )(cfg, grid, name="blocks")(x_bld, mod_bl6d, text_bsd, text_mask, positions, segment_ids_bl)
    else:
      block_cls = block_class(cfg)
      for i in range(cfg.depth):
        block = block_cls(cfg, grid, name=f"block_{i}")
        x_bld = block(x_bld, mod_bl6d, text_bsd, text_mask, positions, segment_ids_bl)

    # Final layer (PixArt-alpha T2IFinalLayer): shift/scale = learned table + c, no gate; the
    # zero-initialised projection makes the initial output exactly zero (DiT §3.2).
    final_table = self.param(
        "final_modulation",
        nn.with_logical_partitioning(nn.initializers.zeros, (axes.MODULATION, axes.EMBED)),
        (2, cfg.width),
    )
    shift, scale = final_table[0] + c, final_table[1] + c
    h = layers.modulate(layers.layer_norm(x_bld), shift, scale)
    out_blp = layers.Linear(
        cfg.patch_dim,
        (axes.EMBED, axes.PATCH),
        kernel_init=nn.initializers.zeros,
        dtype=cfg.dtype,
        name="final_proj",
    )(h)
    return out_blp.astype(jnp.float32)

  @nn.compact
  def __call__(self, x, t, text, text_mask, *, drop_text_b=None, segment_ids=None,
               positions=None):
    """Predicts the denoiser output for a noisy latent, or for a packed row of clips.

    Grid mode (`segment_ids` is None):
      x: noisy latent (B, T, H, W, C); T, H, W divisible by the patch size.
      t: float timesteps in [0, 1], shape (B,) or per token (B, L).
      text, text_mask: what the text front end (`text_lib.make_front_end`) returns: int token
        ids (B, S) for encoder "trainable", float features (B, S, E) of a frozen encoder; bool
        mask (B, S), True at real tokens.
      drop_text_b: optional bool (B,); True uses the learned null text (classifier-free guidance).
      Returns float32 (B, T, H, W, C).

    Packed mode (NaViT, Dehghani et al. 2023; the batch of `data_pipelines.packing`): several
    clips of different shapes share one row of L tokens; every token attends only to the
    tokens and the caption of its own clip, so one compiled program serves every mix of shapes.
      x: patch tokens (B, L, P), P ordered (pt, ph, pw, C) as `patchify` makes them.
      t: per-token timesteps (B, L) (each clip's own t, gathered by the caller).
      text, text_mask: ids (B, G, S) or features (B, G, S, E), mask (B, G, S): one caption per
        clip slot g = segment id - 1.
      drop_text_b: optional bool (B, G) per slot.
      segment_ids: int (B, L), 1..G per clip, 0 at padding.
      positions: int (B, L, 3), each token's (t, h, w) patch coordinate within its clip.
      Returns float32 (B, L, P); padding tokens carry garbage that the loss must mask out.
    """
    if segment_ids is not None:
      return self._packed(x, t, text, text_mask, drop_text_b, positions, segment_ids)
    cfg = self.config
    t = jnp.asarray(t, jnp.float32)
    grid = self._check_inputs(x, t, text, text_mask, drop_text_b)
    x_blp = patchify_lib.patchify(x.astype(jnp.float32), cfg.patch_size)
    text_bsd, text_mask_bs, pooled_b1d = self._text(text, text_mask, drop_text_b)
    c, mod_bl6d = self._conditioning(t, pooled_b1d)
    out_blp = self._trunk(
        x_blp, c, mod_bl6d, text_bsd, text_mask_bs, patchify_lib.grid_positions(grid), None,
        tuple(grid),
    )
    return patchify_lib.unpatchify(out_blp, grid, cfg.patch_size, cfg.latent_channels)

  def _packed(self, x_blp, t, text_bgs, text_mask_bgs, drop_text_bg, positions,
              segment_ids_bl):
    """Packed mode of `__call__` (see there)."""
    if self.config.attention_layout != "full":
      raise ValueError(
          f"DiTConfig.attention_layout={self.config.attention_layout!r} needs the (T, H, W) token"
          " grid of grid mode; a packed row (segment_ids given) mixes clips of different grids."
          " Use attention_layout='full' with packing (data.packing=True)."
      )
    t = jnp.asarray(t, jnp.float32)
    self._check_packed(x_blp, t, text_bgs, text_mask_bgs, drop_text_bg, positions,
                       segment_ids_bl)
    b, g, s = text_bgs.shape[:3]
    drop = None if drop_text_bg is None else drop_text_bg.reshape(b * g)
    text_bsd, mask_bs, pooled_b1d = self._text(
        text_bgs.reshape(b * g, *text_bgs.shape[2:]), text_mask_bgs.reshape(b * g, s), drop
    )
    # Slot g's caption occupies text positions [g*S, (g+1)*S) of the row; token of segment id
    # g+1 sees exactly those (and their mask). An empty slot's caption is never seen.
    text_bsd = text_bsd.reshape(b, g * s, -1)
    text_segment_bs = jnp.repeat(jnp.arange(1, g + 1, dtype=jnp.int32), s)[None, :]
    segment_ids_bl = segment_ids_bl.astype(jnp.int32)
    cross_mask_bls = (segment_ids_bl[:, :, None] == text_segment_bs[:, None, :]) & mask_bs.reshape(
        b, 1, g * s
    )
    # Each token's pooled caption vector is its slot's; padding takes slot 0's (never used).
    slot_bl = jnp.clip(segment_ids_bl - 1, 0, g - 1)
    pooled_bld = jnp.take_along_axis(pooled_b1d.reshape(b, g, -1), slot_bl[:, :, None], axis=1)
    c, mod_bl6d = self._conditioning(t, pooled_bld)
    return self._trunk(
        x_blp.astype(jnp.float32), c, mod_bl6d, text_bsd, cross_mask_bls, positions, segment_ids_bl
    )
