"""Training data for either stage: the source, its shape buckets, and the Grain iterator."""

import collections
import logging
import math
import os
from collections.abc import Callable

import grain
import numpy as np

from data_pipelines import buckets as buckets_lib
from data_pipelines import loader
from data_pipelines import shapesworld
from spacetime_dit.config_types import DataConfig
from spacetime_dit.models import autoencoder as autoencoder_lib
from spacetime_dit.models import patchify as patchify_lib

TokensPerClip = Callable[[tuple[int, int, int]], int]
ShapeCheck = Callable[[tuple[int, int, int]], str | None]  # (T, H, W) -> None, or the broken rule.


def make_source(config: DataConfig, *, split: str | None = None):
  """The random-access clip source named by `config.source`.

  "shapesworld" is the embedded procedural data (its splits: "train", "holdout"); a
  directory written by `python -m data_pipelines.prepare` is read with its shape index; and
  "tfds:NAME" reads any TFDS dataset with a video feature from `config.tfds_data_dir`.
  """
  if config.source == "shapesworld":
    return shapesworld.ShapesWorld(
        shapesworld.ShapesWorldConfig(
            seed=config.seed,
            sizes=tuple(tuple(s) for s in config.sizes),
            lengths=tuple(config.lengths),
            max_objects=config.max_objects,
            holdout=tuple(tuple(h) for h in config.holdout),
            camera_pan_prob=config.camera_pan_prob,
        ),
        split=split or "train",
    )
  from data_pipelines import prepared  # Lazy: TFDS is imported only when it is read.

  if config.source.startswith("tfds:"):
    return prepared.TfdsSource(
        config.source[len("tfds:"):], data_dir=config.tfds_data_dir or None,
        split=split or config.split,
    )
  if os.path.isdir(config.source) and prepared.is_prepared_dir(config.source):
    return prepared.open_prepared(config.source, split=split or config.split)
  raise ValueError(
      f"data.source={config.source!r} is neither 'shapesworld', 'tfds:NAME', nor a directory"
      " written by `python -m data_pipelines.prepare` (which holds dataset.json). Prepare your"
      " videos with `python -m data_pipelines.prepare --input=FOLDER --output=DIR` and pass"
      " --config.data.source=DIR."
  )


def common_shape_indices(indices, shapes, count: int) -> tuple[tuple[int, int, int], list[int]]:
  """The most frequent native (T, H, W) among `shapes` (largest first on ties) and up to
  `count` of the `indices` with that shape, so that a pass over them compiles one program."""
  counts = collections.Counter(shapes)
  shape = max(counts, key=lambda s: (counts[s], s))
  return shape, [int(i) for i, s in zip(indices, shapes) if s == shape][:count]


def no_text(captions):
  """Tokenizer of the autoencoder stage, which ignores captions: one padding token per clip
  keeps the batch layout of the DiT stage."""
  return np.zeros((len(captions), 1), np.int32), np.zeros((len(captions), 1), bool)


def dit_tokens_per_clip(ae_cfg, patch) -> TokensPerClip:
  """Native video (T, H, W) -> DiT tokens of its latent with `patch` (raises if it does not fit)."""

  def tokens(shape):
    latent = autoencoder_lib.latent_shape(ae_cfg, *shape)
    return math.prod(patchify_lib.patch_grid(latent, patch))

  return tokens


def training_indices(config: DataConfig, source, num_samples: int | None = None):
  """(indices, native shapes) of the clips a stage trains on.

  Stored data (a prepared directory, latents, TFDS) is read whole: its shapes come from an
  index, so listing them is cheap, and a sample would silently leave clips out. ShapesWorld is
  infinite, so a stage trains on a seeded sample of `config.num_index_samples` of its clips.
  `num_samples` asks for a sample of that size from either kind.
  """
  if num_samples is None and not isinstance(source, shapesworld.ShapesWorld):
    num = None
  else:
    num = config.num_index_samples if num_samples is None else num_samples
  indices = loader.select_indices(len(source), num_samples=num, seed=config.seed)
  return indices, loader.shapes_of(source, indices)


