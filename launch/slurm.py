"""Writes an sbatch script that trains on N SLURM nodes and submits it.

  python -m launch.slurm --nodes=4 --gpus_per_node=8 --partition=gpu --time=24:00:00 \
      --job_name=dit-b --workdir=/shared/runs/dit-b -- --config=experiments/base.py:b
  python -m launch.slurm ... --dry_run -- ...   # prints the script and the sbatch command

The script goes to WORKDIR/slurm/JOB_NAME.sbatch and the job's log to
WORKDIR/slurm/JOB_NAME-JOBID.out; `--dry_run` prints the same thing as a shell snippet
(mkdir, the script as a here-document, `sbatch PATH`) and runs nothing.

One task per node, owning all of the node's GPUs (`srun` with `--ntasks-per-node=1`):
the same layout as a TPU pod host and `launch.local` (one JAX process per host), so there
is one data loader and one checkpoint writer per node, and the mesh maps over hosts the
same way everywhere. JAX's SLURM detection, used by `jax.distributed.initialize()` with no
arguments, reads SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID and
SLURM_LOCALID (jax/_src/clusters/slurm_cluster.py) and, unless told otherwise, restricts
each process to the one GPU numbered SLURM_LOCALID (a one-task-per-GPU layout). The script
therefore exports JAX_LOCAL_DEVICE_IDS=0,...,G-1 so each process keeps all G GPUs, and
SPACETIME_DIT_DISTRIBUTED=auto so the trainer calls `jax.distributed.initialize()` with no
arguments (spacetime_dit/sharding/distributed.py).

Preemption and the time limit: `#SBATCH --signal=TERM@S` has SLURM send SIGTERM to every
task S seconds before the time limit (sbatch(1): without the B: prefix all job steps are
signalled); the trainer then saves at the next step boundary and exits 0, and resubmitting
the same command resumes. `srun --kill-on-bad-exit=1` ends the job when one task fails,
since the others would wait forever in a collective.
"""

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys

from launch import cli

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TIME = re.compile(r"^(\d+-)?\d{1,3}:\d{2}:\d{2}$")  # [D-]HH:MM:SS, as sbatch --time accepts.
_JOB_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
_HEREDOC = "SBATCH_SCRIPT"


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
  """One job: its allocation, where the run lives, and how the nodes start the trainer."""

  nodes: int
  gpus_per_node: int
  partition: str
  time: str
  job_name: str
  workdir: str
  account: str = ""
  cpus_per_task: int = 0  # 0: the partition's default.
  signal_before_s: int = 120  # SIGTERM this long before the time limit (0: none).
  sbatch_options: tuple[str, ...] = ()  # Extra `#SBATCH` lines, e.g. ("--qos=high",).
  setup: str = ""  # A shell line run before srun, e.g. "source ~/venv/bin/activate".
  repo_dir: str = _REPO  # This checkout, on a file system the nodes see.
  python: str = "python"


def check(opts: SlurmOptions) -> None:
  """Raises ValueError naming the bad value, the rule and the fix."""
  if opts.nodes < 1:
    raise ValueError(f"--nodes={opts.nodes} must be >= 1.")
  if opts.gpus_per_node < 0:
    raise ValueError(f"--gpus_per_node={opts.gpus_per_node} must be >= 0 (0: CPU-only nodes).")
  if not opts.partition:
    raise ValueError("--partition is required (see `sinfo` for the cluster's partitions).")
  if not _TIME.match(opts.time):
    raise ValueError(f"--time={opts.time!r} must be HH:MM:SS or D-HH:MM:SS, e.g. --time=24:00:00.")
  if not _JOB_NAME.match(opts.job_name):
    raise ValueError(f"--job_name={opts.job_name!r} must be letters, digits, '.', '_' or '-' (it names files).")
  if not opts.workdir:
    raise ValueError("--workdir is required: an absolute path on a file system every node mounts.")
  if "://" in opts.workdir or not os.path.isabs(opts.workdir):
    raise ValueError(
        f"--workdir={opts.workdir!r} must be an absolute path on a shared file system that every node"
        " mounts at the same place (every process writes its checkpoint shards there, and the trainer"
        " uses POSIX file calls, so no gs:// or s3:// URLs), e.g. --workdir=/shared/runs/dit."
    )
  if opts.cpus_per_task < 0 or opts.signal_before_s < 0:
    raise ValueError(f"--cpus_per_task={opts.cpus_per_task} and --signal_before_s={opts.signal_before_s}"
                     " must be >= 0.")
  for option in opts.sbatch_options:
    if not option.startswith("--") or "\n" in option:
      raise ValueError(f"--sbatch_option={option!r} must be one sbatch long option,"
                       " e.g. --sbatch_option=--qos=high.")


def script_path(opts: SlurmOptions) -> str:
  return os.path.join(opts.workdir, "slurm", f"{opts.job_name}.sbatch")


