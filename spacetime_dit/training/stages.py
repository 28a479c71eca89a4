"""The two training stages: the video autoencoder, then the DiT on its latents.

Each stage resolves its config into frozen dataclasses, builds the mesh, creates or
restores the sharded state (a workdir with checkpoints resumes), and hands a jitted step
to the shared loop.
"""

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from data_pipelines import loader
from data_pipelines import packing
from spacetime_dit import conditioning as conditioning_lib
from spacetime_dit import config_types
from spacetime_dit import inference
from spacetime_dit import video_io
from spacetime_dit.models import autoencoder as autoencoder_lib
from spacetime_dit.models import patchify as patchify_lib
from spacetime_dit.sharding import mesh as mesh_lib
from spacetime_dit.training import builders
from spacetime_dit.training import checkpointing
from spacetime_dit.training import data as data_lib
from spacetime_dit.training import ema as ema_lib
from spacetime_dit.training import latent_cache
from spacetime_dit.training import loop
from spacetime_dit.training import metrics as metrics_lib
from spacetime_dit.training import state as state_lib
from spacetime_dit.training import steps


def _resolve(config: ml_collections.ConfigDict):
  """The config sections every stage needs, as frozen dataclasses."""
  train = config_types.dataclass_from_config(config_types.TrainConfig, config.train, path="config.train")
  data = config_types.dataclass_from_config(config_types.DataConfig, config.data, path="config.data")
  mesh = config_types.dataclass_from_config(config_types.MeshConfig, config.mesh, path="config.mesh")
  return train, data, mesh


def check_config(config: ml_collections.ConfigDict) -> None:
  """Resolves every section and the mesh now, so a bad value fails before any training.

  (A DiT config with an impossible mesh must not first spend minutes on its autoencoder.)
  """
  _, _, mesh_cfg = _resolve(config)
  mesh_lib.mesh_shape(mesh_cfg, jax.device_count())
  builders.build_optimizer(config)
  if config.stage == "autoencoder":
    builders.autoencoder_config(config)
    builders.build_autoencoder_training(config)  # Resolves the loss section and the discriminator.
    loss, num_steps = config.loss, config.train.num_steps
    if loss.disc_weight > 0 and loss.disc_start >= num_steps:
      raise ValueError(
          f"config.loss.disc_start={loss.disc_start} is not below config.train.num_steps="
          f"{num_steps}: the discriminator would run every step and never take effect. Start it"
          f" earlier (e.g. --config.loss.disc_start={num_steps // 10}) or set"
          " --config.loss.disc_weight=0.")
  else:
    config_types.dataclass_from_config(config_types.DiffusionConfig, config.diffusion, path="config.diffusion")
    config_types.dataclass_from_config(config_types.SampleConfig, config.sample, path="config.sample")
    conditioning_lib.ConditioningConfig.from_config(config)
    builders.dit_config(config, latent_channels=1)


def _setup(config, workdir, init_params, tx, mesh, rules, train):
  """Checkpointer, writer, and (abstract state, shardings)."""
  builders.save_config(config, workdir)
  abstract, shardings = state_lib.state_shardings(init_params, tx, mesh, rules, config.seed, train.ema_decay)
  checkpointer = checkpointing.Checkpointer(
      os.path.join(workdir, "checkpoints"), max_to_keep=train.keep_checkpoints,
      keep_every=train.keep_every, async_save=train.async_checkpointing,
  )
  writer = metrics_lib.MetricsWriter(workdir, enabled=jax.process_index() == 0)
  return checkpointer, writer, abstract, shardings


def _make_mesh(mesh_cfg, train, workdir):
  """The device mesh, after pointing XLA's persistent compilation cache at the workdir."""
  if train.compilation_cache and not jax.config.jax_compilation_cache_dir:
    # A cache already named (JAX_COMPILATION_CACHE_DIR, e.g. shared by a test session) wins.
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "xla_cache"))
  return mesh_lib.make_mesh(mesh_cfg)


