"""What every launcher's `main` shares: its own flags before `--`, the trainer's after, and
one `error:` line with exit status 2 for a bad input instead of a traceback."""

import sys
from collections.abc import Callable, Sequence


def split_at_dashes(argv: Sequence[str] | None) -> tuple[list[str], list[str]]:
  """(the launcher's flags, the flags after `--` that go to the trainer); argv None: sys.argv."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" not in argv:
    return argv, []
  split = argv.index("--")
  return argv[:split], argv[split + 1:]


def exit_status(call: Callable[[], int], errors: tuple[type[Exception], ...] = (ValueError,)) -> int:
  """`call()`'s status, or 2 after printing `error: <message>` when it raises one of `errors`."""
  try:
    return call()
  except errors as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
