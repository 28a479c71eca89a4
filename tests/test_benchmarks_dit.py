"""benchmarks.dit_speed runs at tiny sizes and writes every field of its JSON report.

It runs as its own process (`python -m benchmarks.dit_speed`), as a user would: its absl flags
cannot share a process with other benchmarks'. Where torch/diffusers are absent it must still
time ours and say how to install the peer; the test forces that case with a `torch` module that
fails to import, so it checks the guard and needs no PyTorch.
"""

import json
import os
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Slow with a cold XLA cache: 50-120 s on 2 busy cores (load 8), starting jax and compiling two
# programs; ~7 s when the suite's persistent cache (conftest.py) already holds them.
@pytest.mark.slow
def test_dit_speed_tiny_without_peer_writes_report(tmp_path):
  shim = tmp_path / "shim"
  shim.mkdir()
  (shim / "torch.py").write_text("raise ImportError('torch hidden by the test')\n")
  out = tmp_path / "dit_speed.json"
  # Lowest backend optimisation level: compiling dominates at tiny sizes (as in conftest.py).
  env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(shim), _ROOT, os.environ.get("PYTHONPATH", "")]))
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.dit_speed", "--variant=tiny", "--tokens=16",
       "--ops=fwd,step", "--reps=1", "--warmup=0", "--matmul_sizes=128,256", "--matmul_reps=1",
       "--settle_s=0", f"--out={out}"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'pip install -e ".[bench]"' in result.stdout  # The guard names the fix.
  report = json.loads(out.read_text())
  assert report["peer_missing"] and report["params"]["wan"] is None
  peak = report["matmul_peak"]["jax"]
  assert set(peak["by_size"]) == {"128", "256"} and "torch" not in report["matmul_peak"]
  assert peak["flop_per_s"] == max(v["flop_per_s"] for v in peak["by_size"].values()) > 0
  assert report["threads"]["jax_xla_cpu"] >= 1 and len(report["load_average"]["start"]) == 3
  assert report["ours_model"]["width"] == 32 and report["ours_model"]["latent_channels"] == 16
  rows = report["results"]
  assert [(r["tokens"], r["op"]) for r in rows] == [(16, "fwd"), (16, "step")]
  for r in rows:
    assert r["latent_thw"] == [1, 8, 8] and "torch" not in r and "ratio_median" not in r
    ours = r["jax"]
    assert ours["ms"]["median"] > 0 and ours["compile_s"] > 0
    assert ours["tokens_per_s"] == pytest.approx(16 / (ours["ms"]["median"] / 1e3))
    assert ours["model_flops"] > 0 and ours["counted_flops"] > 0
    assert 0 < ours["mfu"] == pytest.approx(
        ours["model_flop_per_s"] / report["matmul_peak"]["jax"]["flop_per_s"])
  fwd, step = rows[0]["jax"]["model_flops"], rows[1]["jax"]["model_flops"]
  assert step == pytest.approx(3 * fwd)  # Backward = 2 forwards of matmul work.


def test_latent_shapes_have_the_requested_tokens():
  from benchmarks import dit_speed  # pylint: disable=g-import-not-at-top
  assert dit_speed.latent_thw(256) == (1, 32, 32)
  assert dit_speed.latent_thw(1024) == (4, 32, 32)
  assert dit_speed.latent_thw(4096) == (16, 32, 32)
  assert dit_speed.latent_thw(16) == (1, 8, 8)
  assert dit_speed.latent_thw(12) == (3, 4, 4)  # 2x2 patches per frame, 3 frames.
