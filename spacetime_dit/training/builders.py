"""Config -> modules, optimizers and trained parameters; the single place that knows how.

Everything here reads a resolved `ConfigDict` once and hands frozen dataclasses to the
model code (which never sees the ConfigDict).
"""

import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from spacetime_dit import config_types
from spacetime_dit.models import autoencoder as autoencoder_lib
from spacetime_dit.models import discriminator as discriminator_lib
from spacetime_dit.models import dit as dit_lib
from spacetime_dit.models import text as text_lib
from spacetime_dit.training import checkpointing
from spacetime_dit.training import ema as ema_lib
from spacetime_dit.training import optimizer as optimizer_lib
from spacetime_dit.training import state as state_lib
from spacetime_dit.training import steps

# The EMA decay of a state built only to restore a checkpoint that holds an average (never trained).
_RESTORE_ONLY_EMA_DECAY = 0.5

CONFIG_FILE = "config.json"
LATENT_STATS_FILE = "latent_stats.json"


def autoencoder_config(config: ml_collections.ConfigDict) -> autoencoder_lib.AutoencoderConfig:
  return config_types.dataclass_from_config(autoencoder_lib.AutoencoderConfig, config.model, path="config.model")


def dit_config(config: ml_collections.ConfigDict, latent_channels: int) -> dit_lib.DiTConfig:
  return config_types.dataclass_from_config(
      dit_lib.DiTConfig, config.model, path="config.model", latent_channels=latent_channels
  )


def build_autoencoder(config: ml_collections.ConfigDict):
  """(module, init_params) of the autoencoder; init_params(rng) returns boxed params."""
  model = autoencoder_lib.CausalVideoAutoencoder(autoencoder_config(config))
  cfg = model.config
  dummy = jnp.zeros((1, 1 + cfg.temporal_factor, cfg.spatial_factor, cfg.spatial_factor, 3), jnp.float32)

  def init_params(rng):
    return model.init({"params": rng, "sample": rng}, dummy, sample_posterior=True)["params"]

  return model, init_params


def loss_config(config: ml_collections.ConfigDict) -> steps.AutoencoderLossConfig:
  """The autoencoder's `loss` section (configs written before its GAN fields get their defaults)."""
  return config_types.dataclass_from_config(steps.AutoencoderLossConfig, config.loss, path="config.loss")


def build_discriminator(loss: steps.AutoencoderLossConfig, ae_config: autoencoder_lib.AutoencoderConfig):
  """(module, init_params) of the 3-D patch discriminator; init_params(rng) returns boxed params."""
  model = discriminator_lib.PatchDiscriminator(
      discriminator_lib.DiscriminatorConfig(
          channels=loss.disc_channels, num_layers=loss.disc_layers, conv_impl=ae_config.conv_impl,
          dtype=ae_config.dtype,
      )
  )
  # Parameter shapes do not depend on the clip size: one small frame initialises them.
  dummy = jnp.zeros((1, 1, 8, 8, ae_config.video_channels), jnp.float32)

  def init_params(rng):
    return model.init(rng, dummy)["params"]

  return model, init_params


def build_autoencoder_training(config: ml_collections.ConfigDict):
  """Everything the autoencoder stage trains with, in the layout its loss implies.

  Returns:
    (model, discriminator or None, init_params, tx, schedule, loss). Without a discriminator
    (`loss.disc_weight == 0`) the parameters are the bare autoencoder's, exactly as before the
    GAN existed. With one they are {"autoencoder", "discriminator"}; each network gets its own
    copy of the configured optimizer (so neither one's gradient clipping or Adam statistics see
    the other's), and the discriminator's is masked (zero update, state untouched) until
    `disc_start`: its Adam statistics and warmup begin when it starts training.
  """
  loss = loss_config(config)
  model, ae_init = build_autoencoder(config)
  tx, schedule = build_optimizer(config)
  if not loss.use_discriminator:
    return model, None, ae_init, tx, schedule, loss
  discriminator, d_init = build_discriminator(loss, model.config)

  def init_params(rng):
    # The autoencoder takes the same key as without the GAN, so both layouts start alike.
    return {"autoencoder": ae_init(rng), "discriminator": d_init(jax.random.fold_in(rng, 1))}

  d_tx, _ = build_optimizer(config)
  # The mask's counter advances once per update, like `TrainState.step`, so the two agree.
  d_tx = optax.transforms.conditionally_mask(d_tx, lambda count: count >= loss.disc_start)
  labels = {"autoencoder": "autoencoder", "discriminator": "discriminator"}
  tx = optax.multi_transform({"autoencoder": tx, "discriminator": d_tx}, labels)
  return model, discriminator, init_params, tx, schedule, loss


def autoencoder_params(params: Any) -> Any:
  """The bare autoencoder parameters from either state layout (with or without discriminator)."""
  if isinstance(params, dict) and set(params) == {"autoencoder", "discriminator"}:
    return params["autoencoder"]
  return params


