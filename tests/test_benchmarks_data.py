"""The data benchmarks run on a fresh clone (no runs/ directory) and write their JSON.

Each runs as its own process (`python -m benchmarks.X`): both define absl flags such as
--out, which cannot live in one process together.
"""

import json
import os
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_QUICK_LOADER = ["--threads=1", "--workers=", "--seconds=0.2", "--warmup_batches=1"]


def _run(module, *args, cwd):
  # One CPU device: the benchmarks size batches for the host's devices, not the 8 fake ones.
  env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0",
             PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def _write_metrics(path, steps_per_sec):
  rows = [{"step": 10 * k, "steps_per_sec": steps_per_sec * (0.1 if k == 0 else 1.0),
           "tokens_per_sec": 1000.0, "data_wait_fraction": 0.01} for k in range(4)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_data_loader_reads_trainer_rate_from_metrics(tmp_path):
  metrics = tmp_path / "metrics.jsonl"
  _write_metrics(metrics, steps_per_sec=2.0)
  out = tmp_path / "loader.json"
  result = _run("benchmarks.data_loader", "--variant=tiny", "--stages=dit",
                f"--metrics=dit={metrics}", f"--out={out}", *_QUICK_LOADER, cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "headroom" in result.stdout and "trainer" in result.stdout
  (stage,) = json.loads(out.read_text())["results"]
  trainer = stage["trainer"]
  assert trainer["steps_per_sec"] == 2.0  # The first (compilation) row is left out.
  assert trainer["clips_per_sec"] == pytest.approx(2.0 * stage["clips_per_step"])
  (timing,) = stage["loader"]
  assert timing["headroom"] == pytest.approx(timing["clips_per_sec"] / trainer["clips_per_sec"])


def test_data_loader_metrics_without_config_names_the_fix(tmp_path):
  metrics = tmp_path / "metrics.jsonl"
  _write_metrics(metrics, steps_per_sec=2.0)
  result = _run("benchmarks.data_loader", f"--metrics={metrics}", cwd=tmp_path)
  assert result.returncode == 2
  assert "--metrics=dit=PATH" in result.stderr


@pytest.mark.slow
def test_data_loader_times_the_train_step_without_a_run(tmp_path):
  out = tmp_path / "loader.json"
  result = _run("benchmarks.data_loader", "--variant=tiny", f"--out={out}", "--steps=1",
                "--step_warmup=1", *_QUICK_LOADER, cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  for stage in json.loads(out.read_text())["results"]:
    assert stage["trainer"]["source"].startswith("timed")
    assert stage["trainer"]["step"]["seconds_per_step"] > 0
    assert stage["loader"][0]["headroom"] > 0


def test_data_loader_loader_only_table_says_why(tmp_path):
  out = tmp_path / "loader.json"
  result = _run("benchmarks.data_loader", "--variant=tiny", "--stages=autoencoder",
                "--notime_step", f"--out={out}", *_QUICK_LOADER, cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "no trainer rate" in result.stdout
  (stage,) = json.loads(out.read_text())["results"]
  assert stage["trainer"] is None and stage["loader"][0]["headroom"] is None


def test_padding_waste_runs_and_writes_json(tmp_path):
  out = tmp_path / "padding.json"
  result = _run("benchmarks.padding_waste", "--mixes=web33", "--num_videos=300",
                "--max_buckets=0,4", "--pack_clips=500", f"--out={out}", cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "packing" in result.stdout
  (mix,) = json.loads(out.read_text())["results"]
  assert [b["max_buckets"] for b in mix["bucketing"]] == [0, 4]
  assert all(0 <= p["row_padding"] < 1 for p in mix["packing"])
