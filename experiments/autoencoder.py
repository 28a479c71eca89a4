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
    # temporal, spatial, latent channels, base channels, per-level multipliers.
    # cpu: 16 latent channels (compression 2*4*4*3/16 = 6x) gave +1.4 dB over 8 at 800 steps.
    "cpu": (2, 4, 16, 16, (1, 2, 4)),
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
  config.loss.l1_weight = 1.0  # Weight of mean |recon - video| (keeps edges sharp).
  config.loss.l2_weight = 1.0  # Weight of mean (recon - video)^2 (PSNR's term).
  config.loss.kl_weight = 1e-6  # Weight of KL(q(z|x) || N(0, I)) per element.
  # Weight of the adaptively weighted 3-D PatchGAN term (VQGAN, Esser et al. 2021); 0 builds no
  # discriminator. Off for tiny/cpu, whose target is PSNR, which a GAN only lowers. At pod scale
  # 0.1: between Open-Sora 2.0's 0.05 (3-D N-layer discriminator) and latent diffusion's 0.5
  # (Rombach et al. 2022), both of which also have an LPIPS term to anchor textures; we have none
  # (it needs downloaded weights), so the GAN must not dominate the pixel losses.
  config.loss.disc_weight = 0.0 if cpu else 0.1
  # Step at which the GAN term and the discriminator start: after the pixel losses have shaped
  # the reconstructions (latent diffusion starts at 50k steps; here 10% of the run).
  config.loss.disc_start = 20_000
  config.loss.disc_channels = 8 if tiny else 64  # Width of the discriminator's first layer.
  config.loss.disc_layers = 3  # Strided discriminator layers (PatchGAN's n_layers: 70 px patches).

  # cpu: 2e-3 trained with frequent loss spikes; 1e-3 was steadier and ahead at equal steps.
  config.optimizer = common.optimizer_config(learning_rate=1e-3 if cpu else 1e-4, warmup_steps=50)
  config.train = common.train_config(
      num_steps=4 if tiny else 2400 if cpu else 200_000,
      log_every=1 if tiny else 10 if cpu else 100,
      checkpoint_every=2 if tiny else 400 if cpu else 5000,
      # No EMA of the weights: no run has measured one helping the autoencoder. (> 0 works: the
      # latent statistics and the DiT stage then use the averaged encoder and decoder.)
      ema_decay=0.0,
  )
  config.mesh = common.mesh_config()
  # Clips encoded after training to measure the per-channel latent mean and std that the
  # diffusion stage normalises with.
  config.latent_stats_clips = 8 if tiny else 64 if cpu else 1024
  return config.lock()


def sweep_latent_channels():
  """Latent channels C: more keeps more detail (PSNR) but gives the DiT a wider target."""
  for channels in (8, 16):
    yield {"model.latent_channels": channels}


# Run with `python -m launch.sweep --config=experiments/autoencoder.py:cpu --sweep=latent_channels`.
SWEEPS = {"latent_channels": sweep_latent_channels}
