"""Throughput of the bucketed Grain loader against what the train step consumes.

  python -m benchmarks.data_loader --out=runs/bench/data_loader.json     # a fresh clone: no run needed
  python -m benchmarks.data_loader --metrics=W/autoencoder/metrics.jsonl,W/metrics.jsonl
  python -m benchmarks.data_loader --workdirs=runs/qs2/autoencoder,runs/qs2 --data_wait
  python -m benchmarks.data_loader --data=PREPARED_DIR --token_budget=N

Stages (`--stages`, default both): the autoencoder and the DiT. Each stage's data is rebuilt
exactly as its trainer builds it: the source (ShapesWorld, or `--data=DIR`), the index sample,
the shape buckets with the stage's tokens per clip (pixels for the autoencoder, latent patches
for the DiT, `training.data.dit_tokens_per_clip`) and its tokenizer. The config comes from,
first match wins:
  1. `--workdirs=W,...`: the run's W/config.json (a finished or running `spacetime_dit.train`);
  2. `--metrics=W/metrics.jsonl`: the W/config.json beside it (`--metrics=dit=PATH` names the
     stage of a file that has none beside it; its config is then the experiment's);
  3. the experiment files at `--variant` (default `cpu`): experiments/autoencoder.py and
     experiments/base.py. Nothing needs to exist on disk.

Trainer side (the clips/s the train step eats):
- from a metrics.jsonl (`--metrics`, or W/metrics.jsonl of a `--workdirs` run): the median
  steps/s of the rows after the first (which holds compilation) x the expected clips per step
  (sum over buckets of weight x batch size); tokens/s and data_wait_fraction as logged;
- otherwise measured here: the stage's jitted train step (random init parameters, the config's
  mesh and optimizer) on one batch of the LARGEST bucket (most tokens per clip), timed for
  `--steps` steps after `--step_warmup` (compilation); the autoencoder on a real clip batch,
  the DiT on random latents of that bucket's latent shape (what a latent cache feeds it). Every
  bucket holds about the token budget, but attention costs more per token in long clips, so the
  largest bucket's step is the slowest: the trainer rate is a lower bound, the headroom an
  upper bound. `--notime_step` skips it and prints the loader-only table.

Loader side: `make_bucketed_iterator` with 1, 2, 4 reader threads and with 1, 2 worker
processes (`--threads`, `--workers`), each timed for `--seconds` after `--warmup_batches`
(startup, worker spawn included, is reported separately): clips/s, tokens/s and the headroom =
loader clips/s / trainer clips/s (> 1: the loader keeps up; in training it shares the host's
cores with the step, so a timed step and the loader here do not overlap). The load average
before each timing is recorded: on a shared host other work halves the rates.
"""

import dataclasses
import functools
import json
import math
import os
import statistics
import time
from typing import Any

from absl import flags
import flax.linen as nn
import jax
import ml_collections
import numpy as np

from data_pipelines import buckets as buckets_lib
from data_pipelines import loader
from experiments import autoencoder as autoencoder_experiment
from experiments import base as dit_experiment
from benchmarks import reporting
from spacetime_dit import cli
from spacetime_dit import config_types
from spacetime_dit.models import autoencoder as autoencoder_lib
from spacetime_dit.sharding import mesh as mesh_lib
from spacetime_dit.training import builders
from spacetime_dit.training import data as data_lib
from spacetime_dit.training import state as state_lib
from spacetime_dit.training import steps

STAGES = ("autoencoder", "dit")

_STAGES = flags.DEFINE_list("stages", list(STAGES), "Stages to benchmark: autoencoder, dit.")
_VARIANT = flags.DEFINE_string(
    "variant", "cpu", "Experiment variant for a stage with no run config (see the module doc).")
_WORKDIRS = flags.DEFINE_list(
    "workdirs", [], "Training workdirs (W/config.json, and W/metrics.jsonl if present).")
_METRICS = flags.DEFINE_multi_string(
    "metrics", [], "metrics.jsonl of a training run for the trainer rate: W/metrics.jsonl (stage "
    "and config from W/config.json) or STAGE=PATH. Repeat the flag or give a comma list.")
_DATA = flags.DEFINE_string(
    "data", "",
    "Read this prepared directory (data_pipelines.prepare) instead of the run's source.")
