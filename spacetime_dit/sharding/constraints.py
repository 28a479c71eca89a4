"""Activation sharding constraints that never split an axis unevenly.

XLA's SPMD partitioner can compute wrong convolutions when a spatial axis is split over more
mesh devices than it divides evenly: on 8 CPU devices (jax 0.10.2), a 4x4 conv over H = 3
split 4 ways was wrong in its forward and backward passes, and H = 2 with a 3x3 kernel in its
input gradient, with no error raised; every evenly divided H tested was exact. The deep levels
of the autoencoder and the discriminator are small (H / 2^n), so with spatial sharding they
meet this case. Such an axis is gathered explicitly (replicated, not merely unconstrained:
GSPMD would otherwise carry the split onward from an earlier layer).
"""

import math
from collections.abc import Sequence

import flax.linen as nn
import jax


def mesh_divides(size: int, logical_axis: str) -> bool:
  """Whether the mesh axes the rules give `logical_axis` split `size` evenly (True off-mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return True
  (mesh_axes,) = nn.logical_to_mesh_axes((logical_axis,))
  if mesh_axes is None:
    return True
  mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
  return size % math.prod(mesh.shape[a] for a in mesh_axes) == 0


def even_logical_constraint(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """`nn.with_logical_constraint`, with every axis its mesh axes do not divide replicated.

  Args:
    x: an activation.
    logical_axes: one logical name (or None) per axis of `x`.

  Returns:
    `x` constrained to the rules' sharding, except that an axis whose size is not a multiple of
    the product of its mesh axes' sizes is replicated. Outside a mesh, `x` unchanged.
  """
  names = tuple(
      name if name is None or mesh_divides(size, name) else None
      for name, size in zip(logical_axes, x.shape))
  return nn.with_logical_constraint(x, names)
