"""The train state pytree and its creation already sharded over the mesh.

Parameters are born sharded: `jax.eval_shape` gives the abstract state with its logical
axis names, the rules turn them into mesh shardings, and a jitted init with those
`out_shardings` writes each shard straight onto its device (no host-side full copy).

With `train.ema_decay` > 0 the state is an `EmaTrainState`: it also carries the EMA of the
parameters (`training.ema`), born with their shardings.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from spacetime_dit.sharding import mesh as mesh_lib


class TrainState(struct.PyTreeNode):
  """Everything a step changes; checkpointed whole (with the data iterator beside it)."""

  step: jax.Array  # int32 scalar: optimizer updates applied so far.
  params: Any  # Model parameters (float32 master weights).
  opt_state: Any  # Optimizer state, sharded like the parameters.
  rng: jax.Array  # uint32 (2,) base key; step keys are fold_in(rng, step).


class EmaTrainState(TrainState):
  """A `TrainState` with an exponential moving average of the parameters (`training.ema`).

  A subclass rather than an optional field: with EMA off the state stays the plain
  `TrainState`, whose checkpoints are exactly those written before EMA existed (Orbax stores a
  None field as a key of its own, so `ema_params=None` would change the tree).
  """

  ema_params: Any  # float32 average of `params`, sharded like them.
  # d of ema <- d * ema + (1 - d) * params (with `ema.decay_at`'s warm-up). Static: part of the
  # tree's structure, not a checkpointed array, so a resumed run takes the configured value.
  ema_decay: float = struct.field(pytree_node=False, default=0.0)


def _ema_copy(x: Any, copy: bool) -> Any:
  """A float32 copy of one parameter: abstract (same sharding), traced or a concrete array."""
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding)
  # Concrete arrays are copied: the jitted step donates the state, so `params` and
  # `ema_params` must not share a buffer. `jnp.array` keeps the array's sharding.
  return jnp.array(x, dtype=jnp.float32, copy=copy)


def with_ema(state: TrainState, ema_decay: float, copy: bool = False) -> EmaTrainState:
  """`state` with an average that starts at its parameters (`copy`: new buffers)."""
  fields = {name: getattr(state, name) for name in ("step", "params", "opt_state", "rng")}
  ema = jax.tree.map(lambda x: _ema_copy(x, copy), state.params)
  return EmaTrainState(**fields, ema_params=ema, ema_decay=ema_decay)


def without_ema(state: TrainState) -> TrainState:
  """The plain `TrainState` of `state` (its average, if any, left out)."""
  return TrainState(step=state.step, params=state.params, opt_state=state.opt_state, rng=state.rng)


def _init_boxed(
    init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation, seed: int, ema_decay: float = 0.0
):
  """Returns a no-argument function that builds the state with logically boxed parameters.

  With `ema_decay` > 0 the state is an `EmaTrainState` whose average starts at the initial
  parameters (boxed alike, so it gets their shardings).
  """

  def init() -> TrainState:
    rng = jax.random.PRNGKey(seed)
    # Parameters are drawn with the "rbg" generator: XLA:CPU spends seconds compiling every
    # threefry draw of a new shape (a small DiT's init took ~50 s), rbg a fraction of that.
    # The step keys (noise, timesteps) stay threefry, which is identical under any sharding.
    params = init_params(jax.random.key(seed, impl="rbg"))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)
    return with_ema(state, ema_decay) if ema_decay > 0 else state

  return init


def _strip_boxes(tree: Any) -> Any:
  """Removes logical-axis boxes without applying sharding constraints (abstract values)."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree, is_leaf=is_box)


def state_shardings(
    init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation, mesh: Mesh, rules, seed: int = 0,
    ema_decay: float = 0.0,
) -> tuple[TrainState, TrainState]:
  """(abstract unboxed state, its shardings), computed without allocating anything."""
  boxed = jax.eval_shape(_init_boxed(init_params, tx, seed, ema_decay))
  shardings = mesh_lib.tree_shardings(mesh, rules, boxed)
  abstract = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), _strip_boxes(boxed), shardings
  )
  return abstract, shardings


def create_state(
    init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation, mesh: Mesh, rules, seed: int,
    ema_decay: float = 0.0,
) -> TrainState:
  """Initialises the state directly into its shardings.

  Args:
    init_params: rng -> parameters boxed with logical axis names (`module.init(...)["params"]`).
    tx: the optimizer.
    mesh, rules: where the logical names land.
    seed: init seed.
    ema_decay: > 0 adds an EMA of the parameters (an `EmaTrainState`, see `training.ema`).
  """
  _, shardings = state_shardings(init_params, tx, mesh, rules, seed, ema_decay)
  init = _init_boxed(init_params, tx, seed, ema_decay)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return jax.jit(lambda: nn.meta.unbox(init()), out_shardings=shardings)()


def count_params(params: Any) -> int:
  """Number of scalars in a parameter tree."""
  return sum(int(x.size) for x in jax.tree.leaves(params))
