"""The training loop shared by both stages: fetch, step, log, checkpoint, sample.

The loop is deliberately flat: everything stage-specific (the jitted step, what to
count as tokens, how to write samples) comes in as arguments.

What it survives:
- **Kills.** A run resumes from the newest complete checkpoint; the metrics rows of the
  steps after it are dropped (they are recomputed, bitwise the same), so metrics.jsonl
  always reads as one uninterrupted run.
- **Preemption.** SIGTERM sets a flag; at the next step boundary every process learns
  whether any process got one (a tiny all-gather), all save that same step, wait for the
  write, and exit 0 (`Preempted`). Rerunning the command continues from there.
- **Bad numbers.** `guard_nonfinite` makes the jitted step report whether its loss and
  gradient norms are finite (a NaN or Inf anywhere in the gradients makes their global
  norm non-finite). The loop reads that flag one step late, so it never waits on the
  device it just fed; it reads it at once before a checkpoint, so no non-finite state is
  ever saved. Then it stops naming the step, the metrics and the last good checkpoint, or,
  with `train.skip_nonfinite`, the step kept the old state and the loop counts the skip.
  Logged losses above `train.loss_spike_factor` x the running median are flagged.
"""

import collections
import dataclasses
import logging
import math
import signal
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from spacetime_dit.config_types import TrainConfig
from spacetime_dit.sharding import mesh as mesh_lib
from spacetime_dit.training import prefetch as prefetch_lib
from spacetime_dit.training.checkpointing import Checkpointer
from spacetime_dit.training.metrics import MetricsWriter

FINITE = "finite"  # Metric added by `guard_nonfinite`: loss and gradient norms all finite.
_SPIKE_WINDOW = 50  # Logged losses in the running median.
_SPIKE_MIN_ROWS = 10  # No spike test before this many rows.


class NonFiniteLossError(FloatingPointError):
  """Raised when the loss or a gradient norm is NaN or Inf."""


class Preempted(SystemExit):
  """Raised (exit status 0) after the checkpoint saved on SIGTERM is on disk."""

  def __init__(self, step: int):
    super().__init__(0)
    self.step = step


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


def _watched(metrics: Mapping[str, Any]) -> list[str]:
  """The metrics whose non-finiteness means a bad update: losses and gradient norms."""
  keys = [k for k in metrics if k.endswith("loss") or k.endswith("grad_norm")]
  return keys or list(metrics)


def guard_nonfinite(step_fn: Callable, skip_nonfinite: bool = False) -> Callable:
  """Wraps a (state, batch, frozen) -> (state, metrics) step to report `metrics["finite"]`.

  With `skip_nonfinite` a non-finite step returns the old state (parameters, optimizer
  state, rng) with only the step counter advanced, so the data position and the checkpoints
  stay aligned with the steps taken. The optimizer's own step count is kept with the old
  state, so after k skips its learning rate is the schedule's value k steps earlier than the
  logged `learning_rate` (schedule(step)). Put it inside the `jax.jit` (it needs the old
  state, which the jit then donates).
  """

  def guarded(state, batch, frozen):
    new_state, metrics = step_fn(state, batch, frozen)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(metrics[k])) for k in _watched(metrics)]))
    if skip_nonfinite:
      kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
      new_state = kept.replace(step=new_state.step) if hasattr(kept, "replace") else kept
    return new_state, {**metrics, FINITE: finite}

  return guarded


_sigterm = threading.Event()  # Set by the SIGTERM handler, for the whole process.


def _on_sigterm(signum, frame):
  del signum, frame
  if not _sigterm.is_set():
    logging.warning("SIGTERM: saving a checkpoint at the next step boundary, then exiting")
  _sigterm.set()


def install_preemption_handler() -> None:
  """Makes SIGTERM a request to stop at the next step boundary (from now on, for good).

  Entry points call it first thing, so a SIGTERM during start-up (compiling, restoring)
  also ends in a clean stop at the first step boundary rather than a kill, and again after
  `jax.distributed.initialize`, whose preemption service replaces the C-level handler.
  """
  signal.signal(signal.SIGTERM, _on_sigterm)


class _Preemption:
  """SIGTERM -> a flag that every process reads in agreement at step boundaries.

  Installs the handler for the loop's duration unless `install_preemption_handler` did.
  """

  def __init__(self):
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      if signal.getsignal(signal.SIGTERM) is not _on_sigterm:
        self._previous = signal.signal(signal.SIGTERM, _on_sigterm)

  @property
  def requested(self) -> bool:
    return _sigterm.is_set()

  def agreed(self) -> bool:
    """True on every process when any process was asked to stop (a collective when multi-process)."""
    if jax.process_count() == 1:
      return self.requested
    flags = multihost_utils.process_allgather(np.array([int(self.requested)], np.int32))
    return bool(np.max(flags))

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      _sigterm.clear()  # Only this loop was asked to stop.


