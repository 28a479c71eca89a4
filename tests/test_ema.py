"""EMA of the weights: the average's closed form, its state and shardings, checkpoints with and
without it (restoring checkpoints written before EMA existed), sampling with it by default."""

import logging
import os

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import base as base_experiment
from spacetime_dit import config_types
from spacetime_dit import inference
from spacetime_dit.sharding import mesh as mesh_lib
from spacetime_dit.training import builders
from spacetime_dit.training import checkpointing
from spacetime_dit.training import ema as ema_lib
from spacetime_dit.training import loop
from spacetime_dit.training import metrics as metrics_lib
from spacetime_dit.training import state as state_lib
from spacetime_dit.training import steps

RULES = config_types.MeshConfig().rules
_LR = 0.5


def _toy_state(ema_decay=0.0, width=3):
  params = {"w": jnp.arange(width, dtype=jnp.float32), "b": jnp.ones((2, 2), jnp.float32)}
  tx = optax.sgd(_LR)
  state = state_lib.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                               rng=jax.random.PRNGKey(0))
  return (state_lib.with_ema(state, ema_decay, copy=True) if ema_decay else state), tx


def _step_fn(tx):
  """(state, {"g": grads}, frozen) -> apply_gradients with a constant learning rate."""

  def step(state, batch, frozen):
    del frozen
    state, metrics = steps.apply_gradients(state, batch["g"], tx=tx, schedule=optax.constant_schedule(_LR))
    return state, {"loss": metrics["grad_norm"], **metrics}

  return step


def _grads(k, width=3):
  return {"w": jnp.full((width,), 0.1 * (k + 1), jnp.float32), "b": jnp.full((2, 2), -0.2 * k, jnp.float32)}


def test_decay_warms_up_as_tensorflow_then_holds():
  t = np.array([0, 1, 10, 89, 1000])
  expected = np.minimum(0.9, (1 + t) / (10 + t))
  np.testing.assert_allclose(ema_lib.decay_at(0.9, jnp.asarray(t)), expected, rtol=1e-6)
  assert float(ema_lib.decay_at(0.9, 0)) == pytest.approx(0.1)


def test_apply_gradients_updates_the_ema_as_the_closed_form():
  state, tx = _toy_state(ema_decay=0.8)
  step = jax.jit(_step_fn(tx))
  params = {k: np.asarray(v, np.float64) for k, v in state.params.items()}
  ema = dict(params)
  for k in range(5):
    state, _ = step(state, {"g": _grads(k)}, {})
    d = min(0.8, (1 + k) / (10 + k))  # k updates before this one.
    params = {n: params[n] - _LR * np.asarray(g, np.float64) for n, g in _grads(k).items()}
    ema = {n: d * ema[n] + (1 - d) * params[n] for n in ema}
  assert isinstance(state, state_lib.EmaTrainState) and int(state.step) == 5
  for name in ema:
    np.testing.assert_allclose(state.params[name], params[name], rtol=1e-6)
    np.testing.assert_allclose(state.ema_params[name], ema[name], rtol=1e-6)
  # The average lags the parameters, it does not equal them.
  assert not np.allclose(state.ema_params["w"], state.params["w"])


def test_a_skipped_nonfinite_update_leaves_the_ema_alone():
  state, tx = _toy_state(ema_decay=0.8)
  guarded = jax.jit(loop.guard_nonfinite(_step_fn(tx), skip_nonfinite=True))
  state, _ = guarded(state, {"g": _grads(0)}, {})
  before = jax.device_get(state)
  bad = {"w": jnp.array([1.0, jnp.nan, 0.0]), "b": jnp.zeros((2, 2))}
  state, metrics = guarded(state, {"g": bad}, {})
  assert not bool(metrics[loop.FINITE]) and int(state.step) == 2
  np.testing.assert_array_equal(state.ema_params["w"], before.ema_params["w"])
  np.testing.assert_array_equal(state.params["w"], before.params["w"])


def test_decay_zero_is_off_and_the_state_is_the_plain_train_state():
  with pytest.raises(ValueError, match=r"train.ema_decay=1.0 must be in \[0, 1\)"):
    config_types.TrainConfig(ema_decay=1.0)
  state, tx = _toy_state(ema_decay=0.0)
  new, _ = jax.jit(_step_fn(tx))(state, {"g": _grads(0)}, {})
  assert type(new) is state_lib.TrainState  # pylint: disable=unidiomatic-typecheck
  assert ema_lib.sampling_params(new) is new.params
  assert len(jax.tree.leaves(new)) == len(jax.tree.leaves(state))


