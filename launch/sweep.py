"""Runs a sweep declared next to its config, then tabulates and plots its trials.

  python -m launch.sweep --config=experiments/base.py:cpu --sweep=attention --root=runs/sweeps/attention \
      -- --config.train.num_steps=300 --config.autoencoder.workdir=runs/quickstart/autoencoder
  python -m launch.sweep --config=experiments/base.py:cpu --sweep=lr --dry_run       # print, run nothing
  python -m launch.sweep --config=experiments/base.py:cpu --sweep=lr --collect       # tables and plots only
  python -m launch.sweep --config=experiments/base.py:cpu --list                     # the declared sweeps

A config module declares `SWEEPS = {"name": fn}`, each `fn()` yielding one dict of overrides
(dotted config keys -> values) per trial. Trial `<name>` trains in `<root>/<name>` with
`python -m spacetime_dit.train --config=... --workdir=<root>/<name> --config.<key>=<value> ...
<flags after -->` (the flags after `--` come last, so they win), one trial after another or
`--parallel=N` at once (each trial uses every core it finds: on a small CPU host parallel
trials only share the cores). `--evaluate` then runs `python -m spacetime_dit.evaluate
--workdir=<root>/<name> <--eval_args>` per trial. A trial whose final checkpoint
(`checkpoints/<train.num_steps>`) exists is skipped and any other runs again, the trainer resuming
it from its newest checkpoint: rerunning the command resumes the sweep. A failed trial is
recorded and the others go on (exit status 1 at the end). SIGTERM or Ctrl-C stops the running
trials at their next step (they save) and starts no new one. `<root>/sweep.json`
holds every trial's overrides, commands, status and times; logs are in `<root>/logs/`.

Collecting (done after a run, or alone with --collect) reads each trial's metrics.jsonl and
`eval/report.json` into `<root>/results.md` and `results.csv` and draws `loss_curves.png` and
`<metric>_vs_<knob>.png`. `--launcher=slurm|tpu` prints each trial's submission from
launch/slurm.py or launch/tpu_pod.py (`--launcher_opt=key=value` goes to their options; the
workdir, and for SLURM the job name, are set per trial).
"""

import argparse
import ast
import concurrent.futures
import dataclasses
import importlib
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from data_pipelines import atomic_files
from launch import cli
from launch import sweep_results as results

SWEEP_FILE = results.SWEEP_FILE
_EVAL_REPORT = results.EVAL_REPORT
_NAME_CHARS = re.compile(r"[^A-Za-z0-9._+-]+")  # Anything else in a value becomes "_" in a trial name.


@dataclasses.dataclass
class Trial:
  """One point of a sweep: its overrides, where it trains, and what happened to it."""

  name: str
  overrides: dict[str, Any]
  workdir: str
  train_argv: list[str]
  eval_argv: list[str] | None = None  # None: no --evaluate.
  final_step: int | None = None  # train.num_steps of the resolved config (None: not resolved).
  status: str = "pending"  # pending | done | failed | stopped (exited 0 before its final step).
  skipped: bool = False  # Finished in an earlier run of the sweep.
  returncode: int | None = None
  eval_status: str | None = None  # None | done | failed | skipped.
  started: str | None = None
  wall_s: float | None = None  # Training (+ evaluation) seconds of the run that finished it.
  error: str | None = None  # Last lines of a failed command's log.


# Declarations.


