"""The command-line contracts, run for real: train (both stages chained), sample, evaluate."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from spacetime_dit import cli
from spacetime_dit import inference
from spacetime_dit import video_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, check=True):
  """Runs `python -m <args>` from the repository root; returns the completed process."""
  result = subprocess.run(
      [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=900
  )
  if check and result.returncode:
    raise AssertionError(f"{args} exited {result.returncode}:\n{result.stderr[-4000:]}")
  return result


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """One tiny quickstart: the autoencoder stage is trained first because none exists."""
  workdir = str(tmp_path_factory.mktemp("quickstart"))
  _run(
      "spacetime_dit.train", "--config=experiments/base.py:tiny", "--config.train.sample_every=2",
      f"--workdir={workdir}",
  )
  return workdir


def test_train_leaves_checkpoints_metrics_tensorboard_and_samples(run_dir):
  for stage_dir, steps in ((os.path.join(run_dir, "autoencoder"), 4), (run_dir, 4)):
    assert os.path.isdir(os.path.join(stage_dir, "checkpoints", str(steps)))
    assert os.path.exists(os.path.join(stage_dir, "config.json"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(stage_dir, "tensorboard")))
    with open(os.path.join(stage_dir, "metrics.jsonl"), encoding="utf-8") as f:
      rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("step", "loss", "learning_rate", "grad_norm", "steps_per_sec", "tokens_per_sec"):
      assert all(np.isfinite(r[key]) for r in rows), key
  assert os.path.exists(os.path.join(run_dir, "autoencoder", "latent_stats.json"))
  assert sorted(os.listdir(os.path.join(run_dir, "samples"))) == ["step_0000002", "step_0000004"]
  samples = os.path.join(run_dir, "samples", "step_0000004")
  clips = sorted(os.listdir(samples))
  assert len(clips) == 4 and all(c.endswith(".mp4") for c in clips)
  assert video_io.read_video(os.path.join(samples, clips[0])).shape == (9, 32, 32, 3)


def test_rerunning_a_finished_run_resumes_instead_of_retraining(run_dir):
  _run(
      "spacetime_dit.train", "--config=experiments/base.py:tiny", "--config.train.sample_every=2",
      f"--workdir={run_dir}",
  )
  with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
    assert len(f.readlines()) == 4  # nothing was trained again


def test_sample_command_writes_a_decodable_mp4_of_the_asked_size(run_dir, tmp_path):
  out, gif = str(tmp_path / "clip.mp4"), str(tmp_path / "clip.gif")
  _run(
      "spacetime_dit.sample", f"--workdir={run_dir}", "--prompt=a red circle moving right",
      f"--out={out}", f"--gif={gif}", "--frames=5", "--height=24", "--width=40", "--steps=2",
      "--guidance=3", "--seed=1",
  )
  assert video_io.read_video(out).shape == (5, 24, 40, 3)
  assert os.path.getsize(gif) > 0


@pytest.mark.parametrize("frames, height, width", [(9, 40, 24), (1, 24, 48), (1, 8, 8), (13, 16, 64)])
def test_any_size_the_factors_allow_samples_portrait_landscape_and_images(run_dir, frames, height, width):
  generator = inference.Generator.from_workdir(run_dir)
  videos = generator.generate(
      ["a blue square moving up", "a white circle"], frames=frames, height=height, width=width,
      steps=2, progress=False,
  )
  assert videos.shape == (2, frames, height, width, 3) and videos.dtype == np.uint8


def test_sizes_the_model_cannot_take_are_clear_errors(run_dir):
  generator = inference.Generator.from_workdir(run_dir)
  with pytest.raises(ValueError, match=r"multiples of 8 and 8 .*e.g. 32x32"):
    generator.generate(["a red circle"], frames=5, height=36, width=32, steps=1, progress=False)
  with pytest.raises(ValueError, match=r"frames = 1 \+ k\*2 \(e.g. 3\)"):
    generator.generate(["a red circle"], frames=4, height=32, width=32, steps=1, progress=False)
  result = _run(
      "spacetime_dit.sample", f"--workdir={run_dir}", "--prompt=x", "--height=30", "--out=/dev/null",
      check=False,
  )
  assert result.returncode != 0 and "multiples of 8" in result.stderr
  assert "Traceback" not in result.stderr


def test_evaluate_writes_a_scored_report(run_dir, tmp_path):
  out = str(tmp_path / "report.json")
  # The sampling part only: tests/test_evaluate_report.py runs every part.
  _run("spacetime_dit.evaluate", f"--workdir={run_dir}", f"--out={out}", "--num_prompts=2", "--steps=2",
       "--parts=sampling", "--split=train")
  with open(out, encoding="utf-8") as f:
    report = json.load(f)
  assert report["num_prompts"] == 2 and len(report["clips"]) == 2
  for key in ("colour", "shape", "motion", "persistence"):
    assert 0.0 <= report["summary"][key] <= 1.0


def test_a_mistyped_override_names_the_close_match(tmp_path):
  result = _run(
      "spacetime_dit.train", "--config=experiments/base.py:tiny", "--config.train.num_stepz=3",
      f"--workdir={tmp_path}", check=False,
  )
  assert result.returncode != 0 and 'Did you mean "num_steps"' in result.stderr


def test_a_mesh_that_does_not_fit_is_a_clear_error(tmp_path):
  result = _run(
      "spacetime_dit.train", "--config=experiments/autoencoder.py:tiny", "--config.mesh.data=3",
      f"--workdir={tmp_path}", check=False,
  )
  assert result.returncode != 0 and re.search(r"needs 3 devices but \d+ are available", result.stderr)
  assert "Traceback" not in result.stderr


def test_fast_cpu_convolutions_flag_is_added_once_and_respects_the_user(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  monkeypatch.delenv(cli.KEEP_YNNPACK_ENV, raising=False)
  cli.use_fast_cpu_convolutions()
  cli.use_fast_cpu_convolutions()
  assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {cli.NO_YNNPACK_FLAG}"
  # A YNNPACK choice already made is kept, and the opt-out keeps XLA's default.
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
  cli.use_fast_cpu_convolutions()
  assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot"
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv(cli.KEEP_YNNPACK_ENV, "1")
  cli.use_fast_cpu_convolutions()
  assert os.environ["XLA_FLAGS"] == ""