def _start_state(checkpointer, abstract, iterator, init_params, tx, mesh, rules, seed):
  """Restores the newest checkpoint (and the data position), or initialises from scratch."""
  latest = checkpointer.latest_step()
  if latest is not None:
    logging.info("resuming from step %d", latest)
    changed = checkpointer.changed_since(latest)
    if changed:
      logging.warning(
          "resuming step %d with a config that differs from the one it was trained with; the"
          " run continues with the new values:\n  %s", latest, "\n  ".join(changed))
    return checkpointer.restore(latest, abstract, iterator)
  ema_decay = getattr(abstract, "ema_decay", 0.0)  # `_setup` made the abstract state from train.ema_decay.
  return state_lib.create_state(init_params, tx, mesh, rules, seed, ema_decay)


def _jit_step(step_fn, state_shardings, mesh, rules, batch_ndims: dict[str, int], skip_nonfinite=False):
  batch_shardings = {k: mesh_lib.batch_sharding(mesh, rules, n) for k, n in batch_ndims.items()}
  return jax.jit(
      loop.guard_nonfinite(step_fn, skip_nonfinite),
      in_shardings=(state_shardings, batch_shardings, None),
      out_shardings=(state_shardings, mesh_lib.replicated(mesh)),
      donate_argnums=(0,),
  )


def shape_check(ae_cfg, patch=(1, 1, 1)):
  """(T, H, W) -> None if the autoencoder (and a DiT patch) can take a clip of that shape,
  else the rule it breaks (for `data_lib.usable_indices`)."""

  def check(shape):
    try:
      patchify_lib.patch_grid(autoencoder_lib.latent_shape(ae_cfg, *shape), patch)
    except ValueError as e:
      return str(e)
    return None

  return check


def train_autoencoder(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Trains the video autoencoder in `workdir`, then writes its latent statistics."""
  train, data_cfg, mesh_cfg = _resolve(config)
  rules = mesh_cfg.rules
  model, discriminator, init_params, tx, schedule, loss = builders.build_autoencoder_training(config)
  mesh = _make_mesh(mesh_cfg, train, workdir)
  checkpointer, writer, abstract, shardings = _setup(config, workdir, init_params, tx, mesh, rules, train)
  iterator, _ = data_lib.make_iterator(
      data_cfg,
      tokens_per_clip=math.prod,
      batch_multiple=mesh_lib.batch_axis_size(mesh, rules),
      tokenize=data_lib.no_text,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      check_shape=shape_check(model.config),
  )
  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      state = _start_state(checkpointer, abstract, iterator, init_params, tx, mesh, rules, config.seed)
      step_fn = _jit_step(
          functools.partial(
              steps.autoencoder_step, model=model, discriminator=discriminator, tx=tx, schedule=schedule,
              loss=loss,
          ),
          shardings, mesh, rules, {"video": 5}, train.skip_nonfinite,
      )
      ctx = loop.LoopContext(
          train=train, mesh=mesh, rules=rules, checkpointer=checkpointer, writer=writer,
          batch_keys=("video",), tokens_per_batch=lambda b: int(b["video"].shape[0] * math.prod(b["video"].shape[1:4])),
          description="autoencoder", prefetch=data_cfg.prefetch_to_device,
      )
      state = loop.run(state, step_fn, {}, iterator, ctx)
      # The weights the DiT stage will load (`builders.restore_params`): the EMA if there is one.
      ae_params = builders.autoencoder_params(ema_lib.sampling_params(state))
      mean, std = _latent_statistics(model, ae_params, data_cfg, config.latent_stats_clips)
    _write_reconstruction(model, ae_params, data_cfg, workdir)
    builders.save_latent_stats(workdir, mean, std)
  finally:
    iterator.close()  # Stops grain worker processes, if any (also when training fails).
    checkpointer.close()
    writer.close()


def _latent_statistics(model, params, data_cfg, num_clips, batch_size=8) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std of the posterior means over `num_clips` training clips.

  The DiT trains on `(z - mean) / std`, so every latent channel enters the diffusion at
  unit scale whatever the autoencoder learned (as in SD3's and Wan's latent scaling). The
  clips all have the data's most common native shape, so the encoder compiles once; the
  statistics are per channel and do not depend on the frame size.
  """
  source = data_lib.make_source(data_cfg)
  candidates, shapes = data_lib.training_indices(data_cfg, source, 50 * num_clips)
  candidates, shapes = data_lib.usable_indices(list(candidates), shapes, shape_check(model.config))
  shape, indices = data_lib.common_shape_indices(candidates, shapes, num_clips)
  batch_size = max(1, min(batch_size, len(indices)))

  @jax.jit
  def moments(params, video):
    mean = steps.encode_video(model, params, video)
    flat = mean.reshape(-1, mean.shape[-1]).astype(jnp.float32)
    return jnp.sum(flat, 0), jnp.sum(jnp.square(flat), 0), flat.shape[0]

  count, total, total_sq = 0, 0.0, 0.0
  for start in range(0, len(indices) - batch_size + 1, batch_size):
    video = np.stack([source[i]["video"] for i in indices[start:start + batch_size]])
    s, sq, n = jax.device_get(moments(params, video))
    count, total, total_sq = count + n, total + np.float64(s), total_sq + np.float64(sq)
  if not count:
    raise ValueError(
        f"found no training clips to measure latent statistics (data.source={data_cfg.source!r},"
        f" most common shape {shape}); raise latent_stats_clips or check the data."
    )
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-12))
  logging.info("latent mean %s std %s (%d clips of %s)", np.round(mean, 3), np.round(std, 3),
               len(indices), shape)
  return mean.astype(np.float32), std.astype(np.float32)


