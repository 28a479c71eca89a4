"""What every benchmark shares: wall-clock timing, its summary, and the `--out` JSON file."""

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any


def timed(fn: Callable[[], object]) -> float:
  """Wall-clock milliseconds of fn(); fn must return only once its work has finished."""
  start = time.perf_counter()
  fn()
  return (time.perf_counter() - start) * 1e3


def stats(times_ms: Sequence[float]) -> dict:
  """Median and min of repeated timings (median: robust to a load spike on a shared host)."""
  return {"median": statistics.median(times_ms), "min": min(times_ms),
          "all": [round(t, 1) for t in times_ms]}


def write_json(path: str, value: Any) -> None:
  """Writes a benchmark's results to `path` (creating its folder) and says where."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(value, f, indent=2)
  print(f"wrote {path}")
