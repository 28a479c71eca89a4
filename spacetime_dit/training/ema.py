"""Exponential moving average (EMA) of the parameters: the weights sampling uses by default.

After every optimizer update (`steps.apply_gradients`)

    ema <- d_t * ema + (1 - d_t) * params,    d_t = min(decay, (1 + t) / (10 + t)),

t being the number of updates before this one. The warm-up of d_t is the `num_updates` form of
TensorFlow's `tf.train.ExponentialMovingAverage` ("the actual decay rate used is
min(decay, (1 + num_updates) / (10 + num_updates))", TF API docs): early on the average follows
the fast-moving weights instead of remembering the random initialisation for ~1 / (1 - decay)
steps, which matters for short runs and for the samples written during training. DiT (Peebles &
Xie 2023, §4 "Training") samples from an EMA with decay 0.9999.

The average lives in the train state (`state.EmaTrainState.ema_params`, float32, sharded like
the parameters), is updated inside the jitted step and checkpointed with the rest, so a resumed
run continues the same average bit for bit; a step that `loop.guard_nonfinite` skips keeps the
old average with the old parameters. `train.ema_decay = 0` turns it off and the state is the
plain `TrainState`, exactly the tree of checkpoints written before EMA existed.

`restore_plan` lets a checkpoint without an average (written before EMA, or with EMA off) resume
a run with EMA on (the average starts from the restored parameters) and the other way round.
"""

import logging
from collections.abc import Callable, Collection
from typing import Any

import jax
import jax.numpy as jnp

from spacetime_dit.training import state as state_lib

FIELD = "ema_params"  # The state's field, and the checkpoint's top-level key, of the average.


def decay_at(decay: float, step: jax.Array) -> jax.Array:
  """d_t = min(decay, (1 + t) / (10 + t)) for the update after `step` = t updates (float32)."""
  t = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + t) / (10.0 + t))


def update(ema: Any, params: Any, decay_t: jax.Array) -> Any:
  """d * ema + (1 - d) * params, leaf by leaf, in the average's dtype (float32)."""
  return jax.tree.map(
      lambda e, p: (decay_t * e + (1.0 - decay_t) * p.astype(e.dtype)).astype(e.dtype), ema, params
  )


def update_state(state: Any, *, t: jax.Array) -> Any:
  """The state with its average moved towards its (already updated) parameters.

  `t` is the number of updates before this one (the step counter before it advanced). A state
  without an average is returned as it is.
  """
  if not isinstance(state, state_lib.EmaTrainState):
    return state
  return state.replace(ema_params=update(state.ema_params, state.params, decay_at(state.ema_decay, t)))


def sampling_params(state: Any, use_ema: bool = True) -> Any:
  """The weights to sample with: the average when the state has one (and `use_ema`), else the raw ones."""
  if use_ema and isinstance(state, state_lib.EmaTrainState):
    return state.ema_params
  return state.params


def _fill_from_params(restored: state_lib.TrainState, ema_decay: float, step: int) -> state_lib.EmaTrainState:
  logging.warning(
      "checkpoint step %d has no EMA of the parameters (written before EMA, or with"
      " train.ema_decay=0): the EMA starts from the restored parameters", step)
  return state_lib.with_ema(restored, ema_decay, copy=True)


def _drop(restored: state_lib.EmaTrainState, step: int) -> state_lib.TrainState:
  logging.warning(
      "checkpoint step %d holds an EMA of the parameters but train.ema_decay=0: the EMA is"
      " dropped and later checkpoints have none", step)
  return state_lib.without_ema(restored)


def restore_plan(
    abstract_state: Any, saved_fields: Collection[str], step: int
) -> tuple[Any, Callable[[Any], Any]]:
  """(what to restore checkpoint `step` into, how to make that the state `abstract_state` describes).

  `saved_fields` are the top-level fields of the checkpoint's state. When the checkpoint and
  the wanted state disagree only in having an average, the target is the checkpoint's layout:
  - an EMA run resuming a checkpoint without one restores the plain state and starts the
    average from the restored parameters (a copy: the jitted step donates both);
  - a run without EMA resuming a checkpoint with one restores it and drops the average.
  Anything else (including states that are no `TrainState`) restores as it is.
  """
  has_field = FIELD in saved_fields
  if isinstance(abstract_state, state_lib.EmaTrainState) and not has_field:
    decay = abstract_state.ema_decay
    return state_lib.without_ema(abstract_state), lambda s: _fill_from_params(s, decay, step)
  if type(abstract_state) is state_lib.TrainState and has_field:  # pylint: disable=unidiomatic-typecheck
    return state_lib.with_ema(abstract_state, 0.0), lambda s: _drop(s, step)
  return abstract_state, lambda s: s