_THREADS = flags.DEFINE_list("threads", ["1", "2", "4"], "Reader thread counts (no workers).")
_WORKERS = flags.DEFINE_list("workers", ["1", "2"], "Worker process counts (mp_prefetch).")
_WORKER_THREADS = flags.DEFINE_integer("worker_threads", 1, "Reader threads inside each worker.")
_SECONDS = flags.DEFINE_float("seconds", 5.0, "Timed seconds per loader setting.")
_WARMUP = flags.DEFINE_integer("warmup_batches", 4, "Untimed batches first (and worker spawn).")
_TIME_STEP = flags.DEFINE_bool(
    "time_step", True, "Time the jitted train step for a stage without a metrics.jsonl.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed train steps (after the warm-up steps).")
_STEP_WARMUP = flags.DEFINE_integer("step_warmup", 2, "Untimed train steps (compilation).")
_TOKEN_BUDGET = flags.DEFINE_integer(
    "token_budget", 0, "Override the run's data.token_budget (0: keep), e.g. for --data at 256 px.")
_MAX_BUCKETS = flags.DEFINE_integer(
    "max_buckets", -1, "Override the run's data.max_buckets (-1: keep; 0: one per shape).")
_BATCH_MULTIPLE = flags.DEFINE_integer(
    "batch_multiple", 0, "compute_buckets' batch_multiple: the run's data-parallel shards (0: "
    "those of the stage's mesh on this host's devices, as the trainer computes them).")
_DATA_WAIT = flags.DEFINE_bool(
    "data_wait", False,
    "Only report the trainer side (steps/s, data_wait_fraction); no loader runs.")
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage's data, rebuilt as its trainer builds it, and where its trainer rate comes from."""

  name: str  # "autoencoder" or "dit".
  origin: str  # Where the config came from: a workdir or "experiments/...:variant".
  config: ml_collections.ConfigDict  # The stage's whole config (model, optimizer, mesh).
  data: config_types.DataConfig  # With the command-line overrides applied.
  ae_config: ml_collections.ConfigDict  # The autoencoder's (an autoencoder stage's own).
  tokens_per_clip: Any  # Native (T, H, W) -> tokens.
  tokenize: Any  # Captions -> (ids (B, S), mask (B, S)).
  metrics: str | None  # A metrics.jsonl to read the trainer rate from, else None (time the step).


def _experiment(stage: str, variant: str) -> ml_collections.ConfigDict:
  module = autoencoder_experiment if stage == "autoencoder" else dit_experiment
  return module.get_config(variant)


def _autoencoder_of(
    config: ml_collections.ConfigDict, workdir: str | None
) -> ml_collections.ConfigDict:
  """A DiT config's autoencoder config: its run's config.json if there is one, else the
  experiment `train` would train for it (config.autoencoder.variant)."""
  if workdir is not None:
    ae_dir = builders.autoencoder_workdir(config, workdir)
    if os.path.exists(os.path.join(ae_dir, builders.CONFIG_FILE)):
      return builders.load_config(ae_dir)
  return autoencoder_experiment.get_config(config.autoencoder.variant)


def _make_stage(config: ml_collections.ConfigDict, origin: str, workdir: str | None,
                metrics: str | None) -> Stage:
  section = config.data.to_dict()
  if _DATA.value:
    section["source"] = _DATA.value
  if _TOKEN_BUDGET.value:
    section["token_budget"] = _TOKEN_BUDGET.value
  if _MAX_BUCKETS.value >= 0:
    section["max_buckets"] = _MAX_BUCKETS.value
  data = config_types.dataclass_from_config(config_types.DataConfig, section, path="config.data")
  if config.stage == "autoencoder":
    return Stage("autoencoder", origin, config, data, config, math.prod, data_lib.no_text, metrics)
  ae_config = _autoencoder_of(config, workdir)
  ae_cfg = builders.autoencoder_config(ae_config)
  _, _, tokenizer = builders.build_dit(config, ae_cfg.latent_channels)
  tokens_per_clip = data_lib.dit_tokens_per_clip(ae_cfg, tuple(config.model.patch_size))
  return Stage("dit", origin, config, data, ae_config, tokens_per_clip, tokenizer, metrics)


def _metrics_entries() -> list[tuple[str | None, str]]:
  """(stage or None, path) per --metrics entry (repeated flags and comma lists)."""
  entries = []
  for value in _METRICS.value:
    for item in filter(None, (v.strip() for v in value.split(","))):
      stage, sep, path = item.partition("=")
      if not sep:
        entries.append((None, item))
      elif stage in STAGES:
        entries.append((stage, path))
      else:
        raise ValueError(f"--metrics={item!r}: the stage before '=' must be one of {STAGES}.")
  return entries


