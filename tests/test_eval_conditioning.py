"""Conditioning fidelity: closed-form metrics, the driver's bookkeeping, and a real tiny run."""

import json
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from data_pipelines import shapesworld
from spacetime_dit import config_types
from spacetime_dit.eval import conditioning

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# Pure metrics, closed form.


def test_frame_psnr_closed_form_and_cap():
  reference = np.zeros((8, 8, 3), np.uint8)
  frame = np.full((8, 8, 3), 10, np.uint8)
  assert conditioning.frame_psnr(reference, frame) == pytest.approx(10 * math.log10(255**2 / 100))
  assert conditioning.frame_psnr(reference, reference) == conditioning.PSNR_CAP_DB
  assert conditioning.frame_psnr(reference, reference, max_db=50.0) == 50.0
  with pytest.raises(ValueError, match=r"single frames .*video\[t\]"):
    conditioning.frame_psnr(reference[None], frame[None])


def test_histogram_distance_is_total_variation_of_colour_histograms():
  black = np.zeros((2, 4, 4, 3), np.uint8)
  white = np.full((2, 4, 4, 3), 255, np.uint8)
  half = np.concatenate([black[:1], white[:1]])  # One black and one white frame.
  hist = conditioning.colour_histogram(half, bins=4)
  assert hist.shape == (64,) and hist.sum() == pytest.approx(1.0)
  assert hist[0] == pytest.approx(0.5) and hist[63] == pytest.approx(0.5)
  assert conditioning.histogram_distance(black, black) == 0.0
  assert conditioning.histogram_distance(black, white) == pytest.approx(1.0)
  assert conditioning.histogram_distance(half, black) == pytest.approx(0.5)
  # Any sizes: a 1-frame 2x2 black image against the clips.
  assert conditioning.histogram_distance(black[:1, :2, :2], half) == pytest.approx(0.5)
  # Values in the same bin do not count: 0 and 31 share bin 0 of 8.
  assert conditioning.histogram_distance(black, np.full_like(black, 31), bins=8) == 0.0
  with pytest.raises(ValueError, match=r"uint8 \(T, H, W, 3\)"):
    conditioning.colour_histogram(black.astype(np.float32))


def test_persistence_of_a_ground_truth_clip_and_of_an_empty_one():
  world = shapesworld.ShapesWorldConfig(sizes=((32, 32),), lengths=(9,), max_objects=1)
  example = shapesworld.ShapesWorld(world).example(0)
  assert conditioning.persistence(example.video, example.caption) == 1.0
  empty = np.full_like(example.video, 20)
  assert conditioning.persistence(empty, example.caption) == 0.0


