"""Tests for training.prefetch and its use in training.loop: order, checkpoint position, errors."""

import threading
import time
import traceback

import flax
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spacetime_dit.config_types import MeshConfig, TrainConfig
from spacetime_dit.sharding import mesh as mesh_lib
from spacetime_dit.training import checkpointing
from spacetime_dit.training import loop
from spacetime_dit.training import metrics as metrics_lib
from spacetime_dit.training import prefetch


def _batch(i):
  """Batch i: (8, 3) int32 rows that all name i, plus a caption that stays on the host."""
  return {"x": np.full((8, 3), i, np.int32), "caption": np.asarray([f"clip {i}"] * 8)}


def _pipeline(num_batches=None):
  """A checkpointable grain iterator of `_batch(0), _batch(1), ...` (endless by default)."""
  dataset = grain.MapDataset.range(10**6 if num_batches is None else num_batches).map(_batch)
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)))


class _Counting:
  """Wraps an iterator and counts the elements read (how far a prefetcher ran ahead)."""

  def __init__(self, iterator):
    self._iterator = iterator
    self.read = 0
    self.closed = False

  def __next__(self):
    value = next(self._iterator)
    self.read += 1
    return value

  def get_state(self):
    return self._iterator.get_state()

  def set_state(self, state):
    self._iterator.set_state(state)

  def close(self):
    self.closed = True


def _to_device(host):
  return {"x": jnp.asarray(host["x"])}


def _wait_until(condition, timeout_s=10.0):
  deadline = time.monotonic() + timeout_s
  while not condition():
    if time.monotonic() > deadline:
      raise TimeoutError("condition not met in time")
    time.sleep(0.01)


def _values(batches):
  return [int(np.asarray(b.device["x"])[0, 0]) for b in batches]


def test_batches_arrive_in_order_in_both_forms():
  prefetcher = prefetch.DevicePrefetcher(_pipeline(6), _to_device, depth=2)
  batches = list(prefetcher)
  assert _values(batches) == list(range(6))
  for i, batch in enumerate(batches):
    assert isinstance(batch.device["x"], jax.Array)
    np.testing.assert_array_equal(batch.host["x"], _batch(i)["x"])
    assert batch.host["caption"][0] == f"clip {i}"
  with pytest.raises(StopIteration):  # Exhaustion stays sticky.
    next(prefetcher)
  prefetcher.close()


def test_saved_state_is_the_consumed_position_not_the_prefetched_one():
  source = _Counting(_pipeline())
  prefetcher = prefetch.DevicePrefetcher(source, _to_device, depth=3)
  consumed = [next(prefetcher) for _ in range(4)]
  # The thread fills its queue (3) and holds one more waiting to be queued: 8 read, 4 used.
  _wait_until(lambda: source.read == 4 + 3 + 1)
  state = prefetcher.get_state()
  expected = _values([next(prefetcher) for _ in range(3)])
  assert _values(consumed) == [0, 1, 2, 3] and expected == [4, 5, 6]
  # A fresh prefetcher restored to the state continues at the first unconsumed batch ...
  fresh = prefetch.DevicePrefetcher(_pipeline(), _to_device, depth=3)
  fresh.set_state(state)
  assert _values([next(fresh) for _ in range(3)]) == expected
  # ... and so does the bare loader: the saved format is the loader's own.
  bare = _pipeline()
  bare.set_state(state)
  assert [int(next(bare)["x"][0, 0]) for _ in range(3)] == expected
  for p in (prefetcher, fresh):
    p.close()


def test_set_state_mid_stream_drops_prefetched_batches():
  prefetcher = prefetch.DevicePrefetcher(_pipeline(), _to_device, depth=3)
  [next(prefetcher) for _ in range(2)]
  state = prefetcher.get_state()
  [next(prefetcher) for _ in range(5)]
  prefetcher.set_state(state)  # Rewind while the thread is running ahead.
  assert _values([next(prefetcher) for _ in range(2)]) == [2, 3]
  prefetcher.close()


def test_checkpointer_saves_and_restores_the_consumed_position(tmp_path):
  prefetcher = prefetch.DevicePrefetcher(_pipeline(), _to_device, depth=3)
  [next(prefetcher) for _ in range(5)]
  state = {"w": jnp.arange(3.0)}
  checkpointer = checkpointing.Checkpointer(str(tmp_path), async_save=False)
  checkpointer.save(5, state, prefetcher)
  checkpointer.wait()
  expected = _values([next(prefetcher) for _ in range(2)])
  fresh = prefetch.DevicePrefetcher(_pipeline(), _to_device, depth=3)
  restored = checkpointer.restore(5, jax.eval_shape(lambda: state), fresh)
  np.testing.assert_array_equal(restored["w"], state["w"])
  assert _values([next(fresh) for _ in range(2)]) == expected == [5, 6]
  checkpointer.close()
  for p in (prefetcher, fresh):
    p.close()


