"""Starts N local processes of one multi-process JAX job (CPU collectives over loopback).

  python -m launch.local --num_processes=2 -- --config=experiments/base.py:cpu --workdir=W
  python -m launch.local --num_processes=2 --dry_run -- --config=... --workdir=W

Each process runs `python -m spacetime_dit.train <args> --coordinator_address=127.0.0.1:PORT
--num_processes=N --process_id=i`; the trainer calls `jax.distributed.initialize` with them
(`spacetime_dit/sharding/distributed.py`) and the processes form one job whose global
mesh spans all their devices (gloo CPU collectives, JAX's default on CPU). With
`--devices_per_process=K` each process gets K fake CPU devices (XLA_FLAGS), so 2 processes x
4 devices run the same 8-device mesh as one process with 8.

Signals: SIGTERM or SIGINT sent to the launcher reach every process as SIGTERM (the trainer
then saves at the next step boundary, all processes agreeing on the step, and exits 0). The
processes share the launcher's process group: SIGKILL to the group kills the whole job, and a
terminal's Ctrl-C also interrupts them directly (a rerun resumes from the last checkpoint).
When one process dies, the others cannot finish a collective without it, so the launcher
kills them and exits with the first failure's status (128 + signal for a killed process).
Rerunning the same command resumes, also with another --num_processes (see
`checkpointing.Checkpointer._data_state_of_other_process_count` for the data rule).
"""

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

from launch import cli

_GRACE_S = 10.0  # After one process fails: how long the others get to exit on their own.


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def commands(num_processes: int, port: int, module: str, args: list[str], devices_per_process: int = 0):
  """[(env overrides, argv)] of each process."""
  out = []
  for i in range(num_processes):
    env = {}
    if devices_per_process:
      flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
      env["XLA_FLAGS"] = f"{flags.strip()} --xla_force_host_platform_device_count={devices_per_process}".strip()
      env["JAX_PLATFORMS"] = "cpu"
    argv = [sys.executable, "-m", module, *args, f"--coordinator_address=127.0.0.1:{port}",
            f"--num_processes={num_processes}", f"--process_id={i}"]
    out.append((env, argv))
  return out


def _status(code: int) -> int:
  return 128 - code if code < 0 else code


def launch(num_processes: int, args: list[str], *, module: str = "spacetime_dit.train", port: int = 0,
           devices_per_process: int = 0, dry_run: bool = False) -> int:
  """Runs the processes to the end; returns the job's exit status (0 when all succeeded)."""
  if num_processes < 1:
    raise ValueError(f"--num_processes={num_processes} must be >= 1.")
  port = port or _free_port()
  cmds = commands(num_processes, port, module, args, devices_per_process)
  if dry_run:
    for env, argv in cmds:
      prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
      print((prefix + " " if prefix else "") + shlex.join(argv))
    return 0
  procs = []

  def forward(signum, frame):
    # The trainer's clean stop is SIGTERM (save at the next step boundary, exit 0); a SIGINT
    # to the launcher is turned into it rather than a KeyboardInterrupt in every process.
    del signum, frame
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)

  # Installed before spawning, so a signal then still reaches every child started.
  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  # The children stay in the launcher's process group, so killing the group (a scheduler's
  # SIGKILL) kills the whole job; a terminal's Ctrl-C therefore also reaches them directly.
  procs.extend(subprocess.Popen(argv, env={**os.environ, **env}) for env, argv in cmds)
  try:
    failed_at, status = None, 0
    while any(p.poll() is None for p in procs):
      for i, p in enumerate(procs):
        code = p.poll()
        if code not in (None, 0) and failed_at is None:
          failed_at, status = time.monotonic(), _status(code)
          print(f"launch.local: process {i} exited with status {status}; stopping the others",
                file=sys.stderr)
      if failed_at is not None and time.monotonic() - failed_at > _GRACE_S:
        for p in procs:
          if p.poll() is None:
            p.kill()
      time.sleep(0.1)
    if failed_at is None:
      codes = [p.returncode for p in procs]
      status = next((_status(c) for c in codes if c != 0), 0)
    return status
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def main(argv=None):
  parser = argparse.ArgumentParser(
      description="Starts N local processes of one JAX job.",
      usage="python -m launch.local --num_processes=N [--dry_run] -- <trainer flags>",
  )
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=0,
                      help="Fake CPU devices per process (0: leave XLA_FLAGS as they are).")
  parser.add_argument("--port", type=int, default=0, help="Coordinator port (0: a free one).")
  parser.add_argument("--module", default="spacetime_dit.train", help="Python module each process runs.")
  parser.add_argument("--dry_run", action="store_true", help="Print the commands, start nothing.")
  own, rest = cli.split_at_dashes(argv)
  args = parser.parse_args(own)
  return cli.exit_status(lambda: launch(args.num_processes, rest, module=args.module, port=args.port,
                                        devices_per_process=args.devices_per_process, dry_run=args.dry_run))


if __name__ == "__main__":
  sys.exit(main())
