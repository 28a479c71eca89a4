"""The fused clip + AdamW against the optax chain it replaces, and the blocked norms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spacetime_dit.config_types import OptimizerConfig
from spacetime_dit.training import optimizer
from spacetime_dit.training import state as state_lib
from spacetime_dit.training import steps


def _tree(seed, scale=1.0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return {
      "dense": {"kernel": scale * jax.random.normal(keys[0], (37, 29)),
                "bias": scale * jax.random.normal(keys[1], (29,))},
      "blocks": scale * jax.random.normal(keys[2], (2, 5, 3, 7)),
  }


def _config(**kw):
  base = dict(learning_rate=1e-2, warmup_steps=2, weight_decay=0.0, b1=0.9, b2=0.99,
              grad_clip=1.0)
  base.update(kw)
  return OptimizerConfig(**base)


@pytest.mark.parametrize("kw", [{}, {"grad_clip": 0.0}, {"weight_decay": 0.05},
                                {"grad_clip": 0.5, "weight_decay": 0.1}])
def test_clip_adamw_matches_the_optax_chain(kw):
  config = _config(**kw)
  tx, schedule = optimizer.make_optimizer(config, num_steps=10)
  ref = optimizer.reference_optimizer(config, schedule)
  params = _tree(0)
  state, ref_state = tx.init(params), ref.init(params)
  # The same state pytree: checkpoints of either restore into the other.
  assert jax.tree.structure(state) == jax.tree.structure(ref_state)
  p, p_ref = params, params
  update, ref_update = jax.jit(tx.update), jax.jit(ref.update)
  # Gradient scales above and below the clip threshold (global norm ~ 35 * scale).
  for step, scale in enumerate((1.0, 0.001, 3.0, 0.01, 1.0)):
    grads = _tree(10 + step, scale)
    u, state = update(grads, state, p)
    u_ref, ref_state = ref_update(grads, ref_state, p_ref)
    p, p_ref = optax.apply_updates(p, u), optax.apply_updates(p_ref, u_ref)
    for a, b in zip(jax.tree.leaves((u, state)), jax.tree.leaves((u_ref, ref_state))):
      np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-9)
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p_ref)):
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-8)


@pytest.mark.parametrize("size,block", [(1000, 64), (1024, 64), (63, 64), (64, 64), (4096, 1)])
def test_blocked_sum_of_squares_is_the_plain_sum(size, block):
  x = jax.random.normal(jax.random.key(size), (size,)).reshape(-1, 1) * 3.0
  got = jax.jit(lambda x: optimizer._blocked_sum_of_squares(x, block))(x)
  np.testing.assert_allclose(got, jnp.sum(x * x), rtol=1e-5)


def test_global_norm_is_optax_tree_norm():
  tree = _tree(3)
  np.testing.assert_allclose(optimizer.global_norm(tree), optax.tree.norm(tree), rtol=1e-6)
  np.testing.assert_allclose(
      jax.jit(lambda t: optimizer.global_norm(t))(tree), optax.tree.norm(tree), rtol=1e-6)
  assert float(optimizer.global_norm({})) == 0.0


def test_apply_gradients_metrics_and_update():
  config = _config()
  tx, schedule = optimizer.make_optimizer(config, num_steps=10)
  ref = optimizer.reference_optimizer(config, schedule)
  params = _tree(0)
  grads = _tree(1)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params), rng=jax.random.PRNGKey(0))
  new_state, metrics = jax.jit(lambda s, g: steps.apply_gradients(s, g, tx=tx,
                                                                  schedule=schedule))(state, grads)
  u_ref, _ = ref.update(grads, ref.init(params), params)
  for a, b in zip(jax.tree.leaves(new_state.params),
                  jax.tree.leaves(optax.apply_updates(params, u_ref))):
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-8)
  np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-6)
  np.testing.assert_allclose(metrics["param_norm"], optax.tree.norm(new_state.params), rtol=1e-6)
  assert int(new_state.step) == 1
