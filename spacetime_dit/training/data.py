"""Training data for either stage: the source, its shape buckets, and the Grain iterator."""

import logging
from collections.abc import Callable

from data_pipelines import buckets as buckets_lib
from data_pipelines import loader
from data_pipelines import shapesworld
from spacetime_dit.config_types import DataConfig

TokensPerClip = Callable[[tuple[int, int, int]], int]


def make_source(config: DataConfig, *, split: str = "train") -> shapesworld.ShapesWorld:
  """The random-access clip source named by `config.source`."""
  if config.source != "shapesworld":
    raise ValueError(
        f"data.source={config.source!r}: only the embedded 'shapesworld' source can be read by"
        " this version; prepared data directories arrive with `python -m data_pipelines.prepare`."
        " Use --config.data.source=shapesworld."
    )
  return shapesworld.ShapesWorld(
      shapesworld.ShapesWorldConfig(
          seed=config.seed,
          sizes=tuple(tuple(s) for s in config.sizes),
          lengths=tuple(config.lengths),
          max_objects=config.max_objects,
          holdout=tuple(tuple(h) for h in config.holdout),
          camera_pan_prob=config.camera_pan_prob,
      ),
      split=split,
  )


def training_indices(config: DataConfig, source, num_samples: int | None = None):
  """(indices, native shapes) of the clips a stage trains on: a seeded sample of the source."""
  num = config.num_index_samples if num_samples is None else num_samples
  indices = loader.select_indices(len(source), num_samples=num, seed=config.seed)
  return indices, loader.shapes_of(source, indices)


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
):
  """Returns (per-process batch iterator, buckets).

  By default it reads the ShapesWorld training split; pass `source` (e.g. a latent cache)
  and its `indices` to read those instead. Buckets come from the native (T, H, W) of the
  indices read.
  """
  if source is None:
    source = make_source(config)
  if indices is None:
    indices, shapes = training_indices(config, source)
  else:
    shapes = loader.shapes_of(source, indices)
  buckets, report = buckets_lib.compute_buckets(
      shapes,
      tokens_per_clip=tokens_per_clip,
      token_budget=config.token_budget,
      batch_multiple=batch_multiple,
      max_batch_size=config.max_batch_size,
  )
  logging.info("buckets:\n%s", buckets_lib.describe_buckets(buckets))
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
      indices=indices,
      shapes=shapes,
  )
  return iterator, buckets
