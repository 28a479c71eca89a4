"""launch.sweep: declared sweeps apply to their configs, dry runs print the exact commands, a real
tiny sweep runs (one trial failing), resumes without retraining, and collects tables and plots."""

import csv
import json
import os
import sys

import pytest

from launch import sweep
from spacetime_dit.training import stages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PNG = b"\x89PNG\r\n\x1a\n"


def _get(config, dotted):
  for part in dotted.split("."):
    config = config[part]
  return config


@pytest.mark.parametrize("config_path", ["experiments/base.py:cpu", "experiments/autoencoder.py:cpu"])
def test_every_declared_trial_applies_through_the_train_flags_and_resolves(config_path):
  sweeps = sweep.sweeps_for(config_path)
  if config_path.startswith("experiments/base.py"):
    assert {"shift", "attention", "packing", "lr"} <= set(sweeps)
  for name in sweeps:
    trials = sweep.plan(config_path, name, "R", [], resolve=False)
    assert len(trials) >= 2 and len({t.name for t in trials}) == len(trials)
    for trial in trials:
      # The trainer's own flag parser, then every section's validation (what train checks first).
      config = sweep.resolve_config(config_path, trial.train_argv[5:])
      for key, value in trial.overrides.items():
        assert _get(config, key) == value, (name, key)
      stages.check_config(config)


def test_trial_names_are_readable_unique_and_safe_as_directories():
  names = sweep.trial_names([
      {"data.sizes": ((32, 32),), "optimizer.learning_rate": 1e-3},
      {"model.text.width": 8, "model.width": 16},
      {"optimizer.learning_rate": 1e-3, "data.sizes": ((32, 32),)},
      {},
      {},
  ])
  assert names == ["sizes=32_32,learning_rate=0.001", "model.text.width=8,model.width=16",
                   "learning_rate=0.001,sizes=32_32", "default", "default-2"]


def test_dry_run_prints_exactly_each_trials_commands_and_runs_nothing(tmp_path, capsys):
  root = str(tmp_path / "lr")
  code = sweep.main([
      "--config=experiments/base.py:cpu", "--sweep=lr", f"--root={root}", "--dry_run", "--evaluate",
      "--eval_args=--num_prompts=2 --split='train'", "--", "--config.train.num_steps=7",
  ])
  assert code == 0
  py = sys.executable
  expected = []
  for lr in ("0.0004", "0.0008", "0.0016"):
    w = f"{root}/learning_rate={lr}"
    expected += [
        f"{py} -m spacetime_dit.train --config=experiments/base.py:cpu --workdir={w}"
        f" --config.optimizer.learning_rate={lr} --config.train.num_steps=7",
        f"{py} -m spacetime_dit.evaluate --workdir={w} --out_dir={w}/eval --num_prompts=2 --split=train",
    ]
  assert capsys.readouterr().out.splitlines() == expected
  assert not os.path.exists(root)
  # The sweep collects <trial>/eval/report.json, so moving the report is refused.
  assert sweep.main([
      "--config=experiments/base.py:cpu", "--sweep=lr", f"--root={root}", "--dry_run", "--evaluate",
      "--eval_args=--out_dir=elsewhere"]) == 2


def test_cluster_launchers_print_one_submission_per_trial(tmp_path, capsys):
  root = str(tmp_path / "att")
  args = ["--config=experiments/base.py:cpu", "--sweep=attention", f"--root={root}", "--launcher=slurm"]
  assert sweep.main(args) == 2  # Submitting for real is the printed commands' job.
  assert "add --dry_run" in capsys.readouterr().err
  assert sweep.main(args + ["--dry_run"]) == 2
  assert "--launcher_opt=key=value" in capsys.readouterr().err
  opts = ["--launcher_opt=nodes=2", "--launcher_opt=gpus_per_node=8", "--launcher_opt=partition=gpu",
          "--launcher_opt=time=04:00:00", "--launcher_opt=job_name=att"]
  assert sweep.main(args + ["--dry_run", *opts, "--", "--config.train.num_steps=9"]) == 0
  out = capsys.readouterr().out
  for layout in ("full", "factorised"):
    assert f"# trial attention_layout={layout}\n" in out
    assert f"#SBATCH --job-name=att-attention_layout_{layout}\n" in out
    assert (f"spacetime_dit.train --config=experiments/base.py:cpu --config.model.attention_layout={layout}"
            f" --config.train.num_steps=9 --workdir={root}/attention_layout={layout}\n") in out
  assert out.count("#SBATCH --nodes=2\n") == 2 and out.count("\nsbatch ") == 2
  assert not os.path.exists(root)


