"""Tests for benchmarks/plan.py: the AOT plan of the DiT step on 8 fake CPU devices."""

import jax
import pytest

from benchmarks import plan as plan_lib
from experiments import base
from spacetime_dit.training import builders
from spacetime_dit.training import state as state_lib


def test_parse_mesh_fills_unnamed_axes_and_names_the_format():
  assert plan_lib.parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4, "tensor": 1, "sequence": 1}
  with pytest.raises(ValueError, match="AXIS=SIZE"):
    plan_lib.parse_mesh("model=2")


def test_plan_of_the_tiny_step_counts_params_flops_memory_and_fits():
  config = base.get_config("tiny")
  # One latent frame of 2 x 2 tokens; the search's one probe (1 frame) reuses the report's
  # compile, so the test compiles the step twice.
  result = plan_lib.plan(
      config, {"data": 2, "fsdp": 4}, tokens=4, frame_grid=(2, 2), memory_gb=1.0,
      policies=("none", "full"), max_probes=1, latent_channels=4, devices=jax.devices()[:8])

  model, init_params, _ = builders.build_dit(config, latent_channels=4)
  real = jax.jit(init_params)(jax.random.key(0, impl="rbg"))
  assert result["params"] == state_lib.count_params(real) > 0
  assert result["devices"] == 8 and result["batch"] == 8
  for step in result["steps"]:
    assert step["xla_flops"] > 0 and step["analytic_flops"] > 0
    memory = step["memory_bytes"]
    assert all(memory[k] > 0 for k in ("argument", "output", "temp", "total")), memory
  # Recomputation costs FLOPs: full remat runs the blocks' forward twice.
  none, full = result["steps"]
  assert full["xla_flops"] > none["xla_flops"]
  fits = {f["policy"]: f for f in result["fits"]}
  assert fits["none"]["max_frames"] >= 1  # 1 GiB holds the tiny step many times over.
  assert fits["full"]["max_tokens_per_device"] >= fits["none"]["max_tokens_per_device"]