def stages() -> list[Stage]:
  """The stages to benchmark, in --stages order (see the module doc for the config rules)."""
  for name in _STAGES.value:
    if name not in STAGES:
      raise ValueError(f"--stages: unknown stage {name!r}; use {','.join(STAGES)}.")
  found: dict[str, tuple] = {}  # stage -> (config, origin, workdir, metrics)
  for workdir in _WORKDIRS.value:
    config = builders.load_config(workdir)
    path = os.path.join(workdir, "metrics.jsonl")
    found[config.stage] = (config, workdir, workdir, path if os.path.exists(path) else None)
  for stage, path in _metrics_entries():
    if not os.path.exists(path):
      raise FileNotFoundError(f"--metrics: {path} does not exist; pass a run's W/metrics.jsonl.")
    if stage is None:
      workdir = os.path.dirname(os.path.abspath(path))
      if not os.path.exists(os.path.join(workdir, builders.CONFIG_FILE)):
        raise FileNotFoundError(
            f"--metrics={path}: no config.json beside it to tell its stage and data; name them: "
            "--metrics=autoencoder=PATH or --metrics=dit=PATH (the data is then the "
            "--variant experiment's).")
      config = builders.load_config(workdir)
      found[config.stage] = (config, workdir, workdir, path)
    elif stage in found:
      found[stage] = (*found[stage][:3], path)
    else:
      config = _experiment(stage, _VARIANT.value)
      found[stage] = (config, f"experiments {stage}:{_VARIANT.value}", None, path)
  result = []
  for name in _STAGES.value:
    if name not in found:
      found[name] = (_experiment(name, _VARIANT.value), f"experiments {name}:{_VARIANT.value}",
                     None, None)
    result.append(_make_stage(*found[name]))
  return result


def trainer_rates_from_metrics(path: str, clips_per_step: float) -> dict:
  """Steps/s, clips/s, tokens/s and data_wait_fraction of a run from its metrics.jsonl."""
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  rows = [r for r in rows if "steps_per_sec" in r]
  if len(rows) < 2:
    raise ValueError(
        f"{path} has {len(rows)} rows with steps_per_sec; at least 2 are needed (the first "
        "holds compilation). Train longer or drop --metrics to time the step here.")
  rows = rows[1:]
  steps_per_sec = statistics.median(r["steps_per_sec"] for r in rows)
  return {
      "source": f"metrics {path}",
      "rows": len(rows),
      "steps_per_sec": steps_per_sec,
      "clips_per_step": clips_per_step,
      "clips_per_sec": steps_per_sec * clips_per_step,
      "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in rows),
      "data_wait_fraction": statistics.fmean(r.get("data_wait_fraction", 0.0) for r in rows),
  }


def _step_setup(stage: Stage, batch_shape: tuple[int, int, int], batch: dict):
  """(step function, init_params, tx, device batch fields, frozen) of the stage's train step."""
  config = stage.config
  if stage.name == "autoencoder":
    model, discriminator, init_params, tx, schedule, loss = (
        builders.build_autoencoder_training(config))
    step = functools.partial(steps.autoencoder_step, model=model, discriminator=discriminator,
                             tx=tx, schedule=schedule, loss=loss)
    return step, init_params, tx, {"video": batch["video"]}, {}
  ae_cfg = builders.autoencoder_config(stage.ae_config)
  model, init_params, _ = builders.build_dit(config, ae_cfg.latent_channels)
  tx, schedule = builders.build_optimizer(config)
  diffusion = config_types.dataclass_from_config(
      config_types.DiffusionConfig, config.diffusion, path="config.diffusion")
  step = functools.partial(
      steps.dit_step, model=model, autoencoder=None, patch_size=model.config.patch_size,
      diffusion=diffusion, tx=tx, schedule=schedule)
  latent_shape = autoencoder_lib.latent_shape(ae_cfg, *batch_shape)
  b = len(batch["index"])
  rng = np.random.default_rng(0)
  fields = {
      "latent": rng.normal(size=(b, *latent_shape, ae_cfg.latent_channels)).astype(np.float32),
      "text_ids": batch["text_ids"], "text_mask": batch["text_mask"],
  }
  c = ae_cfg.latent_channels
  frozen = {"latent_mean": np.zeros(c, np.float32), "latent_std": np.ones(c, np.float32)}
  return step, init_params, tx, fields, frozen


