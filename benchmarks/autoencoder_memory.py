"""Peak memory of encoding a long clip with the causal VAE: chunked over time vs one-shot.

  python -m benchmarks.autoencoder_memory --variant=cpu --frames=129 --height=64 --width=64 \
      --chunk_frames=8 --out=runs/autoencoder_memory.json

Two measures, both for random weights of an `experiments/autoencoder.py` variant:
- XLA's own accounting of each compiled program (`Compiled.memory_analysis()`): arguments
  (parameters, input, carried cache), outputs, and the temporary buffers of the activations.
  For the chunked encoder these are the per-chunk programs; the host holds the clip and the
  latents between chunks.
- The process's peak resident memory (`resource.getrusage(...).ru_maxrss`), each mode in a fresh
  subprocess so that no mode inherits another's high-water mark: after building the model and
  the clip, after compiling, and after encoding.
It also states the PSNR of the chunked latent mean against the one-shot one (data range: the
one-shot mean's range), which should be far above 80 dB: chunking is exact up to float rounding.
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import linen as nn

from benchmarks import reporting
from spacetime_dit import cli
from spacetime_dit import config_types
from spacetime_dit.models import autoencoder as ae
from spacetime_dit.models import autoencoder_tiling as tiling

_VARIANT = flags.DEFINE_string("variant", "cpu", "Model size from experiments/autoencoder.py.")
_FRAMES = flags.DEFINE_integer("frames", 129, "Video frames T (1 + k*tf).")
_HEIGHT = flags.DEFINE_integer("height", 64, "Video height (a multiple of sf).")
_WIDTH = flags.DEFINE_integer("width", 64, "Video width (a multiple of sf).")
_BATCH = flags.DEFINE_integer("batch", 1, "Videos encoded together.")
_CHUNK = flags.DEFINE_integer("chunk_frames", 8, "Video frames per chunk after frame 0 (k*tf).")
_TILE = flags.DEFINE_list(
    "tile", [], "Optional H,W pixel tile: also measures chunked + tiled encoding (blended).")
_OVERLAP = flags.DEFINE_list("overlap", [], "H,W pixels shared by tiles (default: tile / 4).")
_SEED = flags.DEFINE_integer("seed", 0, "Parameter and clip seed.")
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")
# Internal: run one mode in this process (the parent starts one subprocess per mode).
_MODE = flags.DEFINE_enum("mode", "", ["", "oneshot", "chunked", "tiled"], "Internal.")
_CHILD_DIR = flags.DEFINE_string("child_dir", "", "Internal: where a mode writes its results.")

_MIB = 2**20


def _model(variant: str) -> ae.CausalVideoAutoencoder:
  # Imported here: experiments/ is a top-level package of the repository, not of the library.
  from experiments import autoencoder as experiment  # pylint: disable=g-import-not-at-top
  section = experiment.get_config(variant).model
  return ae.CausalVideoAutoencoder(
      config_types.dataclass_from_config(ae.AutoencoderConfig, section, path="config.model"))


def _params(model: ae.CausalVideoAutoencoder, seed: int):
  # "rbg" keys compile in milliseconds on XLA:CPU; any random init does for memory.
  init = jax.jit(lambda k: model.init({"params": k}, jnp.zeros((1, 1, 8, 8, 3)),
                                      sample_posterior=False)["params"])
  # Plain arrays, without the logical-axis boxes of `with_logical_partitioning`.
  return nn.meta.unbox(init(jax.random.key(seed, impl="rbg")))


def _clip(shape: tuple[int, ...], seed: int) -> np.ndarray:
  """Drifting sinusoids plus a little noise, in [-1, 1]: a clip with structure at every scale."""
  b, t, h, w, _ = shape
  tt, yy, xx = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
  rgb = np.stack([np.sin(0.2 * xx + 0.3 * tt), np.cos(0.15 * yy - 0.2 * tt),
                  np.sin(0.1 * (xx + yy) + 0.1 * tt)], axis=-1)
  noise = np.random.default_rng(seed).uniform(-0.1, 0.1, shape)
  return np.clip(0.8 * rgb[None] + noise, -1.0, 1.0).astype(np.float32)


def _memory_stats(compiled) -> dict[str, int]:
  stats = compiled.memory_analysis()
  names = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
           "alias_size_in_bytes", "generated_code_size_in_bytes")
  out = {name.removesuffix("_size_in_bytes"): int(getattr(stats, name)) for name in names}
  # Arguments donated to outputs (the carried cache) are counted once.
  out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def xla_memory(model, params, video_shape: tuple[int, ...], chunk: int,
               tile: tuple[int, int] | None) -> dict[str, dict]:
  """XLA's memory analysis of the one-shot encoder and of each per-chunk program.

  Keys: "oneshot", "chunk_first" (frame 0), "chunk_next" (a full chunk), "chunk_last" (a
  shorter last chunk, if any), and "tile_chunk_next" (a full chunk of one tile) with a tile.
  """
  steps = tiling.chunk_steps(model)
  b, t, h, w, c = video_shape
  spec = lambda frames, height=h, width=w: jax.ShapeDtypeStruct((b, frames, height, width, c),
                                                                jnp.float32)
  result = {"oneshot": _memory_stats(steps.encode_whole.lower(params, spec(t)).compile())}
  result["chunk_first"] = _memory_stats(steps.encode_first.lower(params, spec(1)).compile())
  _, cache = jax.eval_shape(steps.encode_first, params, spec(1))
  result["chunk_next"] = _memory_stats(
      steps.encode_next.lower(params, cache, spec(chunk)).compile())
  if (t - 1) % chunk:
    result["chunk_last"] = _memory_stats(
        steps.encode_next.lower(params, cache, spec((t - 1) % chunk)).compile())
  if tile:
    tile_h, tile_w = min(tile[0], h), min(tile[1], w)
    _, tile_cache = jax.eval_shape(steps.encode_first, params, spec(1, tile_h, tile_w))
    result["tile_chunk_next"] = _memory_stats(
        steps.encode_next.lower(params, tile_cache, spec(chunk, tile_h, tile_w)).compile())
  return result


def _rss_mib() -> float:
  # Linux reports ru_maxrss in KiB (macOS in bytes).
  scale = 1 if sys.platform == "darwin" else 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / _MIB


def _pair(values: list[str], name: str) -> tuple[int, int] | None:
  if not values:
    return None
  if len(values) != 2:
    raise ValueError(f"--{name}={','.join(values)} must be two integers H,W, e.g. --{name}=32,32.")
  return int(values[0]), int(values[1])


def run_mode(mode: str, child_dir: str) -> None:
  """Encodes the clip in one mode and writes its peak RSS, time and latent mean to child_dir."""
  model = _model(_VARIANT.value)
  params = _params(model, _SEED.value)
  shape = (_BATCH.value, _FRAMES.value, _HEIGHT.value, _WIDTH.value, model.config.video_channels)
  video = _clip(shape, _SEED.value)
  rss = {"built": _rss_mib()}
  chunk = _CHUNK.value
  kwargs = dict(chunk_frames=chunk)
  if mode == "tiled":
    kwargs.update(tile=_pair(_TILE.value, "tile"), overlap=_pair(_OVERLAP.value, "overlap"))
  start = time.perf_counter()
  if mode == "oneshot":
    compiled = tiling.chunk_steps(model).encode_whole.lower(params, video).compile()
  else:
    # Compiles every chunk shape the full run uses: frame 0, a full chunk, the last one.
    warmup = 1 + chunk + (shape[1] - 1) % chunk
    tiling.encode(model, params, video[:, :min(warmup, shape[1])], **kwargs)
  rss["compiled"] = _rss_mib()
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  if mode == "oneshot":
    mean, _ = jax.block_until_ready(compiled(params, jnp.asarray(video)))
  else:
    mean, _ = jax.block_until_ready(tiling.encode(model, params, video, **kwargs))
  encode_s = time.perf_counter() - start
  rss["encoded"] = _rss_mib()
  np.save(os.path.join(child_dir, f"{mode}_mean.npy"), np.asarray(mean))
  with open(os.path.join(child_dir, f"{mode}.json"), "w") as f:
    json.dump({"rss_mib": rss, "compile_s": compile_s, "encode_s": encode_s}, f)


def _psnr(x: np.ndarray, reference: np.ndarray) -> float:
  mse = float(np.mean(np.square(x.astype(np.float64) - reference)))
  return float(10 * np.log10(np.ptp(reference) ** 2 / max(mse, 1e-30)))


def _child(mode: str, child_dir: str) -> dict:
  """Runs `run_mode(mode)` in a fresh Python process (its own peak RSS) and reads its results."""
  args = [f"--mode={mode}", f"--child_dir={child_dir}", f"--variant={_VARIANT.value}",
          f"--frames={_FRAMES.value}", f"--height={_HEIGHT.value}", f"--width={_WIDTH.value}",
          f"--batch={_BATCH.value}", f"--chunk_frames={_CHUNK.value}", f"--seed={_SEED.value}",
          f"--tile={','.join(_TILE.value)}", f"--overlap={','.join(_OVERLAP.value)}"]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
  proc = subprocess.run([sys.executable, "-m", "benchmarks.autoencoder_memory", *args], cwd=root,
                        env=dict(os.environ, PYTHONPATH=path), capture_output=True, text=True,
                        check=False)
  if proc.returncode:
    raise RuntimeError(f"the {mode} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
  with open(os.path.join(child_dir, f"{mode}.json")) as f:
    return json.load(f)


def _table(results: dict) -> str:
  xla, runs = results["xla_mib"], results["runs"]
  # A chunked run needs the largest of its chunk programs at a time.
  worst_chunk = max((k for k in xla if k.startswith("chunk_")), key=lambda k: xla[k]["total"])
  programs = {"oneshot": "oneshot", "chunked": worst_chunk, "tiled": "tile_chunk_next"}
  rows = [("mode", "XLA program", "XLA total", "XLA temp", "XLA args", "RSS peak",
           "RSS growth encoding", "encode s", "PSNR dB")]
  for mode, run in runs.items():
    stats, rss = xla[programs[mode]], run["rss_mib"]
    rows.append((mode, programs[mode], f"{stats['total']:.1f}", f"{stats['temp']:.1f}",
                 f"{stats['argument']:.1f}", f"{rss['encoded']:.0f}",
                 f"{rss['encoded'] - rss['compiled']:+.0f}", f"{run['encode_s']:.1f}",
                 str(run.get("psnr_vs_oneshot_db", "-"))))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
  return "\n".join(lines + [
      "(MiB. XLA: one compiled program, arguments + outputs + temporaries. RSS: the process's "
      "peak resident memory after encoding, and how much encoding raised it above the peak "
      "reached while compiling. PSNR: latent mean vs one-shot.)"])


def main(argv):
  del argv
  if _MODE.value:
    run_mode(_MODE.value, _CHILD_DIR.value)
    return
  model = _model(_VARIANT.value)
  shape = (_BATCH.value, _FRAMES.value, _HEIGHT.value, _WIDTH.value, model.config.video_channels)
  tf = model.config.temporal_factor
  if _CHUNK.value < 1 or _CHUNK.value % tf:
    raise ValueError(
        f"--chunk_frames={_CHUNK.value} must be a positive multiple of the temporal factor {tf} "
        f"of variant {_VARIANT.value!r}, e.g. --chunk_frames={2 * tf}.")
  ae.latent_shape(model.config, *shape[1:4])  # Names the fix for a bad clip shape.
  tile = _pair(_TILE.value, "tile")
  params = _params(model, _SEED.value)
  xla = xla_memory(model, params, shape, _CHUNK.value, tile)
  results = {
      "variant": _VARIANT.value, "config": repr(model.config), "video_bthwc": list(shape),
      "chunk_frames": _CHUNK.value, "tile": tile, "overlap": _pair(_OVERLAP.value, "overlap"),
      "device": str(jax.devices()[0]),
      "xla_mib": {k: {n: v / _MIB for n, v in s.items()} for k, s in xla.items()},
      "runs": {},
  }
  modes = ["oneshot", "chunked"] + (["tiled"] if tile else [])
  with tempfile.TemporaryDirectory() as child_dir:
    for mode in modes:
      results["runs"][mode] = _child(mode, child_dir)
    reference = np.load(os.path.join(child_dir, "oneshot_mean.npy")).astype(np.float64)
    for mode in modes[1:]:
      mean = np.load(os.path.join(child_dir, f"{mode}_mean.npy"))
      results["runs"][mode]["psnr_vs_oneshot_db"] = round(_psnr(mean, reference), 2)
  print(_table(results))
  if _OUT.value:
    reporting.write_json(_OUT.value, results)


if __name__ == "__main__":
  cli.run(main)
