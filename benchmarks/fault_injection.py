"""Kills the real trainer with SIGKILL at random moments and checks that it resumes exactly.

  python -m benchmarks.fault_injection --trials=20 --out=runs/bench/fault_injection.json

One uninterrupted reference run, then chains of runs in fresh workdirs: each run of
`python -m spacetime_dit.train` (the same command every time) is SIGKILLed at a random
moment, the same command restarts it, and so on `--kills_per_run` times, then the last run
finishes. A trial is one kill and its restart. Kill moments:

- `step`: a random step of the run, then a random fraction of a step later (anywhere in a
  step: data, compute, logging, checkpoint start);
- `save`: just after a checkpoint step's metrics row, while the async checkpoint of that
  step is being written (the row is logged just before the save starts); whether the kill
  really hit a half-written checkpoint is recorded (`hit_write`: Orbax's temporary
  directory was left behind).

Per trial: the step the restart resumed from (the newest complete checkpoint; it must be
one that was finished), the steps recomputed (logged before the kill, after that
checkpoint), the checkpoints lost (checkpoint steps logged before the kill but not on disk),
and whether it resumed exactly: every metrics row the restarted run wrote has the loss and
grad_norm of the reference row of that step, bitwise, and metrics.jsonl reads 1, 2, ..., n
with no gap or duplicate. Finally each chain's whole metrics.jsonl must equal the
reference's.

Defaults: `experiments/autoencoder.py:tiny` on 2 CPU devices, 16 steps, a checkpoint every 3
steps, one bucket shape (so a restart compiles one step, from the persistent cache).
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from benchmarks import reporting

_COMPARED = ("loss", "grad_norm")


def _train_command(config, workdir, num_steps, checkpoint_every, extra):
  return [
      sys.executable, "-m", "spacetime_dit.train", f"--config={config}", f"--workdir={workdir}",
      f"--config.train.num_steps={num_steps}", f"--config.train.checkpoint_every={checkpoint_every}",
      "--config.train.log_every=1", "--config.train.keep_checkpoints=3",
      *extra,
  ]


def _env(devices, cache_dir):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
  return env


def _rows(workdir):
  """metrics.jsonl rows (a torn last line, as a SIGKILL can leave, is ignored)."""
  path = os.path.join(workdir, "metrics.jsonl")
  rows = []
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      for line in f:
        try:
          rows.append(json.loads(line))
        except ValueError:
          pass
  return rows


def _checkpoints(workdir):
  """(complete checkpoint steps, names of unfinished temporary checkpoint dirs)."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return [], []
  names = os.listdir(directory)
  return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if not n.isdigit())


def _max_step(workdir):
  rows = _rows(workdir)
  return max((r["step"] for r in rows), default=0)


def _kill_when(proc, workdir, mode, target_step, delay, timeout, resumed_from):
  """SIGKILLs `proc` at the chosen moment; returns False if it finished first.

  Rows of the killed run beyond `resumed_from` stay on disk until the restarted trainer
  drops them; only rows written after that count towards `target_step`.
  """
  deadline = time.monotonic() + timeout
  fresh = _max_step(workdir) <= resumed_from
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      return False
    if not fresh:
      fresh = _max_step(workdir) <= resumed_from
    if fresh and _max_step(workdir) >= target_step:
      if mode == "save":
        # Kill as soon as Orbax's temporary directory shows up, or after `delay` at the latest.
        until = time.monotonic() + delay
        while time.monotonic() < until and not _checkpoints(workdir)[1] and proc.poll() is None:
          time.sleep(0.001)
      else:
        time.sleep(delay)
      if proc.poll() is not None:
        return False
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      return True
    time.sleep(0.005)
  proc.kill()
  proc.wait()
  raise TimeoutError(f"the run in {workdir} did not reach step {target_step} in {timeout} s")


def _same(row, ref):
  return all(row.get(k) == ref.get(k) for k in _COMPARED)


def _contiguous(rows):
  return [r["step"] for r in rows] == list(range(1, len(rows) + 1))


