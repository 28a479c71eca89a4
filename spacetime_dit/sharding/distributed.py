"""Multi-process start-up: the one place that calls `jax.distributed.initialize`.

Launchers (`launch/`) pass the coordinator address, process count and id as flags or the
standard JAX environment variables; on TPU pods and SLURM JAX finds them itself.
"""

import logging

import jax


def initialize(coordinator_address: str = "", num_processes: int = 1, process_id: int = 0) -> None:
  """Joins this process to the job when there is more than one process.

  With `num_processes == 1` and no coordinator it does nothing, so single-process runs
  never touch the distributed runtime.
  """
  if num_processes <= 1 and not coordinator_address:
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
  logging.info(
      "process %d/%d joined; %d local and %d global devices",
      jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
  )
