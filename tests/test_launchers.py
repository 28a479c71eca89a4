"""launch.tpu_pod and launch.slurm: exact dry-run commands, clear errors, and the real paths
against fake `gcloud`/`sbatch` executables on PATH; plus the SLURM auto-detection in
spacetime_dit/sharding/distributed.py, run by two real JAX processes."""

import json
import os
import shlex
import socket
import subprocess
import sys
import textwrap

import pytest

from launch import slurm
from launch import tpu_pod
from spacetime_dit.sharding import distributed

# Train args that need quoting: a space, a single quote, a shell variable, a glob.
_TRAIN = ["--config=experiments/base.py:b", "--config.train.num_steps=1000", "--note=two words",
          "--tag=it's", "--path=$HOME/*"]
_POD = dict(name="dit", zone="us-east5-a", accelerator_type="v5p-64", version="v2-alpha-tpuv5",
            workdir="gs://my-bucket/runs/dit")
_POD_FLAGS = ["--name=dit", "--zone=us-east5-a", "--accelerator_type=v5p-64", "--version=v2-alpha-tpuv5",
              "--workdir=gs://my-bucket/runs/dit"]
_JOB = dict(nodes=4, gpus_per_node=8, partition="gpu", time="24:00:00", job_name="dit-b",
            workdir="/shared/runs/dit-b", repo_dir="/shared/code")
_TPU = ["gcloud", "compute", "tpus", "tpu-vm"]


def _remote_train_argv(ssh_argv):
  """The trainer argv inside an ssh --command (after the env assignment), shell-parsed."""
  command = next(a for a in ssh_argv if a.startswith("--command="))[len("--command="):]
  steps = command.split(" && ")
  train = shlex.split(steps[-1])
  assert train[0] == "SPACETIME_DIT_DISTRIBUTED=auto"
  return steps, train[1:]


def test_tpu_dry_run_prints_create_copy_run_delete():
  lines = tpu_pod.dry_run_text(_TRAIN, **_POD, project="proj", spot=True).splitlines()
  argvs = [shlex.split(line) for line in lines]
  loc = ["--zone=us-east5-a", "--project=proj"]
  assert argvs[0] == [*_TPU, "create", "dit", *loc, "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5",
                      "--spot"]
  assert argvs[1] == [*_TPU, "ssh", "dit", *loc, "--worker=all", "--command=mkdir -p spacetime_dit"]
  code = [os.path.join(tpu_pod._REPO, p) for p in ("setup.py", "spacetime_dit", "data_pipelines", "experiments",
                                                  "launch")]
  assert argvs[2] == [*_TPU, "scp", *code, "dit:spacetime_dit", *loc, "--worker=all", "--recurse"]
  assert argvs[3][:9] == [*_TPU, "ssh", "dit", *loc, "--worker=all"]
  steps, train = _remote_train_argv(argvs[3])
  assert steps[0] == "cd spacetime_dit"
  assert steps[1] == "python3 -m pip install -q -e . 'jax[tpu]>=0.10.2,<0.11'"
  assert "gcsfuse --implicit-dirs --rename-dir-limit=1000000 my-bucket /tmp/gcs/my-bucket" in steps[3]
  # Every train arg survives two rounds of shell parsing (local, then the worker's) unchanged.
  assert train == ["python3", "-m", "spacetime_dit.train", *_TRAIN, "--workdir=/tmp/gcs/my-bucket/runs/dit"]
  assert argvs[4] == [*_TPU, "delete", "dit", *loc, "--quiet"]
  assert len(argvs) == 5


def test_tpu_actions_and_options_select_commands():
  only_create = tpu_pod.dry_run_text([], **_POD, action="create").splitlines()
  assert len(only_create) == 1 and " create dit " in only_create[0] and "--spot" not in only_create[0]
  only_delete = tpu_pod.dry_run_text([], **_POD, action="delete").splitlines()
  assert only_delete == ["gcloud compute tpus tpu-vm delete dit --zone=us-east5-a --quiet"]
  run = tpu_pod.dry_run_text(["--config=c"], **{**_POD, "workdir": "/mnt/nfs/run"}, action="run",
                             shared_fs=True, copy_code=False, setup="none").splitlines()
  assert len(run) == 1
  assert run[0] == ('gcloud compute tpus tpu-vm ssh dit --zone=us-east5-a --worker=all --command="cd spacetime_dit'
                    ' && SPACETIME_DIT_DISTRIBUTED=auto python3 -m spacetime_dit.train --config=c'
                    ' --workdir=/mnt/nfs/run"')


