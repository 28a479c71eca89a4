"""`python -m spacetime_dit.sample` for every kind of input: modes with image/video files of any
size, several seeds, drafts, and a one-line error for every bad command line.

The workdir is an untrained tiny run written straight through the real checkpoint path (no
training: only the plumbing and the files are checked here; tests/test_cli.py trains one).
"""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from experiments import autoencoder as autoencoder_experiment
from experiments import base as base_experiment
from spacetime_dit import config_types
from spacetime_dit import video_io
from spacetime_dit.sharding import mesh as mesh_lib
from spacetime_dit.training import builders
from spacetime_dit.training import checkpointing
from spacetime_dit.training import state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _save_untrained(config, workdir, init_params, tx):
  builders.save_config(config, workdir)
  mesh = mesh_lib.make_mesh(config_types.MeshConfig())
  state = state_lib.create_state(init_params, tx, mesh, config_types.MeshConfig().rules, config.seed)
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  checkpointer.save(1, state)
  checkpointer.close()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A tiny DiT run and its autoencoder at initialisation, as `restore_params` reads them."""
  workdir = str(tmp_path_factory.mktemp("untrained"))
  ae_dir = os.path.join(workdir, "autoencoder")
  ae_config = autoencoder_experiment.get_config("tiny")
  _, _, init_params, tx, _, _ = builders.build_autoencoder_training(ae_config)
  _save_untrained(ae_config, ae_dir, init_params, tx)
  channels = ae_config.model.latent_channels
  builders.save_latent_stats(ae_dir, np.zeros(channels), np.ones(channels))
  dit_config = base_experiment.get_config("tiny")
  _, init_params, _ = builders.build_dit(dit_config, channels)
  _save_untrained(dit_config, workdir, init_params, builders.build_optimizer(dit_config)[0])
  return workdir


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Condition files of awkward sizes: an odd-sized png, a 5-frame mp4, a corrupt 'png'."""
  folder = tmp_path_factory.mktemp("cond")
  rng = np.random.default_rng(0)
  paths = {
      "image": str(folder / "odd.png"), "clip": str(folder / "clip.mp4"),
      "corrupt": str(folder / "corrupt.png"), "long": str(folder / "long.mp4"),
  }
  video_io.write_png(paths["image"], rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
  video_io.write_mp4(paths["clip"], rng.integers(0, 256, (5, 30, 18, 3), dtype=np.uint8))
  video_io.write_mp4(paths["long"], rng.integers(0, 256, (11, 16, 16, 3), dtype=np.uint8))
  with open(paths["corrupt"], "wb") as f:
    f.write(b"\x89PNG not really an image")
  return paths


def _sample(run_dir, *flags, check=True):
  result = subprocess.run(
      [sys.executable, "-m", "spacetime_dit.sample", f"--workdir={run_dir}", "--prompt=a red circle",
       "--steps=1", *flags],
      cwd=REPO, capture_output=True, text=True, timeout=600,
  )
  if check and result.returncode:
    raise AssertionError(f"{flags} exited {result.returncode}:\n{result.stderr[-3000:]}")
  return result


def test_seeds_write_one_mp4_and_gif_per_sample(run_dir, tmp_path):
  out, gif = str(tmp_path / "t2v.mp4"), str(tmp_path / "t2v.gif")
  _sample(run_dir, "--seeds=3,4", f"--out={out}", f"--gif={gif}", "--frames=5", "--height=16",
          "--width=24", "--sampler=heun")
  for path in (out, str(tmp_path / "t2v_1.mp4")):
    assert video_io.read_video(path).shape == (5, 16, 24, 3)
  assert os.path.getsize(str(tmp_path / "t2v_1.gif")) > 0
  assert not os.path.exists(str(tmp_path / "t2v_2.mp4"))


def test_image_condition_of_any_size_and_num_samples(run_dir, files, tmp_path):
  i2v = str(tmp_path / "i2v.mp4")
  _sample(run_dir, "--mode=i2v", f"--cond={files['image']}", f"--out={i2v}", "--frames=7",
          "--height=24", "--width=16", "--cond_guidance=2", "--num_samples=2")
  assert video_io.read_video(i2v).shape == (7, 24, 16, 3)
  assert video_io.read_video(str(tmp_path / "i2v_1.mp4")).shape == (7, 24, 16, 3)


def test_interpolate_two_files_with_a_draft(run_dir, files, tmp_path):
  between = str(tmp_path / "interpolate.mp4")
  _sample(run_dir, "--mode=interpolate", f"--cond={files['clip']}", f"--cond={files['image']}",
          f"--out={between}", "--frames=9", "--height=16", "--width=16", "--draft_scale=0.5")
  assert video_io.read_video(between).shape == (9, 16, 16, 3)


def test_edit_defaults_to_the_clips_length(run_dir, files, tmp_path):
  out = str(tmp_path / "edit.mp4")
  _sample(run_dir, "--mode=edit", f"--cond={files['long']}", "--strength=0.5", f"--out={out}",
          "--height=16", "--width=16")
  assert video_io.read_video(out).shape == (11, 16, 16, 3)


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--mode=extend", "--cond={missing}"), r"cannot read '.*missing.mp4': no such file"),
        (("--mode=i2v", "--cond={corrupt}"), r"cannot read '.*corrupt.png': (not a decodable|decoding failed)"),
        (("--mode=interpolate", "--cond={image}"), r"mode 'interpolate' takes 2 condition\(s\)"),
        (("--mode=t2v", "--cond={image}"), r"mode 't2v' takes 0 condition\(s\)"),
        (("--mode=extend", "--cond={long}", "--frames=9"), r"takes 6 latent frame\(s\) and a 9-frame output has 5; .*--frames >= 13"),
        (("--height=20",), r"multiples of 8 and 8 .*e.g. 16x32"),
        (("--strength=0.5",), r"strength is for mode 'edit'"),
        (("--mode=edit", "--cond={long}", "--strength=2"), r"edit strength is 2.0"),
        (("--seeds=1,x",), r"--seeds='1,x' is not a comma-separated list of integers"),
        (("--seeds=1,2", "--num_samples=2"), r"pass one"),
        (("--sampler=rk4",), r"unknown sampler 'rk4'"),
        (("--draft_scale=2",), r"draft_scale is 2.0"),
    ],
)
def test_bad_command_lines_are_one_line_errors(run_dir, files, tmp_path, flags, message):
  paths = {**files, "missing": str(tmp_path / "missing.mp4")}
  out = tmp_path / "x.mp4"
  # Defaults first: absl keeps the last value of a repeated flag.
  result = _sample(run_dir, "--frames=5", "--height=16", "--width=32", f"--out={out}",
                   *(f.format(**paths) for f in flags), check=False)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and re.search(message, last), last
  assert not out.exists()
