"""Multi-process start-up: the one place that calls `jax.distributed.initialize`.

Launchers (`launch/`) pass the coordinator address, process count and id as flags or the
standard JAX environment variables; on TPU pods and SLURM JAX finds them itself.

Auto-detection (no flags): `jax.distributed.initialize()` with no arguments reads the cluster
from a Cloud TPU VM's metadata or from SLURM_* variables (jax/_src/clusters/; the JAX docs of
`jax.distributed.initialize`: "If you are using TPU, Slurm, or Open MPI, all arguments are
optional"). It is used when the environment says so: `SPACETIME_DIT_DISTRIBUTED=auto`
(`launch.tpu_pod` and `launch.slurm` set it), or inside an `srun` step of more than one task
(SLURM_STEP_NUM_TASKS > 1, which only srun sets). A plain single-process run never takes it:
on a laptop there is no cluster to detect and the call would fail.
"""

import logging
import os

import jax

AUTO_ENV = "SPACETIME_DIT_DISTRIBUTED"  # "auto": let JAX detect the cluster; "off": never.


def auto_requested(environ) -> bool:
  """Whether `environ` asks for JAX's cluster auto-detection (see the module docstring).

  Raises:
    ValueError: `SPACETIME_DIT_DISTRIBUTED` is set to something other than auto/off/empty.
  """
  value = environ.get(AUTO_ENV, "")
  if value not in ("", "auto", "off"):
    raise ValueError(f"{AUTO_ENV}={value!r} must be 'auto', 'off' or unset.")
  if value:
    return value == "auto"
  try:
    return int(environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1
  except ValueError:
    return False


def initialize(coordinator_address: str = "", num_processes: int = 1, process_id: int = 0) -> None:
  """Joins this process to the job when there is more than one process.

  With `num_processes == 1` and no coordinator it does nothing, so single-process runs
  never touch the distributed runtime, unless `auto_requested(os.environ)`: then JAX reads
  the coordinator, process count and id from the TPU VM or SLURM environment.
  """
  if num_processes <= 1 and not coordinator_address:
    if auto_requested(os.environ):
      jax.distributed.initialize()
      _log_joined()
    return
  if num_processes > 1 and not coordinator_address:
    raise ValueError(
        f"num_processes={num_processes} needs a coordinator address (host:port of process 0),"
        " e.g. --coordinator_address=127.0.0.1:12355."
    )
  if not 0 <= process_id < max(num_processes, 1):
    raise ValueError(f"process_id={process_id} must be in [0, {num_processes}).")
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
  _log_joined()


def _log_joined() -> None:
  logging.info(
      "process %d/%d joined; %d local and %d global devices",
      jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
  )