def time_step(stage: Stage, source, bucket: buckets_lib.Bucket, indices, shapes) -> dict:
  """Seconds per jitted train step of the stage on one batch of `bucket`."""
  start = time.perf_counter()
  # One real batch of the bucket, exactly as the loader makes it (the bucket's own clips only).
  one = dataclasses.replace(bucket, weight=1.0)
  iterator = loader.make_bucketed_iterator(
      source, buckets=[one], seed=stage.data.seed, tokenize=stage.tokenize, indices=indices,
      shapes=shapes, num_threads=1, mix_window=1)
  batch = next(iterator)
  iterator.close()
  step, init_params, tx, fields, frozen = _step_setup(stage, bucket.shape, batch)
  mesh, rules = _mesh(stage)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    _, shardings = state_lib.state_shardings(init_params, tx, mesh, rules)
    state = state_lib.create_state(init_params, tx, mesh, rules, seed=0)
    jitted = jax.jit(  # As stages._jit_step: state sharded, batch over the batch axes.
        step, in_shardings=(shardings, None, None),
        out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=0)
    device_batch = mesh_lib.global_batch(fields, mesh, rules)
    for _ in range(_STEP_WARMUP.value):
      state, metrics = jitted(state, device_batch, frozen)
    jax.block_until_ready(metrics)
    setup_s = time.perf_counter() - start
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    for _ in range(_STEPS.value):
      state, metrics = jitted(state, device_batch, frozen)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / _STEPS.value
  return {
      "bucket": list(bucket.shape), "batch_size": len(batch["index"]),
      "tokens_per_batch": bucket.tokens_per_batch, "setup_s": setup_s,
      "seconds_per_step": seconds, "steps": _STEPS.value, "load_average_before": load_before,
      "batch_fields": {k: list(np.shape(v)) for k, v in fields.items()},
  }


def trainer_rates_from_step(stage, source, buckets, indices, shapes, clips_per_step,
                            tokens_per_step) -> dict:
  """The trainer's rates if every step took as long as one on the largest bucket."""
  largest = max(buckets, key=lambda b: (b.tokens_per_clip, b.shape))
  timing = time_step(stage, source, largest, indices, shapes)
  steps_per_sec = 1.0 / timing["seconds_per_step"]
  return {
      "source": f"timed {stage.name} step on bucket {tuple(largest.shape)}",
      "step": timing,
      "steps_per_sec": steps_per_sec,
      "clips_per_step": clips_per_step,
      "clips_per_sec": steps_per_sec * clips_per_step,
      "tokens_per_sec": steps_per_sec * tokens_per_step,
      "data_wait_fraction": None,
  }


def time_loader(source, stage: Stage, buckets, indices, shapes, *, threads: int, workers: int):
  """Clips/s and tokens/s of one loader setting, after the warm-up batches."""
  tokens = {b.shape: b.tokens_per_clip for b in buckets}
  load_before = os.getloadavg()[0]
  start = time.perf_counter()
  iterator = loader.make_bucketed_iterator(
      source, buckets=buckets, seed=stage.data.seed, tokenize=stage.tokenize, indices=indices,
      shapes=shapes, num_threads=threads, num_workers=workers,
  )
  try:
    for _ in range(_WARMUP.value):
      next(iterator)
    startup_s = time.perf_counter() - start
    batches = clips = token_count = 0
    start = time.perf_counter()
    while time.perf_counter() - start < _SECONDS.value:
      batch = next(iterator)
      b = len(batch["index"])
      batches, clips = batches + 1, clips + b
      token_count += b * tokens[tuple(batch["video"].shape[1:4])]
    elapsed = time.perf_counter() - start
  finally:
    iterator.close()
  return {
      "threads": threads, "workers": workers, "startup_s": startup_s, "seconds": elapsed,
      "batches_per_sec": batches / elapsed, "clips_per_sec": clips / elapsed,
      "tokens_per_sec": token_count / elapsed, "load_average_before": load_before,
  }


def _notes(stage: Stage, trainer: dict | None) -> list[str]:
  notes = []
  if trainer is None:
    notes.append("no trainer rate: no metrics.jsonl for this stage and --notime_step; pass "
                 "--metrics=W/metrics.jsonl or drop --notime_step for the headroom")
  elif trainer["source"].startswith("timed"):
    notes.append("trainer rate from the largest bucket's step (random init weights): a lower "
                 "bound, since shorter clips' buckets step faster; headroom is an upper bound")
  if (_DATA.value or _TOKEN_BUDGET.value) and trainer and trainer["source"].startswith("metrics"):
    notes.append("--data/--token_budget change the clips and batches, but the trainer's steps/s "
                 "is the run's own: the headroom holds only if the step runs as fast on these")
  if stage.name == "dit":
    if stage.data.latent_cache_clips or stage.data.latent_dir:
      notes.append("this stage trains on cached latents (read from memory or latent shards); "
                   "the video loader timed here is what it needs without a cache")
    elif trainer and trainer["source"].startswith("timed"):
      notes.append("this stage encodes video in its step (no latent cache), which the timed "
                   "step on latents leaves out: the real step is slower")
    if stage.data.packing:
      notes.append("this stage packs latents (data.packing); the bucketed loader is timed")
  return notes


