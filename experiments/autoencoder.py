"""Stage 1: the causal video autoencoder on ShapesWorld.

  python -m spacetime_dit.train --config=experiments/autoencoder.py:cpu --workdir=runs/ae

Variants: `tiny` (tests), `cpu` (2x4x4 compression, trains in minutes on 2 cores), `s`, `b`, `xl`
(4x8x8 with 16 latent channels, the factors of Wan 2.1 / HunyuanVideo / CogVideoX).
`experiments/base.py` trains this stage first, in W/autoencoder, when it finds none there.
"""

import ml_collections

from experiments import common

_MODEL = {
    "tiny": (2, 4, 4, 8, (1, 1, 1)),
    # temporal, spatial, latent channels, base channels, per-level multipliers
    "cpu": (2, 4, 8, 16, (1, 2, 4)),
    "s": (4, 8, 16, 64, (1, 2, 4, 4)),
    "b": (4, 8, 16, 96, (1, 2, 4, 4)),
    "xl": (4, 8, 16, 128, (1, 2, 4, 4)),
}


def get_config(variant: str = "cpu") -> ml_collections.ConfigDict:
  """Returns the locked autoencoder config for `variant` in ('cpu', 's', 'b', 'xl')."""
  variant = common.check_variant(variant)
  cpu = variant in ("tiny", "cpu")
  tiny = variant == "tiny"
  temporal, spatial, latent, base, multipliers = _MODEL[variant]

  config = ml_collections.ConfigDict()
  config.stage = "autoencoder"  # Which network this file trains.
  config.variant = variant  # Size preset this config was built from.
  config.seed = 0  # Parameter init and noise seed.

  # Tokens here are video pixels (T*H*W): the autoencoder's cost grows with them.
  config.data = common.data_config(
      variant, token_budget=4 * 13 * 32 * 32 if cpu else 16 * 33 * 256 * 256, max_batch_size=16
  )

  config.model = ml_collections.ConfigDict()
  config.model.temporal_factor = temporal  # Frames per latent frame (after the first).
  config.model.spatial_factor = spatial  # Pixels per latent pixel along H and W.
  config.model.latent_channels = latent  # C of the latent.
  config.model.base_channels = base  # Width of the first (full-resolution) level.
  config.model.channel_multipliers = multipliers  # Width of each level, times base_channels.
  config.model.num_res_blocks = 1  # Residual blocks per level.

  config.loss = ml_collections.ConfigDict()
  config.loss.kl_weight = 1e-6  # Weight of KL(q(z|x) || N(0, I)) per element.

  config.optimizer = common.optimizer_config(learning_rate=2e-3 if cpu else 1e-4, warmup_steps=50)
  config.train = common.train_config(
      num_steps=4 if tiny else 800 if cpu else 200_000,
      log_every=1 if tiny else 10 if cpu else 100,
      checkpoint_every=2 if tiny else 200 if cpu else 5000,
  )
  config.mesh = common.mesh_config()
  # Clips encoded after training to measure the per-channel latent mean and std that the
  # diffusion stage normalises with.
  config.latent_stats_clips = 8 if tiny else 64 if cpu else 1024
  return config.lock()