def test_unknown_sweep_bad_parallel_and_mistyped_keys_are_clear_errors(capsys):
  assert sweep.main(["--config=experiments/base.py:cpu", "--sweep=lrr"]) == 2
  assert "--sweep='lrr' is not declared" in capsys.readouterr().err
  assert sweep.main(["--config=experiments/base.py:cpu", "--sweep=lr", "--parallel=0"]) == 2
  assert "--parallel=0 must be >= 1" in capsys.readouterr().err
  assert sweep.main(["--config=experiments/base.py:cpu", "--sweep=lr", "--dry_run", "--",
                     "--config.train.num_stepz=3"]) == 2
  assert 'Did you mean "num_steps"' in capsys.readouterr().err


_SWEEP_CONFIG = '''
from experiments import base


def get_config(variant="tiny"):
  return base.get_config(variant)


def sweep_pair():
  yield {"seed": 1}
  yield {"seed": 2}
  yield {"model.attention_layout": "bogus"}  # Rejected before training: the failing trial.


SWEEPS = {"pair": sweep_pair}
'''


def _metric_lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return len(f.readlines())


def test_a_tiny_sweep_runs_records_a_failure_resumes_and_collects(tmp_path, untrained_autoencoder,
                                                                  monkeypatch):
  monkeypatch.chdir(REPO)
  config_file = tmp_path / "pair_config.py"
  config_file.write_text(_SWEEP_CONFIG)
  root = str(tmp_path / "root")
  # One bucket shape, and trials in turn that differ only by seed (an input, not a constant of
  # the program): the second finds the first's train step and sampler in the XLA cache.
  argv = [
      f"--config={config_file}:tiny", "--sweep=pair", f"--root={root}", "--",
      f"--config.autoencoder.workdir={untrained_autoencoder}", "--config.train.num_steps=2",
      "--config.train.sample_every=0", "--config.data.sizes=((32, 32),)", "--config.data.lengths=(9,)",
      "--config.data.latent_cache_clips=8",
  ]
  assert sweep.main(argv) == 1  # One trial failed; the other two still ran.
  with open(os.path.join(root, "sweep.json"), encoding="utf-8") as f:
    state = json.load(f)
  trials = {t["name"]: t for t in state["trials"]}
  assert list(trials) == ["seed=1", "seed=2", "attention_layout=bogus"]
  for name in ("seed=1", "seed=2"):
    assert trials[name]["status"] == "done" and trials[name]["wall_s"] > 0
    assert _metric_lines(os.path.join(root, name)) == 2
  bad = trials["attention_layout=bogus"]
  assert bad["status"] == "failed" and bad["returncode"] == 2 and "attention_layout" in bad["error"]

  with open(os.path.join(root, "results.csv"), encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  assert [r["trial"] for r in rows] == list(trials)
  assert [r["seed"] for r in rows] == ["1", "2", ""]
  assert all(float(r["final_loss"]) > 0 and r["steps"] == "2" for r in rows[:2])
  assert rows[0]["final_loss"] != rows[1]["final_loss"]  # Each trial really got its own override.
  assert rows[2]["status"] == "failed" and rows[2]["final_loss"] == ""
  with open(os.path.join(root, "results.md"), encoding="utf-8") as f:
    assert f.readline().startswith("| trial | status | seed | attention_layout | final_loss |")
  for png in ("loss_curves.png", "final_loss_vs_seed.png", "steps_per_sec_vs_seed.png"):
    with open(os.path.join(root, png), "rb") as f:
      assert f.read(8) == _PNG, png
  # attention_layout varies only over the failed trial, which has no metrics to plot.
  assert not os.path.exists(os.path.join(root, "final_loss_vs_attention_layout.png"))

  train_log = os.path.join(root, "logs", "seed=1.train.log")
  log_size = os.path.getsize(train_log)
  # Rerun, two at a time: the finished trials are skipped, the failed one is retried.
  assert sweep.main(argv[:3] + ["--parallel=2"] + argv[3:]) == 1
  with open(os.path.join(root, "sweep.json"), encoding="utf-8") as f:
    again = {t["name"]: t for t in json.load(f)["trials"]}
  assert again["seed=1"]["skipped"] and again["seed=2"]["skipped"]
  assert again["seed=1"]["wall_s"] == trials["seed=1"]["wall_s"]
  assert os.path.getsize(train_log) == log_size and _metric_lines(os.path.join(root, "seed=1")) == 2
  assert again["attention_layout=bogus"]["status"] == "failed"


def _write_rows(workdir, losses, rates, torn=False):
  os.makedirs(workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), "w", encoding="utf-8") as f:
    for i, (loss, rate) in enumerate(zip(losses, rates)):
      f.write(json.dumps({"step": 10 * (i + 1), "loss": loss, "steps_per_sec": rate}) + "\n")
    if torn:
      f.write('{"step": 999, "lo')