class _SpikeDetector:
  """Flags a logged loss above `factor` x the median of the last `_SPIKE_WINDOW` ones."""

  def __init__(self, factor: float):
    self.factor = factor
    self.history = collections.deque(maxlen=_SPIKE_WINDOW)

  def __call__(self, loss: float) -> float | None:
    """Returns the median it beat, or None."""
    median = statistics.median(self.history) if len(self.history) >= _SPIKE_MIN_ROWS else None
    self.history.append(loss)
    if self.factor and median is not None and median > 0 and loss > self.factor * median:
      return median
    return None


def run(state: Any, step_fn: Callable, frozen: Any, data_iterator: Any, ctx: LoopContext) -> Any:
  """Runs `step_fn` from `state.step` to `ctx.train.num_steps`; returns the final state.

  `data_iterator` must already be at the position of `state` (restored with it). With
  `ctx.prefetch` > 0 the checkpoints store the position of the batches the steps consumed,
  not of those prefetched (`prefetch.DevicePrefetcher.get_state`).

  Raises:
    Preempted: after SIGTERM, once the checkpoint of the step reached is written.
    NonFiniteLossError: a non-finite loss or gradient norm (unless `train.skip_nonfinite`).
  """
  train = ctx.train
  start = int(jax.device_get(state.step))
  dropped = ctx.writer.truncate_after(start)
  if dropped:
    logging.info("dropped %d metrics rows after step %d (recomputed from its checkpoint)", dropped, start)
  last_checkpoint = ctx.checkpointer.latest_step()

  def to_device(local):
    return mesh_lib.global_batch({k: local[k] for k in ctx.batch_keys}, ctx.mesh, ctx.rules)

  def resolve(pending) -> int:
    """Checks one step's finite flag: 0 if fine, 1 if its update was skipped, else raises."""
    step, finite, metrics = pending
    if finite is None or bool(jax.device_get(finite)):
      return 0
    values = {k: float(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0}
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if train.skip_nonfinite:
      logging.warning("step %d: non-finite %s, update skipped", step, bad)
      return 1
    ctx.checkpointer.wait()
    raise NonFiniteLossError(
        f"non-finite {bad} at step {step}. The last good checkpoint is step"
        f" {ctx.checkpointer.latest_step()}; lower --config.optimizer.learning_rate or tighten"
        " --config.optimizer.grad_clip and rerun the same command to resume from it, or set"
        " --config.train.skip_nonfinite=True to skip such updates."
    )

  prefetcher = None
  if ctx.prefetch:
    # The caller owns data_iterator (and closes it); the loop only stops its thread.
    prefetcher = prefetch_lib.DevicePrefetcher(
        data_iterator, to_device, depth=ctx.prefetch, close_iterator=False
    )
  preemption = _Preemption()
  spikes = _SpikeDetector(train.loss_spike_factor)
  window_start, window_steps, window_tokens, window_wait = time.perf_counter(), 0, 0, 0.0
  skipped, pending = 0, None
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
      # The previous step's flag: ready by now, so reading it does not stall the pipeline.
      if pending is not None:
        skipped += resolve(pending)
      metrics = dict(metrics)
      pending = (done, metrics.pop(FINITE, None), metrics)

      log_now = done % train.log_every == 0 or done == train.num_steps
      save_now = done % train.checkpoint_every == 0 or done == train.num_steps
      stop = preemption.agreed()
      if log_now or save_now or stop:
        skipped += resolve(pending)
        pending = None

      if log_now:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        elapsed = time.perf_counter() - window_start
        metrics["steps_per_sec"] = window_steps / elapsed
        metrics["tokens_per_sec"] = window_tokens * jax.process_count() / elapsed
        metrics["data_wait_fraction"] = window_wait / elapsed
        if train.skip_nonfinite:
          metrics["skipped_updates"] = float(skipped)
          skipped = 0
        bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
        if bad and not train.skip_nonfinite:  # A step without `guard_nonfinite`.
          ctx.checkpointer.wait()
          raise NonFiniteLossError(
              f"non-finite metrics {bad} at step {done}. The last good checkpoint is step"
              f" {ctx.checkpointer.latest_step()}; lower --config.optimizer.learning_rate or"
              " tighten --config.optimizer.grad_clip and rerun the same command to resume from it."
          )
        median = spikes(metrics["loss"]) if math.isfinite(metrics.get("loss", math.nan)) else None
        if median is not None:
          metrics["loss_spike"] = 1.0
          logging.warning("step %d: loss spike %.4g > %g x running median %.4g", done, metrics["loss"],
                          train.loss_spike_factor, median)
        ctx.writer.write(done, metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        window_start, window_steps, window_tokens, window_wait = time.perf_counter(), 0, 0, 0.0

      if save_now or stop:
        ctx.checkpointer.save(done, state, data_iterator if prefetcher is None else prefetcher)
        last_checkpoint = done
      if stop:
        ctx.checkpointer.wait()
        logging.warning("%s preempted: checkpoint of step %d written, exiting", ctx.description, done)
        raise Preempted(done)
      if ctx.on_sample is not None and train.sample_every and done % train.sample_every == 0:
        ctx.on_sample(state, done)
  finally:
    preemption.restore()
    if prefetcher is not None:
      prefetcher.stop()
    bar.close()
  ctx.checkpointer.wait()
  logging.info("%s finished at step %d (last checkpoint %s)", ctx.description, train.num_steps, last_checkpoint)
  return state