def _explode_on_three(host):
  if host["x"][0, 0] == 3:
    raise ValueError("batch 3 is bad")
  return _to_device(host)


def test_an_error_in_the_thread_reaches_the_consumer_with_its_traceback():
  prefetcher = prefetch.DevicePrefetcher(_pipeline(), _explode_on_three, depth=2)
  assert _values([next(prefetcher) for _ in range(3)]) == [0, 1, 2]
  with pytest.raises(ValueError, match="batch 3 is bad") as info:
    next(prefetcher)
  frames = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
  assert "_explode_on_three" in frames  # Raised in the thread, still visible here.
  with pytest.raises(ValueError, match="batch 3 is bad"):  # And again on every later call.
    next(prefetcher)
  prefetcher.close()


def test_close_joins_the_thread_and_closes_the_iterator_when_owned():
  source = _Counting(_pipeline())
  prefetcher = prefetch.DevicePrefetcher(source, _to_device, depth=2)
  next(prefetcher)
  thread = prefetcher._thread  # pylint: disable=protected-access
  assert thread.is_alive()
  prefetcher.close()
  assert not thread.is_alive() and source.closed
  with pytest.raises(ValueError, match="closed"):
    next(prefetcher)
  borrowed = _Counting(_pipeline())
  other = prefetch.DevicePrefetcher(borrowed, _to_device, depth=2, close_iterator=False)
  next(other)
  other.close()
  assert not borrowed.closed


def test_plain_iterators_work_but_cannot_checkpoint():
  prefetcher = prefetch.DevicePrefetcher(iter([_batch(0), _batch(1)]), _to_device, depth=1)
  assert _values(list(prefetcher)) == [0, 1]
  with pytest.raises(ValueError, match="cannot be checkpointed"):
    prefetcher.get_state()
  with pytest.raises(ValueError, match="depth=0"):
    prefetch.DevicePrefetcher(_pipeline(), _to_device, depth=0)


@flax.struct.dataclass
class _State:
  step: jax.Array
  total: jax.Array  # Sum of every batch value the steps saw.


def _run_loop(workdir, data_iterator, *, num_steps, prefetch_depth):
  mesh = mesh_lib.make_mesh(MeshConfig())
  rules = MeshConfig().rules
  train = TrainConfig(num_steps=num_steps, log_every=2, checkpoint_every=3, async_checkpointing=False)
  checkpointer = checkpointing.Checkpointer(str(workdir / "checkpoints"), async_save=False)
  writer = metrics_lib.MetricsWriter(str(workdir))
  seen = []

  @jax.jit
  def step_fn(state, batch, frozen):
    del frozen
    value = batch["x"][0, 0]
    metrics = {"loss": value.astype(jnp.float32)}
    return _State(step=state.step + 1, total=state.total + value), metrics

  def recording_step(state, batch, frozen):
    seen.append(int(batch["x"][0, 0]))
    return step_fn(state, batch, frozen)

  state = _State(step=jnp.int32(0), total=jnp.int32(0))
  latest = checkpointer.latest_step()
  if latest is not None:
    state = checkpointer.restore(latest, jax.eval_shape(lambda: state), data_iterator)
  ctx = loop.LoopContext(
      train=train, mesh=mesh, rules=rules, checkpointer=checkpointer, writer=writer,
      batch_keys=("x",), tokens_per_batch=lambda b: int(b["x"].size), prefetch=prefetch_depth,
  )
  state = loop.run(state, recording_step, {}, data_iterator, ctx)
  checkpointer.close()
  writer.close()
  return state, seen


def test_loop_with_prefetch_checkpoints_the_consumed_batches(tmp_path):
  # Stop after 5 steps (checkpoint at 3 and 5), then resume to 8 with a fresh loader.
  _, first = _run_loop(tmp_path, _pipeline(), num_steps=5, prefetch_depth=3)
  assert first == [0, 1, 2, 3, 4]
  state, second = _run_loop(tmp_path, _pipeline(), num_steps=8, prefetch_depth=3)
  assert second == [5, 6, 7]
  assert int(state.total) == sum(range(8))
  # The loop stopped its thread.
  assert not [t for t in threading.enumerate() if t.name == "device-prefetch" and t.is_alive()]
  rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert rows and all('"data_wait_fraction"' in row for row in rows)
  # Without prefetch the same checkpoints resume the same way.
  _, third = _run_loop(tmp_path, _pipeline(), num_steps=10, prefetch_depth=0)
  assert third == [8, 9]
