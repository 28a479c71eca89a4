"""Mesh construction, its errors, and global batches on 8 fake CPU devices."""

import jax
import numpy as np
import pytest

from spacetime_dit.config_types import MeshConfig
from spacetime_dit.sharding import distributed
from spacetime_dit.sharding import mesh as mesh_lib
from spacetime_dit.sharding.rules import DEFAULT_RULES


def test_eight_fake_devices():
  assert jax.device_count() == 8


@pytest.mark.parametrize(
    "config, expected",
    [
        (MeshConfig(), (8, 1, 1, 1)),
        (MeshConfig(data=1, fsdp=-1), (1, 8, 1, 1)),
        (MeshConfig(data=2, fsdp=2, tensor=2), (2, 2, 2, 1)),
        (MeshConfig(data=-1, tensor=2, sequence=2), (2, 1, 2, 2)),
    ],
)
def test_mesh_shape_fills_the_free_axis(config, expected):
  assert mesh_lib.mesh_shape(config, 8) == expected


def test_mesh_that_does_not_fit_names_the_sizes_and_the_fix():
  with pytest.raises(ValueError, match=r"needs 16 devices but 8 are available.*-1"):
    mesh_lib.mesh_shape(MeshConfig(data=2, fsdp=2, tensor=2, sequence=2), 8)
  with pytest.raises(ValueError, match=r"multiply to 3, which does not divide 8"):
    mesh_lib.mesh_shape(MeshConfig(data=-1, tensor=3), 8)


def test_mesh_config_rejects_two_fill_axes_and_zero():
  with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
    MeshConfig(data=-1, fsdp=-1)
  with pytest.raises(ValueError, match="positive or -1"):
    MeshConfig(tensor=0)


def test_make_mesh_has_the_four_named_axes():
  mesh = mesh_lib.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  assert mesh.axis_names == ("data", "fsdp", "tensor", "sequence")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}
  assert mesh_lib.batch_axis_size(mesh, DEFAULT_RULES) == 4


def test_global_batch_splits_rows_over_the_batch_axes():
  mesh = mesh_lib.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  local = {"video": np.arange(8 * 3, dtype=np.uint8).reshape(8, 3), "caption": np.array(["x"] * 8)}
  batch = mesh_lib.global_batch(local, mesh, DEFAULT_RULES)
  assert set(batch) == {"video"}  # strings stay on the host
  np.testing.assert_array_equal(np.asarray(batch["video"]), local["video"])
  # 4 batch shards (data x fsdp), each row block held by the 2 tensor-parallel devices.
  rows = {tuple(range(8))[s.index[0]] for s in batch["video"].addressable_shards}
  assert len(rows) == 4 and all(len(r) == 2 for r in rows)


def test_distributed_initialize_is_a_no_op_for_one_process_and_checks_arguments():
  distributed.initialize()  # must not touch the distributed runtime
  with pytest.raises(ValueError, match="coordinator address"):
    distributed.initialize("", num_processes=2, process_id=0)
  with pytest.raises(ValueError, match=r"process_id=3 must be in \[0, 2\)"):
    distributed.initialize("127.0.0.1:1", num_processes=2, process_id=3)
