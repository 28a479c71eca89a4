"""Creates a Cloud TPU VM slice, runs the trainer on every worker, deletes the slice.

  python -m launch.tpu_pod --name=dit --zone=us-east5-a --accelerator_type=v5p-64 \
      --version=v2-alpha-tpuv5 --workdir=gs://my-bucket/runs/dit --action=all -- \
      --config=experiments/base.py:b
  python -m launch.tpu_pod ... --dry_run -- ...   # prints the gcloud commands, runs nothing

Actions: `create` (`gcloud compute tpus tpu-vm create`), `run` (copy this checkout to every
worker with `tpu-vm scp --worker=all`, then one `tpu-vm ssh --worker=all --command=...` that
installs it and starts `python -m spacetime_dit.train` on all workers at once), `delete`
(`tpu-vm delete --quiet`), and `all` (the three in order; delete also runs when the
training command failed, because an idle slice is billed and everything worth keeping is in
the bucket). gcloud syntax: https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm
(create, ssh: "To run the same command in all workers ... --worker=all", scp).

The trainer on each worker runs with SPACETIME_DIT_DISTRIBUTED=auto, so
`spacetime_dit/sharding/distributed.py` calls `jax.distributed.initialize()` with no
arguments and JAX reads the coordinator, process count and process id from the TPU VM
metadata (one process per host, owning the host's chips).

Workdir: every worker must read and write the same directory (process 0 writes the
metrics and config, every process writes its shards of each checkpoint), and a TPU VM's
disk is deleted with the slice. The trainer writes through POSIX file calls (`open`,
`os.replace`, Orbax on a local-looking path), so a gs:// URL cannot be passed to it
directly: `--workdir=gs://BUCKET/PATH` mounts BUCKET with Cloud Storage FUSE (gcsfuse, which
must be installed on the VM image) at `--mount_root/BUCKET` on every worker and gives the
trainer that path. An absolute path is accepted with `--shared_fs`, when you have mounted
one shared file system (e.g. Filestore NFS) at that path on every worker yourself.
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
# What `pip install -e .` and the trainer need on a worker (setup.py's packages); the rest of
# the checkout (runs/, .git, notebooks) stays here.
_CODE = ("setup.py", "spacetime_dit", "data_pipelines", "experiments", "launch")
# v2-8, v3-32, v4-64, v5p-128, v5litepod-16, v6e-256: generation, then the slice size.
_ACCELERATOR = re.compile(r"^v\d+[a-z]*(?:pod)?-\d+$")
_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # GCP resource names.
_ACTIONS = ("create", "run", "delete", "all")
# gcsfuse renames a directory only when it holds fewer objects than this (default 0: never),
# and Orbax commits a checkpoint on a non-gs:// path by renaming its temporary directory.
_RENAME_DIR_LIMIT = 1_000_000


@dataclasses.dataclass(frozen=True)
class PodOptions:
  """One launch: the slice, where the run lives, and what to do."""

  name: str
  zone: str
  accelerator_type: str
  version: str
  workdir: str
  action: str = "all"
  project: str = ""
  spot: bool = False
  setup: str = "pip"  # "pip": pip install the checkout (and jax[tpu]) first; "none": it is there.
  copy_code: bool = True
  code_dir: str = "spacetime_dit"  # On each worker, relative to the ssh user's home.
  mount_root: str = "/tmp/gcs"
  shared_fs: bool = False
  python: str = "python3"


def check(opts: PodOptions) -> None:
  """Raises ValueError naming the bad value, the rule and the fix."""
  if not _NAME.match(opts.name) or len(opts.name) > 63:
    raise ValueError(f"--name={opts.name!r} must be a GCP resource name: lowercase letters, digits and"
                     " hyphens, starting with a letter, at most 63 characters (e.g. --name=dit-v5p).")
  if not opts.zone:
    raise ValueError("--zone is required (e.g. --zone=us-east5-a): a TPU slice lives in one zone.")
  if not _ACCELERATOR.match(opts.accelerator_type):
    raise ValueError(f"--accelerator_type={opts.accelerator_type!r} is not VERSION-SIZE: use a Cloud TPU"
                     " accelerator type such as v4-32, v5p-64, v5litepod-16 or v6e-256.")
  if not opts.version:
    raise ValueError("--version (the TPU software version) is required, e.g. v2-alpha-tpuv5 for v5p,"
                     " v2-alpha-tpuv6e for v6e, tpu-ubuntu2204-base for v4.")
  if opts.action not in _ACTIONS:
    raise ValueError(f"--action={opts.action!r} must be one of {', '.join(_ACTIONS)}.")
  if opts.setup not in ("pip", "none"):
    raise ValueError(f"--setup={opts.setup!r} must be 'pip' or 'none'.")
  if opts.action in ("run", "all"):
    _check_workdir(opts)


def _check_workdir(opts: PodOptions) -> None:
  if not opts.workdir:
    raise ValueError("--workdir is required: gs://BUCKET/PATH (mounted on every worker), or an"
                     " absolute path on a file system every worker mounts, with --shared_fs.")
  if opts.workdir.startswith("gs://"):
    bucket = opts.workdir[len("gs://"):].split("/", 1)[0]
    if not bucket:
      raise ValueError(f"--workdir={opts.workdir!r} names no bucket: use gs://BUCKET/PATH.")
    return
  if "://" in opts.workdir:
    raise ValueError(f"--workdir={opts.workdir!r}: only gs:// URLs and absolute paths are supported.")
  if not (opts.shared_fs and os.path.isabs(opts.workdir)):
    raise ValueError(
        f"--workdir={opts.workdir!r} is a local path, but each TPU worker has its own disk (deleted"
        " with the slice) and every worker must see the same checkpoint directory. Use"
        " --workdir=gs://BUCKET/PATH, or an absolute path on a shared file system mounted at the"
        " same place on every worker, with --shared_fs."
    )


def trainer_workdir(opts: PodOptions) -> str:
  """The path the trainer gets on the workers (the gcsfuse mount point for gs:// workdirs)."""
  if opts.workdir.startswith("gs://"):
    return f"{opts.mount_root}/{opts.workdir[len('gs://'):]}".rstrip("/")
  return opts.workdir


def _jax_tpu_requirement() -> str:
  """`jax[tpu]` held to setup.py's jax range, so pip puts libtpu next to the tested jax."""
  with open(os.path.join(_REPO, "setup.py"), encoding="utf-8") as f:
    spec = re.search(r'"jax(>=[^"]+)"', f.read())
  return "jax[tpu]" + (spec.group(1) if spec else "")


def _location(opts: PodOptions) -> list[str]:
  return [f"--zone={opts.zone}"] + ([f"--project={opts.project}"] if opts.project else [])


def _remote_command(train_args: list[str], opts: PodOptions) -> str:
  """The shell line every worker runs (quoted pieces: shlex)."""
  steps = [f"cd {shlex.quote(opts.code_dir)}"]
  if opts.setup == "pip":
    steps.append(f"{opts.python} -m pip install -q -e . {shlex.quote(_jax_tpu_requirement())}")
  if opts.workdir.startswith("gs://"):
    bucket = opts.workdir[len("gs://"):].split("/", 1)[0]
    mount = shlex.quote(f"{opts.mount_root}/{bucket}")
    steps.append(f"mkdir -p {mount}")
    steps.append(f"(mountpoint -q {mount} || gcsfuse --implicit-dirs --rename-dir-limit={_RENAME_DIR_LIMIT}"
                 f" {shlex.quote(bucket)} {mount})")
  train = [opts.python, "-m", "spacetime_dit.train", *train_args, f"--workdir={trainer_workdir(opts)}"]
  steps.append("SPACETIME_DIT_DISTRIBUTED=auto " + shlex.join(train))
  return " && ".join(steps)


def commands(train_args: list[str], opts: PodOptions) -> list[list[str]]:
  """The gcloud argv lists `opts.action` runs, in order."""
  check(opts)
  if any(a.startswith("--workdir") for a in train_args):
    raise ValueError("pass the workdir as the launcher's --workdir (before `--`), not as a trainer flag:"
                     " the launcher turns it into the path the workers see.")
  tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
  loc = _location(opts)
  create = [*tpu, "create", opts.name, *loc, f"--accelerator-type={opts.accelerator_type}",
            f"--version={opts.version}"] + (["--spot"] if opts.spot else [])
  run = []
  if opts.copy_code:
    run.append([*tpu, "ssh", opts.name, *loc, "--worker=all", f"--command=mkdir -p {shlex.quote(opts.code_dir)}"])
    run.append([*tpu, "scp", *[os.path.join(_REPO, p) for p in _CODE], f"{opts.name}:{opts.code_dir}",
                *loc, "--worker=all", "--recurse"])
  run.append([*tpu, "ssh", opts.name, *loc, "--worker=all", f"--command={_remote_command(train_args, opts)}"])
  delete = [*tpu, "delete", opts.name, *loc, "--quiet"]
  return {"create": [create], "run": run, "delete": [delete], "all": [create, *run, delete]}[opts.action]


def _shell_word(arg: str) -> str:
  """`arg` quoted for a POSIX shell: "--command=..." in double quotes when that is exact.

  Double quotes keep the remote command readable (its own quoting is single quotes); they are
  used only when nothing inside would expand locally ($, `, \\, ", !).
  """
  flag, sep, value = arg.partition("=")
  if sep and flag == "--command" and not set(value) & set('$`\\"!'):
    return f'{flag}="{value}"'
  return shlex.quote(arg)


def dry_run_text(train_args: list[str], **opts) -> str:
  """The commands a launch would run, one shell line each (nothing is run)."""
  argvs = commands(list(train_args), PodOptions(**opts))
  return "".join(" ".join(_shell_word(a) for a in argv) + "\n" for argv in argvs)


def launch(train_args: list[str], opts: PodOptions, dry_run: bool = False) -> int:
  """Runs the commands in order; returns the first failure's exit status (0 when all succeeded)."""
  cmds = commands(train_args, opts)
  if dry_run:
    print(dry_run_text(train_args, **dataclasses.asdict(opts)), end="")
    return 0
  status, created = 0, False
  for argv in cmds:
    is_delete = argv[4] == "delete"
    # After a failure only `all`'s delete still runs (an idle slice is billed), and only for a
    # slice this call created: a failed create may mean the name belongs to someone else's slice.
    if status and not (is_delete and opts.action == "all" and created):
      continue
    print("+ " + shlex.join(argv), file=sys.stderr, flush=True)
    code = subprocess.call(argv)
    created = created or (argv[4] == "create" and code == 0)
    status = status or code
  return status


def main(argv=None):
  parser = argparse.ArgumentParser(
      description="Create a Cloud TPU VM slice, run the trainer on all workers, delete it.",
      usage="python -m launch.tpu_pod --name=N --zone=Z --accelerator_type=v5p-64 --version=V"
            " --workdir=gs://B/P [--action=create|run|delete|all] [--dry_run] -- <trainer flags>",
  )
  parser.add_argument("--name", required=True, help="TPU VM (slice) name.")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--accelerator_type", required=True, help="e.g. v5p-64, v4-32, v6e-256.")
  parser.add_argument("--version", required=True, help="TPU software version, e.g. v2-alpha-tpuv5.")
  parser.add_argument("--project", default="", help="GCP project (default: gcloud's configured one).")
  parser.add_argument("--spot", action="store_true", help="Spot capacity (preemptible; resume by rerunning).")
  parser.add_argument("--workdir", default="", help="gs://BUCKET/PATH, or an absolute path with --shared_fs.")
  parser.add_argument("--shared_fs", action="store_true",
                      help="--workdir is an absolute path that every worker mounts (e.g. Filestore).")
  parser.add_argument("--mount_root", default="/tmp/gcs", help="Where gs:// buckets are mounted on workers.")
  parser.add_argument("--setup", default="pip", help="pip: install the checkout and jax[tpu]; none: skip.")
  parser.add_argument("--copy_code", action=argparse.BooleanOptionalAction, default=True,
                      help="Copy this checkout to every worker before running (--no-copy_code: it is there).")
  parser.add_argument("--code_dir", default="spacetime_dit", help="Checkout directory on each worker.")
  parser.add_argument("--python", default="python3",
                      help="Interpreter on the workers (setup.py needs Python 3.11, e.g. python3.11).")
  parser.add_argument("--action", default="all", help="create, run, delete or all.")
  parser.add_argument("--dry_run", action="store_true", help="Print the commands, run nothing.")
  own, train_args = cli.split_at_dashes(argv)
  args = vars(parser.parse_args(own))
  dry_run = args.pop("dry_run")
  return cli.exit_status(lambda: launch(train_args, PodOptions(**args), dry_run=dry_run))


if __name__ == "__main__":
  sys.exit(main())
