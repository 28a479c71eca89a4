"""Device mesh from config, logical shardings, and global batches from per-process data.

The mesh always has the four axes of `rules.MESH_AXES`; unused axes have size 1, so one
rules table serves every layout. Axis types are `Auto` (GSPMD-style propagation):
`jax.make_mesh` defaults to `Explicit` axes in jax 0.10, under which linen's logical
constraints raise `ShardingTypeError` (see the environment notes, §2).
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from spacetime_dit.config_types import MeshConfig
from spacetime_dit.sharding import axes
from spacetime_dit.sharding.rules import MESH_AXES

Rules = Sequence[tuple[str, Any]]


def mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, ...]:
  """Resolves the -1 axis and checks that the mesh uses exactly `num_devices` devices.

  Raises:
    ValueError: the axis sizes do not multiply to the device count (names both and the fix).
  """
  sizes = [config.data, config.fsdp, config.tensor, config.sequence]
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise ValueError(
          f"mesh {dict(zip(MESH_AXES, sizes))} cannot fill {num_devices} devices: the fixed axes"
          f" multiply to {fixed}, which does not divide {num_devices}. Choose axis sizes whose"
          f" product divides {num_devices}."
      )
    sizes[sizes.index(-1)] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(
        f"mesh {dict(zip(MESH_AXES, sizes))} needs {fixed} devices but {num_devices} are"
        " available. Make the product of --config.mesh.{data,fsdp,tensor,sequence} equal"
        f" {num_devices}, or set one axis to -1 to take the remaining devices."
    )
  return tuple(sizes)


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the ('data', 'fsdp', 'tensor', 'sequence') mesh over `devices` (default: all)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_sharding(mesh: Mesh, rules: Rules, logical_axes: Sequence[str | None]) -> NamedSharding:
  """NamedSharding for an array whose axes carry these logical names."""
  spec = nn.logical_to_mesh_axes(tuple(logical_axes), rules)
  return NamedSharding(mesh, spec)


def tree_shardings(mesh: Mesh, rules: Rules, abstract_tree: Any) -> Any:
  """Shardings for a tree of (possibly `nn.Partitioned`-boxed) abstract values.

  Leaves without logical names are replicated.
  """
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_axis_size(mesh: Mesh, rules: Rules) -> int:
  """How many shards the batch axis is split into under `rules` (its divisibility unit)."""
  mesh_axes = dict(rules).get(axes.ACT_BATCH)
  if mesh_axes is None:
    return 1
  if isinstance(mesh_axes, str):
    mesh_axes = (mesh_axes,)
  return math.prod(mesh.shape[a] for a in mesh_axes)


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int) -> NamedSharding:
  """Sharding of a batch array: the leading axis over the batch axes, the rest replicated."""
  return logical_sharding(mesh, rules, (axes.ACT_BATCH,) + (None,) * (ndim - 1))


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules) -> dict[str, jax.Array]:
  """Assembles global arrays from this process's slice of the batch (multi-host safe).

  Each process passes the rows it loaded; rows of process p are the p-th block of the
  global batch (`jax.make_array_from_process_local_data`).
  """
  return {
      key: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, np.ndim(value)), np.asarray(value))
      for key, value in local_batch.items()
      if np.asarray(value).dtype.kind in "biuf"
  }


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of an array held whole on every device."""
  return NamedSharding(mesh, PartitionSpec())
