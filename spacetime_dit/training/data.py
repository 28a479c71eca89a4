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


def make_iterator(
    config: DataConfig,
    *,
    tokens_per_clip: TokensPerClip,
    batch_multiple: int,
    tokenize,
    process_index: int,
    process_count: int,
):
  """Returns (per-process batch iterator, buckets) for the training split."""
  source = make_source(config)
  indices = loader.select_indices(len(source), num_samples=config.num_index_samples, seed=config.seed)
  shapes = loader.shapes_of(source, indices)
  buckets, report = buckets_lib.compute_buckets(
      shapes,
      tokens_per_clip=tokens_per_clip,
      token_budget=config.token_budget,
      batch_multiple=batch_multiple,
      max_batch_size=config.max_batch_size,
  )
  logging.info("buckets:\n%s\n%s", buckets_lib.describe_buckets(buckets), report)
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
