"""The demo folder CLI writes real clips plus one broken file per skip reason."""

import json
import os
import subprocess
import sys


def test_cli_writes_the_folder_and_prints_what_ingest_should_find(tmp_path):
  out = tmp_path / "demo"
  result = subprocess.run(
      [sys.executable, "-m", "data_pipelines.demo_folder", f"--out={out}"],
      capture_output=True, text=True, check=False, timeout=120,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 0, result.stderr[-2000:]
  expected = json.loads(result.stdout[:result.stdout.rindex("}") + 1])
  assert len(expected["expected_accepted"]) == 8 and expected["expected_clips"] == 10
  assert sorted(set(expected["expected_skips"].values())) == [
      "corrupt", "empty_file", "missing_caption", "not_video", "too_small", "truncated",
      "unreadable"]
  for path in expected["expected_accepted"]:
    assert os.path.getsize(path) > 0
    assert os.path.exists(os.path.splitext(path)[0] + ".txt")
  assert not os.path.exists(str(out / "bad" / "no_caption.txt"))
