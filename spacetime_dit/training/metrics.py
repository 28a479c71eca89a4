"""Metrics to `W/metrics.jsonl` (one JSON object per logged step) and TensorBoard.

Only process 0 writes; every other process gets a writer that does nothing, so the loop
needs no `if process_index == 0` branches.
"""

import json
import math
import os
from collections.abc import Mapping

import numpy as np
from tensorboardX import SummaryWriter


class MetricsWriter:
  """Appends metric rows to metrics.jsonl and writes TensorBoard scalars."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
      self._tb = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    """Writes one row; `step` is the number of updates applied when it was measured."""
    if not self.enabled:
      return
    row = {"step": int(step)}
    for key, value in metrics.items():
      value = float(np.asarray(value))
      row[key] = value if math.isfinite(value) else str(value)
      self._tb.add_scalar(key, value, global_step=int(step))
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()

  def truncate_after(self, step: int) -> int:
    """Drops rows with a step above `step` (and a torn last line); returns how many went.

    A run resumed from the checkpoint of `step` recomputes the steps after it, so their
    rows from the killed run must go: metrics.jsonl then reads as one uninterrupted run.
    The file is rewritten beside itself and renamed over, so a kill here loses nothing.
    """
    if not self.enabled:
      return 0
    path = self._jsonl.name
    self._jsonl.close()
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
      for line in f:
        try:
          row = json.loads(line)
          keep = line.endswith("\n") and int(row["step"]) <= step
        except (ValueError, KeyError, TypeError):
          keep = False
        if keep:
          kept.append(line)
        else:
          dropped += 1
    if dropped:
      tmp = path + ".tmp"
      with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
    self._jsonl = open(path, "a", encoding="utf-8")
    return dropped

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