def _write_reconstruction(model, params, data_cfg, workdir) -> None:
  """W/samples/reconstruction.mp4: input | reconstruction, side by side, for a quick look.

  Every process computes (the parameters may span them all); process 0 writes.
  """
  source = data_lib.make_source(data_cfg)
  candidates, shapes = data_lib.training_indices(data_cfg, source, 200)
  candidates, shapes = data_lib.usable_indices(list(candidates), shapes, shape_check(model.config))
  index = int(candidates[max(range(len(shapes)), key=lambda k: (shapes[k][0], -k))])
  video = source[index]["video"]
  recon, _, _ = model.apply(
      {"params": params}, steps.video_to_model_range(jnp.asarray(video[None])), sample_posterior=False
  )
  recon = np.asarray(steps.video_from_model_range(recon[0]))
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
  video_io.write_mp4(os.path.join(workdir, "samples", "reconstruction.mp4"), np.concatenate([video, recon], axis=2))


def _latent_cache(autoencoder, ae_params, ae_step, ae_dir, data_cfg, workdir, rules, front_end=None):
  """Encodes the diffusion stage's training clips once into W/latents (see `latent_cache`).

  Every process encodes its own share of the clips on its own devices and writes its shard;
  a frozen text front end's caption features are stored with them (`latent_cache.text_encode_for`).
  """
  text = latent_cache.describe_text(front_end)
  text_part = {} if text is None else {"text": text}  # Trainable ids: the old fingerprint.
  video_source = data_lib.make_source(data_cfg)
  indices, _ = data_lib.training_indices(data_cfg, video_source, data_cfg.latent_cache_clips)
  indices, _ = data_lib.usable_indices(
      list(indices), loader.shapes_of(video_source, indices), shape_check(autoencoder.config)
  )
  ae_dir = os.path.abspath(ae_dir)
  # Collective when the parameters span processes: every process gets here together.
  encode = latent_cache.make_local_encoder(autoencoder, ae_params, rules=rules)
  return latent_cache.build(
      video_source, indices, encode,
      fingerprint=latent_cache.fingerprint(
          data=latent_cache.describe_data(data_cfg, video_source), autoencoder=ae_dir,
          autoencoder_step=ae_step, **text_part,
      ),
      directory=os.path.join(workdir, latent_cache.DIRECTORY),
      process_index=jax.process_index(), process_count=jax.process_count(),
      barrier=multihost_utils.sync_global_devices if jax.process_count() > 1 else None,
      info=latent_cache.autoencoder_info(ae_dir, ae_step, autoencoder.config),
      text_encode=latent_cache.text_encode_for(front_end),
  )


