"""Device prefetch: a background thread turns the next host batches into device arrays.

Without it the loop reads a host batch and assembles its global `jax.Array`s (host-to-device
copies, `mesh.global_batch`) between two steps, so those copies sit on the critical path
whenever the step has already finished. `DevicePrefetcher` keeps `depth` batches ready on
the devices while the current step runs (as `flax.jax_utils.prefetch_to_device` did for
pmap, and `grain.experimental.device_put` does for one device).

Checkpoints must not skip or repeat data. The wrapped iterator runs ahead by up to `depth`
batches, so its own state is NOT the position of the step. The thread therefore reads the
wrapped iterator's state right after reading each batch and queues it with the batch; the
prefetcher's `get_state()` is the state queued with the last batch handed to the caller
(the batches CONSUMED), and `set_state()` drops the prefetched batches and moves the
wrapped iterator there. The prefetcher is a `grain.DatasetIterator`, so
`grain.checkpoint.CheckpointSave/CheckpointRestore` (the `Checkpointer`) save it as they
save the loader itself, in the same JSON: a run can resume with prefetch turned on or off.
"""

import copy
import queue as queue_lib
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import grain

_POLL_S = 0.05  # How often a blocked thread or consumer looks for a stop request.


class PrefetchedBatch(NamedTuple):
  """One batch in both forms."""

  host: Any  # The wrapped iterator's element (the per-process numpy batch, with "caption").
  device: Any  # transform(host): e.g. a dict of global jax.Arrays ready for the step.


class _End(NamedTuple):
  """Queued when the wrapped iterator is exhausted."""


class _Failure(NamedTuple):
  """Queued when reading or transforming a batch raised."""

  error: BaseException