def _mesh(stage: Stage):
  mesh_cfg = config_types.dataclass_from_config(
      config_types.MeshConfig, stage.config.mesh, path="config.mesh")
  return mesh_lib.make_mesh(mesh_cfg), mesh_cfg.rules


def run_stage(stage: Stage) -> dict:
  source = data_lib.make_source(stage.data)
  indices, shapes = data_lib.training_indices(stage.data, source)
  batch_multiple = _BATCH_MULTIPLE.value or mesh_lib.batch_axis_size(*_mesh(stage))
  buckets, report = buckets_lib.compute_buckets(
      shapes, tokens_per_clip=stage.tokens_per_clip, token_budget=stage.data.token_budget,
      batch_multiple=batch_multiple, max_batch_size=stage.data.max_batch_size,
      max_buckets=stage.data.max_buckets,
  )
  clips_per_step = sum(b.weight * b.batch_size for b in buckets)
  tokens_per_step = sum(b.weight * b.tokens_per_batch for b in buckets)
  if stage.metrics:
    trainer = trainer_rates_from_metrics(stage.metrics, clips_per_step)
  elif _TIME_STEP.value:
    trainer = trainer_rates_from_step(
        stage, source, buckets, indices, shapes, clips_per_step, tokens_per_step)
  else:
    trainer = None
  result = {
      "stage": stage.name, "config": stage.origin, "source": stage.data.source,
      "num_clips": len(indices), "num_buckets": len(buckets), "batch_multiple": batch_multiple,
      "bucket_report": report.to_dict(), "clips_per_step": clips_per_step,
      "tokens_per_step": tokens_per_step, "trainer": trainer, "loader": [],
      "notes": _notes(stage, trainer),
  }
  if _DATA_WAIT.value:
    return result
  settings = [(int(t), 0) for t in _THREADS.value] + [
      (_WORKER_THREADS.value, int(w)) for w in _WORKERS.value]
  for threads, workers in settings:
    timing = time_loader(source, stage, buckets, indices, shapes, threads=threads, workers=workers)
    timing["headroom"] = timing["clips_per_sec"] / trainer["clips_per_sec"] if trainer else None
    result["loader"].append(timing)
  return result


def _table(results: list[dict]) -> str:
  rows = [("stage", "who", "threads", "workers", "startup s", "steps|batches/s", "clips/s",
           "tokens/s", "headroom", "data wait", "load avg")]
  for r in results:
    t = r["trainer"]
    if t is not None:
      wait = "-" if t["data_wait_fraction"] is None else f"{t['data_wait_fraction']:.4f}"
      load = f"{t['step']['load_average_before']:.1f}" if "step" in t else "-"
      rows.append((r["stage"], "trainer", "-", "-", "-", f"{t['steps_per_sec']:.2f}",
                   f"{t['clips_per_sec']:.1f}", f"{t['tokens_per_sec']:.0f}", "1.0", wait, load))
    for x in r["loader"]:
      headroom = "-" if x["headroom"] is None else f"{x['headroom']:.1f}x"
      rows.append((r["stage"], "loader", str(x["threads"]), str(x["workers"]),
                   f"{x['startup_s']:.1f}", f"{x['batches_per_sec']:.1f}",
                   f"{x['clips_per_sec']:.0f}", f"{x['tokens_per_sec']:.0f}", headroom, "-",
                   f"{x['load_average_before']:.1f}"))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
  notes = [
      "(trainer: steps/s from a metrics.jsonl (median of the rows after the first) or from "
      "timing the jitted step here, x the expected clips per step (sum of bucket weight x "
      "batch); data wait: mean data_wait_fraction logged by the run. loader: after warm-up; "
      "headroom = loader clips/s / trainer clips/s.)"]
  for r in results:
    t = r["trainer"]
    notes.append(f"{r['stage']}: config {r['config']}, source {r['source']}, {r['num_clips']} "
                 f"clips in {r['num_buckets']} buckets, {r['clips_per_step']:.1f} clips per "
                 f"step; trainer: {t['source'] if t else 'none'}")
    notes += [f"note ({r['stage']}): {n}" for n in r["notes"]]
  return "\n".join(lines + notes)


def main(argv):
  del argv
  results = [run_stage(stage) for stage in stages()]
  print(_table(results))
  if _OUT.value:
    reporting.write_json(_OUT.value, {"cpu_count": os.cpu_count(), "devices": str(jax.devices()),
                 "results": results})


if __name__ == "__main__":
  cli.use_fast_cpu_convolutions()  # As the trainer's entry point: the same step speed.
  cli.run(main)