def test_collect_reads_a_root_without_sweep_json_and_flattens_eval_reports(tmp_path, capsys):
  root = tmp_path / "fabricated"
  losses = [float(12 - i) for i in range(12)]  # Last ten: 10 .. 1, mean 5.5.
  _write_rows(str(root / "packing=False,learning_rate=0.001"), losses, [0.1] + [2.0] * 11, torn=True)
  _write_rows(str(root / "packing=True,learning_rate=0.002"), [4.0, 3.0], [0.2, 5.0])
  os.makedirs(root / "packing=False,learning_rate=0.001" / "eval")
  report = {"summary": {"colour": 0.75, "holdout": {"motion": 0.25}, "note": "text"},
            "val_loss": {"mean": 0.5, "cells": {"9x32x32": 0.4}}, "clips": [{"colour": 1.0}], "num_prompts": 4,
            "settings": {"num_prompts": 4}, "config": {"seed": 0}, "timings_s": {"sampling": 2.5}}
  with open(root / "packing=False,learning_rate=0.001" / "eval" / "report.json", "w", encoding="utf-8") as f:
    json.dump(report, f)
  os.makedirs(root / "packing=True,learning_rate=0.002" / "eval")
  with open(root / "packing=True,learning_rate=0.002" / "eval" / "report.json", "w", encoding="utf-8") as f:
    json.dump({"summary": {"colour": 0.5}}, f)
  (root / "notes").mkdir()  # A folder without metrics is not a trial.

  assert sweep.main(["--config=experiments/base.py:cpu", "--sweep=lr", f"--root={root}", "--collect"]) == 0
  assert "2 trials" in capsys.readouterr().out
  with open(root / "results.csv", encoding="utf-8") as f:
    first, second = list(csv.DictReader(f))
  assert first["packing"] == "False" and first["learning_rate"] == "0.001"
  assert float(first["final_loss"]) == 5.5 and first["steps"] == "120"
  assert float(first["steps_per_sec"]) == 2.0  # The first (compiling) interval is left out.
  assert float(first["colour"]) == 0.75 and float(first["holdout.motion"]) == 0.25
  assert float(first["val_loss.mean"]) == 0.5
  assert float(first["timings_s.sampling"]) == 2.5
  assert not any(k.startswith(("val_loss.cells", "settings", "config", "num_prompts")) or "clips" in k
                 or "note" in k for k in first)
  assert float(second["final_loss"]) == 3.5 and float(second["colour"]) == 0.5
  assert second["holdout.motion"] == ""  # Missing in its report: an empty cell.
  for png in ("loss_curves.png", "colour_vs_learning_rate.png", "final_loss_vs_packing.png"):
    with open(root / png, "rb") as f:
      assert f.read(8) == _PNG, png


def test_collect_of_an_empty_root_is_a_clear_error(tmp_path, capsys):
  assert sweep.main(["--config=experiments/base.py:cpu", "--sweep=lr", f"--root={tmp_path}", "--collect"]) == 2
  assert "no trials in" in capsys.readouterr().err