def test_created_ema_starts_at_the_params_sharded_alike_in_its_own_buffers():
  config = base_experiment.get_config("tiny")
  _, init_params, _ = builders.build_dit(config, latent_channels=4)
  tx, _ = builders.build_optimizer(config)
  mesh = mesh_lib.make_mesh(config_types.MeshConfig(data=1, fsdp=2, tensor=2, sequence=2))
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    abstract, shardings = state_lib.state_shardings(init_params, tx, mesh, RULES, 0, ema_decay=0.99)
    state = state_lib.create_state(init_params, tx, mesh, RULES, 0, ema_decay=0.99)
  assert isinstance(state, state_lib.EmaTrainState) and state.ema_decay == 0.99
  assert abstract.ema_decay == 0.99
  leaves = list(zip(jax.tree.leaves(state.params), jax.tree.leaves(state.ema_params),
                    jax.tree.leaves(shardings.params), jax.tree.leaves(shardings.ema_params)))
  assert any(not p.sharding.is_fully_replicated for p, *_ in leaves), "nothing is sharded"
  for p, e, p_sharding, e_sharding in leaves:
    assert e.dtype == jnp.float32 and e.sharding == p.sharding and p_sharding == e_sharding
    assert e.addressable_shards[0].data.unsafe_buffer_pointer() != p.addressable_shards[0].data.unsafe_buffer_pointer()
    np.testing.assert_array_equal(e, p)


def _save(directory, step, state):
  checkpointer = checkpointing.Checkpointer(str(directory), async_save=False)
  checkpointer.save(step, state)
  checkpointer.close()


def _abstract(state):
  return jax.eval_shape(lambda: state)


def test_ema_round_trips_through_a_checkpoint_and_takes_the_configured_decay(tmp_path):
  state, tx = _toy_state(ema_decay=0.8)
  state, _ = jax.jit(_step_fn(tx))(state, {"g": _grads(3)}, {})
  _save(tmp_path, 1, state)
  checkpointer = checkpointing.Checkpointer(str(tmp_path), async_save=False)
  assert ema_lib.FIELD in checkpointer.saved_fields(1)
  restored = checkpointer.restore(1, _abstract(state.replace(ema_decay=0.5)))
  checkpointer.close()
  assert isinstance(restored, state_lib.EmaTrainState) and restored.ema_decay == 0.5
  for name in state.params:
    np.testing.assert_array_equal(restored.ema_params[name], state.ema_params[name])
    np.testing.assert_array_equal(restored.params[name], state.params[name])


def test_a_checkpoint_from_before_ema_restores_with_the_ema_started_at_its_params(tmp_path, caplog):
  old, _ = _toy_state(ema_decay=0.0)  # The plain TrainState: the layout of pre-EMA checkpoints.
  old = old.replace(step=jnp.int32(7))
  _save(tmp_path, 7, old)
  wanted, tx = _toy_state(ema_decay=0.8)
  checkpointer = checkpointing.Checkpointer(str(tmp_path), async_save=False)
  assert ema_lib.FIELD not in checkpointer.saved_fields(7)
  checkpointer.check_compatible(7, _abstract(wanted))  # An EMA added is no incompatibility.
  with caplog.at_level(logging.WARNING):
    restored = checkpointer.restore(7, _abstract(wanted))
  assert isinstance(restored, state_lib.EmaTrainState) and int(restored.step) == 7
  assert "checkpoint step 7 has no EMA" in caplog.text
  for name in old.params:
    np.testing.assert_array_equal(restored.ema_params[name], old.params[name])
    assert restored.ema_params[name].unsafe_buffer_pointer() != restored.params[name].unsafe_buffer_pointer()
  # It trains on: the jitted step donates the state, so the two trees must not share buffers.
  step = jax.jit(_step_fn(tx), donate_argnums=0)
  restored, _ = step(restored, {"g": _grads(0)}, {})
  assert int(restored.step) == 8
  # A real change of the arrays is still an error, EMA or not.
  wider, _ = _toy_state(ema_decay=0.8, width=5)
  with pytest.raises(checkpointing.IncompatibleCheckpointError, match=r"params/w: \(\(3,\), 'float32'\)"):
    checkpointer.restore(7, _abstract(wider))
  checkpointer.close()


