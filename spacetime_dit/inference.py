"""Text -> video with a trained DiT and autoencoder: the library behind `spacetime_dit.sample`.

    generator = inference.Generator.from_workdir("runs/quickstart")
    videos = generator.generate(["a red circle moving right"], frames=9, height=32, width=40)

The same `Generator` writes the periodic samples during training, so what the trainer
shows is exactly what the sample command produces.
"""

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from spacetime_dit import config_types
from spacetime_dit import video_io
from spacetime_dit.diffusion import flow
from spacetime_dit.diffusion import samplers
from spacetime_dit.models import autoencoder as autoencoder_lib
from spacetime_dit.sharding import mesh as mesh_lib
from spacetime_dit.training import builders
from spacetime_dit.training import steps


@dataclasses.dataclass
class Generator:
  """A trained text-to-video pipeline: tokenizer -> DiT sampler -> autoencoder decoder."""

  dit: nn.Module
  dit_params: Any
  autoencoder: nn.Module
  autoencoder_params: Any
  latent_mean: np.ndarray  # (C,) per-channel statistics the DiT was trained on.
  latent_std: np.ndarray
  tokenizer: Any
  diffusion: config_types.DiffusionConfig

  def __post_init__(self):
    self._velocity = jax.jit(self._guided_velocity)
    self._decode = jax.jit(self._decode_latent)

  @classmethod
  def from_workdir(cls, workdir: str, mesh=None, rules=None) -> "Generator":
    """Loads the latest checkpoint of a DiT run and its autoencoder."""
    if mesh is None:
      mesh = mesh_lib.make_mesh(config_types.MeshConfig())
      rules = config_types.MeshConfig().rules
    config, dit, dit_params, tokenizer, _ = builders.restore_params(workdir, mesh, rules)
    if config.stage != "dit":
      raise ValueError(
          f"{workdir} holds a {config.stage!r} run; sampling needs a diffusion-transformer run"
          " (trained with experiments/base.py)."
      )
    ae_dir = builders.autoencoder_workdir(config, workdir)
    _, autoencoder, ae_params, _, _ = builders.restore_params(ae_dir, mesh, rules)
    mean, std = builders.load_latent_stats(ae_dir)
    diffusion = config_types.dataclass_from_config(
        config_types.DiffusionConfig, config.diffusion, path="config.diffusion"
    )
    return cls(dit, dit_params, autoencoder, ae_params, mean, std, tokenizer, diffusion)

  def latent_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(t, h, w) of the latent for a video size; a clear error when the size cannot work.

    Frames must be 1 + k * temporal factor (times the temporal patch), height and width
    multiples of spatial factor x patch.
    """
    ae, patch = self.autoencoder.config, self.dit.config.patch_size
    units = (ae.temporal_factor * patch[0], ae.spatial_factor * patch[1], ae.spatial_factor * patch[2])
    frames_ok = frames >= 1 and (frames - 1) % ae.temporal_factor == 0
    frames_ok = frames_ok and (1 + (frames - 1) // ae.temporal_factor) % patch[0] == 0
    sizes_ok = all(n >= u and n % u == 0 for n, u in zip((height, width), units[1:]))
    if not (frames_ok and sizes_ok):
      near = [max(u, n - n % u) for n, u in zip((height, width), units[1:])]
      raise ValueError(
          f"cannot sample {frames} frames of {height}x{width}: this model needs frames = 1 + k*"
          f"{ae.temporal_factor} (e.g. {1 + max(frames - 1, 0) // ae.temporal_factor * ae.temporal_factor})"
          f" and height, width multiples of {units[1]} and {units[2]} (autoencoder factor"
          f" {ae.spatial_factor} x patch {patch[1:]}; e.g. {near[0]}x{near[1]})."
      )
    return autoencoder_lib.latent_shape(ae, frames, height, width)

  def _guided_velocity(self, params, x, t, ids, mask, guidance):
    """Classifier-free guided velocity: one batched call for the text and the null text."""
    batch = x.shape[0]
    x2 = jnp.concatenate([x, x])
    t2 = jnp.concatenate([t, t])
    drop = jnp.concatenate([jnp.zeros((batch,), bool), jnp.ones((batch,), bool)])
    pred = self.dit.apply(
        {"params": params}, x2, t2, jnp.concatenate([ids, ids]), jnp.concatenate([mask, mask]),
        drop_text_b=drop,
    )
    v = flow.to_velocity(pred, x2, t2, self.diffusion.prediction)
    return samplers.guided_velocity(v[:batch], v[batch:], guidance)

  def _decode_latent(self, params, latent):
    z = latent * self.latent_std + self.latent_mean
    video = self.autoencoder.apply({"params": params}, z, method=self.autoencoder.decode)
    return steps.video_from_model_range(video)

  def generate(
      self,
      prompts: Sequence[str],
      *,
      frames: int,
      height: int,
      width: int,
      steps: int | None = None,
      guidance: float | None = None,
      seed: int = 0,
      progress: bool = True,
  ) -> np.ndarray:
    """Samples one clip per prompt; returns uint8 (B, frames, height, width, 3)."""
    if not prompts:
      raise ValueError("generate() needs at least one prompt.")
    steps = self.diffusion.sample_steps if steps is None else steps
    guidance = self.diffusion.guidance if guidance is None else guidance
    grid = self.latent_grid(frames, height, width)
    pt, ph, pw = self.dit.config.patch_size
    num_tokens = math.prod(n // p for n, p in zip(grid, (pt, ph, pw)))
    shift = flow.resolution_shift(num_tokens, self.diffusion.shift_base_tokens, self.diffusion.base_shift)
    ids, mask = (jnp.asarray(a) for a in self.tokenizer(list(prompts)))
    channels = self.latent_mean.shape[0]
    noise = jax.random.normal(jax.random.PRNGKey(seed), (len(prompts), *grid, channels), jnp.float32)

    def velocity_fn(x, t):
      return self._velocity(self.dit_params, x, t, ids, mask, guidance)

    bar = tqdm.tqdm(total=steps, desc="sampling", disable=not progress, leave=False)
    sampler = samplers.heun_sample if self.diffusion.sampler == "heun" else samplers.euler_sample
    latent = sampler(
        velocity_fn, noise, samplers.sampling_timesteps(steps, shift), progress=lambda *_: bar.update(1)
    )
    bar.close()
    return np.asarray(self._decode(self.autoencoder_params, latent))


def write_samples(
    generator: Generator, directory: str, prompts: Sequence[str], *, write: bool = True, fps: int = 8, **kwargs
) -> list[str]:
  """Generates each prompt and writes `<directory>/<i>_<prompt>.mp4`; returns the paths.

  `kwargs` go to `Generator.generate`. With `write=False` it only generates (the other
  processes of a multi-process job must join the computation but not write).
  """
  videos = generator.generate(prompts, **kwargs)
  if not write:
    return []
  os.makedirs(directory, exist_ok=True)
  paths = []
  for i, (prompt, video) in enumerate(zip(prompts, videos)):
    name = "".join(c if c.isalnum() else "_" for c in prompt)[:60]
    path = os.path.join(directory, f"{i:02d}_{name}.mp4")
    video_io.write_mp4(path, video, fps=fps)
    paths.append(path)
  return paths