def build_dit(config: ml_collections.ConfigDict, latent_channels: int):
  """(module, init_params, text front end) of the text-conditioned DiT.

  The front end (`text_lib.make_front_end`) maps texts -> (ids or frozen features, mask), what
  the DiT's third argument takes; the loader, the latent cache and the sampler all use it.
  """
  cfg = dit_config(config, latent_channels)
  model = dit_lib.DiT(cfg)
  front_end = text_lib.make_front_end(cfg.text)
  pt, ph, pw = cfg.patch_size
  dummy = jnp.zeros((1, pt, ph, pw, latent_channels), jnp.float32)
  s = cfg.text.max_length
  # Parameter shapes do not depend on the text's values: zeros of the right kind (no encoder run).
  text = jnp.zeros((1, s, cfg.text.feature_width), jnp.float32) if cfg.text.frozen else jnp.zeros((1, s), jnp.int32)
  mask = jnp.ones((1, s), bool)

  def init_params(rng):
    return model.init(rng, dummy, jnp.zeros((1,)), text, mask)["params"]

  return model, init_params, front_end


def build_optimizer(config: ml_collections.ConfigDict):
  """(tx, schedule) from the `optimizer` and `train` sections."""
  opt = config_types.dataclass_from_config(config_types.OptimizerConfig, config.optimizer, path="config.optimizer")
  return optimizer_lib.make_optimizer(opt, config.train.num_steps)


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the resolved config as W/config.json (process 0 only)."""
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG_FILE), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """Reads W/config.json back into a ConfigDict (lists come back as tuples where used)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} does not exist: {workdir!r} is not a training workdir. Pass the --workdir"
        " that `python -m spacetime_dit.train` wrote to."
    )
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


def save_latent_stats(workdir: str, mean: np.ndarray, std: np.ndarray) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, LATENT_STATS_FILE), "w", encoding="utf-8") as f:
      json.dump({"mean": [float(x) for x in mean], "std": [float(x) for x in std]}, f, indent=2)


def load_latent_stats(workdir: str) -> tuple[np.ndarray, np.ndarray]:
  with open(os.path.join(workdir, LATENT_STATS_FILE), encoding="utf-8") as f:
    stats = json.load(f)
  return np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32)


def autoencoder_workdir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where a DiT run's autoencoder lives: `config.autoencoder.workdir`, else W/autoencoder.

  A relative path is relative to the DiT's workdir, so a run directory can be moved whole.
  """
  path = config.autoencoder.workdir or "autoencoder"
  return path if os.path.isabs(path) else os.path.join(workdir, path)


def autoencoder_finished(workdir: str) -> bool:
  """An autoencoder run is finished once its latent statistics are written (its last act)."""
  return os.path.exists(os.path.join(workdir, LATENT_STATS_FILE))


def restore_params(
    workdir: str, mesh, rules, *, use_ema: bool = True
) -> tuple[ml_collections.ConfigDict, nn.Module, Any, Any, int]:
  """Loads a trained stage: (config, module, params, text front end or None, step) from its latest checkpoint.

  The front end (DiT stages only) is `build_dit`'s: texts -> (ids or frozen features, mask).

  `params` are the EMA of the weights (`training.ema`) when the checkpoint holds one and
  `use_ema`, else the raw trained weights.

  For an autoencoder workdir `params` are always the bare autoencoder's, also when it trained
  with a discriminator (whose parameters stay in the checkpoint).
  """
  config = load_config(workdir)
  tokenizer = None
  if config.stage == "autoencoder":
    # The checkpoint's layout follows its loss config: restore it whole, return the autoencoder.
    model, _, init_params, tx, _, _ = build_autoencoder_training(config)
  else:
    tx, _ = build_optimizer(config)
    ae_config = load_config(autoencoder_workdir(config, workdir))
    model, init_params, tokenizer = build_dit(config, ae_config.model.latent_channels)
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  step = checkpointer.latest_step()
  if step is None:
    raise FileNotFoundError(
        f"no checkpoint in {workdir}/checkpoints: train first with"
        f" `python -m spacetime_dit.train --config=... --workdir={workdir}`."
    )
  # The checkpoint, not the config, says whether there is an average to load. Its decay only
  # steers training, which this is not: any value in (0, 1) restores the same arrays, so a
  # config with EMA off (or from before EMA) takes a stand-in.
  has_ema = ema_lib.FIELD in checkpointer.saved_fields(step)
  ema_decay = (config.train.get("ema_decay", 0.0) or _RESTORE_ONLY_EMA_DECAY) if has_ema else 0.0
  abstract, _ = state_lib.state_shardings(init_params, tx, mesh, rules, config.seed, ema_decay)
  state = checkpointer.restore(step, abstract)
  checkpointer.close()
  params = ema_lib.sampling_params(state, use_ema)
  params = autoencoder_params(params) if config.stage == "autoencoder" else params
  return config, model, params, tokenizer, step