def run(*, trials, kills_per_run, config, num_steps, checkpoint_every, devices, seed, workdir, extra,
        timeout=900, log=print):
  """Runs the reference and the kill/restart chains; returns the JSON report."""
  rng = random.Random(seed)
  cache = os.path.join(workdir, "xla_cache")
  env = _env(devices, cache)
  logs = os.path.join(workdir, "logs")
  os.makedirs(logs, exist_ok=True)

  def start(run_dir, name):
    out = open(os.path.join(logs, name + ".log"), "w")
    cmd = _train_command(config, run_dir, num_steps, checkpoint_every, extra)
    return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=os.getcwd()), cmd

  ref_dir = os.path.join(workdir, "reference")
  began = time.perf_counter()
  proc, cmd = start(ref_dir, "reference")
  if proc.wait(timeout=timeout) != 0:
    raise RuntimeError(f"reference run failed; see {logs}/reference.log")
  reference = {r["step"]: r for r in _rows(ref_dir)}
  if sorted(reference) != list(range(1, num_steps + 1)):
    raise RuntimeError(f"reference metrics rows are {sorted(reference)}, not 1..{num_steps}")
  log(f"reference: {num_steps} steps in {time.perf_counter() - began:.0f} s: {' '.join(cmd)}")

  results, chains, chain = [], [], 0
  while len(results) < trials:
    run_dir = os.path.join(workdir, f"chain{chain}")
    kills = min(kills_per_run, trials - len(results))
    chain_trials, attempt = [], 0
    while True:
      proc, _ = start(run_dir, f"chain{chain}_run{attempt}")
      if len(chain_trials) >= kills:
        code = proc.wait(timeout=timeout)
        if chain_trials:
          chain_trials[-1]["rows_after"] = _rows(run_dir)
        break
      # Later kills aim later in the run, so each restart gets some steps done.
      mode = rng.choice(["step", "save"])
      done_before = max(_checkpoints(run_dir)[0], default=0)  # Where this run resumes.
      if mode == "save":
        candidates = [s for s in range(checkpoint_every, num_steps, checkpoint_every) if s > done_before]
        target = rng.choice(candidates) if candidates else num_steps
        delay = rng.uniform(0.0, 0.2)
      else:
        target = rng.randint(min(done_before + 1, num_steps - 1), num_steps - 1)
        delay = rng.uniform(0.0, 0.5)
      killed = _kill_when(proc, run_dir, mode, target, delay, timeout, done_before)
      if chain_trials:
        chain_trials[-1]["rows_after"] = _rows(run_dir)
      attempt += 1
      if not killed:
        code = proc.returncode
        break
      complete, partial = _checkpoints(run_dir)
      logged = _max_step(run_dir)
      restored = max(complete, default=0)
      lost = [s for s in range(checkpoint_every, logged + 1, checkpoint_every) if s not in complete]
      chain_trials.append({
          "chain": chain, "mode": mode, "target_step": target, "killed_after_step": logged,
          "resumed_from": restored, "steps_recomputed": logged - restored, "checkpoints_lost": len(lost),
          "hit_write": bool(partial), "unfinished_dirs": partial,
      })
    final = _rows(run_dir)
    chain_exact = code == 0 and _contiguous(final) and len(final) == num_steps and all(
        _same(r, reference[r["step"]]) for r in final)
    for trial in chain_trials:
      after = trial.pop("rows_after", final)
      # Rows the restarted run wrote before the next kill (or the end).
      new = [r for r in after if r["step"] > trial["resumed_from"]]
      trial["rows_checked"] = len(new)
      trial["exact"] = bool(chain_exact and _contiguous(after)
                            and all(_same(r, reference[r["step"]]) for r in new))
      log(f"trial {len(results):3d}: {trial['mode']:4s} kill after step {trial['killed_after_step']:3d}"
          f" (write hit: {trial['hit_write']!s:5s}) -> resumed from {trial['resumed_from']:3d},"
          f" recomputed {trial['steps_recomputed']}, exact: {trial['exact']}")
      results.append(trial)
    chains.append({"chain": chain, "exit_code": code, "final_rows": len(final), "exact": chain_exact})
    chain += 1

  summary = {
      "trials": len(results),
      "resumed_exactly": sum(t["exact"] for t in results),
      "checkpoints_lost": sum(t["checkpoints_lost"] for t in results),
      "steps_recomputed": sum(t["steps_recomputed"] for t in results),
      "kills_during_checkpoint_write": sum(t["hit_write"] for t in results),
      "chains_exact": sum(c["exact"] for c in chains),
      "chains": len(chains),
      "wall_s": round(time.perf_counter() - began, 1),
  }
  return {
      "summary": summary, "trials": results, "chains": chains,
      "setup": {"config": config, "num_steps": num_steps, "checkpoint_every": checkpoint_every,
                "devices": devices, "kills_per_run": kills_per_run, "seed": seed, "extra_flags": extra,
                "compared": list(_COMPARED)},
  }


def _table(summary):
  rows = [("trials", summary["trials"]), ("resumed exactly", summary["resumed_exactly"]),
          ("checkpoints lost", summary["checkpoints_lost"]), ("steps recomputed", summary["steps_recomputed"]),
          ("kills during a checkpoint write", summary["kills_during_checkpoint_write"]),
          ("chains whose whole metrics.jsonl matched", f"{summary['chains_exact']}/{summary['chains']}"),
          ("wall time (s)", summary["wall_s"])]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


FAST_FLAGS = (
    "--config.data.max_buckets=1", "--config.data.num_index_samples=2000",
    "--config.data.token_budget=9600", "--config.latent_stats_clips=2",
)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--trials", type=int, default=20)
  parser.add_argument("--kills_per_run", type=int, default=4, help="Kills per workdir before it may finish.")
  parser.add_argument("--config", default="experiments/autoencoder.py:tiny")
  parser.add_argument("--num_steps", type=int, default=16)
  parser.add_argument("--checkpoint_every", type=int, default=3)
  parser.add_argument("--devices", type=int, default=2, help="Fake CPU devices per run.")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", default="", help="Where the runs go (default: a temporary dir, deleted).")
  parser.add_argument("--out", required=True)
  parser.add_argument("extra", nargs="*",
                      help="More train flags (after --), e.g. --config.train.async_checkpointing=False.")
  args = parser.parse_args()
  workdir = args.workdir or tempfile.mkdtemp(prefix="fault_injection_")
  try:
    report = run(trials=args.trials, kills_per_run=args.kills_per_run, config=args.config,
                 num_steps=args.num_steps, checkpoint_every=args.checkpoint_every, devices=args.devices,
                 seed=args.seed, workdir=workdir, extra=list(FAST_FLAGS) + args.extra)
  finally:
    if not args.workdir:
      shutil.rmtree(workdir, ignore_errors=True)
  print(_table(report["summary"]))
  reporting.write_json(args.out, report)


if __name__ == "__main__":
  main()
