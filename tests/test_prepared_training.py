"""End to end on real footage: a folder of mixed clips and bad files -> prepare -> train both
stages from the prepared directory (the diffusion stage on packed latent rows)."""

import json
import os

import pytest

from data_pipelines import demo_folder
from data_pipelines import ingest
from data_pipelines import prepare
from experiments import autoencoder as autoencoder_experiment
from experiments import base as base_experiment
from spacetime_dit.training import stages


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("demo")
  expected = demo_folder.make_demo_folder(str(root / "videos"))
  # Small clips (a 2-core CPU trains the tiny models on them in seconds): at most 48x48 pixels,
  # 9 frames at 8 fps; sizes are multiples of 16 (the tiny autoencoder's 4 x the DiT patch 2
  # divides them), lengths 1 + 4k.
  options = ingest.IngestOptions(max_pixels=48 * 48, max_frames=9)
  report = prepare.prepare(
      str(root / "videos"), str(root / "prepared"), options=options, num_workers=0, progress=False
  )
  return str(root / "prepared"), report, expected


def test_prepare_reports_every_bad_file_and_keeps_every_good_one(prepared_dir):
  directory, report, expected = prepared_dir
  skipped = {os.path.basename(s["path"]): s["reason"] for s in report["skipped"]}
  want = {os.path.basename(p): r for p, r in expected["expected_skips"].items()}
  assert skipped == want
  assert set(want.values()) >= {
      "empty_file", "truncated", "corrupt", "not_video", "unreadable", "too_small",
      "missing_caption",
  }
  assert report["accepted"] == len(expected["expected_accepted"])
  with open(os.path.join(directory, "report.json")) as f:
    assert json.load(f)["skipped_count"] == len(want)


def test_both_stages_train_from_the_prepared_directory(prepared_dir, tmp_path):
  directory, report, _ = prepared_dir
  workdir = str(tmp_path / "run")
  ae_config = autoencoder_experiment.get_config("tiny")
  ae_config.data.source = directory
  ae_config.train.num_steps = 2
  ae_config.latent_stats_clips = 4
  stages.train_autoencoder(ae_config, os.path.join(workdir, "autoencoder"))

  config = base_experiment.get_config("tiny")
  config.data.source = directory
  config.data.packing = True
  config.data.latent_cache_clips = 1000  # Every prepared clip.
  config.data.token_budget = 8 * config.data.pack_length  # One row per fake device.
  config.train.num_steps = 2
  config.train.sample_every = 0
  stages.train_dit(config, workdir)

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert rows[-1]["step"] == 2 and rows[-1]["loss"] > 0
  assert 0 < rows[-1]["token_fill"] <= 1
  with open(os.path.join(workdir, "latents", "meta.json")) as f:
    meta = json.load(f)
  assert meta["num_latents"] == report["clips"]["train"]  # Every prepared clip, none lost.
