"""What the entry points share: absl start-up, logging, and one-line errors for bad input.

A bad flag, config value, size or path raises `ValueError` / `FileNotFoundError` deep in the
library with a message that names the value, the rule and the fix. At the command line that
message is the whole output (no traceback); set SPACETIME_DIT_TRACEBACK=1 to see the stack.
"""

import logging
import os
import sys
from collections.abc import Callable

from absl import app
from absl import logging as absl_logging

_USER_ERRORS = (ValueError, FileNotFoundError)
# Libraries whose INFO lines drown the trainer's own (Orbax logs every file it renames).
_CHATTY = ("/orbax/", "/grain/", "/jax/_src/")


class _QuietLibraries(logging.Filter):
  """Keeps warnings from everyone but INFO only from this project."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not any(c in record.pathname for c in _CHATTY)


# XLA:CPU (jax 0.10) hands convolutions and the norms fused into them to YNNPACK by default,
# which runs the weight-gradient convolutions of large frames at ~4 GFLOP/s: the autoencoder's
# train step at 17x128x128 took 20.3 s with it and 6.1 s without (2 threads; torch: 9.5 s), and
# the `cpu` DiT's forward+backward was no slower without it (323-334 vs 350-405 ms). See
# benchmarks/autoencoder_speed.py. Empty = no YNNPACK fusion of any type.
NO_YNNPACK_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
KEEP_YNNPACK_ENV = "SPACETIME_DIT_XLA_CPU_YNNPACK"


def use_fast_cpu_convolutions() -> None:
  """Turns XLA:CPU's YNNPACK fusions off (see NO_YNNPACK_FLAG) unless the user chose otherwise.

  Must run before the first JAX computation (XLA reads XLA_FLAGS when the backend starts). A
  YNNPACK setting already in XLA_FLAGS is kept; SPACETIME_DIT_XLA_CPU_YNNPACK=1 keeps XLA's
  default. Accelerator backends ignore this CPU-only option.
  """
  flags_now = os.environ.get("XLA_FLAGS", "")
  if os.environ.get(KEEP_YNNPACK_ENV) == "1" or "xla_cpu_experimental_ynn_fusion_type" in flags_now:
    return
  os.environ["XLA_FLAGS"] = f"{flags_now} {NO_YNNPACK_FLAG}".strip()


def run(main: Callable[[list[str]], None]) -> None:
  """`absl.app.run(main)`, turning user errors into `error: <message>` and exit status 2."""

  def guarded(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    absl_logging.get_absl_handler().addFilter(_QuietLibraries())
    try:
      main(argv)
    except _USER_ERRORS as e:
      if os.environ.get("SPACETIME_DIT_TRACEBACK"):
        raise
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  app.run(guarded)