def _latent_source(autoencoder, ae_params, ae_step, ae_dir, data_cfg, workdir, rules, front_end=None):
  """The diffusion stage's latent clips: encoded ahead of time, cached here, or None
  (the step then encodes every batch)."""
  if data_cfg.latent_dir:
    return latent_cache.open_encoded(
        data_cfg.latent_dir, ae_dir=os.path.abspath(ae_dir), ae_step=ae_step,
        config=autoencoder.config,
    )
  if data_cfg.latent_cache_clips:
    return _latent_cache(autoencoder, ae_params, ae_step, ae_dir, data_cfg, workdir, rules, front_end)
  if data_cfg.packing:
    raise ValueError(
        "data.packing=True packs latent clips, but this run has none: set"
        " --config.data.latent_cache_clips=N (encode N clips once in this run) or"
        " --config.data.latent_dir=DIR (from `python -m spacetime_dit.encode_latents`)."
    )
  return None


@dataclasses.dataclass(frozen=True)
class _DitData:
  """The diffusion stage's data: iterator, the step that reads it, and its batch layout."""

  iterator: Any
  step: Callable
  batch_ndims: dict[str, int]  # Field -> rank, the fields the jitted step takes.
  tokens_per_batch: Callable[[Any], int]  # Real (non-padding) tokens of a host batch.