def usable_indices(indices, shapes, check_shape: ShapeCheck | None):
  """Drops the clips whose native shape the model cannot take, logging each shape once.

  `check_shape(shape)` returns None for a usable (T, H, W) or the rule it breaks. Every
  dropped shape is logged with its clip count (never silently); when none is usable the
  error names the rules and how to re-prepare the data.
  """
  if check_shape is None:
    return list(indices), list(shapes)
  verdicts = {shape: check_shape(shape) for shape in set(shapes)}
  bad = collections.Counter(shape for shape in shapes if verdicts[shape])
  if bad:
    logging.warning(
        "clips the model cannot take (not trained on): %s",
        "; ".join(f"{n} clips of {s}: {verdicts[s]}" for s, n in bad.most_common()),
    )
  keep = [k for k, shape in enumerate(shapes) if not verdicts[shape]]
  if not keep:
    raise ValueError(
        f"none of the {len(shapes)} clips has a shape the model can take: "
        + "; ".join(f"{s}: {verdicts[s]}" for s in sorted(bad))
        + ". Re-prepare the data with matching --size_multiple / --frame_multiple."
    )
  return [indices[k] for k in keep], [shapes[k] for k in keep]


def make_iterator(
    config: DataConfig,
    *,
    tokens_per_clip: TokensPerClip,
    batch_multiple: int,
    tokenize,
    process_index: int,
    process_count: int,
    source=None,
    indices=None,
    check_shape: ShapeCheck | None = None,
):
  """Returns (per-process batch iterator, buckets).

  By default it reads `config.source`; pass `source` (e.g. a latent cache) and its `indices`
  to read those instead. Buckets come from the native (T, H, W) of the indices read; clips
  that `check_shape` refuses are left out and logged (see `usable_indices`).
  """
  if source is None:
    source = make_source(config)
  if indices is None:
    indices, shapes = training_indices(config, source)
  else:
    shapes = loader.shapes_of(source, indices)
  indices, shapes = usable_indices(list(indices), shapes, check_shape)
  buckets, report = buckets_lib.compute_buckets(
      shapes,
      tokens_per_clip=tokens_per_clip,
      token_budget=config.token_budget,
      batch_multiple=batch_multiple,
      max_batch_size=config.max_batch_size,
      max_buckets=config.max_buckets,
  )
  logging.info("buckets:\n%s", buckets_lib.describe_buckets(buckets))
  if report.cropped:
    logging.info(
        "clips centre-cropped into a smaller bucket (%.1f%% of their pixels): %s",
        100 * report.crop_pixel_fraction_lost, report.to_dict()["cropped"],
    )
  if report.rejected:
    logging.warning("clips with no bucket (not trained on): %s", report.to_dict()["rejected"])
  iterator = loader.make_bucketed_iterator(
      source,
      buckets=buckets,
      seed=config.seed,
      process_index=process_index,
      process_count=process_count,
      tokenize=tokenize,
      num_threads=config.num_threads,
      num_workers=config.num_workers,
      indices=indices,
      shapes=shapes,
  )
  return BucketsInState(iterator, buckets), buckets


BUCKETS_KEY = "buckets"  # Iterator state key: [[T, H, W, global batch size], ...] per bucket.


def bucket_changes(saved, current) -> list[str]:
  """'shape: saved -> current global batch size' for each bucket that differs (or is only on one side)."""
  saved = {tuple(b[:3]): b[3] for b in saved}
  current = {tuple(b[:3]): b[3] for b in current}
  return [f"{'x'.join(map(str, s))}: {saved.get(s, 'absent')} -> {current.get(s, 'absent')}"
          for s in sorted(set(saved) | set(current)) if saved.get(s) != current.get(s)]


class BucketsInState(grain.DatasetIterator):
  """The bucketed iterator, whose checkpointed state also names its buckets.

  The state's position (global batches taken) means the same stream only with the same
  buckets: their global batch sizes set the bucket weights, so the bucket order, and the clips
  of every batch. A resumed run on a mesh with another number of batch shards (data x fsdp)
  can get other sizes (`compute_buckets` rounds them down to a multiple of it); `set_state`
  then warns, naming the buckets, instead of silently training on another stream. States
  without buckets (older checkpoints) restore as before.
  """

  def __init__(self, parent: grain.DatasetIterator, buckets):
    super().__init__(parent)
    self._buckets = [[*map(int, b.shape), int(b.batch_size)] for b in buckets]

  def __next__(self):
    return next(self._parent)

  def get_state(self) -> dict:
    return {**self._parent.get_state(), BUCKETS_KEY: self._buckets}

  def set_state(self, state: dict) -> None:
    state = dict(state)
    saved = state.pop(BUCKETS_KEY, None)
    changes = [] if saved is None else bucket_changes(saved, self._buckets)
    if changes:
      logging.warning(
          "the data position was saved with other buckets (shape: saved -> now global batch"
          " size): %s. Training continues at the saved step, but not with the batches the saved"
          " run would have drawn next. Across meshes, keep the sizes by choosing"
          " --config.data.max_batch_size and --config.data.token_budget so that every bucket's"
          " batch is a multiple of each mesh's data x fsdp size.", "; ".join(changes))
    self._parent.set_state(state)
