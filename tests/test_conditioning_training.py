"""Conditioning in the DiT train steps: given frames are clean at t = 0 with no loss, text-only
reproduces the unconditioned step bit for bit, packed slots follow their own frame counts, and
tiny runs train with the default mixture in grid and packed mode."""

import functools
import json
import math
import os
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import base as base_experiment
from spacetime_dit import conditioning as cond
from spacetime_dit.config_types import DiffusionConfig
from spacetime_dit.diffusion import flow
from spacetime_dit.models import dit, patchify, text
from spacetime_dit.training import stages
from spacetime_dit.training import state as state_lib
from spacetime_dit.training import steps

TEXT = text.TextEncoderConfig(vocab_size=64, max_length=8, width=32, depth=1, num_heads=2)
TOKENIZER = text.HashTokenizer(TEXT.vocab_size, TEXT.max_length)
C = 4
FROZEN = {"latent_mean": jnp.zeros((C,)), "latent_std": jnp.ones((C,))}
DIFFUSION = DiffusionConfig(prediction="x0", shift_base_tokens=16)


def _state(params, tx):
  return state_lib.TrainState(step=jnp.asarray(5, jnp.int32), params=params,
                              opt_state=tx.init(params), rng=jax.random.key(3))


def _grid_batch(b=3, t=4, h=4, w=4):
  rng = np.random.default_rng(0)
  ids, mask = TOKENIZER(["a red circle moving left", "a blue square moving up", ""][:b])
  return {"latent": jnp.asarray(rng.normal(size=(b, t, h, w, C)).astype(np.float32)),
          "text_ids": jnp.asarray(ids), "text_mask": jnp.asarray(mask)}


def _old_dit_step(state, batch, frozen, *, model, patch_size, diffusion, tx, schedule):
  """`steps.dit_step` as it was before conditioning (git d04d061), for the bit-for-bit check."""
  rng = jax.random.fold_in(state.rng, state.step)
  rng_t, rng_noise, rng_drop = jax.random.split(rng, 3)
  x0 = jax.lax.stop_gradient((batch["latent"] - frozen["latent_mean"]) / frozen["latent_std"])
  batch_size = x0.shape[0]
  num_tokens = math.prod(n // p for n, p in zip(x0.shape[1:4], patch_size))
  shift = flow.resolution_shift(num_tokens, diffusion.shift_base_tokens, diffusion.base_shift)
  t = flow.sample_timesteps(rng_t, (batch_size,), distribution=diffusion.timestep_distribution,
                            mean=diffusion.logit_mean, std=diffusion.logit_std, shift=shift)
  noise = jax.random.normal(rng_noise, x0.shape, x0.dtype)
  x_t = flow.interpolate(x0, noise, t)
  drop_text = jax.random.uniform(rng_drop, (batch_size,)) < diffusion.caption_dropout
  target = flow.velocity_target(x0, noise)

  def loss_fn(params):
    pred = model.apply({"params": params}, x_t, t, batch["text_ids"], batch["text_mask"],
                       drop_text_b=drop_text)
    return flow.flow_matching_loss(flow.to_velocity(pred, x_t, t, diffusion.prediction), target)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  state, metrics = steps.apply_gradients(state, grads, tx=tx, schedule=schedule)
  return state, {"loss": loss, **metrics}


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 2, 2)])
def test_text_only_mixture_is_the_old_step_bit_for_bit(patch):
  config = dit.DiTConfig(width=32, depth=1, num_heads=2, mlp_ratio=2.0, mlp_multiple_of=16,
                         latent_channels=C, text=TEXT, patch_size=patch)
  model = dit.DiT(config)
  batch = _grid_batch()
  params = nn.unbox(model.init(jax.random.key(0), batch["latent"], jnp.full((3,), 0.5),
                               batch["text_ids"], batch["text_mask"]))["params"]
  tx, schedule = optax.adam(1e-3), optax.constant_schedule(1e-3)
  kw = dict(model=model, patch_size=patch, diffusion=DIFFUSION, tx=tx, schedule=schedule)
  old_state, old = jax.jit(functools.partial(_old_dit_step, **kw))(_state(params, tx), batch, FROZEN)
  for mixture in (None, cond.ConditioningConfig(text=1.0)):
    step = functools.partial(steps.dit_step, autoencoder=None, conditioning=mixture, **kw)
    new_state, new = jax.jit(step)(_state(params, tx), batch, FROZEN)
    assert float(new["given_fraction"]) == 0.0
    for key in old:
      assert np.asarray(old[key]).tobytes() == np.asarray(new[key]).tobytes(), key
    for a, b in zip(jax.tree.leaves(old_state.params), jax.tree.leaves(new_state.params)):
      assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  # A real mixture changes the loss (the check above is not vacuous).
  mixed = functools.partial(steps.dit_step, autoencoder=None, **kw,
                            conditioning=cond.ConditioningConfig(text=0.0, first_frame=1.0))
  _, m = jax.jit(mixed)(_state(params, tx), batch, FROZEN)
  assert float(m["loss"]) != float(old["loss"])
  assert float(m["given_fraction"]) == pytest.approx(patch[0] / 4)


