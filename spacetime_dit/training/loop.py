"""The training loop shared by both stages: fetch, step, log, checkpoint, sample.

The loop is deliberately flat: everything stage-specific (the jitted step, what to
count as tokens, how to write samples) comes in as arguments.
"""

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import tqdm

from spacetime_dit.config_types import TrainConfig
from spacetime_dit.sharding import mesh as mesh_lib
from spacetime_dit.training import prefetch as prefetch_lib
from spacetime_dit.training.checkpointing import Checkpointer
from spacetime_dit.training.metrics import MetricsWriter


class NonFiniteLossError(FloatingPointError):
  """Raised when a logged metric is NaN or Inf."""


@dataclasses.dataclass
class LoopContext:
  """What the loop needs besides the state and the step function."""

  train: TrainConfig
  mesh: Any
  rules: Any
  checkpointer: Checkpointer
  writer: MetricsWriter
  batch_keys: tuple[str, ...]  # Batch fields the step reads.
  tokens_per_batch: Callable[[Mapping[str, np.ndarray]], int]  # Counted for tokens_per_sec.
  on_sample: Callable[[Any, int], None] | None = None  # (state, step) -> writes samples.
  description: str = "train"
  # Batches made into device arrays ahead of the step by a background thread (0: none; the
  # loop then copies each batch to the devices between steps). See `prefetch`.
  prefetch: int = 0


def _check_finite(metrics: Mapping[str, float], step: int, last_checkpoint: int | None) -> None:
  bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
  if bad:
    raise NonFiniteLossError(
        f"non-finite metrics {bad} at step {step}. The last good checkpoint is step"
        f" {last_checkpoint}; lower --config.optimizer.learning_rate or tighten"
        " --config.optimizer.grad_clip and rerun the same command to resume from it."
    )


def run(state: Any, step_fn: Callable, frozen: Any, data_iterator: Any, ctx: LoopContext) -> Any:
  """Runs `step_fn` from `state.step` to `ctx.train.num_steps`; returns the final state.

  `data_iterator` must already be at the position of `state` (restored with it). With
  `ctx.prefetch` > 0 the checkpoints store the position of the batches the steps consumed,
  not of those prefetched (`prefetch.DevicePrefetcher.get_state`).
  """
  train = ctx.train
  start = int(jax.device_get(state.step))
  last_checkpoint = ctx.checkpointer.latest_step()

  def to_device(local):
    return mesh_lib.global_batch({k: local[k] for k in ctx.batch_keys}, ctx.mesh, ctx.rules)

  prefetcher = None
  if ctx.prefetch:
    # The caller owns data_iterator (and closes it); the loop only stops its thread.
    prefetcher = prefetch_lib.DevicePrefetcher(
        data_iterator, to_device, depth=ctx.prefetch, close_iterator=False
    )
  window_start, window_steps, window_tokens, window_wait = time.perf_counter(), 0, 0, 0.0
  bar = tqdm.tqdm(
      total=train.num_steps, initial=start, desc=ctx.description, disable=jax.process_index() != 0,
      dynamic_ncols=True,
  )
  try:
    for step in range(start, train.num_steps):
      # data_wait_fraction counts only the time the step waits here: with prefetch that is
      # reading and copying whatever the thread has not finished; without, only the read.
      fetch_start = time.perf_counter()
      if prefetcher is not None:
        local, batch = next(prefetcher)
      else:
        local = next(data_iterator)
      window_wait += time.perf_counter() - fetch_start
      if prefetcher is None:
        batch = to_device(local)
      window_tokens += ctx.tokens_per_batch(local)
      state, metrics = step_fn(state, batch, frozen)
      window_steps += 1
      done = step + 1
      bar.update(1)

      if done % train.log_every == 0 or done == train.num_steps:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        elapsed = time.perf_counter() - window_start
        metrics["steps_per_sec"] = window_steps / elapsed
        metrics["tokens_per_sec"] = window_tokens * jax.process_count() / elapsed
        metrics["data_wait_fraction"] = window_wait / elapsed
        _check_finite(metrics, done, last_checkpoint)
        ctx.writer.write(done, metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        window_start, window_steps, window_tokens, window_wait = time.perf_counter(), 0, 0, 0.0

      if done % train.checkpoint_every == 0 or done == train.num_steps:
        ctx.checkpointer.save(done, state, data_iterator if prefetcher is None else prefetcher)
        last_checkpoint = done
      if ctx.on_sample is not None and train.sample_every and done % train.sample_every == 0:
        ctx.on_sample(state, done)
  finally:
    if prefetcher is not None:
      prefetcher.stop()
  bar.close()
  ctx.checkpointer.wait()
  logging.info("%s finished at step %d", ctx.description, train.num_steps)
  return state
