"""The boundary between ml_collections configs and the library's frozen dataclasses.

Experiment files (`experiments/*.py`) build a locked `ConfigDict`; everything below the
entry points sees only frozen, validated dataclasses (big_vision configs, flax gemma
config dataclasses). `dataclass_from_config` refuses unknown fields with the close
matches, so a typo in a config file fails at start-up rather than being silently
ignored.
"""

import dataclasses
import difflib
import typing
from typing import Any, TypeVar

import ml_collections

from spacetime_dit.sharding import rules as rules_lib

_T = TypeVar("_T")


def _to_plain(value: Any) -> Any:
  """ConfigDict -> dict, lists -> tuples (so the result is hashable and frozen)."""
  if isinstance(value, ml_collections.ConfigDict):
    return {k: _to_plain(v) for k, v in value.items()}
  if isinstance(value, dict):
    return {k: _to_plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(_to_plain(v) for v in value)
  return value


def dataclass_from_config(cls: type[_T], section: Any, *, path: str = "config", **extra: Any) -> _T:
  """Builds the frozen dataclass `cls` from one config section.

  Nested dataclass fields are built recursively from nested sections. Fields absent
  from the section keep the dataclass default.

  Raises:
    ValueError: a key of the section is not a field of `cls` (the message lists the
      close matches and the valid fields).
  """
  values = dict(_to_plain(section))
  values.update(extra)
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  kwargs = {}
  for key, value in values.items():
    if key not in fields:
      close = difflib.get_close_matches(key, list(fields), n=3)
      hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
      raise ValueError(
          f"{path}.{key} is not a field of {cls.__name__}.{hint} Valid fields: {sorted(fields)}."
      )
    field_type = hints[key]
    if dataclasses.is_dataclass(field_type) and isinstance(value, dict):
      value = dataclass_from_config(field_type, value, path=f"{path}.{key}")
    kwargs[key] = value
  return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh over the axes ('data', 'fsdp', 'tensor', 'sequence').

  One axis may be -1: it takes all devices the others leave.
  """

  data: int = -1  # Pure data parallelism (replicated weights).
  fsdp: int = 1  # Data parallelism with weights sharded over it (ZeRO-3).
  tensor: int = 1  # Tensor parallelism over heads and MLP width.
  sequence: int = 1  # Sequence (context) parallelism over spacetime tokens.
  rules: tuple[tuple[str, Any], ...] = rules_lib.DEFAULT_RULES  # Logical -> mesh axes.

  def __post_init__(self):
    sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor, "sequence": self.sequence}
    bad = {k: v for k, v in sizes.items() if v == 0 or v < -1}
    if bad:
      raise ValueError(f"mesh axis sizes must be positive or -1 (fill), got {bad}.")
    if list(sizes.values()).count(-1) > 1:
      raise ValueError(
          f"at most one mesh axis may be -1 (take the remaining devices), got {sizes}. Set the"
          " others explicitly, e.g. --config.mesh.fsdp=2."
      )


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with linear warmup, cosine decay and global-norm clipping."""

  learning_rate: float = 3e-4  # Peak learning rate, reached after `warmup_steps`.
  warmup_steps: int = 100  # Linear warmup from 0.
  final_lr_fraction: float = 0.1  # Cosine decay ends at this fraction of the peak.
  weight_decay: float = 0.0  # Decoupled weight decay (Loshchilov & Hutter 2019).
  b1: float = 0.9
  b2: float = 0.99
  grad_clip: float = 1.0  # Global-norm clipping threshold; <= 0 disables it.

  def __post_init__(self):
    if self.learning_rate <= 0:
      raise ValueError(f"optimizer.learning_rate must be > 0, got {self.learning_rate}.")
    if self.warmup_steps < 0:
      raise ValueError(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}.")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Loop schedule of one training stage."""

  num_steps: int = 1000  # Steps of this stage.
  log_every: int = 10  # Steps between metrics.jsonl / TensorBoard rows.
  checkpoint_every: int = 200  # Steps between Orbax checkpoints (the last step always saves).
  keep_checkpoints: int = 2  # Checkpoints kept on disk (oldest deleted first).
  keep_every: int = 0  # >0: also keep every checkpoint whose step is a multiple of this, forever.
  async_checkpointing: bool = True  # Write checkpoints in the background.
  # A non-finite loss or gradient: False stops the run naming the step, metric and last good
  # checkpoint; True skips that update (state unchanged but the step counter) and counts it.
  skip_nonfinite: bool = False
  loss_spike_factor: float = 3.0  # Warn (and count) when loss > factor x running median (0: off).
  sample_every: int = 0  # Steps between sample videos in W/samples (0: only at the end).
  compilation_cache: bool = True  # Persist XLA executables under W/xla_cache across runs.
  # Decay of the EMA of the weights that sampling uses (`training.ema`); 0 turns it off.
  ema_decay: float = 0.0

  def __post_init__(self):
    if not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(
          f"train.ema_decay={self.ema_decay} must be in [0, 1): 0 turns the EMA of the weights"
          " off, values near 1 (e.g. 0.999) average over ~1 / (1 - decay) steps."
      )
    for name in ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
      if getattr(self, name) < 1:
        raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}.")
    if self.sample_every < 0:
      raise ValueError(f"train.sample_every must be >= 0, got {self.sample_every}.")
    if self.keep_every < 0 or self.loss_spike_factor < 0:
      raise ValueError(
          f"train.keep_every ({self.keep_every}) and train.loss_spike_factor"
          f" ({self.loss_spike_factor}) must be >= 0 (0 turns each off)."
      )


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where training clips come from and how they are batched."""

  source: str = "shapesworld"  # "shapesworld" (embedded, procedural) or a prepared data dir.
  seed: int = 0  # Shuffling and ShapesWorld seed.
  sizes: tuple[tuple[int, int], ...] = ((32, 32),)  # ShapesWorld native (H, W) choices.
  lengths: tuple[int, ...] = (1, 9)  # ShapesWorld native frame counts (1 = an image).
  max_objects: int = 1  # ShapesWorld objects per clip.
  camera_pan_prob: float = 0.0  # ShapesWorld probability of a captioned camera pan.
  holdout: tuple[tuple[str, str, str], ...] = ()  # (colour, shape, motion) never trained on.
  num_index_samples: int = 50_000  # Source indices scanned to form buckets.
  token_budget: int = 1024  # Tokens per global batch; bucket batch sizes derive from it.
  max_batch_size: int = 64  # Cap on any bucket's global batch size.
  num_threads: int = 2  # Grain reader threads (processes do not help on small hosts).
  latent_cache_clips: int = 0  # Diffusion stage: clips encoded once and trained on; 0 encodes every step.
  latent_dir: str = ""  # Diffusion stage: latents from `spacetime_dit.encode_latents` ("" = none).
  packing: bool = False  # Diffusion stage: NaViT rows of pack_length tokens instead of buckets.
  pack_length: int = 256  # Tokens per packed row.
  max_clips_per_pack: int = 16  # Clips (caption slots) per packed row.
  max_buckets: int = 0  # >0: keep this many bucket shapes, centre-crop other clips into them.
  num_workers: int = 0  # Grain worker processes (0 = threads).
  prefetch_to_device: int = 2  # Batches put on the devices ahead of the step (0 = none).
  tfds_data_dir: str = ""  # data_dir of a "tfds:NAME" source.
  split: str = "train"  # Split of a prepared directory or TFDS dataset.

  def __post_init__(self):
    if self.token_budget < 1:
      raise ValueError(f"data.token_budget must be >= 1, got {self.token_budget}.")
    for name in ("pack_length", "max_clips_per_pack"):
      if getattr(self, name) < 1:
        raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}.")
    for name in ("max_buckets", "num_workers", "prefetch_to_device", "latent_cache_clips"):
      if getattr(self, name) < 0:
        raise ValueError(f"data.{name} must be >= 0, got {getattr(self, name)}.")
    if self.packing and self.token_budget < self.pack_length:
      raise ValueError(
          f"data.token_budget={self.token_budget} is below data.pack_length={self.pack_length}:"
          " a packed batch holds token_budget // pack_length rows, so this gives none. Raise"
          f" --config.data.token_budget to a multiple of {self.pack_length}.")
    if not self.sizes or not self.lengths:
      raise ValueError(f"data.sizes and data.lengths must be non-empty, got {self.sizes}, {self.lengths}.")


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
  """Rectified-flow training and sampling settings (SD3, Esser et al. 2024)."""

  prediction: str = "velocity"  # What the network outputs: "velocity" or "x0" (clean latent).
  timestep_distribution: str = "logit_normal"  # "logit_normal" or "uniform".
  logit_mean: float = 0.0  # Logit-normal location (SD3 §3.1).
  logit_std: float = 1.0  # Logit-normal scale.
  shift_base_tokens: int = 256  # Token count at which the timestep shift is `base_shift`.
  base_shift: float = 1.0  # Shift at `shift_base_tokens`; grows with sqrt(tokens / base).
  # False: every clip gets the constant shift `base_shift` (1.0 = no shift), whatever its size;
  # the "shift off" arm of the ablation in experiments/base.py.
  resolution_shift: bool = True
  caption_dropout: float = 0.1  # Probability of training on the null caption (enables CFG).
  sample_steps: int = 30  # Default sampler steps.
  guidance: float = 4.0  # Default classifier-free guidance scale.
  sampler: str = "euler"  # "euler" or "heun".

  def __post_init__(self):
    if self.prediction not in ("velocity", "x0"):
      raise ValueError(f"diffusion.prediction must be 'velocity' or 'x0', got {self.prediction!r}.")
    if self.timestep_distribution not in ("logit_normal", "uniform"):
      raise ValueError(
          "diffusion.timestep_distribution must be 'logit_normal' or 'uniform', got"
          f" {self.timestep_distribution!r}."
      )
    if not 0.0 <= self.caption_dropout < 1.0:
      raise ValueError(f"diffusion.caption_dropout must be in [0, 1), got {self.caption_dropout}.")
    if self.sampler not in ("euler", "heun"):
      raise ValueError(f"diffusion.sampler must be 'euler' or 'heun', got {self.sampler!r}.")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  """Periodic and final sample videos written to W/samples."""

  prompts: tuple[str, ...] = ("a red circle moving right",)  # One clip per prompt.
  frames: int = 9  # Frames of each sample clip.
  height: int = 32
  width: int = 32
  seed: int = 0
  fps: int = 8
