"""The full benchmark: validation-loss math, the markdown report and plots, and the CLI end to end."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from matplotlib import image as mpl_image

from data_pipelines import shapesworld_captions
from experiments import base as base_experiment
from spacetime_dit import config_types
from spacetime_dit import evaluate
from spacetime_dit import inference
from spacetime_dit.diffusion import flow
from spacetime_dit.eval import report as report_lib
from spacetime_dit.eval import validation_loss
from spacetime_dit.sharding import mesh as mesh_lib
from spacetime_dit.training import builders

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# Pure math, closed form.


def test_training_weights_match_the_closed_form_and_the_training_sampler():
  edges = validation_loss.bin_edges(10)
  np.testing.assert_allclose(validation_loss.noise_levels(10), np.arange(10) / 10 + 0.05)
  uniform = validation_loss.training_weights(edges, distribution="uniform", mean=0.0, std=1.0, shift=1.0)
  np.testing.assert_allclose(uniform, np.full(10, 0.1))
  # Logit-normal (0, 1) without shift is symmetric about t = 1/2.
  plain = validation_loss.training_weights(edges, distribution="logit_normal", mean=0.0, std=1.0, shift=1.0)
  np.testing.assert_allclose(plain, plain[::-1], atol=1e-12)
  # Shift s maps u = 1/(1+s) to 1/2, so P(t <= 1/2) = Phi(logit(1/(1+s))) = Phi(-log s).
  cdf = validation_loss.training_cdf(
      np.array([0.5]), distribution="logit_normal", mean=0.0, std=1.0, shift=3.0)
  assert cdf[0] == pytest.approx(0.5 * math.erfc(math.log(3.0) / math.sqrt(2)), rel=1e-9)
  # The same masses as the sampler the train step draws from.
  shifted = validation_loss.training_weights(edges, distribution="logit_normal", mean=0.3, std=0.8, shift=2.0)
  draws = np.asarray(
      flow.sample_timesteps(jax.random.PRNGKey(0), (200_000,), mean=0.3, std=0.8, shift=2.0))
  np.testing.assert_allclose(np.histogram(draws, edges)[0] / draws.size, shifted, atol=4e-3)
  assert shifted.sum() == pytest.approx(1.0) and shifted[5:].sum() > 0.6  # Shift moves t to noise.


def test_loss_at_t_is_the_training_loss_and_zero_for_an_exact_denoiser():
  x0 = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 4, 4, 5))
  noise = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
  t = 0.3
  exact_x0 = validation_loss.loss_at_t(lambda x_t, t_b: x0, x0, noise, t, prediction="x0")
  exact_v = validation_loss.loss_at_t(lambda x_t, t_b: noise - x0, x0, noise, t, prediction="velocity")
  np.testing.assert_allclose(exact_x0, 0.0, atol=1e-10)
  np.testing.assert_allclose(exact_v, 0.0, atol=1e-10)
  zero = validation_loss.loss_at_t(lambda x_t, t_b: jnp.zeros_like(x_t), x0, noise, t, prediction="velocity")
  np.testing.assert_allclose(zero, jnp.mean((noise - x0) ** 2, axis=(1, 2, 3, 4)), rtol=1e-6)
  assert zero.shape == (3,)
  # Its batch mean is `flow.flow_matching_loss`, the train step's loss.
  x_t = flow.interpolate(x0, noise, t)
  half = lambda x, tb: 0.5 * x  # noqa: E731  Any denoiser.
  expected = flow.flow_matching_loss(
      flow.to_velocity(half(x_t, None), x_t, t, "x0"), flow.velocity_target(x0, noise))
  got = validation_loss.loss_at_t(half, x0, noise, t, prediction="x0")
  assert float(jnp.mean(got)) == pytest.approx(float(expected), rel=1e-6)


def test_options_name_the_bad_part_and_the_valid_ones():
  with pytest.raises(ValueError, match=r"unknown part\(s\) \['fid'\].*sampling,conditioning"):
    evaluate.BenchmarkOptions(parts=("sampling", "fid"))
  with pytest.raises(ValueError, match="--val_levels=0 must be >= 1"):
    evaluate.BenchmarkOptions(val_levels=0)
  with pytest.raises(FileNotFoundError, match="--fvd_weights=/nope.npz does not exist"):
    evaluate.BenchmarkOptions(fvd_weights="/nope.npz")


# ---------------------------------------------------------------------------------------------
# A tiny untrained DiT: its zero-initialised output layer gives a closed-form loss.


@pytest.fixture(scope="module")
def untrained_generator(untrained_autoencoder):
  config = base_experiment.get_config("tiny")
  mesh_cfg = config_types.MeshConfig()
  _, ae, ae_params, _, _ = builders.restore_params(
      untrained_autoencoder, mesh_lib.make_mesh(mesh_cfg), mesh_cfg.rules)
  dit, init_params, tokenizer = builders.build_dit(config, ae.config.latent_channels)
  params = nn.meta.unbox(init_params(jax.random.PRNGKey(0)))
  mean, std = builders.load_latent_stats(untrained_autoencoder)
  diffusion = config_types.dataclass_from_config(config_types.DiffusionConfig, config.diffusion)
  data_cfg = config_types.dataclass_from_config(config_types.DataConfig, config.data)
  return inference.Generator(dit, params, ae, ae_params, mean, std, tokenizer, diffusion), data_cfg


def test_validation_loss_per_cell_and_noise_level_of_an_untrained_dit(untrained_generator):
  generator, data_cfg = untrained_generator
  assert generator.diffusion.prediction == "x0"
  cfg = validation_loss.ValidationConfig(num_clips=2, num_levels=4, seed=5)
  result = validation_loss.evaluate_validation_loss(generator, data_cfg, cfg)
  levels = np.asarray(result["noise_levels"])
  assert [c["shape"] for c in result["cells"]] == [list(s) for s in validation_loss.cells(data_cfg)]
  assert len(result["cells"]) == len(data_cfg.lengths) * len(data_cfg.sizes) == 4
  for cell in result["cells"]:
    loss = np.asarray(cell["loss"])
    assert loss.shape == (4,) and np.isfinite(loss).all() and cell["clips"] == 2
    # The output layer is zero-initialised, so the x0 estimate is 0 and the velocity x_t / t:
    # its error is x0 / t, the loss E[x0^2] / t^2. Near-clean t costs (t_hi / t_lo)^2 more.
    np.testing.assert_allclose(loss * levels**2, loss[0] * levels[0] ** 2, rtol=1e-4)
    assert loss[0] / loss[-1] == pytest.approx((levels[-1] / levels[0]) ** 2, rel=1e-4)
    assert sum(cell["training_weights"]) == pytest.approx(1.0)
    assert cell["weighted_loss"] == pytest.approx(np.dot(cell["training_weights"], loss))
  np.testing.assert_allclose(
      result["by_noise_level"], np.mean([c["loss"] for c in result["cells"]], axis=0))
  # Deterministic for a seed (one cell again, to keep it quick), different for another.
  one_cell = dataclasses.replace(data_cfg, lengths=(data_cfg.lengths[0],), sizes=(data_cfg.sizes[0],))
  again = validation_loss.evaluate_validation_loss(generator, one_cell, cfg)
  assert again["cells"] == result["cells"][:1]
  other = validation_loss.evaluate_validation_loss(
      generator, one_cell, validation_loss.ValidationConfig(num_clips=2, num_levels=4, seed=6))
  assert other["cells"][0]["loss"] != result["cells"][0]["loss"]
  with pytest.raises(ValueError, match=r"--eval_seed=0 is the run's training seed.*e.g. 1"):
    validation_loss.evaluate_validation_loss(
        generator, data_cfg, validation_loss.ValidationConfig(num_clips=1, num_levels=2, seed=0))


def test_fvd_part_compares_samples_with_ground_truth_of_the_same_shapes(untrained_generator):
  from spacetime_dit.eval import fvd  # pylint: disable=g-import-not-at-top

  _, data_cfg = untrained_generator
  network = fvd.random_feature_network(0, num_frames=4, resolution=16)
  shapes = [np.zeros((5, 32, 32, 3), np.uint8), np.zeros((5, 24, 40, 3), np.uint8)] * 2
  truth = evaluate.ground_truth_like(data_cfg, shapes, seed=3)
  assert [v.shape for v in truth] == [v.shape for v in shapes] and truth[0].any()
  kwargs = dict(network=network, batch_size=2, seed=3, size=(32, 32))
  same = evaluate.evaluate_fvd(truth, data_cfg, **kwargs)  # The ground truth against itself.
  blank = evaluate.evaluate_fvd(shapes, data_cfg, **kwargs)
  assert same["fvd"] == pytest.approx(0.0, abs=1e-6) and blank["fvd"] > 1e-3
  assert same["num_clips"] == 4 and same["resized_to"] == [5, 32, 32]
  assert "not comparable" in same["network"]


# ---------------------------------------------------------------------------------------------
# The markdown report and plots from a report dict.


def _synthetic_report(fvd=None):
  scores = {"colour": 0.75, "shape": 0.5, "motion": 0.25, "persistence": 1.0, "velocity_residual": 0.4}
  val = {
      "settings": {"num_clips": 2, "seed": 1}, "noise_levels": [0.25, 0.75],
      "cells": [{"shape": [5, 32, 32], "latent_shape": [3, 8, 8], "tokens": 48, "shift": 0.87,
                 "clips": 2, "loss": [2.0, 0.5], "loss_std": [0.1, 0.1],
                 "training_weights": [0.5, 0.5], "weighted_loss": 1.25}],
      "skipped_cells": [{"shape": [4, 32, 32], "reason": "frames = 1 + k*2"}],
      "by_noise_level": [2.0, 0.5], "summary": {"weighted_loss": 1.25},
  }
  report = {
      "workdir": "/runs/x", "step": 7, "command": "python -m spacetime_dit.evaluate --workdir=/runs/x",
      "parts": ["sampling", "val_loss", "fvd"], "skipped_parts": [] if fvd else ["fvd"],
      "settings": {"num_prompts": 4}, "config": {"stage": "dit"}, "split": "train",
      "sampling": {
          "train": {"num_prompts": 4, "frames": 5, "summary": scores},
          "holdout": {"num_prompts": 4, "frames": 5, "summary": {**scores, "colour": 0.25}},
      },
      "val_loss": val,
      "fvd": ({"fvd": fvd, "num_clips": 4, "resized_to": [5, 32, 32], "network": "I3D logits"}
              if fvd else {"fvd": None, "skipped": report_lib.FVD_SKIPPED}),
  }
  report["summary"] = {**scores, **{f"holdout_{k}": v for k, v in scores.items()},
                       "holdout_colour": 0.25, "val_loss": 1.25, "fvd": fvd}
  return report


def test_markdown_report_has_every_table_and_valid_plots(tmp_path):
  written = report_lib.write(_synthetic_report(), str(tmp_path))
  md = open(written["markdown"], encoding="utf-8").read()
  for heading in ("## Summary", "## ShapesWorld scores per split", "## Validation loss",
                  "### Per cell", "### Per noise level", "## FVD", "## Command and config"):
    assert heading in md, heading
  assert "| colour (holdout combinations) | 25.0% |" in md
  assert "| colour (train combinations) | 75.0% |" in md
  assert "| holdout | 4 | 5 | 25.0% | 50.0% | 25.0% | 100.0% | 0.400 |" in md
  assert "| 5x32x32 | 3x8x8 | 48 | 0.87 | 2 | 1.2500 | 2.0000 | 0.5000 |" in md
  assert "| 0.750 | 0.5000 | 0.5000 |" in md  # Per noise level: t, mean, the cell.
  assert "4x32x32 | skipped: frames = 1 + k*2" in md
  assert "FVD: skipped (bring I3D weights, see docs)." in md
  assert "python -m spacetime_dit.evaluate --workdir=/runs/x" in md
  for name in (report_lib.LOSS_PLOT, report_lib.SCORES_PLOT):
    path = tmp_path / name
    assert f"]({name})" in md and path.read_bytes()[:8] == PNG_MAGIC
    assert mpl_image.imread(str(path)).shape[2] in (3, 4)  # Decodes as an image.
  md_fvd = report_lib.markdown(_synthetic_report(fvd=12.5), {})
  assert "| FVD | 12.50 |" in md_fvd and "FVD 12.50 between 4 sampled" in md_fvd
  assert "features: I3D logits." in md_fvd


# ---------------------------------------------------------------------------------------------
# The command on the session's tiny trained run.


def test_evaluate_command_writes_the_full_benchmark(tiny_conditioned_run, tmp_path):
  out_dir, out = tmp_path / "eval", tmp_path / "elsewhere" / "r.json"
  result = subprocess.run(
      [sys.executable, "-m", "spacetime_dit.evaluate", f"--workdir={tiny_conditioned_run}",
       f"--out_dir={out_dir}", f"--out={out}", "--num_prompts=2", "--batch_size=2", "--steps=1",
       "--conditioning_clips=1", "--num_extensions=1", "--ae_clips=1", "--val_clips=2",
       "--val_levels=3"],
      cwd=REPO, capture_output=True, text=True, timeout=900,
  )
  assert result.returncode == 0, result.stderr[-4000:]
  report = json.loads(out.read_text())
  assert set(report["sampling"]) == {"train", "holdout"}
  holdout = {tuple(h) for h in report["config"]["data"]["holdout"]}
  for split, section in report["sampling"].items():
    assert len(section["clips"]) == 2
    for clip in section["clips"]:
      obj = shapesworld_captions.parse_caption(clip["prompt"]).objects[0]
      assert ((obj.colour, obj.shape, obj.motion) in holdout) == (split == "holdout")
  assert report["split"] == "train" and report["clips"] == report["sampling"]["train"]["clips"]
  summary = report["summary"]
  for key in ("colour", "shape", "motion", "persistence", "holdout_colour", "holdout_persistence"):
    assert 0.0 <= summary[key] <= 1.0, key
  assert summary["ae_psnr"] > 0 and 0 < summary["ae_ssim"] <= 1 and summary["val_loss"] > 0
  (cell,) = report["val_loss"]["cells"]  # The fixture trains one shape: 9 x 32 x 32.
  assert cell["shape"] == [9, 32, 32] and len(cell["loss"]) == 3
  assert report["conditioning"]["i2v"]["first_frame_psnr"]["n"] == 1
  assert report["fvd"]["fvd"] is None and report["skipped_parts"] == ["fvd"]
  md = (out_dir / "report.md").read_text()
  for heading in ("## Summary", "## ShapesWorld scores per split", "### Per cell",
                  "### Per noise level", "## Conditioning fidelity", "## Autoencoder reconstruction",
                  "FVD: skipped", "--val_levels=3"):
    assert heading in md, heading
  for name in (report_lib.LOSS_PLOT, report_lib.SCORES_PLOT):
    assert (out_dir / name).read_bytes()[:8] == PNG_MAGIC
  assert not (out_dir / "report.json").exists()  # --out moved it.
