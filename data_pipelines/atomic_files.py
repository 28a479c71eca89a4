"""Atomic file writes: readers (and resume checks) see the old file or the whole new one.

The pattern is the POSIX one: write to a temporary file in the destination's own folder (a
rename is atomic only within one file system), fsync it (so that after a crash the renamed
file has its data, not zero bytes: the ext4 "delayed allocation" lesson), then `os.replace`
it onto the destination.

Temporary names are `<destination>.<random hex>.tmp`, created with O_EXCL: unique across the
processes and machines that share a folder (a fixed ".tmp" suffix lets two writers of one file
clobber each other's half-written data), and recognisable by their destination's name (so a
cleaner can match them). Not `tempfile.mkstemp`: it creates files with mode 0600, which would
leave a dataset written by one user unreadable to the others; here the umask decides, as for
any other file.
"""

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from typing import Any

TMP_SUFFIX = ".tmp"


def temp_path(path: str) -> str:
  """Creates an empty, uniquely named file beside `path` (module docstring); returns its name."""
  path = os.fspath(path)
  while True:
    candidate = f"{path}.{secrets.token_hex(6)}{TMP_SUFFIX}"
    try:
      fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:  # 2^-48 per try; loop rather than reason about it.
      continue
    os.close(fd)
    return candidate


def commit(tmp: str, path: str) -> None:
  """fsyncs the finished temporary file `tmp` and renames it onto `path`."""
  with open(tmp, "rb") as f:
    os.fsync(f.fileno())
  os.replace(tmp, path)


def discard(tmp: str) -> None:
  """Deletes a temporary file that will not be committed (missing is fine)."""
  with contextlib.suppress(FileNotFoundError):
    os.remove(tmp)


@contextlib.contextmanager
def replacing(path: str) -> Iterator[str]:
  """Yields a temporary path to write `path`'s new content to (by name, e.g. with PyAV).

  On a normal exit the temporary file is committed onto `path`; on an exception it is deleted
  and `path` keeps its old content (or stays absent).
  """
  tmp = temp_path(path)
  try:
    yield tmp
    commit(tmp, path)
  finally:
    discard(tmp)


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` atomically."""
  with replacing(path) as tmp, open(tmp, "wb") as f:
    f.write(data)


def write_json(path: str, value: Any, *, compact: bool = False) -> None:
  """Writes `value` as JSON (UTF-8, one trailing newline) to `path` atomically.

  Args:
    path: destination file; its folder must exist.
    value: anything `json.dump` takes.
    compact: no whitespace (for big machine-read files, e.g. an index of millions of shapes);
      the default indents by one space for the files people read (reports, metadata).
  """
  layout = {"separators": (",", ":")} if compact else {"indent": 1}
  with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, **layout)
    f.write("\n")
