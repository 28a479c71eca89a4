"""The train state pytree and its creation already sharded over the mesh.

Parameters are born sharded: `jax.eval_shape` gives the abstract state with its logical
axis names, the rules turn them into mesh shardings, and a jitted init with those
`out_shardings` writes each shard straight onto its device (no host-side full copy).
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


def _init_boxed(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation, seed: int):
  """Returns a no-argument function that builds the state with logically boxed parameters."""

  def init() -> TrainState:
    rng = jax.random.PRNGKey(seed)
    # Parameters are drawn with the "rbg" generator: XLA:CPU spends seconds compiling every
    # threefry draw of a new shape (a small DiT's init took ~50 s), rbg a fraction of that.
    # The step keys (noise, timesteps) stay threefry, which is identical under any sharding.
    params = init_params(jax.random.key(seed, impl="rbg"))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)

  return init


def _strip_boxes(tree: Any) -> Any:
  """Removes logical-axis boxes without applying sharding constraints (abstract values)."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree, is_leaf=is_box)


def state_shardings(
    init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation, mesh: Mesh, rules, seed: int = 0
) -> tuple[TrainState, TrainState]:
  """(abstract unboxed state, its shardings), computed without allocating anything."""
  boxed = jax.eval_shape(_init_boxed(init_params, tx, seed))
  shardings = mesh_lib.tree_shardings(mesh, rules, boxed)
  abstract = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), _strip_boxes(boxed), shardings
  )
  return abstract, shardings


def create_state(
    init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation, mesh: Mesh, rules, seed: int
) -> TrainState:
  """Initialises the state directly into its shardings.

  Args:
    init_params: rng -> parameters boxed with logical axis names (`module.init(...)["params"]`).
    tx: the optimizer.
    mesh, rules: where the logical names land.
    seed: init seed.
  """
  _, shardings = state_shardings(init_params, tx, mesh, rules, seed)
  init = _init_boxed(init_params, tx, seed)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return jax.jit(lambda: nn.meta.unbox(init()), out_shardings=shardings)()


def count_params(params: Any) -> int:
  """Number of scalars in a parameter tree."""
  return sum(int(x.size) for x in jax.tree.leaves(params))
