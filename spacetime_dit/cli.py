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
