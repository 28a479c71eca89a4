"""Trains a stage of spacetime_dit.

  python -m spacetime_dit.train --config=experiments/base.py:cpu --workdir=runs/quickstart

`experiments/base.py` trains the diffusion transformer; when its autoencoder
(`config.autoencoder.workdir`, default W/autoencoder) is not finished, the same command
first trains one there with `experiments/autoencoder.py` of the same variant. Re-running
the same command on the same workdir resumes from the newest checkpoint: after a crash or
SIGKILL from the newest complete one, after SIGTERM (preemption: the trainer saves at the next
step boundary and exits 0) from exactly where it stopped. A NaN or Inf in the loss or the
gradients stops the run (exit status 1) naming the step and the last good checkpoint, unless
--config.train.skip_nonfinite=True. Multi-process: `python -m launch.local --num_processes=2 --
<these flags>` (or --coordinator_address/--num_processes/--process_id by hand).
"""

import importlib
import logging
import sys

from absl import flags
from ml_collections import config_flags

from spacetime_dit import cli
from spacetime_dit.sharding import distributed
from spacetime_dit.training import builders
from spacetime_dit.training import loop
from spacetime_dit.training import stages

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:variant].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv  # Checked by cli.run.
  loop.install_preemption_handler()
  try:
    _train()
  except loop.NonFiniteLossError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def _train():
  cli.use_fast_cpu_convolutions()
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  # jax.distributed.initialize starts JAX's preemption service, whose C++ SIGTERM notifier
  # replaces Python's handler (signal.getsignal still reports ours). Install ours again so a
  # SIGTERM still saves at the next step boundary in multi-process runs.
  loop.install_preemption_handler()
  config, workdir = _CONFIG.value, _WORKDIR.value
  stages.check_config(config)
  if config.stage == "autoencoder":
    stages.train_autoencoder(config, workdir)
    return
  ae_dir = builders.autoencoder_workdir(config, workdir)
  if not builders.autoencoder_finished(ae_dir):
    logging.info("no finished autoencoder in %s: training one first", ae_dir)
    ae_config = importlib.import_module("experiments.autoencoder").get_config(config.autoencoder.variant)
    stages.train_autoencoder(ae_config, ae_dir)
  stages.train_dit(config, workdir)


if __name__ == "__main__":
  cli.run(main)