def script(train_args: list[str], opts: SlurmOptions) -> str:
  """The sbatch script's text."""
  check(opts)
  if any(a.startswith("--workdir") for a in train_args):
    raise ValueError("pass the workdir as the launcher's --workdir (before `--`), not as a trainer flag.")
  log = os.path.join(opts.workdir, "slurm", "%x-%j.out")
  directives = [
      f"--job-name={opts.job_name}", f"--nodes={opts.nodes}", "--ntasks-per-node=1",
      f"--partition={opts.partition}", f"--time={opts.time}", f"--output={log}",
  ]
  if opts.gpus_per_node:
    directives.append(f"--gpus-per-node={opts.gpus_per_node}")
  if opts.cpus_per_task:
    directives.append(f"--cpus-per-task={opts.cpus_per_task}")
  if opts.account:
    directives.append(f"--account={opts.account}")
  if opts.signal_before_s:
    directives.append(f"--signal=TERM@{opts.signal_before_s}")
  directives.extend(opts.sbatch_options)
  lines = ["#!/bin/bash"] + [f"#SBATCH {d}" for d in directives] + ["", "set -eo pipefail"]
  lines.append(f"cd {shlex.quote(opts.repo_dir)}")
  if opts.setup:
    lines.append(opts.setup)
  lines.append("# The trainer calls jax.distributed.initialize() with no arguments: JAX reads SLURM_*.")
  lines.append("export SPACETIME_DIT_DISTRIBUTED=auto")
  if opts.gpus_per_node:
    lines.append("# One task per node owns all its GPUs (JAX's SLURM default would keep only GPU SLURM_LOCALID).")
    lines.append("export JAX_LOCAL_DEVICE_IDS=" + ",".join(str(i) for i in range(opts.gpus_per_node)))
  train = [opts.python, "-m", "spacetime_dit.train", *train_args, f"--workdir={opts.workdir}"]
  # srun no longer inherits sbatch's --cpus-per-task (Slurm 22.05 release notes): pass it again,
  # or the one task per node gets a single CPU and starves the data loader.
  cpus = f"--cpus-per-task={opts.cpus_per_task} " if opts.cpus_per_task else ""
  lines.append(f"srun --ntasks-per-node=1 {cpus}--kill-on-bad-exit=1 " + shlex.join(train))
  return "\n".join(lines) + "\n"


def dry_run_text(train_args: list[str], **opts) -> str:
  """A shell snippet doing what the launch does: mkdir, write the script, `sbatch` it."""
  if "sbatch_options" in opts:
    opts["sbatch_options"] = tuple(opts["sbatch_options"])
  options = SlurmOptions(**opts)
  text = script(list(train_args), options)
  path = script_path(options)
  return (f"mkdir -p {shlex.quote(os.path.dirname(path))}\n"
          f"cat > {shlex.quote(path)} <<'{_HEREDOC}'\n{text}{_HEREDOC}\n"
          f"sbatch {shlex.quote(path)}\n")


def launch(train_args: list[str], opts: SlurmOptions, dry_run: bool = False) -> int:
  """Writes the script and submits it; returns sbatch's exit status."""
  text = script(train_args, opts)
  if dry_run:
    print(dry_run_text(train_args, **dataclasses.asdict(opts)), end="")
    return 0
  path = script_path(opts)
  os.makedirs(os.path.dirname(path), exist_ok=True)  # Also where SLURM writes the job's log.
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  print(f"+ sbatch {shlex.quote(path)}", file=sys.stderr, flush=True)
  return subprocess.call(["sbatch", path])


def main(argv=None):
  parser = argparse.ArgumentParser(
      description="Write an sbatch script that trains on N nodes, and submit it.",
      usage="python -m launch.slurm --nodes=N --gpus_per_node=G --partition=P --time=HH:MM:SS"
            " --job_name=NAME --workdir=/shared/run [--dry_run] -- <trainer flags>",
  )
  parser.add_argument("--nodes", type=int, required=True)
  parser.add_argument("--gpus_per_node", type=int, required=True, help="GPUs per node (0: CPU nodes).")
  parser.add_argument("--partition", required=True)
  parser.add_argument("--time", required=True, help="Time limit, HH:MM:SS or D-HH:MM:SS.")
  parser.add_argument("--job_name", required=True)
  parser.add_argument("--workdir", default="", help="Absolute path on a file system every node mounts.")
  parser.add_argument("--account", default="")
  parser.add_argument("--cpus_per_task", type=int, default=0, help="CPUs of the one task per node (0: default).")
  parser.add_argument("--signal_before_s", type=int, default=120,
                      help="SIGTERM (save and exit) this many seconds before the time limit; 0: none.")
  parser.add_argument("--sbatch_option", action="append", default=[], dest="sbatch_options",
                      help="Extra #SBATCH option, repeatable, e.g. --sbatch_option=--qos=high.")
  parser.add_argument("--setup", default="", help="Shell line run before srun, e.g. 'source venv/bin/activate'.")
  parser.add_argument("--repo_dir", default=_REPO, help="This checkout's path as the nodes see it.")
  parser.add_argument("--python", default="python", help="Interpreter on the nodes.")
  parser.add_argument("--dry_run", action="store_true", help="Print the script and the sbatch command only.")
  own, train_args = cli.split_at_dashes(argv)
  args = vars(parser.parse_args(own))
  dry_run = args.pop("dry_run")
  args["sbatch_options"] = tuple(args["sbatch_options"])
  return cli.exit_status(lambda: launch(train_args, SlurmOptions(**args), dry_run=dry_run))


if __name__ == "__main__":
  sys.exit(main())