class DevicePrefetcher(grain.DatasetIterator):
  """Iterates `PrefetchedBatch(host, transform(host))`, computed `depth` batches ahead.

  The thread starts on the first `next()` (or `start_prefetch()`), so building a prefetcher
  and then restoring its state reads nothing twice. It holds up to `depth` transformed
  batches plus the one being transformed: `depth` + 1 batches of device memory beyond the
  one the step uses.

  An exception raised by the wrapped iterator or by `transform` is re-raised by `next()`
  (the same exception object, so its traceback still shows where it was raised), and again
  by every later `next()`. Exhaustion of the wrapped iterator becomes StopIteration.

  Only one thread may call `next`, `get_state` and `set_state` (as for any
  `grain.DatasetIterator`).
  """

  def __init__(
      self,
      iterator: Iterator[Any],
      transform: Callable[[Any], Any],
      *,
      depth: int = 2,
      close_iterator: bool = True,
  ):
    """Wraps `iterator`.

    Args:
      iterator: the host batch iterator (e.g. `loader.make_bucketed_iterator`). With
        `get_state`/`set_state` the prefetcher is checkpointable; a plain iterator works
        too, but then `get_state` raises.
      transform: host batch -> device batch, run in the thread (e.g.
        `lambda b: mesh.global_batch(b, mesh, rules)`).
      depth: transformed batches kept ready (>= 1).
      close_iterator: whether `close()` also closes `iterator` (False when its owner
        closes it).
    """
    # No grain parents: grain's DatasetIterator would close its parents when this object is
    # garbage collected, and the loop that builds a prefetcher does not own the loader.
    super().__init__()
    if depth < 1:
      raise ValueError(f"depth={depth} must be >= 1 batch (construct no prefetcher for 0).")
    self._iterator = iterator
    self._transform = transform
    self._depth = depth
    self._close_iterator = close_iterator
    self._checkpointable = hasattr(iterator, "get_state") and hasattr(iterator, "set_state")
    self._state = self._read_state()  # Position after the batches consumed so far.
    self._queue: queue_lib.Queue | None = None
    self._stop_event: threading.Event | None = None
    self._thread: threading.Thread | None = None
    self._terminal: _End | _Failure | None = None  # Re-raised by every later next().

  def _read_state(self) -> Any:
    return _read_state(self._iterator) if self._checkpointable else None

  @staticmethod
  def _work(iterator, transform, checkpointable: bool, queue: queue_lib.Queue,
            stop: threading.Event) -> None:
    """The thread: read, note the state, transform, queue; until stopped or done.

    A static method given only what it needs: a thread holding `self` would keep an
    abandoned prefetcher (and its device batches) alive forever.
    """
    put = DevicePrefetcher._put
    try:
      while not stop.is_set():
        try:
          host = next(iterator)
        except StopIteration:
          put(queue, stop, _End())
          return
        state = _read_state(iterator) if checkpointable else None
        if not put(queue, stop, (PrefetchedBatch(host, transform(host)), state)):
          return
    except BaseException as error:  # pylint: disable=broad-exception-caught
      # Handed to the consumer, who re-raises it: a thread's exception is otherwise lost.
      put(queue, stop, _Failure(error))

  @staticmethod
  def _put(queue: queue_lib.Queue, stop: threading.Event, item: Any) -> bool:
    """Blocks until `item` is queued (True) or a stop is requested (False)."""
    while not stop.is_set():
      try:
        queue.put(item, timeout=_POLL_S)
        return True
      except queue_lib.Full:
        continue
    return False

  def start_prefetch(self) -> None:
    """Starts the thread now (idempotent), e.g. right after restoring a checkpoint."""
    self._assert_not_closed()
    if self._thread is not None or self._terminal is not None:
      return
    self._queue = queue_lib.Queue(maxsize=self._depth)
    self._stop_event = threading.Event()
    self._thread = threading.Thread(
        target=self._work,
        args=(self._iterator, self._transform, self._checkpointable, self._queue,
              self._stop_event),
        name="device-prefetch",
        daemon=True,  # Never keeps a crashed program alive.
    )
    self._thread.start()

  def __next__(self) -> PrefetchedBatch:
    self._assert_not_closed()
    if self._terminal is None:
      self.start_prefetch()
      item = self._get()
      if isinstance(item, (_End, _Failure)):
        self._terminal = item
        self.stop()
      else:
        batch, self._state = item
        return batch
    if isinstance(self._terminal, _Failure):
      raise self._terminal.error
    raise StopIteration

  def _get(self) -> Any:
    while True:
      try:
        return self._queue.get(timeout=_POLL_S)
      except queue_lib.Empty:
        if not self._thread.is_alive() and self._queue.empty():
          # _work always queues a final item before it returns, unless stopped.
          return _Failure(RuntimeError("the device prefetch thread ended without a batch."))

  def get_state(self) -> dict[str, Any]:
    """The wrapped iterator's state after the last batch `next()` returned."""
    if not self._checkpointable:
      raise ValueError(
          f"{type(self._iterator).__name__} has no get_state/set_state, so the prefetcher "
          "cannot be checkpointed; wrap a grain DatasetIterator."
      )
    return copy.deepcopy(self._state)

  def set_state(self, state: dict[str, Any]) -> None:
    """Drops the prefetched batches and continues from `state` (a `get_state()` value)."""
    if not self._checkpointable:
      raise ValueError(
          f"{type(self._iterator).__name__} has no get_state/set_state, so the prefetcher "
          "cannot be restored; wrap a grain DatasetIterator."
      )
    self.stop()
    self._iterator.set_state(copy.deepcopy(state))
    self._state = copy.deepcopy(state)
    self._terminal = None

  def stop(self) -> None:
    """Stops and joins the thread, dropping prefetched batches; `next()` restarts it.

    The wrapped iterator is then ahead of `get_state()` by the dropped batches: continue
    through this prefetcher, or `set_state(get_state())` first to rewind it.
    """
    if self._thread is None:
      return
    self._stop_event.set()
    self._thread.join()
    self._thread = self._queue = self._stop_event = None

  def close(self) -> None:
    """Stops the thread and, if `close_iterator`, closes the wrapped iterator (idempotent)."""
    if self._closed:
      return
    self.stop()
    if self._close_iterator and hasattr(self._iterator, "close"):
      self._iterator.close()
    super().close()

  def __del__(self):
    # Garbage collection only asks the thread to stop (it exits within _POLL_S); closing the
    # wrapped iterator is left to close() and to the iterator's own finaliser.
    stop = getattr(self, "_stop_event", None)
    if stop is not None:
      stop.set()


def _read_state(iterator) -> Any:
  # A deep copy: an iterator may return (and later mutate) its internal dict.
  return copy.deepcopy(iterator.get_state())