class _Recorder:
  """A stand-in DiT whose output is a parameter array: it records the inputs it is given, and the
  gradient of that parameter is the loss's sensitivity to each output element."""

  def __init__(self):
    self.config = types.SimpleNamespace(latent_channels=C)
    self.seen = {}

  def apply(self, variables, x_t, t, text_in, text_mask, **kwargs):
    del text_in, text_mask, kwargs
    self.seen.update(x_t=np.asarray(x_t), t=np.asarray(t))
    return variables["params"]["out"]


def _run_recorder(step_fn, batch, out_shape, **kw):
  model = _Recorder()
  tx = optax.sgd(1.0)
  params = {"out": jnp.asarray(np.random.default_rng(1).normal(size=out_shape), jnp.float32)}
  new_state, metrics = step_fn(_state(params, tx), batch, FROZEN, model=model, diffusion=DIFFUSION,
                               tx=tx, schedule=optax.constant_schedule(1.0), **kw)
  grad = np.asarray(params["out"] - new_state.params["out"])  # sgd(1): the gradient.
  return model.seen, grad, metrics


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 2, 2)])
def test_grid_given_frames_are_clean_at_t0_and_carry_no_loss(patch):
  batch = _grid_batch(b=3, t=6)
  x0 = np.asarray(batch["latent"])
  mixture = cond.ConditioningConfig(text=0.0, first_last=1.0)  # Latent frames 0..pt-1 and last pt.
  seen, grad, metrics = _run_recorder(
      steps.dit_step, batch, x0.shape, autoencoder=None, patch_size=patch, conditioning=mixture)
  pt = patch[0]
  given_t = np.zeros(6, bool)
  given_t[:pt] = given_t[-pt:] = True
  grid = patchify.patch_grid(x0.shape[1:4], patch)
  given_l = given_t[patchify.grid_positions(grid)[:, 0] * pt]
  assert seen["t"].shape == (3, math.prod(grid))
  assert (seen["t"][:, given_l] == 0).all() and (seen["t"][:, ~given_l] > 0).all()
  np.testing.assert_array_equal(seen["x_t"][:, given_t], x0[:, given_t])
  assert (seen["x_t"][:, ~given_t] != x0[:, ~given_t]).all()
  assert (grad[:, given_t] == 0).all() and (grad[:, ~given_t] != 0).all()
  assert float(metrics["given_fraction"]) == pytest.approx(2 * pt / 6)


def test_grid_random_mode_gives_whole_frames():
  batch = _grid_batch(b=3, t=6)
  mixture = cond.ConditioningConfig(text=0.0, random=1.0, random_frame_prob=0.5)
  seen, grad, _ = _run_recorder(steps.dit_step, batch, batch["latent"].shape, autoencoder=None,
                                patch_size=(1, 2, 2), conditioning=mixture)
  given_bl = seen["t"] == 0
  given_bt = given_bl.reshape(3, 6, -1)
  assert (given_bt == given_bt[:, :, :1]).all()  # A frame's tokens agree.
  given_bt = given_bt[:, :, 0]
  assert given_bt.any() and not given_bt.all(axis=1).any()
  assert ((grad == 0).all(axis=(2, 3, 4)) == given_bt).all()