@pytest.mark.parametrize("flags, message", [
    (["--accelerator_type=v5p"], "--accelerator_type='v5p' is not VERSION-SIZE"),
    (["--accelerator_type=tpu-64"], "is not VERSION-SIZE"),
    (["--workdir=runs/dit"], "each TPU worker has its own disk"),
    (["--workdir=/home/me/run"], "with --shared_fs"),
    (["--workdir=gs://"], "names no bucket"),
    (["--workdir=s3://b/run"], "only gs:// URLs and absolute paths"),
    (["--workdir="], "--workdir is required"),
    (["--name=My_TPU"], "must be a GCP resource name"),
    (["--action=start"], "--action='start' must be one of"),
    (["--setup=conda"], "--setup='conda' must be 'pip' or 'none'"),
])
def test_tpu_bad_inputs_exit_2_with_an_error_line(capsys, flags, message):
  assert tpu_pod.main([*_POD_FLAGS, *flags, "--dry_run", "--", "--config=c"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_tpu_workdir_as_a_trainer_flag_is_refused(capsys):
  assert tpu_pod.main([*_POD_FLAGS, "--dry_run", "--", "--workdir=/tmp/x"]) == 2
  assert "launcher's --workdir" in capsys.readouterr().err


def _fake(tmp_path, name, fail_when=""):
  """An executable `name` on a fresh PATH dir that appends its argv (JSON) to name.log and
  exits 3 when `fail_when` is in its arguments."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  log = tmp_path / f"{name}.log"
  exe = bin_dir / name
  exe.write_text(textwrap.dedent(f"""\
      #!{sys.executable}
      import json, sys
      with open({str(log)!r}, "a") as f:
        f.write(json.dumps(sys.argv[1:]) + "\\n")
      sys.exit(3 if {fail_when!r} and {fail_when!r} in " ".join(sys.argv[1:]) else 0)
      """))
  exe.chmod(0o755)
  env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
  return env, log


def _calls(log):
  return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_tpu_real_run_calls_gcloud_in_order_and_deletes_after_a_failed_run(tmp_path):
  env, log = _fake(tmp_path, "gcloud", fail_when="spacetime_dit.train")
  cmd = [sys.executable, "-m", "launch.tpu_pod", *_POD_FLAGS, "--", *_TRAIN]
  proc = subprocess.run(cmd, env=env, cwd=tpu_pod._REPO, capture_output=True, text=True, check=False)
  assert proc.returncode == 3, proc.stderr  # The training command's status.
  expected = tpu_pod.commands(_TRAIN, tpu_pod.PodOptions(**_POD))
  assert [["gcloud", *c] for c in _calls(log)] == expected  # Delete ran after the failure.
  # `run` alone stops at the failure and deletes nothing.
  log.unlink()
  proc = subprocess.run([*cmd[:-len(_TRAIN) - 1], "--action=run", "--", *_TRAIN], env=env, cwd=tpu_pod._REPO,
                        capture_output=True, text=True, check=False)
  assert proc.returncode == 3 and [c[3] for c in _calls(log)] == ["ssh", "scp", "ssh"]
  # A failed create (e.g. the name is taken by another slice) deletes nothing.
  (tmp_path / "taken").mkdir()
  env, log = _fake(tmp_path / "taken", "gcloud", fail_when=" create ")
  proc = subprocess.run(cmd, env=env, cwd=tpu_pod._REPO, capture_output=True, text=True, check=False)
  assert proc.returncode == 3 and [c[3] for c in _calls(log)] == ["create"]


def test_dry_runs_execute_nothing(tmp_path):
  env, gcloud_log = _fake(tmp_path, "gcloud")
  env, sbatch_log = _fake(tmp_path, "sbatch")
  pod = subprocess.run([sys.executable, "-m", "launch.tpu_pod", *_POD_FLAGS, "--dry_run", "--", *_TRAIN],
                       env=env, cwd=tpu_pod._REPO, capture_output=True, text=True, check=True)
  job = subprocess.run([sys.executable, "-m", "launch.slurm", "--nodes=2", "--gpus_per_node=4", "--partition=p",
                        "--time=01:00:00", "--job_name=j", f"--workdir={tmp_path / 'run'}", "--dry_run", "--",
                        *_TRAIN], env=env, cwd=tpu_pod._REPO, capture_output=True, text=True, check=True)
  assert pod.stdout == tpu_pod.dry_run_text(_TRAIN, **_POD)
  assert "sbatch " in job.stdout
  assert not gcloud_log.exists() and not sbatch_log.exists() and not (tmp_path / "run").exists()


def test_slurm_script_has_the_allocation_and_one_task_per_node():
  text = slurm.script(_TRAIN, slurm.SlurmOptions(**_JOB, account="acct", sbatch_options=("--qos=high",)))
  lines = text.splitlines()
  assert lines[0] == "#!/bin/bash"
  assert [l for l in lines if l.startswith("#SBATCH")] == [
      "#SBATCH --job-name=dit-b", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --partition=gpu",
      "#SBATCH --time=24:00:00", "#SBATCH --output=/shared/runs/dit-b/slurm/%x-%j.out",
      "#SBATCH --gpus-per-node=8", "#SBATCH --account=acct", "#SBATCH --signal=TERM@120", "#SBATCH --qos=high",
  ]
  assert "cd /shared/code" in lines
  assert "export SPACETIME_DIT_DISTRIBUTED=auto" in lines
  assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in lines
  srun = shlex.split(lines[-1])
  assert srun == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "python", "-m", "spacetime_dit.train",
                  *_TRAIN, "--workdir=/shared/runs/dit-b"]
  cpu = slurm.script([], slurm.SlurmOptions(**{**_JOB, "gpus_per_node": 0}, signal_before_s=0))
  assert "gpus-per-node" not in cpu and "JAX_LOCAL_DEVICE_IDS" not in cpu and "--signal" not in cpu
  # srun does not inherit sbatch's --cpus-per-task, so the step asks again.
  cpus = slurm.script([], slurm.SlurmOptions(**_JOB, cpus_per_task=32)).splitlines()
  assert "#SBATCH --cpus-per-task=32" in cpus and "--cpus-per-task=32" in shlex.split(cpus[-1])


def test_slurm_dry_run_snippet_writes_the_script_and_submits_it(tmp_path):
  """The printed snippet, run by bash (with a fake sbatch), does exactly what the launcher does."""
  workdir = str(tmp_path / "run dir")  # A space, to check the quoting of paths.
  opts = {**_JOB, "workdir": workdir}
  snippet = slurm.dry_run_text(_TRAIN, **opts)
  env, log = _fake(tmp_path, "sbatch")
  subprocess.run(["bash", "-c", snippet], env=env, check=True)
  path = os.path.join(workdir, "slurm", "dit-b.sbatch")
  with open(path, encoding="utf-8") as f:
    assert f.read() == slurm.script(_TRAIN, slurm.SlurmOptions(**opts))
  assert _calls(log) == [[path]]


def test_slurm_real_submit_writes_the_script_and_returns_sbatch_status(tmp_path, monkeypatch):
  env, log = _fake(tmp_path, "sbatch", fail_when="sbatch")
  monkeypatch.setenv("PATH", env["PATH"])
  workdir = str(tmp_path / "run")
  flags = ["--nodes=2", "--gpus_per_node=4", "--partition=p", "--time=1-00:00:00", "--job_name=j",
           f"--workdir={workdir}", "--", "--config=c"]
  assert slurm.main(flags) == 3  # sbatch's status (the fake fails: the path contains "sbatch").
  path = os.path.join(workdir, "slurm", "j.sbatch")
  assert _calls(log) == [[path]] and "#SBATCH --nodes=2" in open(path, encoding="utf-8").read()


@pytest.mark.parametrize("flags, message", [
    (["--nodes=0"], "--nodes=0 must be >= 1"),
    (["--gpus_per_node=-1"], "--gpus_per_node=-1 must be >= 0"),
    (["--time=24:00"], "--time='24:00' must be HH:MM:SS"),
    (["--workdir=runs/x"], "must be an absolute path on a shared file system"),
    (["--workdir=gs://b/run"], "no gs:// or s3:// URLs"),
    (["--workdir="], "--workdir is required"),
    (["--job_name=my job"], "--job_name='my job' must be"),
    (["--sbatch_option=qos=high"], "must be one sbatch long option"),
])
def test_slurm_bad_inputs_exit_2_with_an_error_line(capsys, flags, message):
  base = {"--nodes": "2", "--gpus_per_node": "4", "--partition": "p", "--time": "01:00:00", "--job_name": "j",
          "--workdir": "/shared/run"}
  for flag in flags:
    base.pop(flag.split("=")[0], None)
  argv = [f"{k}={v}" for k, v in base.items()] + flags + ["--dry_run", "--", "--config=c"]
  assert slurm.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_auto_detection_is_requested_by_env_or_a_multi_task_srun_step():
  assert not distributed.auto_requested({})
  assert distributed.auto_requested({"SPACETIME_DIT_DISTRIBUTED": "auto"})
  assert distributed.auto_requested({"SLURM_STEP_NUM_TASKS": "4"})
  assert not distributed.auto_requested({"SLURM_STEP_NUM_TASKS": "1", "SLURM_JOB_ID": "7"})  # sbatch's shell.
  assert not distributed.auto_requested({"SLURM_STEP_NUM_TASKS": "4", "SPACETIME_DIT_DISTRIBUTED": "off"})
  with pytest.raises(ValueError, match="SPACETIME_DIT_DISTRIBUTED='yes' must be 'auto', 'off' or unset"):
    distributed.auto_requested({"SPACETIME_DIT_DISTRIBUTED": "yes"})


def test_two_processes_join_one_job_from_slurm_variables_alone(tmp_path):
  """What srun gives two tasks on one node; our initialize() with no flags forms one JAX job."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  code = ("from spacetime_dit.sharding import distributed; distributed.initialize(); import jax;"
          " print(jax.process_index(), jax.process_count(), jax.device_count())")
  procs = []
  for i in range(2):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
           "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i),
           "JAX_COORDINATOR_PORT": str(port), "JAX_LOCAL_DEVICE_IDS": "0,1"}
    env.pop("SPACETIME_DIT_DISTRIBUTED", None)
    procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=180)
    assert p.returncode == 0, err[-2000:]
    outs.append(out.split())
  assert outs == [["0", "2", "4"], ["1", "2", "4"]]


def _doc_block_after(text, marker):
  """The second ``` block after `marker` (the first is the command, the second its output)."""
  rest = text[text.index(marker):]
  blocks = rest.split("```")
  return blocks[3].lstrip("\n")


def test_docs_show_the_launchers_real_dry_run_output():
  with open(os.path.join(tpu_pod._REPO, "docs", "multihost.md"), encoding="utf-8") as f:
    doc = f.read()
  train = ["--config=experiments/base.py:b", "--config.mesh.fsdp=8"]
  pod = tpu_pod.dry_run_text(train, name="dit-b", zone="us-east5-a", accelerator_type="v5p-64",
                             version="v2-alpha-tpuv5", spot=True, python="python3.11",
                             workdir="gs://my-bucket/runs/dit-b")
  assert _doc_block_after(doc, "### TPU pod") == pod.replace(tpu_pod._REPO, "/path/to/checkout")
  job = slurm.dry_run_text(train, nodes=4, gpus_per_node=8, partition="gpu", time="24:00:00", job_name="dit-b",
                           workdir="/shared/runs/dit-b", repo_dir="/shared/spacetime_dit",
                           setup="source /shared/venv/bin/activate")
  assert _doc_block_after(doc, "### SLURM") == job