def sweeps_for(config_path: str) -> dict[str, Callable[[], Iterable[dict[str, Any]]]]:
  """The `SWEEPS` dict of the config module at `config_path` (`file.py[:variant]`)."""
  path = config_path.partition(":")[0]
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist; e.g. --config=experiments/base.py:cpu.")
  stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
  spec = importlib.util.spec_from_file_location(f"_sweep_config_{stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  sweeps = getattr(module, "SWEEPS", None)
  if not isinstance(sweeps, dict) or not sweeps:
    raise ValueError(
        f"{path} declares no sweeps: add `SWEEPS = {{'name': fn}}` where fn() yields override"
        " dicts (see experiments/base.py).")
  return sweeps


def sweep_overrides(config_path: str, sweep: str) -> list[dict[str, Any]]:
  """The override dicts of `sweep`, one per trial, checked for shape (not yet for keys)."""
  sweeps = sweeps_for(config_path)
  if sweep not in sweeps:
    raise ValueError(f"--sweep={sweep!r} is not declared in {config_path}; declared: {sorted(sweeps)}.")
  trials = [dict(o) for o in sweeps[sweep]()]
  if not trials:
    raise ValueError(f"sweep {sweep!r} of {config_path} yields no trials.")
  for overrides in trials:
    bad = [k for k in overrides if not isinstance(k, str) or not re.fullmatch(r"\w+(\.\w+)*", k)]
    if bad:
      raise ValueError(f"sweep {sweep!r} has override keys {bad}; keys are dotted config paths, e.g."
                       " 'optimizer.learning_rate'.")
  return trials


def format_value(value: Any) -> str:
  """The text of `value` in `--config.key=<text>`, which ml_collections parses back to `value`."""
  if isinstance(value, str):
    return value
  if isinstance(value, list):
    value = tuple(value)
  return repr(value)


def override_flags(overrides: dict[str, Any]) -> list[str]:
  return [f"--config.{k}={format_value(v)}" for k, v in overrides.items()]


def trial_names(trials: list[dict[str, Any]]) -> list[str]:
  """Readable, unique directory names: `learning_rate=0.0004`, `packing=True`, `default`."""
  short = results.short_keys(k for o in trials for k in o)
  names = []
  for overrides in trials:
    parts = [f"{short[k]}={_NAME_CHARS.sub('_', format_value(v)).strip('_')}" for k, v in overrides.items()]
    name = ",".join(parts) or "default"
    base, i = name, 2
    while name in names:
      name, i = f"{base}-{i}", i + 1
    names.append(name)
  return names


def resolve_config(config_path: str, train_args: list[str]):
  """The locked ConfigDict that `spacetime_dit.train <train_args>` builds (same flag parser)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  args = ["sweep", f"--config={config_path}", *(a for a in train_args if a.startswith("--config."))]
  values = flags.FlagValues()
  try:
    handle = config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                             sys_argv=args)
    values(args)
    return handle.value
  except (flags.Error, AttributeError, KeyError, TypeError) as e:  # E.g. a mistyped key.
    # ConfigDict wraps a KeyError, whose str() is the repr of its message.
    inner = e.args[0] if e.args and isinstance(e.args[0], KeyError) else e
    message = str(inner.args[0] if isinstance(inner, KeyError) and inner.args else inner).replace("\n", " ")
    raise ValueError(f"{config_path} with {args[2:]}: {message}") from e


# Planning.


def plan(config_path: str, sweep: str, root: str, extra_args: list[str], *, evaluate: bool = False,
         eval_args: list[str] = (), resolve: bool = True) -> list[Trial]:
  """Every trial of `sweep` with its commands; `resolve` also reads its final step (local runs)."""
  all_overrides = sweep_overrides(config_path, sweep)
  trials = []
  for name, overrides in zip(trial_names(all_overrides), all_overrides):
    workdir = os.path.join(root, name)
    train_args = [f"--config={config_path}", f"--workdir={workdir}", *override_flags(overrides), *extra_args]
    trial = Trial(name, overrides, workdir, [sys.executable, "-m", "spacetime_dit.train", *train_args])
    if evaluate:
      moved = [a for a in eval_args if a.split("=")[0] in ("--out", "--out_dir")]
      if moved:
        raise ValueError(
            f"--eval_args sets {moved[0]!r}, but the sweep collects each trial's report from"
            f" <trial>/{_EVAL_REPORT}; drop it from --eval_args.")
      trial.eval_argv = [sys.executable, "-m", "spacetime_dit.evaluate", f"--workdir={workdir}",
                         f"--out_dir={os.path.join(workdir, 'eval')}", *eval_args]
    if resolve:
      trial.final_step = int(resolve_config(config_path, train_args[2:]).train.num_steps)
    trials.append(trial)
  return trials


def finished(trial: Trial) -> bool:
  """Training reached its last step: Orbax renames `checkpoints/<step>` into place only when whole."""
  return trial.final_step is not None and os.path.isdir(
      os.path.join(trial.workdir, "checkpoints", str(trial.final_step)))


def evaluated(trial: Trial) -> bool:
  """The trial's report exists and scores its final checkpoint (not one of an earlier, shorter run)."""
  try:
    with open(os.path.join(trial.workdir, _EVAL_REPORT), encoding="utf-8") as f:
      step = json.load(f).get("step")
  except (OSError, ValueError):
    return False
  return trial.final_step is not None and step == trial.final_step


def submission_text(trial: Trial, launcher: str, opts: dict[str, Any]) -> str:
  """What a dry run prints for one trial: its command(s), or the cluster launcher's submission."""
  if launcher == "local":
    lines = [shlex.join(trial.train_argv)]
    if trial.eval_argv:
      lines.append(shlex.join(trial.eval_argv))
    if finished(trial):
      lines.insert(0, f"# {trial.name}: checkpoints/{trial.final_step} exists, training is skipped")
    return "\n".join(lines)
  module_name = {"slurm": "launch.slurm", "tpu": "launch.tpu_pod"}[launcher]
  try:
    module = importlib.import_module(module_name)
    dry_run_text = module.dry_run_text
  except (ImportError, AttributeError) as e:
    raise ValueError(f"--launcher={launcher} needs {module_name}.dry_run_text, which is not available"
                     f" ({e}); use --launcher=local.") from e
  # These launchers take the workdir as their own option (it must be a path every host sees).
  train_args = [a for a in trial.train_argv[3:] if not a.startswith("--workdir=")]
  opts = {**opts, "workdir": trial.workdir}
  if launcher == "slurm":  # One job per trial; job names may hold only [A-Za-z0-9._-].
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", trial.name)
    opts["job_name"] = f"{opts['job_name']}-{slug}" if opts.get("job_name") else slug
  try:
    text = dry_run_text(train_args, **opts)
  except TypeError as e:  # A missing or unknown option of the launcher's options dataclass.
    raise ValueError(f"{module_name}: {e}; give its options as --launcher_opt=key=value"
                     f" (see python -m {module_name} --help).") from e
  return f"# trial {trial.name}\n" + text.rstrip("\n")


# Running.


def _state(meta: dict[str, Any], trials: list[Trial]) -> dict[str, Any]:
  return {**meta, "trials": [dataclasses.asdict(t) for t in trials]}


def _log_tail(path: str, lines: int = 8) -> str:
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      return "".join(f.readlines()[-lines:]).strip()
  except OSError:
    return ""


class _Runner:
  """Runs trials in `parallel` threads, each waiting on its own subprocesses; keeps sweep.json current."""

  def __init__(self, root: str, meta: dict[str, Any], trials: list[Trial]):
    self.root, self.meta, self.trials = root, meta, trials
    self.lock = threading.Lock()
    self.live: set[subprocess.Popen] = set()
    self.stopping = False

  def save(self):
    with self.lock:
      atomic_files.write_json(os.path.join(self.root, SWEEP_FILE), _state(self.meta, self.trials))

  def stop(self, signum, frame):
    """SIGTERM/SIGINT: the trainers save at their next step and exit 0; no new trial starts."""
    del signum, frame
    self.stopping = True
    with self.lock:
      for p in self.live:
        if p.poll() is None:
          p.send_signal(signal.SIGTERM)

  def _call(self, argv: list[str], log: str) -> int:
    with open(log, "ab") as out:
      out.write(f"$ {shlex.join(argv)}\n".encode())
      out.flush()
      with self.lock:
        if self.stopping:
          return -signal.SIGTERM
        # Its own session: a terminal's Ctrl-C reaches only this runner, which passes it on as
        # SIGTERM, on which the trainer saves at its next step (it has no SIGINT handler).
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.live.add(p)
      code = p.wait()
      with self.lock:
        self.live.discard(p)
    return code

  def run_one(self, trial: Trial) -> None:
    logs = os.path.join(self.root, "logs")
    start = time.monotonic()
    if not trial.skipped:
      if self.stopping:
        return
      trial.started, trial.status = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "running"
      self.save()
      trial.returncode = self._call(trial.train_argv, os.path.join(logs, f"{trial.name}.train.log"))
      if trial.returncode != 0:
        trial.status = "stopped" if self.stopping else "failed"
        trial.error = _log_tail(os.path.join(logs, f"{trial.name}.train.log"))
      else:
        trial.status = "done" if finished(trial) else "stopped"
    if trial.status == "done" and trial.eval_argv:
      if evaluated(trial):
        trial.eval_status = "skipped"
      elif not self.stopping:
        log = os.path.join(logs, f"{trial.name}.eval.log")
        trial.eval_status = "done" if self._call(trial.eval_argv, log) == 0 else "failed"
        if trial.eval_status == "failed":
          trial.error = _log_tail(log)
    if not trial.skipped or trial.eval_status in ("done", "failed"):
      # A trial finished earlier keeps its training time and adds this run's evaluation.
      earlier = (trial.wall_s or 0.0) if trial.skipped else 0.0
      trial.wall_s = round(earlier + time.monotonic() - start, 2)
    print(f"sweep: {trial.name}: {trial.status}" + (" (finished earlier)" if trial.skipped else "")
          + (f", evaluation {trial.eval_status}" if trial.eval_status else ""), flush=True)
    self.save()


def run(root: str, meta: dict[str, Any], trials: list[Trial], parallel: int = 1) -> int:
  """Runs the trials that are not finished; returns 0 when every trial finished, 1 otherwise."""
  os.makedirs(os.path.join(root, "logs"), exist_ok=True)
  previous = results.previous_records(root)
  for trial in trials:
    if finished(trial):
      old = previous.get(trial.name, {})
      trial.status, trial.skipped = "done", True
      trial.started, trial.wall_s = old.get("started"), old.get("wall_s")
      trial.returncode = old.get("returncode", 0)
  runner = _Runner(root, meta, trials)
  runner.save()
  handlers = {s: signal.signal(s, runner.stop) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
      for future in [pool.submit(runner.run_one, t) for t in trials]:
        future.result()
  finally:
    for s, handler in handlers.items():
      signal.signal(s, handler)
  bad = [t.name for t in trials if t.status != "done" or t.eval_status == "failed"]
  if bad:
    print(f"sweep: {len(bad)} of {len(trials)} trials did not finish: {bad} (see {root}/logs/)",
          file=sys.stderr)
  return 1 if bad else 0


# Command line.


def _launcher_opts(items: list[str]) -> dict[str, Any]:
  opts = {}
  for item in items:
    key, eq, text = item.partition("=")
    if not eq or not key.isidentifier():
      raise ValueError(f"--launcher_opt={item!r} must be key=value, e.g. --launcher_opt=nodes=2.")
    try:
      opts[key] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      opts[key] = text
  return opts


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      description="Runs a sweep declared in a config module (SWEEPS) and tabulates its trials.",
      usage="python -m launch.sweep --config=FILE[:VARIANT] --sweep=NAME [--root=DIR] [options] [-- <train flags>]")
  p.add_argument("--config", required=True, help="Config file[:variant] that declares SWEEPS.")
  p.add_argument("--sweep", help="Name in the module's SWEEPS.")
  p.add_argument("--root", help="Directory of the trials (default runs/sweeps/<sweep>).")
  p.add_argument("--parallel", type=int, default=1, help="Trials run at once.")
  p.add_argument("--evaluate", action="store_true", help="Run spacetime_dit.evaluate on each trial.")
  p.add_argument("--eval_args", default="", help="Flags passed verbatim to spacetime_dit.evaluate.")
  p.add_argument("--dry_run", "--print_commands", action="store_true", help="Print each trial's commands only.")
  p.add_argument("--collect", action="store_true", help="Only collect results.md/csv and plots.")
  p.add_argument("--list", action="store_true", help="List the declared sweeps and their trials.")
  p.add_argument("--launcher", choices=("local", "slurm", "tpu"), default="local")
  p.add_argument("--launcher_opt", action="append", default=[], help="key=value for the slurm/tpu launcher.")
  return p


def _main(args, extra: list[str]) -> int:
  if args.list:
    for name in sweeps_for(args.config):
      overrides = sweep_overrides(args.config, name)
      print(f"{name}: {', '.join(trial_names(overrides))}")
    return 0
  if not args.sweep:
    raise ValueError("--sweep is required (see --list for the declared sweeps).")
  if args.parallel < 1:
    raise ValueError(f"--parallel={args.parallel} must be >= 1.")
  root = args.root or os.path.join("runs", "sweeps", args.sweep)
  if args.collect:
    results.collect_and_write(root)
    return 0
  if args.launcher != "local" and not args.dry_run:
    raise ValueError(f"--launcher={args.launcher} only prints each trial's submission: add --dry_run and"
                     " submit the printed commands.")
  if args.launcher != "local" and args.evaluate:
    raise ValueError(f"--evaluate runs on this machine, not with --launcher={args.launcher}: once the jobs"
                     " finished, rerun with --launcher=local --evaluate (finished trials do not retrain).")
  trials = plan(args.config, args.sweep, root, extra, evaluate=args.evaluate,
                eval_args=shlex.split(args.eval_args), resolve=args.launcher == "local")
  if args.dry_run:
    opts = _launcher_opts(args.launcher_opt)
    print("\n".join(submission_text(t, args.launcher, opts) for t in trials))
    return 0
  if (resolve_config(args.config, extra).stage == "dit"
      and not any(a.startswith("--config.autoencoder.workdir=") for a in extra)):
    print("sweep: every trial trains its own autoencoder in <trial>/autoencoder; share one with"
          " -- --config.autoencoder.workdir=DIR", file=sys.stderr)
  meta = {"config": args.config, "sweep": args.sweep, "root": root, "extra_args": extra,
          "eval_args": args.eval_args, "parallel": args.parallel}
  status = run(root, meta, trials, args.parallel)
  results.collect_and_write(root)
  return status


def main(argv: list[str] | None = None) -> int:
  own, extra = cli.split_at_dashes(argv)
  args = _parser().parse_args(own)
  return cli.exit_status(lambda: _main(args, extra), errors=(ValueError, FileNotFoundError))


if __name__ == "__main__":
  sys.exit(main())