def _packed_batch():
  """One row: slot 1 a (3, 2, 2)-token clip, slot 2 a (2, 2, 4)-token clip, an empty slot, padding."""
  shapes = ((3, 4, 4), (2, 4, 8))  # Latent (T, H, W) with patch (1, 2, 2).
  rng = np.random.default_rng(2)
  length, slots = 32, 3
  p = 4 * C
  tokens = np.zeros((1, length, p), np.float32)
  positions = np.zeros((1, length, 3), np.int32)
  segments = np.zeros((1, length), np.int32)
  grid = np.zeros((1, slots, 3), np.int32)
  start = 0
  for g, shape in enumerate(shapes):
    latent = rng.normal(size=(1, *shape, C)).astype(np.float32)
    x = np.asarray(patchify.patchify(jnp.asarray(latent), (1, 2, 2)))[0]
    gr = patchify.patch_grid(shape, (1, 2, 2))
    tokens[0, start:start + len(x)] = x
    positions[0, start:start + len(x)] = patchify.grid_positions(gr)
    segments[0, start:start + len(x)] = g + 1
    grid[0, g] = gr
    start += len(x)
  ids, mask = TOKENIZER(["a red circle", "a blue square", ""])
  mask = np.asarray(mask).copy()
  mask[2] = False
  return {k: jnp.asarray(v) for k, v in dict(
      tokens=tokens, positions=positions, segment_ids=segments, grid=grid,
      text_ids=np.asarray(ids)[None], text_mask=mask[None]).items()}


@pytest.mark.parametrize("mode,given_frames", [
    ("last_frame", ({2}, {1})),  # Each slot's own last frame: T = 3 and T = 2.
    ("trailing", ({1, 2}, {1})),  # k = 2 for T = 3; k clipped to T - 1 = 1 for T = 2.
    ("first_last", ({0, 2}, set())),  # T = 2 would give every frame: falls back to text.
])
def test_packed_given_tokens_follow_each_slots_frame_count(mode, given_frames):
  batch = _packed_batch()
  mixture = cond.ConditioningConfig(**{"text": 0.0, mode: 1.0, "max_frames": 2})
  seen, grad, metrics = _run_recorder(steps.dit_packed_step, batch, batch["tokens"].shape,
                                      conditioning=mixture)
  seg = np.asarray(batch["segment_ids"])[0]
  frame = np.asarray(batch["positions"])[0, :, 0]
  expected = np.array([s > 0 and frame[l] in given_frames[s - 1] for l, s in enumerate(seg)])
  real = seg > 0
  np.testing.assert_array_equal((seen["t"][0] == 0)[real], expected[real])
  np.testing.assert_array_equal(seen["x_t"][0][expected], np.asarray(batch["tokens"])[0][expected])
  generated = (seg > 0) & ~expected
  assert (grad[0][~generated] == 0).all() and (grad[0][generated] != 0).all(axis=-1).all()
  assert float(metrics["given_fraction"]) == pytest.approx(expected.sum() / (seg > 0).sum())


def test_batch_text_prefers_frozen_features():
  ids, mask = np.zeros((2, 3), np.int32), np.ones((2, 3), bool)
  feats = np.ones((2, 3, 5), np.float32)
  assert steps.batch_text({"text_ids": ids, "text_mask": mask})[0] is ids
  got, got_mask = steps.batch_text({"text_ids": ids, "text_features": feats, "text_mask": mask})
  assert got is feats and got_mask is mask


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True])
def test_tiny_run_trains_with_the_default_mixture(untrained_autoencoder, tmp_path, packing):
  config = base_experiment.get_config("tiny")
  assert not cond.ConditioningConfig.from_config(config).text_only  # The default mixture is on.
  config.autoencoder.workdir = untrained_autoencoder
  config.train.num_steps = 3
  config.train.log_every = 1
  config.sample.prompts = ("a red circle moving right",)
  if packing:
    config.data.packing = True
    config.data.token_budget = 8 * config.data.pack_length  # One row per fake device.
  workdir = str(tmp_path / "run")
  stages.train_dit(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [1, 2, 3]
  for row in rows:
    assert np.isfinite(row["loss"]) and 0 <= row["given_fraction"] < 1
  if packing:  # Every packed row mixes images and videos, so some frames are given.
    assert max(r["given_fraction"] for r in rows) > 0