def _dit_data(data_cfg, *, model, autoencoder, source, tokenizer, diffusion, tx,
              schedule, mesh, rules, conditioning=None) -> _DitData:
  """Bucketed clips (videos or latents) or packed latent rows, with the matching step."""
  ae_cfg = autoencoder.config
  patch = model.config.patch_size
  batch_multiple = mesh_lib.batch_axis_size(mesh, rules)
  if data_cfg.packing:
    rows = data_cfg.token_budget // data_cfg.pack_length
    if rows % batch_multiple:
      raise ValueError(
          f"data.token_budget // data.pack_length = {rows} packed rows per batch, not a multiple"
          f" of the {batch_multiple} data-parallel shards; set --config.data.token_budget to a"
          f" multiple of {batch_multiple * data_cfg.pack_length}."
      )
    iterator = packing.make_packed_iterator(
        source, patch_size=patch, seq_len=data_cfg.pack_length,
        max_segments=data_cfg.max_clips_per_pack, rows_per_batch=rows // jax.process_count(),
        seed=data_cfg.seed, tokenize=tokenizer, indices=source.indices,
        latent_shape_of=lambda shape: autoencoder_lib.latent_shape(ae_cfg, *shape),
        process_index=jax.process_index(), process_count=jax.process_count(),
        num_threads=data_cfg.num_threads, num_workers=data_cfg.num_workers,
    )
    step = functools.partial(
        steps.dit_packed_step, model=model, diffusion=diffusion, tx=tx, schedule=schedule,
        conditioning=conditioning,
    )
    text = {"text_features": 4} if getattr(tokenizer, "feature_shape", None) else {"text_ids": 3}
    ndims = {"tokens": 3, "positions": 3, "segment_ids": 2, **text, "text_mask": 3, "grid": 3}
    return _DitData(iterator, step, ndims, lambda b: int(np.count_nonzero(b["segment_ids"])))

  tokens_per_clip = data_lib.dit_tokens_per_clip(ae_cfg, patch)

  def tokens_per_batch(batch):
    if "latent" in batch:
      return len(batch["latent"]) * math.prod(n // p for n, p in zip(batch["latent"].shape[1:4], patch))
    return len(batch["video"]) * tokens_per_clip(batch["video"].shape[1:4])

  iterator, _ = data_lib.make_iterator(
      data_cfg, tokens_per_clip=tokens_per_clip, batch_multiple=batch_multiple,
      tokenize=tokenizer, process_index=jax.process_index(), process_count=jax.process_count(),
      source=source, indices=None if source is None else source.indices,
      check_shape=shape_check(ae_cfg, patch),
  )
  step = functools.partial(
      steps.dit_step, model=model, autoencoder=autoencoder, patch_size=patch, diffusion=diffusion,
      tx=tx, schedule=schedule, conditioning=conditioning,
  )
  field = "video" if source is None else "latent"
  text = {"text_features": 3} if getattr(tokenizer, "feature_shape", None) else {"text_ids": 2}
  return _DitData(iterator, step, {field: 5, **text, "text_mask": 2}, tokens_per_batch)


def train_dit(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Trains the text-conditioned DiT in `workdir` on a finished autoencoder's latents."""
  train, data_cfg, mesh_cfg = _resolve(config)
  rules = mesh_cfg.rules
  diffusion = config_types.dataclass_from_config(config_types.DiffusionConfig, config.diffusion, path="config.diffusion")
  sample_cfg = config_types.dataclass_from_config(config_types.SampleConfig, config.sample, path="config.sample")
  ae_dir = builders.autoencoder_workdir(config, workdir)
  if not builders.autoencoder_finished(ae_dir):
    raise FileNotFoundError(
        f"no finished autoencoder in {ae_dir} (no {builders.LATENT_STATS_FILE}). Train one with"
        f" `python -m spacetime_dit.train --config=experiments/autoencoder.py:{config.variant}"
        f" --workdir={ae_dir}` or point --config.autoencoder.workdir at a finished run."
    )
  mesh = _make_mesh(mesh_cfg, train, workdir)
  _, autoencoder, ae_params, _, ae_step = builders.restore_params(ae_dir, mesh, rules)
  latent_mean, latent_std = builders.load_latent_stats(ae_dir)
  ae_cfg = autoencoder.config
  model, init_params, tokenizer = builders.build_dit(config, ae_cfg.latent_channels)
  tx, schedule = builders.build_optimizer(config)
  checkpointer, writer, abstract, shardings = _setup(config, workdir, init_params, tx, mesh, rules, train)
  frozen = {
      "autoencoder": ae_params,
      "latent_mean": jax.device_put(latent_mean, mesh_lib.replicated(mesh)),
      "latent_std": jax.device_put(latent_std, mesh_lib.replicated(mesh)),
  }
  source = _latent_source(autoencoder, ae_params, ae_step, ae_dir, data_cfg, workdir, rules, tokenizer)
  data = _dit_data(
      data_cfg, model=model, autoencoder=autoencoder, source=source, tokenizer=tokenizer,
      diffusion=diffusion, tx=tx, schedule=schedule, mesh=mesh, rules=rules,
      conditioning=conditioning_lib.ConditioningConfig.from_config(config),
  )

  # One generator for every periodic sample: its jitted sampler compiles once and only
  # the parameters change between calls.
  generator = inference.Generator(
      model, None, autoencoder, ae_params, latent_mean, latent_std, tokenizer, diffusion
  )

  def on_sample(state, done):
    generator.dit_params = ema_lib.sampling_params(state)  # The EMA, as `sample` would load.
    # Every process samples (the parameters may be sharded across them); process 0 writes.
    inference.write_samples(
        generator, os.path.join(workdir, "samples", f"step_{done:07d}"), sample_cfg.prompts,
        write=jax.process_index() == 0, frames=sample_cfg.frames, height=sample_cfg.height,
        width=sample_cfg.width, seed=sample_cfg.seed, fps=sample_cfg.fps, progress=False,
    )

  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      state = _start_state(checkpointer, abstract, data.iterator, init_params, tx, mesh, rules, config.seed)
      step_fn = _jit_step(data.step, shardings, mesh, rules, data.batch_ndims, train.skip_nonfinite)
      ctx = loop.LoopContext(
          train=train, mesh=mesh, rules=rules, checkpointer=checkpointer, writer=writer,
          batch_keys=tuple(data.batch_ndims), tokens_per_batch=data.tokens_per_batch,
          on_sample=on_sample, description="dit", prefetch=data_cfg.prefetch_to_device,
      )
      state = loop.run(state, step_fn, frozen, data.iterator, ctx)
      on_sample(state, int(jax.device_get(state.step)))
  finally:
    data.iterator.close()  # Stops grain worker processes, if any (also when training fails).
    checkpointer.close()
    writer.close()