def test_a_run_without_ema_resumes_a_checkpoint_with_one_and_drops_it(tmp_path, caplog):
  state, _ = _toy_state(ema_decay=0.8)
  _save(tmp_path, 2, state)
  plain, _ = _toy_state(ema_decay=0.0)
  checkpointer = checkpointing.Checkpointer(str(tmp_path), async_save=False)
  with caplog.at_level(logging.WARNING):
    restored = checkpointer.restore(2, _abstract(plain))
  checkpointer.close()
  assert type(restored) is state_lib.TrainState  # pylint: disable=unidiomatic-typecheck
  assert "EMA is dropped" in caplog.text
  np.testing.assert_array_equal(restored.params["w"], state.params["w"])


def _dit_run(workdir, autoencoder_dir):
  """A tiny DiT workdir whose checkpoint's EMA is its params + 1."""
  config = base_experiment.get_config("tiny")
  config.autoencoder.workdir = autoencoder_dir
  builders.save_config(config, workdir)
  _, init_params, _ = builders.build_dit(config, builders.load_config(autoencoder_dir).model.latent_channels)
  tx, _ = builders.build_optimizer(config)
  mesh = mesh_lib.make_mesh(config_types.MeshConfig())
  state = state_lib.create_state(init_params, tx, mesh, RULES, config.seed, ema_decay=0.9)
  state = state.replace(ema_params=jax.tree.map(lambda x: x + 1.0, state.ema_params))
  _save(os.path.join(workdir, "checkpoints"), 3, state)
  return state


def _same(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_the_generator_samples_with_the_ema_by_default_and_raw_weights_on_request(tmp_path,
                                                                                   untrained_autoencoder):
  state = _dit_run(str(tmp_path / "ema"), untrained_autoencoder)
  default = inference.Generator.from_workdir(str(tmp_path / "ema"))
  raw = inference.Generator.from_workdir(str(tmp_path / "ema"), use_ema=False)
  assert _same(default.dit_params, state.ema_params)
  assert _same(raw.dit_params, state.params)
  assert not _same(default.dit_params, raw.dit_params)
  # (Checkpoints without an average sample with their raw weights: tests/test_sample_modes.py.)


def _pipeline():
  """Batch i: x = i + 1 (float32 (8, 2)), restartable at any position."""
  dataset = grain.MapDataset.range(10**6).map(lambda i: {"x": np.full((8, 2), float(i + 1), np.float32)})
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)))


def _train(workdir, num_steps):
  """The real loop and checkpointer on the toy state (resuming from workdir's checkpoints)."""
  state, tx = _toy_state(ema_decay=0.8)
  apply = _step_fn(tx)
  step_fn = jax.jit(
      lambda s, batch, frozen: apply(s, {"g": _grads(0) | {"w": jnp.full((3,), jnp.mean(batch["x"]))}}, frozen)
  )
  train = config_types.TrainConfig(num_steps=num_steps, log_every=1, checkpoint_every=2, async_checkpointing=False)
  checkpointer = checkpointing.Checkpointer(str(workdir / "checkpoints"), async_save=False)
  writer = metrics_lib.MetricsWriter(str(workdir))
  data = _pipeline()
  if checkpointer.latest_step() is not None:
    state = checkpointer.restore(checkpointer.latest_step(), _abstract(state), data)
  ctx = loop.LoopContext(train=train, mesh=mesh_lib.make_mesh(config_types.MeshConfig()), rules=RULES,
                         checkpointer=checkpointer, writer=writer, batch_keys=("x",), tokens_per_batch=lambda b: 1)
  try:
    return loop.run(state, step_fn, {}, data, ctx)
  finally:
    checkpointer.close()
    writer.close()


def test_a_resumed_run_continues_the_same_average_bitwise(tmp_path):
  reference = _train(tmp_path / "ref", num_steps=5)
  _train(tmp_path / "run", num_steps=2)  # Stops after its step-2 checkpoint...
  resumed = _train(tmp_path / "run", num_steps=5)  # ...and the same command trains on from it.
  assert int(resumed.step) == 5
  assert _same(resumed.ema_params, reference.ema_params) and _same(resumed.params, reference.params)
  assert not _same(resumed.ema_params, resumed.params)