def test_summarize_uses_the_sample_std():
  assert conditioning.summarize([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "median": 2.0, "n": 2}
  assert conditioning.summarize([5.0])["std"] == 0.0
  assert conditioning.summarize([])["mean"] is None


@pytest.mark.parametrize("frames, tf, given", [(9, 2, 5), (5, 2, 3), (3, 2, 1), (17, 4, 9), (13, 2, 7)])
def test_default_given_frames_are_whole_latent_frames_and_leave_some_to_generate(frames, tf, given):
  assert conditioning.default_given_frames(frames, tf) == given
  conditioning.check_given_frames(given, frames, tf)


def test_bad_given_frames_are_clear_errors():
  with pytest.raises(ValueError, match=r"given_frames=4 with frames=9: .*1 \+ 2\*m .*e.g. 5"):
    conditioning.check_given_frames(4, 9, 2)
  with pytest.raises(ValueError, match=r"given_frames=9"):
    conditioning.check_given_frames(9, 9, 2)
  with pytest.raises(ValueError, match=r"frames=2"):
    conditioning.ConditioningEvalConfig(frames=2)


# ---------------------------------------------------------------------------------------------
# The driver's bookkeeping, with a stub generator (NOT a model): it returns the condition
# repeated, so every figure has a closed form. The real Generator is exercised below.


class RepeatLastGenerator:
  """Stands in for inference.Generator: i2v repeats the image, extend repeats the last frame."""

  autoencoder = types.SimpleNamespace(config=types.SimpleNamespace(temporal_factor=2))

  def __init__(self):
    self.calls = []

  def generate(self, prompts, *, frames, height, width, mode="t2v", cond=None, seeds=None, **kwargs):
    self.calls.append({"mode": mode, "cond": cond, "seeds": seeds, "kwargs": kwargs})
    if mode == "i2v":
      clip = np.repeat(cond[None], frames, axis=0)
    elif mode == "extend":
      clip = np.concatenate([cond, np.repeat(cond[-1:], frames - len(cond), axis=0)])
    else:
      clip = np.zeros((frames, height, width, 3), np.uint8)
    return clip[None]


def _world(cfg):
  data = config_types.DataConfig(max_objects=1)
  return conditioning.world_config(data, frames=cfg.frames, height=cfg.height, width=cfg.width, seed=cfg.seed)


def test_driver_bookkeeping_with_a_repeat_last_stub(tmp_path):
  cfg = conditioning.ConditioningEvalConfig(num_clips=2, frames=9, height=32, width=32, steps=1, seed=3)
  generator = RepeatLastGenerator()
  report = conditioning.evaluate_conditioning(generator, _world(cfg), cfg, videos_dir=str(tmp_path))
  truth = conditioning.ground_truth_clips(_world(cfg), 3)
  given = 5
  assert report["settings"]["given_frames"] == given and report["settings"]["temporal_factor"] == 2
  # Per clip: i2v, extend, then 4 chained extends; every call its own seed.
  assert [c["mode"] for c in generator.calls] == ["i2v", "extend"] + ["extend"] * 4 + ["i2v", "extend"] + ["extend"] * 4
  assert len({c["seeds"][0] for c in generator.calls}) == 12
  np.testing.assert_array_equal(generator.calls[0]["cond"], truth[0].video[0])
  np.testing.assert_array_equal(generator.calls[1]["cond"], truth[0].video[:given])
  np.testing.assert_array_equal(generator.calls[2]["cond"], truth[0].video[-given:])
  np.testing.assert_array_equal(generator.calls[3]["cond"], np.repeat(truth[0].video[-1:], given, 0))
  assert generator.calls[0]["kwargs"]["steps"] == 1
  # The stub repeats the last given frame: continuity equals the baseline exactly.
  for row, example in zip(report["clips"], truth):
    assert row["i2v_first_frame_psnr"] == conditioning.PSNR_CAP_DB
    assert row["extend_first_generated_psnr"] == row["extend_repeat_last_psnr"]
    assert row["extend_repeat_last_psnr"] == conditioning.frame_psnr(example.video[given], example.video[given - 1])
    held = np.repeat(example.video[-1:], 9 - given, 0)
    for segment in row["drift"]:
      assert segment["histogram_distance"] == pytest.approx(conditioning.histogram_distance(held, example.video))
      assert segment["persistence"] == 1.0
  assert report["clips"][0]["reference_histogram_distance"] == pytest.approx(
      conditioning.histogram_distance(truth[1].video, truth[0].video))
  mean = report["extend"]["first_generated_psnr"]["mean"]
  assert mean == pytest.approx(np.mean([r["extend_first_generated_psnr"] for r in report["clips"]]))
  assert [s["segment"] for s in report["drift"]["segments"]] == [1, 2, 3, 4]
  assert report["drift"]["segments"][0]["persistence"]["n"] == 2
  json.dumps(report)  # JSON-ready.
  assert sorted(os.listdir(tmp_path)) == sorted(
      f"{task}_{i:03d}.mp4" for task in ("ground_truth", "i2v", "extend", "drift") for i in range(2))


def test_mode_examples_cover_every_sampling_mode_and_record_their_arguments(tmp_path):
  cfg = conditioning.ConditioningEvalConfig(num_clips=1, steps=1)
  generator = RepeatLastGenerator()
  index = conditioning.write_mode_examples(generator, _world(cfg), cfg, str(tmp_path))
  modes = {c["mode"] for c in generator.calls}
  assert modes == {"t2v", "i2v", "extend", "extend_backward", "interpolate", "loop", "edit"}
  assert any(c["kwargs"].get("draft_scale") for c in generator.calls)
  with open(tmp_path / "index.json", encoding="utf-8") as f:
    assert json.load(f) == index
  for entry in index:
    assert os.path.getsize(tmp_path / entry["file"]) > 0


def test_world_config_must_match_the_sampled_size():
  cfg = conditioning.ConditioningEvalConfig(num_clips=1)
  other = conditioning.ConditioningEvalConfig(num_clips=1, height=24, width=40)
  with pytest.raises(ValueError, match=r"24x40.*world_config"):
    conditioning.evaluate_conditioning(RepeatLastGenerator(), _world(cfg), other)


# ---------------------------------------------------------------------------------------------
# The real Generator on a tiny trained checkpoint (training it takes about a minute on 2 cores).


@pytest.fixture(scope="module")
def tiny_run(tiny_conditioned_run):
  return tiny_conditioned_run  # conftest.py: trained once per session, shared.


@pytest.mark.slow
def test_real_generator_gives_finite_figures(tiny_run):
  from spacetime_dit import inference

  generator = inference.Generator.from_workdir(tiny_run)
  cfg = conditioning.ConditioningEvalConfig(num_clips=1, steps=1, guidance=1.0, num_extensions=2)
  report = conditioning.evaluate_conditioning(generator, _world(cfg), cfg)
  row = report["clips"][0]
  for key in ("i2v_first_frame_psnr", "extend_first_generated_psnr", "extend_repeat_last_psnr"):
    assert 0.0 < row[key] <= conditioning.PSNR_CAP_DB, key
  assert len(row["drift"]) == 2
  for segment in row["drift"]:
    assert 0.0 <= segment["histogram_distance"] <= 1.0 and 0.0 <= segment["persistence"] <= 1.0


@pytest.mark.slow
def test_evaluate_command_adds_the_conditioning_section_and_mode_videos(tiny_run, tmp_path):
  out, videos = str(tmp_path / "report.json"), str(tmp_path / "videos")
  result = subprocess.run(
      [sys.executable, "-m", "spacetime_dit.evaluate", f"--workdir={tiny_run}", f"--out={out}",
       "--num_prompts=0", "--steps=1", "--conditioning", "--conditioning_clips=1",
       "--num_extensions=1", f"--videos_dir={videos}"],
      cwd=REPO, capture_output=True, text=True, timeout=900,
  )
  assert result.returncode == 0, result.stderr[-4000:]
  with open(out, encoding="utf-8") as f:
    report = json.load(f)
  section = report["conditioning"]
  assert section["settings"]["num_clips"] == 1 and section["settings"]["frames"] == 9
  assert section["i2v"]["first_frame_psnr"]["n"] == 1
  files = set(os.listdir(videos))
  assert {"i2v_000.mp4", "extend_000.mp4", "drift_000.mp4", "index.json", "mode_loop.mp4",
          "mode_draft_refine.mp4"} <= files
