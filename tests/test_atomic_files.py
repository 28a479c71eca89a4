"""atomic_files: whole-or-nothing replacement, unique temporary names, umask permissions."""

import json
import os
import stat

import pytest

from data_pipelines import atomic_files


def test_write_json_replaces_whole_file_and_leaves_nothing_behind(tmp_path):
  path = str(tmp_path / "meta.json")
  atomic_files.write_json(path, {"a": [1, 2]})
  atomic_files.write_json(path, {"b": 3}, compact=True)
  assert json.loads(open(path).read()) == {"b": 3}
  assert open(path).read() == '{"b":3}\n'
  assert os.listdir(tmp_path) == ["meta.json"]


def test_a_failed_write_keeps_the_old_content(tmp_path):
  path = str(tmp_path / "report.json")
  atomic_files.write_json(path, {"old": True})
  with pytest.raises(TypeError):
    atomic_files.write_json(path, {"bad": object()})  # Fails half-way through json.dump.
  assert json.loads(open(path).read()) == {"old": True}
  assert os.listdir(tmp_path) == ["report.json"]
  with pytest.raises(RuntimeError):
    with atomic_files.replacing(str(tmp_path / "new.mp4")) as tmp:
      open(tmp, "wb").write(b"half")
      raise RuntimeError("interrupted")
  assert os.listdir(tmp_path) == ["report.json"]


def test_temporary_names_are_unique_beside_the_destination(tmp_path):
  path = str(tmp_path / "latents-00000-of-00001.array_record")
  names = {atomic_files.temp_path(path) for _ in range(20)}  # Two writers never share one.
  assert len(names) == 20
  assert all(n.startswith(path + ".") and n.endswith(atomic_files.TMP_SUFFIX) for n in names)
  for name in names:
    atomic_files.discard(name)
  atomic_files.discard(name)  # Already gone: fine.
  assert not os.listdir(tmp_path)


def test_permissions_follow_the_umask_not_0600(tmp_path):
  old = os.umask(0o022)
  try:
    atomic_files.write_bytes(str(tmp_path / "dataset.json"), b"{}")
  finally:
    os.umask(old)
  assert stat.S_IMODE(os.stat(tmp_path / "dataset.json").st_mode) == 0o644
