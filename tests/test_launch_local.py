"""launch.local: N local processes of one JAX job; a 2-process run survives SIGKILL and
resumes as 1 process (then preempted by SIGTERM) and as 2 processes (preempted again, then
finishing)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from launch import local

_FAST = [
    "--config=experiments/autoencoder.py:tiny", "--config.train.num_steps=8", "--config.train.checkpoint_every=2",
    "--config.train.log_every=1", "--config.data.max_buckets=1", "--config.data.num_index_samples=2000",
    "--config.data.token_budget=9600", "--config.latent_stats_clips=2",
]


def test_dry_run_prints_one_command_per_process(capsys):
  assert local.main(["--num_processes=3", "--devices_per_process=2", "--port=1234", "--dry_run", "--",
                     "--config=experiments/base.py:cpu", "--workdir=W"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    assert line.startswith("XLA_FLAGS=") and "--xla_force_host_platform_device_count=2" in line
    assert "-m spacetime_dit.train --config=experiments/base.py:cpu --workdir=W" in line
    assert line.endswith(f"--coordinator_address=127.0.0.1:1234 --num_processes=3 --process_id={i}")


def test_bad_process_count_is_a_clear_error(capsys):
  assert local.main(["--num_processes=0", "--dry_run"]) == 2
  assert "--num_processes=0 must be >= 1" in capsys.readouterr().err


def _rows(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.endswith("\n")]


def _checkpoints(workdir):
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []


def _wait_for(proc, condition, timeout=400):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if condition():
      return
    assert proc.poll() is None, f"exited early with {proc.returncode}"
    time.sleep(0.05)
  raise TimeoutError


@pytest.mark.slow
def test_two_processes_train_are_killed_and_resume_as_one_and_as_two(tmp_path):
  workdir = str(tmp_path / "run")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  env.pop("PYTEST_CURRENT_TEST", None)
  launcher = [sys.executable, "-m", "launch.local", "--num_processes=2", "--devices_per_process=1", "--",
              *_FAST, f"--workdir={workdir}"]
  single = [sys.executable, "-m", "spacetime_dit.train", *_FAST, f"--workdir={workdir}"]

  # 1. Two processes (1 device each) train; SIGKILL the whole job once step 2 is saved.
  proc = subprocess.Popen(launcher, env=env, start_new_session=True)
  _wait_for(proc, lambda: 2 in _checkpoints(workdir) and len(_rows(workdir)) >= 3)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  killed_at = max(_checkpoints(workdir))
  assert killed_at < 8

  # 2. One process (2 devices: the same global mesh) resumes; SIGTERM -> save and exit 0.
  proc = subprocess.Popen(single, env=env)
  # Rows of the killed run after its checkpoint stay until the resumed run drops them.
  fresh = [len(_rows(workdir)) <= killed_at]

  def resumed_a_step():
    fresh[0] = fresh[0] or len(_rows(workdir)) <= killed_at
    return fresh[0] and len(_rows(workdir)) > killed_at

  _wait_for(proc, resumed_a_step)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=300) == 0
  preempted_at = max(_checkpoints(workdir))
  assert preempted_at > killed_at
  assert [r["step"] for r in _rows(workdir)] == list(range(1, preempted_at + 1))

  # 3. Two processes resume; SIGTERM to the launcher reaches both (jax.distributed's own
  # SIGTERM notifier must not swallow it): they agree on a step, save it and exit 0.
  proc = subprocess.Popen(launcher, env=env, start_new_session=True)
  _wait_for(proc, lambda: len(_rows(workdir)) > preempted_at)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=300) == 0
  second_preemption = max(_checkpoints(workdir))
  assert preempted_at < second_preemption < 8, (preempted_at, second_preemption)
  assert [r["step"] for r in _rows(workdir)] == list(range(1, second_preemption + 1))

  # 4. Two processes finish the run from there.
  assert subprocess.run(launcher, env=env, timeout=400).returncode == 0
  rows = _rows(workdir)
  assert [r["step"] for r in rows] == list(range(1, 9))
  assert all(isinstance(r["loss"], float) for r in rows)
  assert os.path.exists(os.path.join(workdir, "latent_stats.json"))
