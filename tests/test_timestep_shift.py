"""The resolution shift switch: one rule for grid steps, packed steps and the sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spacetime_dit.config_types import DiffusionConfig
from spacetime_dit.diffusion import flow
from spacetime_dit.training import steps


@pytest.mark.parametrize("tokens", [16, 64, 1024])
def test_timestep_shift_follows_the_switch(tokens):
  on = DiffusionConfig(shift_base_tokens=64, base_shift=1.0)
  off = DiffusionConfig(shift_base_tokens=64, base_shift=1.0, resolution_shift=False)
  assert steps.timestep_shift(on, tokens) == pytest.approx(np.sqrt(tokens / 64))
  assert steps.timestep_shift(off, tokens) == 1.0
  stronger = DiffusionConfig(base_shift=2.0, resolution_shift=False)
  assert steps.timestep_shift(stronger, tokens) == 2.0


def test_packed_timesteps_use_the_same_rule_per_clip():
  grid_bg3 = jnp.asarray([[[1, 4, 4], [3, 8, 8]]], jnp.int32)  # 16 and 192 tokens.
  rng = jax.random.PRNGKey(0)
  for resolution_shift in (True, False):
    diffusion = DiffusionConfig(shift_base_tokens=64, resolution_shift=resolution_shift)
    got = np.asarray(steps.packed_timesteps(rng, grid_bg3, diffusion))
    unshifted = np.asarray(steps.packed_timesteps(
        rng, grid_bg3, DiffusionConfig(shift_base_tokens=64, resolution_shift=False)))
    want = [float(flow.shift_timesteps(jnp.asarray(unshifted[0, g]), steps.timestep_shift(diffusion, n)))
            for g, n in enumerate((16, 192))]
    np.testing.assert_allclose(got[0], want, rtol=1e-5)
  # On, the small clip is shifted towards less noise and the large one towards more.
  on = np.asarray(steps.packed_timesteps(rng, grid_bg3, DiffusionConfig(shift_base_tokens=64)))
  assert on[0, 0] < unshifted[0, 0] and on[0, 1] > unshifted[0, 1]
