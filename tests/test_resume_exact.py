"""Exact resume under SIGKILL: a few kill points of `benchmarks/fault_injection.py`.

The trainer (`python -m spacetime_dit.train`, the tiny autoencoder) is SIGKILLed at random
steps and while an async checkpoint is being written; rerunning the same command must
resume from the newest complete checkpoint and log, for every later step, the loss and
grad_norm of an uninterrupted run, bitwise. `python -m benchmarks.fault_injection
--trials=20` runs the same with more kills (figures in the closing note of issue 7).
"""

import pytest

from benchmarks import fault_injection


@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_exactly(tmp_path):
  report = fault_injection.run(
      trials=3, kills_per_run=3, config="experiments/autoencoder.py:tiny", num_steps=9, checkpoint_every=2,
      devices=2, seed=1, workdir=str(tmp_path), extra=list(fault_injection.FAST_FLAGS), log=print,
  )
  summary = report["summary"]
  assert summary["trials"] == 3
  assert summary["resumed_exactly"] == 3, report["trials"]
  assert summary["chains_exact"] == summary["chains"] == 1
  for trial in report["trials"]:
    # Resumed from a complete checkpoint, never the unfinished one a kill left behind.
    assert trial["resumed_from"] in (0, 2, 4, 6, 8, 9) and trial["resumed_from"] <= trial["killed_after_step"]
    assert all(not name.startswith(f"{trial['resumed_from']}.") for name in trial["unfinished_dirs"])
