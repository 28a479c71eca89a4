"""Interruptions of training.loop: SIGTERM preemption and bad numbers (NaN/Inf, loss spikes).

A toy jitted step (w <- w - lr * (w - x)) drives the real loop, checkpointer and writer, so
each test takes seconds; `tests/test_resume_exact.py` and `benchmarks/fault_injection.py`
kill the real trainer.
"""

import json
import os
import signal

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


@flax.struct.dataclass
class _State:
  step: jax.Array
  w: jax.Array


def _pipeline(bad=()):
  """Batch i: x = i + 1 (float32 (8, 2)), or NaN for i in `bad`."""
  def batch(i):
    value = np.nan if i in bad else float(i + 1)
    return {"x": np.full((8, 2), value, np.float32)}
  dataset = grain.MapDataset.range(10**6).map(batch)
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)))


def _step(state, batch, frozen):
  del frozen
  grad = state.w - jnp.mean(batch["x"])
  loss = 0.5 * jnp.square(grad)
  new = _State(step=state.step + 1, w=state.w - 0.1 * grad)
  return new, {"loss": loss, "grad_norm": jnp.abs(grad)}


def _run(workdir, *, num_steps, bad=(), skip=False, on_step=None, checkpoint_every=3, spike=3.0, log_every=1):
  """Trains (resuming from workdir's checkpoints) and returns (state, metrics rows)."""
  mesh = mesh_lib.make_mesh(MeshConfig())
  rules = MeshConfig().rules
  train = TrainConfig(num_steps=num_steps, log_every=log_every, checkpoint_every=checkpoint_every,
                      async_checkpointing=False, skip_nonfinite=skip, loss_spike_factor=spike)
  checkpointer = checkpointing.Checkpointer(str(workdir / "checkpoints"), async_save=False)
  writer = metrics_lib.MetricsWriter(str(workdir))
  data = _pipeline(bad)
  jitted = jax.jit(loop.guard_nonfinite(_step, skip))

  def step_fn(state, batch, frozen):
    out = jitted(state, batch, frozen)
    if on_step is not None:
      on_step(int(out[0].step))
    return out

  state = _State(step=jnp.int32(0), w=jnp.float32(0.0))
  latest = checkpointer.latest_step()
  if latest is not None:
    state = checkpointer.restore(latest, jax.eval_shape(lambda: state), data)
  ctx = loop.LoopContext(train=train, mesh=mesh, rules=rules, checkpointer=checkpointer, writer=writer,
                         batch_keys=("x",), tokens_per_batch=lambda b: 1)
  try:
    state = loop.run(state, step_fn, {}, data, ctx)
  finally:
    checkpointer.close()
    writer.close()
  return state, _rows(workdir)


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_sigterm_saves_at_the_next_step_boundary_exits_0_and_resumes_exactly(tmp_path):
  _, reference = _run(tmp_path / "ref", num_steps=8)

  def preempt(step):
    if step == 5:
      os.kill(os.getpid(), signal.SIGTERM)  # The loop's handler only sets a flag.

  with pytest.raises(loop.Preempted) as info:
    _run(tmp_path / "w", num_steps=8, on_step=preempt)
  assert info.value.code == 0 and info.value.step == 5
  # Step 5 is no multiple of checkpoint_every=3: it was saved because of the SIGTERM.
  assert sorted(int(d) for d in os.listdir(tmp_path / "w" / "checkpoints")) == [3, 5]
  assert signal.getsignal(signal.SIGTERM) is not None  # The previous handler is back.
  state, rows = _run(tmp_path / "w", num_steps=8)
  assert int(state.step) == 8
  assert [r["step"] for r in rows] == list(range(1, 9))
  assert [r["loss"] for r in rows] == [r["loss"] for r in reference]  # bitwise


def test_resume_drops_metrics_rows_after_the_restored_checkpoint(tmp_path):
  _run(tmp_path, num_steps=5, checkpoint_every=2)  # checkpoints 2, 4, 5
  # A kill after step 4's checkpoint but with rows up to 7 (and a torn line) on disk.
  (tmp_path / "checkpoints" / "5").rename(tmp_path / "gone")
  with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write('{"step": 6, "loss": 1.0}\n{"step": 7, "loss": 1.0}\n{"step": 8, "lo')
  _, rows = _run(tmp_path, num_steps=6, checkpoint_every=2)
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_nan_loss_stops_naming_the_step_metric_and_last_good_checkpoint(tmp_path):
  with pytest.raises(loop.NonFiniteLossError, match=r"at step 5\. The last good checkpoint is step 3") as info:
    _run(tmp_path, num_steps=8, bad={4})  # Batch 4 feeds step 5.
  assert "loss" in str(info.value) and "grad_norm" in str(info.value)
  # No non-finite state was ever saved, and rows stop before the bad step.
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints")) == [3]
  assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3, 4]


def test_nan_on_a_checkpoint_step_is_caught_before_the_save(tmp_path):
  with pytest.raises(loop.NonFiniteLossError, match="at step 6.*checkpoint is step 3"):
    _run(tmp_path, num_steps=8, bad={5})
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints")) == [3]


def test_nan_between_logged_steps_is_caught_one_step_later_naming_its_step(tmp_path):
  # Steps 5.. are not logged until 8; the flag of step 5 is read after step 6 is dispatched.
  with pytest.raises(loop.NonFiniteLossError, match="at step 5.*checkpoint is step 3"):
    _run(tmp_path, num_steps=12, bad={4}, log_every=4, checkpoint_every=3)
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints")) == [3]


def test_skip_nonfinite_keeps_the_old_state_and_counts_the_skip(tmp_path):
  state, rows = _run(tmp_path / "skip", num_steps=6, bad={2}, skip=True)
  assert int(state.step) == 6 and np.isfinite(float(state.w))
  assert [r["skipped_updates"] for r in rows] == [0, 0, 1, 0, 0, 0]
  # Step 3 kept w; steps 4.. see the same batches as an unbroken run from that w.
  assert rows[2]["loss"] == "nan" and rows[3]["loss"] != "nan"
  w = 0.0
  for i in range(6):
    if i != 2:
      w = w - 0.1 * (w - (i + 1))
  assert float(state.w) == pytest.approx(w, rel=1e-6)


def test_loss_spikes_are_flagged():
  spikes = loop._SpikeDetector(3.0)
  flagged = [spikes(v) is not None for v in [1.0] * 12 + [5.0, 1.0, 2.0]]
  assert flagged == [False] * 12 + [True, False, False]
  assert loop._SpikeDetector(0.0)(100.0) is None
