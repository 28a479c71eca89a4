"""Pieces shared by the experiment files: variant parsing, data, mesh and optimizer sections.

Every field carries a comment; `get_config` in each experiment locks the result so that a
mistyped override (`--config.train.num_stepz=5`) fails with the close matches.
"""

import ml_collections

# `tiny` is for tests and smoke runs (seconds, learns nothing); `cpu` is the quickstart
# (minutes on 2 cores); `s`, `b`, `xl` are pod scale.
VARIANTS = ("tiny", "cpu", "s", "b", "xl")

# ShapesWorld at a size a 2-core CPU trains on in minutes, and at pod scale. Each list holds
# portrait, landscape and square native sizes; every size is a multiple of the
# autoencoder's spatial factor times the DiT patch, every length is 1 + k * temporal factor.
_DATA = {
    # Tests compile one step per bucket: two sizes and two lengths keep that to four.
    "tiny": dict(
        sizes=((32, 32), (24, 40)),
        lengths=(1, 5),
        max_objects=1,
        camera_pan_prob=0.0,
    ),
    "cpu": dict(
        sizes=((32, 32), (24, 40), (40, 24), (24, 48)),
        lengths=(1, 5, 9, 13),
        max_objects=1,
        camera_pan_prob=0.0,
    ),
    "pod": dict(
        sizes=((256, 256), (192, 320), (320, 192), (160, 384)),
        lengths=(1, 17, 33, 65),
        max_objects=2,
        camera_pan_prob=0.25,
    ),
}

# Combinations kept out of training, so that compositional generalisation can be measured.
HOLDOUT = (("red", "triangle", "left"), ("blue", "circle", "up"), ("yellow", "square", "right"))


def check_variant(variant: str) -> str:
  """Returns the variant, or raises a ValueError listing the valid ones."""
  variant = (variant or "cpu").strip()
  if variant not in VARIANTS:
    raise ValueError(
        f"unknown config variant {variant!r}; valid variants are {VARIANTS}, e.g."
        " --config=experiments/base.py:cpu"
    )
  return variant


def data_config(variant: str, *, token_budget: int, max_batch_size: int) -> ml_collections.ConfigDict:
  """The `data` section: the embedded ShapesWorld source and token-budget bucketing."""
  shapes = _DATA[variant if variant in _DATA else "pod"]
  c = ml_collections.ConfigDict()
  # "shapesworld" (procedural, no download), a directory written by
  # `python -m data_pipelines.prepare`, or "tfds:NAME" (any TFDS dataset with a video feature).
  c.source = "shapesworld"
  c.seed = 0  # ShapesWorld seed and shuffle seed.
  c.sizes = shapes["sizes"]  # Native (H, W) choices: square, landscape, portrait, wide.
  c.lengths = shapes["lengths"]  # Native frame counts; 1 is an image.
  c.max_objects = shapes["max_objects"]  # Objects per clip.
  c.camera_pan_prob = shapes["camera_pan_prob"]  # Fraction of clips with a captioned pan.
  c.holdout = HOLDOUT  # (colour, shape, motion) combos never seen in training.
  c.num_index_samples = 10_000  # Source indices scanned to form the shape buckets.
  c.token_budget = token_budget  # Tokens per global batch (see the stage's tokens_per_clip).
  c.max_batch_size = max_batch_size  # Cap on any bucket's global batch size.
  c.num_threads = 2  # Grain reader threads; worker processes only add overhead on 2 cores.
  # Diffusion stage only: encode this many clips once and train on their latents (0: encode
  # every batch in the step). On a CPU the encoder costs several times the DiT step.
  c.latent_cache_clips = 0
  # Diffusion stage: read latents encoded ahead of time by `python -m spacetime_dit.encode_latents`
  # from this directory ("" encodes in the stage, see latent_cache_clips).
  c.latent_dir = ""
  # NaViT packing (diffusion stage on latents only): clips of different shapes share fixed rows of
  # pack_length tokens, so one compiled step serves every shape; rows per global batch =
  # token_budget // pack_length. False batches whole clips by shape bucket instead.
  c.packing = False
  # Tokens per packed row; the longest clip must fit in one row. `cpu`: its longest clip has
  # 126 tokens; pod: 8 rows of 8,192 fill the 65,536-token budget, one per host of 8 devices.
  c.pack_length = 256 if variant in ("tiny", "cpu") else 8192
  # G: caption slots per row. Every slot's caption is encoded whether used or not, so G is
  # about twice the mean clips per row (3.9 for `cpu`, measured by the packing log line).
  c.max_clips_per_pack = 8 if variant in ("tiny", "cpu") else 16
  c.max_buckets = 0  # Bucketing: >0 keeps this many shapes and centre-crops the rest into them.
  c.num_workers = 0  # Grain worker processes (0: threads, faster on small hosts).
  c.prefetch_to_device = 2  # Batches put on the devices ahead of the step (0: none).
  c.tfds_data_dir = ""  # data_dir for source="tfds:NAME" (any TFDS dataset with a video feature).
  c.split = "train"  # Split of a prepared directory or TFDS dataset.
  return c


def mesh_config() -> ml_collections.ConfigDict:
  """The `mesh` section. -1 takes every device the other axes leave."""
  c = ml_collections.ConfigDict()
  c.data = -1  # Pure data parallelism.
  c.fsdp = 1  # Data parallelism with sharded weights and optimizer state.
  c.tensor = 1  # Tensor parallelism over heads / MLP width.
  c.sequence = 1  # Sequence parallelism over spacetime tokens.
  return c


def optimizer_config(*, learning_rate: float, warmup_steps: int) -> ml_collections.ConfigDict:
  """The `optimizer` section: AdamW, warmup + cosine, global-norm clipping."""
  c = ml_collections.ConfigDict()
  c.learning_rate = learning_rate  # Peak learning rate.
  c.warmup_steps = warmup_steps  # Linear warmup steps.
  c.final_lr_fraction = 0.1  # Cosine decay floor as a fraction of the peak.
  c.weight_decay = 0.0  # Decoupled weight decay.
  c.b1 = 0.9  # Adam beta1.
  c.b2 = 0.99  # Adam beta2.
  c.grad_clip = 1.0  # Global-norm clip (<= 0 disables).
  return c


def train_config(
    *, num_steps: int, log_every: int, checkpoint_every: int, sample_every: int = 0, ema_decay: float = 0.0
):
  """The `train` section: the loop schedule of the stage the file describes."""
  c = ml_collections.ConfigDict()
  c.num_steps = num_steps  # Steps of this stage (`--config.train.num_steps=N`).
  c.log_every = log_every  # Steps between metrics rows.
  c.checkpoint_every = checkpoint_every  # Steps between checkpoints; the last step always saves.
  c.keep_checkpoints = 2  # Checkpoints kept on disk (the newest ones).
  c.keep_every = 0  # >0: also keep every checkpoint at a multiple of this step, forever.
  c.async_checkpointing = True  # Save in the background while training continues.
  c.skip_nonfinite = False  # NaN/Inf loss or grads: False stops the run, True skips the update.
  c.loss_spike_factor = 3.0  # Log a spike when loss > factor x running median (0: off).
  c.sample_every = sample_every  # Steps between sample clips (0: only at the end).
  c.compilation_cache = True  # Reuse compiled steps across runs (W/xla_cache).
  c.ema_decay = ema_decay  # EMA of the weights, used for sampling (0: off; see training/ema.py).
  return c
