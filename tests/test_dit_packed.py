"""The DiT's packed mode (NaViT rows) against the grid mode, and the packed train step."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spacetime_dit.config_types import DiffusionConfig
from spacetime_dit.models import dit, patchify, text
from spacetime_dit.training import state as state_lib
from spacetime_dit.training import steps

TEXT = text.TextEncoderConfig(vocab_size=64, max_length=8, width=32, depth=1, num_heads=2)
TINY = dit.DiTConfig(
    width=32, depth=2, num_heads=2, mlp_ratio=2.0, mlp_multiple_of=16, latent_channels=4,
    text=TEXT,
)
TOKENIZER = text.HashTokenizer(TEXT.vocab_size, TEXT.max_length)
PATCH = TINY.patch_size
# Two clips of different shapes and one empty slot, in a row of 18 tokens (4 padding).
SHAPES = ((2, 4, 4), (1, 4, 6))  # latent (T, H, W): 8 and 6 tokens with patch (1, 2, 2).
CAPTIONS = ("a red circle moving left", "a blue square moving up")
LENGTH, SLOTS = 18, 3
T_CLIP = (0.3, 0.7)


def _perturbed(variables, seed=1, scale=0.1):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda a: np.asarray(a) + scale * rng.normal(size=a.shape).astype(np.float32),
      nn.unbox(variables),
  )


def _pack(latents, captions, t_clip):
  """A one-row packed batch (the format of data_pipelines.packing) built by hand."""
  p = TINY.patch_dim
  tokens = np.zeros((1, LENGTH, p), np.float32)
  positions = np.zeros((1, LENGTH, 3), np.int32)
  segments = np.zeros((1, LENGTH), np.int32)
  t = np.zeros((1, LENGTH), np.float32)
  ids, mask = TOKENIZER([*captions] + [""] * (SLOTS - len(captions)))
  mask = np.asarray(mask).copy()
  mask[len(captions):] = False
  grid = np.zeros((1, SLOTS, 3), np.int32)
  start = 0
  for g, (latent, tc) in enumerate(zip(latents, t_clip)):
    x = np.asarray(patchify.patchify(jnp.asarray(latent[None]), PATCH))[0]
    n = len(x)
    gr = patchify.patch_grid(latent.shape[:3], PATCH)
    tokens[0, start:start + n] = x
    positions[0, start:start + n] = patchify.grid_positions(gr)
    segments[0, start:start + n] = g + 1
    t[0, start:start + n] = tc
    grid[0, g] = gr
    start += n
  return dict(
      tokens=tokens, positions=positions, segment_ids=segments, t=t, grid=grid,
      text_ids=np.asarray(ids, np.int32)[None], text_mask=mask[None],
  )


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  latents = [rng.normal(size=(*s, TINY.latent_channels)).astype(np.float32) for s in SHAPES]
  model = dit.DiT(TINY)
  ids, mask = TOKENIZER(CAPTIONS[:1])
  variables = model.init(
      jax.random.key(0), jnp.asarray(latents[0][None]), jnp.asarray([0.5]), jnp.asarray(ids),
      jnp.asarray(mask),
  )
  return model, _perturbed(variables), latents


def _grid_output(model, variables, latent, caption, t, drop=False):
  ids, mask = TOKENIZER([caption])
  out = model.apply(
      variables, jnp.asarray(latent[None]), jnp.asarray([t]), jnp.asarray(ids), jnp.asarray(mask),
      drop_text_b=jnp.asarray([drop]),
  )
  return np.asarray(patchify.patchify(out, PATCH))[0]


def _packed_output(model, variables, batch, drop=None):
  return np.asarray(model.apply(
      variables, jnp.asarray(batch["tokens"]), jnp.asarray(batch["t"]),
      jnp.asarray(batch["text_ids"]), jnp.asarray(batch["text_mask"]),
      drop_text_b=None if drop is None else jnp.asarray(drop),
      segment_ids=jnp.asarray(batch["segment_ids"]), positions=jnp.asarray(batch["positions"]),
  ))[0]


@pytest.mark.parametrize("drop", [None, (True, False, False)])
def test_packed_row_equals_each_clip_alone(setup, drop):
  """Every clip of a packed row gets exactly the output it gets alone in grid mode."""
  model, variables, latents = setup
  batch = _pack(latents, CAPTIONS, T_CLIP)
  out = _packed_output(model, variables, batch, None if drop is None else np.asarray([drop]))
  start = 0
  for g, latent in enumerate(latents):
    alone = _grid_output(
        model, variables, latent, CAPTIONS[g], T_CLIP[g], drop=bool(drop and drop[g])
    )
    np.testing.assert_allclose(out[start:start + len(alone)], alone, atol=2e-5, rtol=1e-4)
    start += len(alone)


def test_padding_and_neighbours_do_not_leak(setup):
  """Changing one clip's tokens or the padding leaves the other clip's output unchanged."""
  model, variables, latents = setup
  batch = _pack(latents, CAPTIONS, T_CLIP)
  base = _packed_output(model, variables, batch)
  changed = dict(batch, tokens=batch["tokens"].copy())
  changed["tokens"][0, 8:] += 5.0  # the second clip and the padding
  out = _packed_output(model, variables, changed)
  np.testing.assert_allclose(out[:8], base[:8], atol=1e-6)
  assert np.abs(out[8:14] - base[8:14]).max() > 1e-3  # the second clip itself did change


def test_packed_step_ignores_padding_and_trains(setup):
  """The packed step's loss and gradients do not depend on padding tokens; loss is finite."""
  model, variables, latents = setup
  batch = _pack(latents, CAPTIONS, T_CLIP)
  batch.pop("t")
  tx = optax.sgd(1.0)
  schedule = optax.constant_schedule(1.0)
  frozen = {"latent_mean": jnp.zeros((4,)), "latent_std": jnp.ones((4,))}
  step = jax.jit(functools.partial(
      steps.dit_packed_step, model=model, diffusion=DiffusionConfig(), tx=tx, schedule=schedule))

  def run(b):
    state = state_lib.TrainState(
        step=jnp.asarray(0, jnp.int32), params=variables["params"],
        opt_state=tx.init(variables["params"]), rng=jax.random.key(3))
    new, metrics = step(state, {k: jnp.asarray(v) for k, v in b.items()}, frozen)
    return new, metrics

  new_a, metrics_a = run(batch)
  noisy = dict(batch, tokens=batch["tokens"].copy())
  noisy["tokens"][0, 14:] = 100.0  # padding only
  new_b, metrics_b = run(noisy)
  assert np.isfinite(float(metrics_a["loss"]))
  np.testing.assert_allclose(float(metrics_a["loss"]), float(metrics_b["loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(metrics_a["token_fill"]), 14 / 18, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(new_a.params), jax.tree.leaves(new_b.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_packed_timesteps_shift_per_clip():
  """A clip with 4x the tokens gets shift 2x (SD3 §5.3.2), slot by slot."""
  diffusion = DiffusionConfig(timestep_distribution="uniform", shift_base_tokens=16, base_shift=1.0)
  grid = jnp.asarray([[[1, 4, 4], [1, 8, 8], [0, 0, 0]]], jnp.int32)
  t = np.asarray(steps.packed_timesteps(jax.random.key(0), grid, diffusion))
  u = np.asarray(jax.random.uniform(jax.random.key(0), (1, 3)))
  expect = lambda s, x: s * x / (1 + (s - 1) * x)
  np.testing.assert_allclose(t[0, 0], expect(1.0, u[0, 0]), rtol=1e-5)
  np.testing.assert_allclose(t[0, 1], expect(2.0, u[0, 1]), rtol=1e-5)


def test_packed_input_errors_name_the_shapes(setup):
  model, variables, latents = setup
  batch = _pack(latents, CAPTIONS, T_CLIP)
  with pytest.raises(ValueError, match="segment_ids"):
    model.apply(
        variables, jnp.asarray(batch["tokens"]), jnp.asarray(batch["t"]),
        jnp.asarray(batch["text_ids"]), jnp.asarray(batch["text_mask"]),
        segment_ids=jnp.zeros((1, 5), jnp.int32), positions=jnp.asarray(batch["positions"]),
    )
