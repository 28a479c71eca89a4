"""Speed and MFU of our DiT against diffusers' WanTransformer3DModel, on the same device, in one run.

  python -m benchmarks.dit_speed --variant=s --tokens=256,1024,4096 --out=runs/dit_speed.json
  python -m benchmarks.dit_speed --variant=s --depth=4 --tokens=256,1024 --reps=3
  python -m benchmarks.dit_speed --variant=tiny --tokens=16 --nopeer    # ours only
  python -m benchmarks.dit_speed --variant=b --tokens=4096,16384 --dtype=bfloat16 \
      --attention_impl=cudnn --matmul_sizes=8192 --ops=step      # on a GPU (torch on cuda too)

For every token count L it times, at batch 1 and float32 (or --dtype=bfloat16: our DiT's compute
dtype, params float32; Wan under torch.autocast, params float32), three operations of both models:
  fwd       the denoiser's forward pass (torch: under inference_mode);
  fwd_bwd   forward, rectified-flow MSE against the velocity target, gradient of every parameter;
  step      a full train step. Ours: `spacetime_dit.training.steps.dit_step` on a latent batch
            (batch key "latent", so no autoencoder), jitted with the state donated, with the
            variant's optimizer (global-norm clipping + AdamW, `builders.build_optimizer`),
            random timesteps and caption dropout. Wan: the same loss at sigma 0.5, backward,
            torch.optim.AdamW.
The latent is (1, T, H, W, 16) with H = W the largest power of two <= 32 whose patch grid fits
L, so that T * H/2 * W/2 = L (256 -> 1x32x32, 1024 -> 4x32x32, 4096 -> 16x32x32).

It also measures each framework's matmul peak in the same run (a square matmul in --dtype,
best of N, as FLOP/s): `jnp.dot` for ours, `torch.matmul` for Wan, so each model's MFU is
against what its own framework reaches on this device.

Devices: ours runs on JAX's default backend. Torch runs on --torch_device (auto: cuda when JAX's
backend is a GPU and torch sees CUDA, else cpu). GPU work is asynchronous, so every timed call
waits for its result (`jax.block_until_ready`, `torch.cuda.synchronize`) before the clock stops.

Model FLOPs (for tokens/s -> FLOP/s -> MFU) are the analytic count, the convention of PaLM
(Chowdhery et al. 2022, App. B) and MaxText: 2 FLOPs per multiply-add of every weight matrix
that acts on the L video tokens, plus the text-side matrices on the S text tokens, plus the
attention matmuls 4*L*L*D (self) and 4*L*S*D (cross) per block; fwd+bwd and the step count 3x
the forward. Norms, rope, softmax and the optimizer are not model FLOPs. XLA's own count
(`Compiled.cost_analysis()["flops"]`) and torch's (`FlopCounterMode`) are reported beside it.

Repetitions alternate between the frameworks (and swap who goes first each time) with a short
pause between runs, so a change in load on a shared machine hits both; median and min are
reported, with the load average, and the ratio torch_ms / ours_ms (> 1: ours is faster).
Compile time is excluded from the timings and reported on its own.

Wan's block is not ours: the configuration matches width (heads x head dim), depth, heads,
patch (1, 2, 2), latent channels 16, text length S and text feature width E (Wan's text_dim),
and sets Wan's ffn_dim so its 2-matrix GELU MLP has the FLOPs of our 3-matrix SwiGLU
(ffn_dim = 3F/2). Remaining differences are listed in the report's `mismatches`.

Needs PyTorch and diffusers for the peer: `pip install -e ".[bench]"`; without them (or with
--nopeer) only ours is timed.
"""

import contextlib
import ctypes
import dataclasses
import functools
import os
import time
from benchmarks import reporting
from collections.abc import Callable, Sequence

from absl import app
from absl import flags

OPS = ("fwd", "fwd_bwd", "step")
PARTS = ("self_attn", "attn_core", "cross_attn", "mlp", "norms_mod")
# An empty list turns off every YNNPACK fusion of XLA:CPU (see spacetime_dit/cli.py).
NO_YNN = "--xla_cpu_experimental_ynn_fusion_type="
LEARNING_RATE = 1e-4
SIGMA = 0.5  # Wan's fixed noise level; ours uses the configured random timesteps in `step`.

_VARIANT = None  # Set by define_flags().
_TOKENS = None  # Set by define_flags().
_DEPTH = None  # Set by define_flags().
_OPS = None  # Set by define_flags().
_REPS = None  # Set by define_flags().
_WARMUP = None  # Set by define_flags().
_SETTLE = None  # Set by define_flags().
_PEER = None  # Set by define_flags().
_TORCH_THREADS = None  # Set by define_flags().
_MATMUL_SIZES = None  # Set by define_flags().
_MATMUL_REPS = None  # Set by define_flags().
_WAN_FFN = None  # Set by define_flags().
_ATTN = None  # Set by define_flags().
_REMAT = None  # Set by define_flags().
_MALLOC = None  # Set by define_flags().
_BREAKDOWN = None  # Set by define_flags().
_SEED = None  # Set by define_flags().
_OUT = None  # Set by define_flags().
_YNN = None  # Set by define_flags().
_DTYPE = None  # Set by define_flags().
_TORCH_DEVICE = None  # Set by define_flags().
DTYPES = ("float32", "bfloat16")
TORCH_DEVICES = ("auto", "cpu", "cuda")


def define_flags() -> None:
  """Defines the command-line flags; only when run as a program, so that importing this
  module (tests) never clashes with another entry point's flags (--out, ...)."""
  global _VARIANT, _TOKENS, _DEPTH, _OPS, _REPS, _WARMUP, _SETTLE, _PEER, _TORCH_THREADS, _MATMUL_SIZES, _MATMUL_REPS, _WAN_FFN, _ATTN, _REMAT, _MALLOC, _BREAKDOWN, _SEED, _OUT, _YNN, _DTYPE, _TORCH_DEVICE
  _VARIANT = flags.DEFINE_string("variant", "s", "experiments/base.py variant: tiny, cpu, s, b, xl.")
  _TOKENS = flags.DEFINE_list("tokens", ["256", "1024"], "Token counts L per sample (batch 1).")
  _DEPTH = flags.DEFINE_integer(
      "depth", None, "Blocks of both models; default the variant's. Fewer keeps a CPU run short: "
      "time per block is what is compared.")
  _OPS = flags.DEFINE_list("ops", list(OPS), f"Operations to time, of {OPS}.")
  _REPS = flags.DEFINE_integer("reps", 3, "Timed repetitions of each operation per framework.")
  _WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed runs of each operation before timing.")
  _SETTLE = flags.DEFINE_float(
      "settle_s", 0.2, "Pause between runs, so the other framework's spinning threads sleep.")
  _PEER = flags.DEFINE_bool("peer", True, "Also time diffusers.WanTransformer3DModel.")
  _TORCH_THREADS = flags.DEFINE_integer(
      "torch_threads", None, "torch.set_num_threads; default: the cores XLA:CPU uses.")
  _MATMUL_SIZES = flags.DEFINE_list(
      "matmul_sizes", ["1024", "2048", "4096"], "Sides of the square peak matmuls; the best counts.")
  _MATMUL_REPS = flags.DEFINE_integer("matmul_reps", 3, "Peak = best of this many matmuls.")
  _WAN_FFN = flags.DEFINE_integer(
      "wan_ffn_dim", None, "Wan's ffn_dim; default 3F/2 (FLOPs of our SwiGLU of hidden F).")
  _ATTN = flags.DEFINE_string(
      "attention_impl", None, "Our DiTConfig.attention_impl; default the config's.")
  _REMAT = flags.DEFINE_string(
      "remat", None, "Our DiTConfig.remat_policy (none, full, dots, ...); default the config's "
      "(`s`: full, which recomputes each block's forward in the backward; Wan stores activations).")
  _MALLOC = flags.DEFINE_enum(
      "malloc", "default", list(MALLOC_MODES),
      "glibc allocator of this process (both frameworks): default, or reuse (freed memory stays "
      "in the heap, see `reuse_freed_memory`).")
  _BREAKDOWN = flags.DEFINE_bool(
      "breakdown", False, f"Also time fwd+bwd of one block's parts {PARTS} of both models at each L.")
  _SEED = flags.DEFINE_integer("seed", 0, "Seed of the inputs and both models' weights.")
  _OUT = flags.DEFINE_string("out", None, "Also write the results here as JSON.")
  _YNN = flags.DEFINE_enum(
      "xla_cpu_ynn", "off", list(YNN_MODES),
      "XLA:CPU YNNPACK fusions: off (as the project's entry points), default (XLA's), dot (dots "
      "only).")
  _DTYPE = flags.DEFINE_enum(
      "dtype", "float32", list(DTYPES),
      "Compute dtype: our DiTConfig.dtype (params stay float32), Wan's torch.autocast dtype, and "
      "the dtype of the peak matmuls. attention_impl=cudnn needs bfloat16.")
  _TORCH_DEVICE = flags.DEFINE_enum(
      "torch_device", "auto", list(TORCH_DEVICES),
      "Device of the Wan peer: auto = cuda when JAX's backend is a GPU and torch sees CUDA.")
MALLOC_MODES = ("default", "reuse")
# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def reuse_freed_memory() -> bool:
  """Makes glibc keep freed memory for reuse instead of returning it to the OS; True if set.

  glibc serves allocations above its mmap threshold (at most 32 MiB) with fresh mmap'd pages and
  unmaps them on free, so every step of a jitted program page-faults its large temporaries and
  non-donated outputs in again: on the 2-core dev box ~5 us per 4 KiB page, e.g. 45-52 ms for a
  37 MB `x + 1` of which 2-6 ms is arithmetic. With mmap off, one arena and no trimming, freed
  blocks are reused (the process keeps its peak heap). The same as GLIBC_TUNABLES=
  glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=<huge>:glibc.malloc.arena_max=1, but
  settable after start-up. It applies to the whole process, torch included.
  """
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return False
  return all(libc.mallopt(param, value) == 1 for param, value in
             ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))


YNN_MODES = {
    # The project's entry points (spacetime_dit.cli.use_fast_cpu_convolutions): no YNNPACK.
    "off": NO_YNN,
    # XLA:CPU's own default (jax 0.10): YNNPACK takes dots and convolutions.
    "default": None,
    # YNNPACK for dots only: on this 2-core box a 4096^3 f32 jnp.dot ran at ~36-43 GFLOP/s with
    # YNNPACK and ~18-25 without (load ~8, 2026-11-25); convolutions stay on XLA's own kernels.
    "dot": "--xla_cpu_experimental_ynn_fusion_type=individual_dot",
}


def _import_peer():
  """(torch, diffusers), or raises ImportError naming the install command."""
  try:
    import diffusers  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"benchmarks.dit_speed compares against diffusers.WanTransformer3DModel and needs PyTorch "
        f"and diffusers ({e}). Install them with: pip install -e \".[bench]\"; timing ours only."
    ) from e
  return torch, diffusers



def latent_thw(tokens: int, patch=(1, 2, 2)) -> tuple[int, int, int]:
  """(T, H, W) of a latent with `tokens` patches: the largest square power-of-two patch grid
  (latent side <= 32) that divides `tokens`, repeated over as many frames as needed."""
  pt, ph, pw = patch
  side = 1
  while (2 * side) ** 2 <= tokens and 2 * side <= 32 // ph and tokens % ((2 * side) ** 2) == 0:
    side *= 2
  return tokens // (side * side) * pt, side * ph, side * pw


# ------------------------------------------------------------------------------------- FLOPs


@dataclasses.dataclass(frozen=True)
class Dims:
  """What the analytic FLOP count needs of a model."""

  width: int  # D.
  depth: int
  text_len: int  # S.
  patch_dim: int  # P.
  token_params: int  # Weight-matrix entries applied to every video token, all blocks.
  text_params: int  # Weight-matrix entries applied to every text token (text side), all blocks.

  def forward_flops(self, tokens: int) -> float:
    """2 per multiply-add of the matmuls; attention 4 L^2 D (self) + 4 L S D (cross) per block."""
    matmuls = 2 * tokens * self.token_params + 2 * self.text_len * self.text_params
    attention = self.depth * 4 * tokens * self.width * (tokens + self.text_len)
    return float(matmuls + attention)


def our_dims(cfg) -> Dims:
  d, f, e, p = cfg.width, cfg.mlp_hidden, cfg.text.width, cfg.patch_dim
  text_f = cfg.text.mlp_ratio * e
  # Per block: qkv 3D^2 + out D^2, cross q D^2 + out D^2, SwiGLU 3DF; patch embed + final proj.
  token = cfg.depth * (6 * d * d + 3 * d * f) + 2 * p * d
  # Per block cross kv 2D^2 (from the text projected to D); caption projection E->D->D; the
  # text encoder's layers (attention 4E^2 + gated MLP 3E F_text).
  text = cfg.depth * 2 * d * d + e * d + d * d + cfg.text.depth * (4 * e * e + 3 * e * text_f)
  return Dims(d, cfg.depth, cfg.text.max_length, p, int(token), int(text))


def wan_dims(d: int, depth: int, text_len: int, text_dim: int, ffn: int, patch_dim: int) -> Dims:
  # Per block: q, k, v, o 4D^2; cross q, o 2D^2; GELU MLP 2 D ffn. Text: embedder text_dim->D->D,
  # cross k, v 2D^2 per block (Wan projects the text to D once, before the blocks).
  token = depth * (6 * d * d + 2 * d * ffn) + 2 * patch_dim * d
  text = text_dim * d + d * d + depth * 2 * d * d
  return Dims(d, depth, text_len, patch_dim, token, text)


# ------------------------------------------------------------------------------------- peaks


def torch_sync(torch, device: str) -> Callable[[], None]:
  """Waits for the queued work of `device` (CUDA kernels run asynchronously; CPU ops do not)."""
  return torch.cuda.synchronize if device == "cuda" else (lambda: None)


class MatmulPeak:
  """Best FLOP/s of square matmuls in `dtype`: `jnp.dot` (jitted) and `torch.matmul`.

  Several sizes, because the best size differs between libraries (XLA:CPU's own dot ran
  1024^3 about 1.5-2x faster per FLOP than 4096^3 on the 2-core box; MKL is flat). `measure`
  runs the frameworks alternately; it is called before and after the model timings, and the
  best over all calls and sizes is the peak (on a shared machine a single burst may be unlucky).
  Inputs are random normal, never zeros: a GPU can multiply zeros faster than real data (less
  switching power, so higher clocks), which would inflate the peak.
  """

  def __init__(self, sizes: Sequence[int], torch=None, dtype: str = "float32",
               torch_device: str = "cpu"):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    self.sizes, self.torch = tuple(sizes), torch
    dot = jax.jit(jnp.dot)
    self.fns = {}
    for n in self.sizes:
      a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
      b = jax.random.normal(jax.random.key(1), (n, n), jnp.dtype(dtype))
      self.fns[("jax", n)] = functools.partial(lambda a, b: dot(a, b).block_until_ready(), a, b)
      if torch is not None:
        g = torch.Generator().manual_seed(0)
        ta, tb = (torch.randn(n, n, generator=g).to(torch_device, getattr(torch, dtype))
                  for _ in range(2))
        sync = torch_sync(torch, torch_device)
        self.fns[("torch", n)] = functools.partial(
            lambda a, b, sync: (torch.matmul(a, b), sync()), ta, tb, sync)
    for fn in self.fns.values():
      fn()  # Compile / first-touch outside the timings.
    self.times = {key: [] for key in self.fns}

  def measure(self, reps: int, settle_s: float) -> None:
    for _ in range(reps):
      for key, fn in self.fns.items():
        time.sleep(settle_s)
        self.times[key].append(reporting.timed(fn))

  def report(self) -> dict:
    out = {}
    for (who, n), times in self.times.items():
      rate = 2 * n ** 3 / (min(times) / 1e3)
      entry = out.setdefault(who, {"flop_per_s": 0.0, "by_size": {}})
      entry["by_size"][str(n)] = {"ms": reporting.stats(times), "flop_per_s": rate}
      if rate > entry["flop_per_s"]:
        entry["flop_per_s"], entry["n"] = rate, n
    return out


# -------------------------------------------------------------------------------------- ours


class JaxRunner:
  """Our DiT's fwd, fwd_bwd and train step at one latent shape, compiled once.

  Attributes:
    compile_s: seconds to trace, lower and compile each op.
    xla_flops: XLA's count of each op's floating-point work.
    ynn_fusions: how many of each op's kernels XLA:CPU handed to YNNPACK.
  """

  def __init__(self, model, params, tx, schedule, diffusion, latent_shape, ops, seed):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from spacetime_dit.diffusion import flow  # pylint: disable=g-import-not-at-top
    from spacetime_dit.training import state as state_lib  # pylint: disable=g-import-not-at-top
    from spacetime_dit.training import steps  # pylint: disable=g-import-not-at-top

    cfg = model.config
    rng = np.random.default_rng(seed)
    s = cfg.text.max_length
    self.x0 = jnp.asarray(rng.standard_normal(latent_shape), jnp.float32)
    noise = jnp.asarray(rng.standard_normal(latent_shape), jnp.float32)
    self.text_ids = jnp.asarray(rng.integers(1, cfg.text.vocab_size, (1, s)), jnp.int32)
    self.text_mask = jnp.ones((1, s), bool)  # Every text token valid, as Wan's unmasked input.
    self.t = jnp.full((1,), SIGMA, jnp.float32)
    self.x_t = flow.interpolate(self.x0, noise, self.t)
    self.target = flow.velocity_target(self.x0, noise)
    self.params = params
    channels = latent_shape[-1]
    self.frozen = {"latent_mean": jnp.zeros(channels), "latent_std": jnp.ones(channels)}
    self.batch = {"latent": self.x0, "text_ids": self.text_ids, "text_mask": self.text_mask}
    self.state = state_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=jax.tree.map(jnp.copy, params),
        opt_state=tx.init(params), rng=jax.random.PRNGKey(seed))

    def fwd(p, x_t, t, ids, mask):
      return model.apply({"params": p}, x_t, t, ids, mask)

    def fwd_bwd(p, x_t, t, ids, mask, target):
      def loss_fn(p):
        pred = fwd(p, x_t, t, ids, mask)
        return flow.flow_matching_loss(flow.to_velocity(pred, x_t, t, diffusion.prediction), target)
      return jax.value_and_grad(loss_fn)(p)

    step = functools.partial(steps.dit_step, model=model, autoencoder=None,
                             patch_size=cfg.patch_size, diffusion=diffusion, tx=tx,
                             schedule=schedule)
    args = {"fwd": (params, self.x_t, self.t, self.text_ids, self.text_mask),
            "fwd_bwd": (params, self.x_t, self.t, self.text_ids, self.text_mask, self.target),
            "step": (self.state, self.batch, self.frozen)}
    fns = {"fwd": (fwd, ()), "fwd_bwd": (fwd_bwd, ()), "step": (step, (0,))}
    self.compiled, self.compile_s, self.xla_flops, self.ynn_fusions = {}, {}, {}, {}
    for op in ops:
      fn, donate = fns[op]
      start = time.perf_counter()
      self.compiled[op] = jax.jit(fn, donate_argnums=donate).lower(*args[op]).compile()
      self.compile_s[op] = time.perf_counter() - start
      cost = self.compiled[op].cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      self.xla_flops[op] = float(cost.get("flops", float("nan")))
      self.ynn_fusions[op] = self.compiled[op].as_text().count('"kind":"__ynn_fusion"')
    self._args = args

  def run(self, op: str) -> None:
    """Runs `op` once and waits for its result."""
    import jax  # pylint: disable=g-import-not-at-top
    if op == "step":
      self.state, metrics = self.compiled[op](self.state, self.batch, self.frozen)
      jax.block_until_ready(metrics["loss"])
    else:
      jax.block_until_ready(self.compiled[op](*self._args[op]))


def build_ours(variant: str, depth: int | None, attention_impl: str | None, seed: int,
               remat: str | None = None, dtype: str | None = None):
  """(model, params, tx, schedule, diffusion config) of the variant with random weights.

  `attention_impl`, `remat` (a `DiTConfig.remat_policy`) and `dtype` (the compute dtype) override
  the variant's when given.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from experiments import base as base_experiment  # pylint: disable=g-import-not-at-top
  from spacetime_dit import config_types  # pylint: disable=g-import-not-at-top
  from spacetime_dit.models import dit as dit_lib  # pylint: disable=g-import-not-at-top
  from spacetime_dit.training import builders  # pylint: disable=g-import-not-at-top

  config = base_experiment.get_config(variant)
  if depth is not None:
    config.unlock()
    config.model.depth = depth
    config.lock()
  model, init_params, _ = builders.build_dit(config, latent_channels=16)
  overrides = {k: v for k, v in (("attention_impl", attention_impl), ("remat_policy", remat),
                                 ("dtype", dtype)) if v is not None}
  if overrides:
    # None changes the parameters (always float32): the variant's init gives the same tree.
    model = dit_lib.DiT(dataclasses.replace(model.config, **overrides))
  tx, schedule = builders.build_optimizer(config)
  diffusion = config_types.dataclass_from_config(config_types.DiffusionConfig, config.diffusion)
  # rbg keys: XLA:CPU compiles threefry draws of many new shapes slowly (training/state.py).
  params = nn.meta.unbox(jax.jit(init_params)(jax.random.key(seed, impl="rbg")))
  return model, params, tx, schedule, diffusion


# -------------------------------------------------------------------------------------- peer


def wan_config(cfg, ffn_dim: int | None) -> dict:
  """WanTransformer3DModel kwargs at our DiT's width, depth, heads, patch and text width."""
  return dict(patch_size=tuple(cfg.patch_size), num_attention_heads=cfg.num_heads,
              attention_head_dim=cfg.head_dim, in_channels=cfg.latent_channels,
              out_channels=cfg.latent_channels, text_dim=cfg.text.width,
              freq_dim=cfg.timestep_frequency_dim,
              ffn_dim=ffn_dim or (3 * cfg.mlp_hidden) // 2, num_layers=cfg.depth,
              cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
              image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024)


class TorchRunner:
  """diffusers.WanTransformer3DModel's fwd, fwd_bwd and AdamW step at one latent shape.

  Parameters and the optimizer stay float32; with dtype="bfloat16" the forward and loss run under
  `torch.autocast` (mixed precision, as our DiT computes in bf16 with float32 params).
  """

  def __init__(self, torch, diffusers, wan_kwargs: dict, latent_shape, text_len: int, seed: int,
               device: str = "cpu", dtype: str = "float32"):
    self.torch, self.device = torch, device
    self.autocast_dtype = None if dtype == "float32" else getattr(torch, dtype)
    self.sync = torch_sync(torch, device)
    torch.manual_seed(seed)
    self.model = diffusers.WanTransformer3DModel(**wan_kwargs).to(device)
    self.model.train()  # No dropout in Wan: train and eval modes compute the same.
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    b, t, h, w, c = latent_shape
    x0 = torch.randn(b, c, t, h, w, generator=g)
    noise = torch.randn(b, c, t, h, w, generator=g)
    self.ctx = torch.randn(b, text_len, wan_kwargs["text_dim"], generator=g).to(device)
    self.x_t = ((1 - SIGMA) * x0 + SIGMA * noise).to(device)
    self.target = (noise - x0).to(device)
    self.timestep = torch.full((b,), int(SIGMA * 1000), dtype=torch.long).to(device)
    self.num_params = sum(p.numel() for p in self.model.parameters())

  def _autocast(self):
    if self.autocast_dtype is None:
      return contextlib.nullcontext()
    return self.torch.autocast(self.device, dtype=self.autocast_dtype)

  def _loss(self):
    with self._autocast():
      pred = self.model(hidden_states=self.x_t, timestep=self.timestep,
                        encoder_hidden_states=self.ctx, return_dict=False)[0]
      return self.torch.nn.functional.mse_loss(pred.float(), self.target)

  def run(self, op: str) -> None:
    """Runs `op` once and waits for the device to finish it."""
    torch = self.torch
    if op == "fwd":
      with torch.inference_mode(), self._autocast():
        self.model(hidden_states=self.x_t, timestep=self.timestep,
                   encoder_hidden_states=self.ctx, return_dict=False)
    elif op == "fwd_bwd":
      self.model.zero_grad(set_to_none=True)
      self._loss().backward()
    else:
      self.opt.zero_grad(set_to_none=True)
      self._loss().backward()
      self.opt.step()
    self.sync()

  def count_flops(self, op: str) -> float:
    """Runs `op` once under torch's FLOP counter (matmuls and attention, 2 per multiply-add)."""
    from torch.utils import flop_counter  # pylint: disable=g-import-not-at-top
    counter = flop_counter.FlopCounterMode(display=False)
    with counter:
      self.run(op)
    return float(counter.get_total_flops())


# ------------------------------------------------------------------------------- breakdown


def _jax_parts(cfg, tokens: int, seed: int) -> dict:
  """Jitted fwd+bwd (gradient of sum(output) w.r.t. parameters and input) of one block's parts.

  self_attn: projections, QK-norm, rope and attention; attn_core: `dot_product_attention` alone;
  cross_attn: to S text tokens; mlp: the gated MLP; norms_mod: the block's three LayerNorms,
  two modulations and three residual adds (two gated), its sublayers replaced by identities.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from spacetime_dit.models import layers  # pylint: disable=g-import-not-at-top
  from spacetime_dit.models import patchify as patchify_lib  # pylint: disable=g-import-not-at-top

  d, n, k, s = cfg.width, cfg.num_heads, cfg.head_dim, cfg.text.max_length
  thw = latent_thw(tokens, cfg.patch_size)
  positions = patchify_lib.grid_positions(patchify_lib.patch_grid(thw, cfg.patch_size))
  keys = jax.random.split(jax.random.key(seed), 6)
  x = jax.random.normal(keys[0], (1, tokens, d))
  text = jax.random.normal(keys[1], (1, s, d))
  mask = jnp.ones((1, s), bool)
  mod = 0.1 * jax.random.normal(keys[2], (1, 1, 6, d))
  qkv = [jax.random.normal(kk, (1, tokens, n, k)) for kk in keys[3:]]

  def glue(x, mod):
    m = [mod[:, :, i] for i in range(6)]
    x = x + m[2] * layers.modulate(layers.layer_norm(x), m[0], m[1])
    x = x + layers.layer_norm(x)
    return x + m[5] * layers.modulate(layers.layer_norm(x), m[3], m[4])

  modules = {
      "self_attn": (layers.SelfAttention(n, k, qk_norm=cfg.qk_norm, rope_theta=cfg.rope_theta,
                                         attention_impl=cfg.attention_impl),
                    lambda m, p, x: m.apply({"params": p}, x, positions)),
      "cross_attn": (layers.CrossAttention(n, k, qk_norm=cfg.qk_norm,
                                           attention_impl=cfg.attention_impl),
                     lambda m, p, x: m.apply({"params": p}, x, text, mask)),
      "mlp": (layers.GatedMLP(cfg.mlp_hidden, cfg.mlp_activation),
              lambda m, p, x: m.apply({"params": p}, x)),
  }
  fns = {}
  for name, (module, apply) in modules.items():
    init_args = {"self_attn": (x, positions), "cross_attn": (x, text, mask)}.get(name, (x,))
    init = jax.jit(module.init)(jax.random.key(seed, impl="rbg"), *init_args)
    params = nn.meta.unbox(init["params"])
    grad = jax.jit(jax.grad(lambda p, x, m=module, a=apply: a(m, p, x).sum(), argnums=(0, 1)))
    fns[name] = functools.partial(grad, params, x)
  core = jax.jit(jax.grad(lambda q, kk, v: layers.dot_product_attention(
      q, kk, v, impl=cfg.attention_impl).sum(), argnums=(0, 1, 2)))
  fns["attn_core"] = functools.partial(core, *qkv)
  glue_grad = jax.jit(jax.grad(lambda x, m: glue(x, m).sum(), argnums=(0, 1)))
  fns["norms_mod"] = functools.partial(glue_grad, x, mod)
  for fn in fns.values():
    jax.block_until_ready(fn())  # Compile outside the timings.
  return {name: (lambda fn=fn: jax.block_until_ready(fn())) for name, fn in fns.items()}


def _torch_parts(torch, wan, tokens: int, thw, text_len: int, seed: int) -> dict:
  """The same parts of Wan's first block, fwd+bwd of sum(output) (parameter and input grads)."""
  block, d = wan.blocks[0], wan.config.num_attention_heads * wan.config.attention_head_dim
  n, k = wan.config.num_attention_heads, wan.config.attention_head_dim
  g = torch.Generator().manual_seed(seed)
  t, h, w = thw
  rotary = wan.rope(torch.zeros(1, wan.config.in_channels, t, h, w))
  x = torch.randn(1, tokens, d, generator=g, requires_grad=True)
  text = torch.randn(1, text_len, d, generator=g)
  temb = 0.1 * torch.randn(1, 6, d, generator=g)
  qkv = [torch.randn(1, n, tokens, k, generator=g, requires_grad=True) for _ in range(3)]

  def glue():
    shift, scale, gate, c_shift, c_scale, c_gate = (block.scale_shift_table + temb).chunk(6, dim=1)
    y = x + gate * (block.norm1(x) * (1 + scale) + shift)
    y = y + block.norm2(y)
    return y + c_gate * (block.norm3(y) * (1 + c_scale) + c_shift)

  outs = {
      "self_attn": lambda: block.attn1(x, None, None, rotary),
      "attn_core": lambda: torch.nn.functional.scaled_dot_product_attention(*qkv),
      "cross_attn": lambda: block.attn2(x, text, None, None),
      "mlp": lambda: block.ffn(x),
      "norms_mod": glue,
  }

  def run(out_fn):
    block.zero_grad(set_to_none=True)
    for tensor in (x, *qkv):
      tensor.grad = None
    out_fn().sum().backward()

  return {name: functools.partial(run, fn) for name, fn in outs.items()}


def breakdown(cfg, torch, wan, tokens: int, reps: int, settle_s: float, seed: int) -> dict:
  """Median ms of each part's fwd+bwd, ours and Wan's alternately, with ratio torch / ours."""
  thw = latent_thw(tokens, cfg.patch_size)
  runners = {"jax": _jax_parts(cfg, tokens, seed)}
  if torch is not None:
    runners["torch"] = _torch_parts(torch, wan, tokens, thw, cfg.text.max_length, seed)
  out = {}
  for name in PARTS:
    times = {who: [] for who in runners}
    for who in runners:
      runners[who][name]()  # Warm-up.
    for rep in range(reps):
      for who in (list(runners) if rep % 2 == 0 else list(runners)[::-1]):
        time.sleep(settle_s)
        times[who].append(reporting.timed(runners[who][name]))
    out[name] = {who: reporting.stats(t) for who, t in times.items()}
    if torch is not None:
      out[name]["ratio_median"] = out[name]["torch"]["median"] / out[name]["jax"]["median"]
  return out


# ----------------------------------------------------------------------------------- the run


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """One benchmark run; see the flags for each field."""

  variant: str = "s"
  tokens: tuple[int, ...] = (256, 1024)
  depth: int | None = None
  ops: tuple[str, ...] = OPS
  reps: int = 3
  warmup: int = 1
  settle_s: float = 0.2
  peer: bool = True
  torch_threads: int | None = None
  matmul_sizes: tuple[int, ...] = (1024, 2048, 4096)
  matmul_reps: int = 3
  xla_cpu_ynn: str = "off"
  wan_ffn_dim: int | None = None
  attention_impl: str | None = None
  remat: str | None = None
  malloc: str = "default"
  breakdown: bool = False
  seed: int = 0
  dtype: str = "float32"
  torch_device: str = "auto"

  def __post_init__(self):
    bad = [o for o in self.ops if o not in OPS]
    if bad or not self.ops:
      raise ValueError(f"ops={list(self.ops)} must be a non-empty subset of {OPS}; {bad} are not.")
    if not self.tokens or min(self.tokens) < 1:
      raise ValueError(f"tokens={list(self.tokens)} must be a non-empty list of positive ints.")
    if self.reps < 1 or self.warmup < 0:
      raise ValueError(f"reps={self.reps} must be >= 1 and warmup={self.warmup} >= 0.")
    if self.depth is not None and self.depth < 1:
      raise ValueError(f"depth={self.depth} must be >= 1 (or unset for the variant's).")
    if self.dtype not in DTYPES or self.torch_device not in TORCH_DEVICES:
      raise ValueError(f"dtype={self.dtype!r} must be one of {DTYPES} and torch_device="
                       f"{self.torch_device!r} one of {TORCH_DEVICES}.")
    if self.attention_impl == "cudnn" and self.dtype != "bfloat16":
      raise ValueError("attention_impl='cudnn' runs bf16 only (cuDNN flash attention); add "
                       "--dtype=bfloat16.")


def _load() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def resolve_torch_device(requested: str, jax_backend: str, torch) -> str:
  """The peer's device: `requested`, or for "auto" cuda when JAX runs on a GPU and torch has CUDA.

  Both frameworks on the same kind of device, so the ratio compares implementations, not chips.
  """
  if requested != "auto":
    return requested
  return "cuda" if jax_backend == "gpu" and torch.cuda.is_available() else "cpu"


def run_benchmark(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict:
  """Times every (tokens, op) of ours and, when available, Wan's; returns the report."""
  import jax  # pylint: disable=g-import-not-at-top
  from spacetime_dit.models import dit as dit_lib  # pylint: disable=g-import-not-at-top

  load_start = _load()
  cores = len(os.sched_getaffinity(0))
  torch = diffusers = None
  peer_missing = None
  if cfg.peer:
    try:
      torch, diffusers = _import_peer()
    except ImportError as e:
      peer_missing = str(e)
      log(peer_missing)
  backend = jax.default_backend()
  torch_device = None
  if torch is not None:
    torch.set_num_threads(cfg.torch_threads or cores)
    torch_device = resolve_torch_device(cfg.torch_device, backend, torch)
    if torch_device == "cuda" and cfg.breakdown:
      raise ValueError("--breakdown builds its block inputs on the CPU; run it with "
                       "--torch_device=cpu on a CPU, or drop --breakdown.")

  log(f"building ours: variant {cfg.variant}" + (f", depth {cfg.depth}" if cfg.depth else "") +
      f", {cfg.dtype} on {backend} ({jax.devices()[0].device_kind}); Wan on {torch_device}")
  model, params, tx, schedule, diffusion = build_ours(
      cfg.variant, cfg.depth, cfg.attention_impl, cfg.seed, cfg.remat,
      None if cfg.dtype == "float32" else cfg.dtype)
  mcfg = model.config
  ours_dims = our_dims(mcfg)
  wan_kwargs = wan_config(mcfg, cfg.wan_ffn_dim)
  peer_dims = wan_dims(mcfg.width, mcfg.depth, mcfg.text.max_length, mcfg.text.width,
                       wan_kwargs["ffn_dim"], mcfg.patch_dim)

  log(f"matmul peaks ({cfg.dtype}, sides {list(cfg.matmul_sizes)}, {cfg.matmul_reps} each, "
      f"before and after the models)")
  peak = MatmulPeak(cfg.matmul_sizes, torch, cfg.dtype, torch_device or "cpu")
  peak.measure(cfg.matmul_reps, cfg.settle_s)
  peaks = peak.report()
  for who, p in peaks.items():
    log(f"  {who}: {p['flop_per_s'] / 1e9:.1f} GFLOP/s (side {p['n']})")

  results, wan_params, parts = [], None, {}
  for tokens in cfg.tokens:
    thw = latent_thw(tokens, mcfg.patch_size)
    latent_shape = (1, *thw, mcfg.latent_channels)
    if dit_lib.num_tokens(mcfg, thw) != tokens:
      raise RuntimeError(
          f"latent {thw} gives {dit_lib.num_tokens(mcfg, thw)} tokens, not {tokens}.")
    log(f"L={tokens}: latent (T, H, W)={thw}; compiling ours")
    ours = JaxRunner(model, params, tx, schedule, diffusion, latent_shape, cfg.ops, cfg.seed)
    peer = None
    if torch is not None:
      peer = TorchRunner(torch, diffusers, wan_kwargs, latent_shape, mcfg.text.max_length, cfg.seed,
                         torch_device, cfg.dtype)
      wan_params = peer.num_params
    for op in cfg.ops:
      log(f"L={tokens}: timing {op}")
      # The peer's first warm-up run also counts its FLOPs (None without warm-up).
      torch_flops = peer.count_flops(op) if peer is not None and cfg.warmup else None
      for i in range(cfg.warmup):
        if i and peer is not None:
          peer.run(op)
        ours.run(op)
      times = {"jax": [], "torch": []}
      loads = []
      runners = {"jax": ours} if peer is None else {"jax": ours, "torch": peer}
      for rep in range(cfg.reps):
        # Swap who goes first on every repetition, so neither always runs right after the other.
        order = list(runners) if rep % 2 == 0 else list(runners)[::-1]
        for who in order:
          time.sleep(cfg.settle_s)
          times[who].append(reporting.timed(functools.partial(runners[who].run, op)))
        loads.append(os.getloadavg()[0])
      factor = 1 if op == "fwd" else 3  # backward = 2 forwards of matmul work.
      row = {"tokens": tokens, "latent_thw": list(thw), "op": op,
             "load1_during": [round(x, 2) for x in loads]}
      for who, dims, xla_or_torch in (("jax", ours_dims, ours.xla_flops[op]),
                                      ("torch", peer_dims, torch_flops)):
        if not times[who]:
          continue
        st = reporting.stats(times[who])
        model_flops = factor * dims.forward_flops(tokens)
        rate = model_flops / (st["median"] / 1e3)
        row[who] = {
            "ms": st,
            "tokens_per_s": tokens / (st["median"] / 1e3),
            "model_flops": model_flops,
            "model_flop_per_s": rate,
            "counted_flops": xla_or_torch,  # XLA cost_analysis (jax) / FlopCounterMode (torch).
            "counted_flop_per_s": xla_or_torch and xla_or_torch / (st["median"] / 1e3),
        }
      row["jax"]["compile_s"] = ours.compile_s[op]
      row["jax"]["ynn_fusions"] = ours.ynn_fusions[op]
      if "torch" in row:
        row["ratio_median"] = row["torch"]["ms"]["median"] / row["jax"]["ms"]["median"]
        row["ratio_min"] = row["torch"]["ms"]["min"] / row["jax"]["ms"]["min"]
      results.append(row)
    if cfg.breakdown:
      log(f"L={tokens}: timing one block's parts")
      parts[str(tokens)] = breakdown(mcfg, torch, peer and peer.model, tokens, cfg.reps,
                                     cfg.settle_s, cfg.seed)
    del ours, peer

  peak.measure(cfg.matmul_reps, cfg.settle_s)
  peaks = peak.report()
  for row in results:
    for who in ("jax", "torch"):
      if who in row:
        row[who]["mfu"] = row[who]["model_flop_per_s"] / peaks[who]["flop_per_s"]
  return {
      "variant": cfg.variant,
      "dtype": cfg.dtype,
      "device": {"jax_backend": backend, "jax_device_kind": jax.devices()[0].device_kind,
                 "torch_device": torch_device,
                 "torch_device_name": (torch.cuda.get_device_name() if torch_device == "cuda"
                                       else None)},
      "config": dataclasses.asdict(cfg),
      "ours_model": {"width": mcfg.width, "depth": mcfg.depth, "num_heads": mcfg.num_heads,
                     "head_dim": mcfg.head_dim, "mlp_hidden": mcfg.mlp_hidden,
                     "mlp_activation": mcfg.mlp_activation, "patch_size": list(mcfg.patch_size),
                     "latent_channels": mcfg.latent_channels, "text_len": mcfg.text.max_length,
                     "text_width": mcfg.text.width, "text_depth": mcfg.text.depth,
                     "attention_impl": mcfg.attention_impl, "dtype": mcfg.dtype,
                     "remat_policy": mcfg.remat_policy, "scan_blocks": mcfg.scan_blocks},
      "wan_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in wan_kwargs.items()},
      "params": {"ours": sum(int(x.size) for x in jax.tree.leaves(params)), "wan": wan_params},
      "analytic_dims": {"ours": dataclasses.asdict(ours_dims),
                        "wan": dataclasses.asdict(peer_dims)},
      "mfu_basis": "analytic model FLOPs (2 per weight multiply-add on video and text tokens + "
                   "attention 4 L^2 D + 4 L S D per block; x3 for fwd_bwd and step) / median time "
                   f"/ the framework's own {cfg.dtype} matmul peak on the same device",
      "mismatches": [
          "MLP: ours SwiGLU (3 matrices, hidden F); Wan GELU-tanh (2 matrices) with ffn_dim "
          f"{wan_kwargs['ffn_dim']} (3F/2 by default: equal MLP FLOPs and parameters).",
          "Text: ours encodes token ids with its own text encoder (depth "
          f"{mcfg.text.depth}, width {mcfg.text.width}, vocab {mcfg.text.vocab_size}) then "
          "projects E->D->D; Wan takes given text features (B, S, text_dim) and projects them "
          "text_dim->D->D. The text encoder's FLOPs are counted in ours.",
          "Cross-attention: ours projects keys/values from the projected text in every block as "
          "Wan does; ours is not modulated and has no norm on its input beyond LayerNorm "
          "(Wan: cross_attn_norm LayerNorm with affine).",
          "QK-norm: ours RMSNorm per head; Wan rms_norm_across_heads.",
          "Biases: Wan's linears have biases, ours have none.",
          f"Remat: ours remat_policy={mcfg.remat_policy!r} ('none' stores every activation as "
          "Wan does by default; 'full' recomputes each block's forward in the backward).",
          "Step: ours clips the global gradient norm and follows the variant's warmup-cosine "
          "schedule, samples timesteps and caption dropout (steps.dit_step); Wan: AdamW at a "
          "fixed lr on a fixed sigma.",
      ],
      "matmul_peak": peaks,
      "threads": {"torch": torch.get_num_threads() if torch is not None else None,
                  "jax_xla_cpu": cores, "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
                  "malloc": cfg.malloc},
      "load_average": {"start": load_start, "end": _load()},
      "versions": {"jax": jax.__version__,
                   "torch": torch.__version__ if torch is not None else None,
                   "diffusers": diffusers.__version__ if diffusers is not None else None},
      "peer_missing": peer_missing,
      "results": results,
      "breakdown_fwd_bwd_ms": parts,
  }


def format_table(report: dict) -> str:
  """The report as a plain-text table."""
  m, peaks = report["ours_model"], report["matmul_peak"]
  peak_txt = ", ".join(f"{w} {p['flop_per_s'] / 1e9:.1f} (side {p['n']})" for w, p in peaks.items())
  dev = report["device"]
  lines = [
      f"variant {report['variant']}: width {m['width']}, depth {m['depth']}, heads "
      f"{m['num_heads']}, patch {tuple(m['patch_size'])}, text {m['text_len']} tokens, "
      f"{report['dtype']}, batch 1; params ours {report['params']['ours']:,}, Wan "
      f"{report['params']['wan'] and format(report['params']['wan'], ',')}",
      f"devices: ours {dev['jax_backend']} ({dev['jax_device_kind']}), Wan "
      f"{dev['torch_device_name'] or dev['torch_device']}",
      f"matmul peak GFLOP/s: {peak_txt}; threads torch {report['threads']['torch']}, XLA:CPU "
      f"{report['threads']['jax_xla_cpu']}; load {report['load_average']}; XLA_FLAGS "
      f"{report['threads']['XLA_FLAGS'] or '(none)'}; malloc {report['threads']['malloc']}",
      f"ours: attention_impl {m['attention_impl']}, remat_policy {m['remat_policy']}, "
      f"scan_blocks {m['scan_blocks']}",
      "MFU: analytic model FLOPs / median time / each framework's own peak; ratio = torch / ours "
      "(> 1: ours faster)",
      "",
      f"{'L':>6} {'op':<8} {'ours ms':>9} {'(min)':>8} {'tok/s':>8} {'GFLOP/s':>8} {'MFU':>6} "
      f"{'XLA GF/s':>9} {'Wan ms':>9} {'(min)':>8} {'GFLOP/s':>8} {'MFU':>6} {'ratio':>6} "
      f"{'(min)':>6}",
  ]
  for r in report["results"]:
    j, t = r["jax"], r.get("torch")
    line = (f"{r['tokens']:>6} {r['op']:<8} {j['ms']['median']:>9.1f} {j['ms']['min']:>8.1f} "
            f"{j['tokens_per_s']:>8.0f} {j['model_flop_per_s'] / 1e9:>8.1f} {j['mfu']:>6.1%} "
            f"{j['counted_flop_per_s'] / 1e9:>9.1f}")
    if t:
      line += (f" {t['ms']['median']:>9.1f} {t['ms']['min']:>8.1f} "
               f"{t['model_flop_per_s'] / 1e9:>8.1f} {t['mfu']:>6.1%} {r['ratio_median']:>6.2f} "
               f"{r['ratio_min']:>6.2f}")
    lines.append(line)
  for tokens, part in report["breakdown_fwd_bwd_ms"].items():
    lines += ["", f"L={tokens}: one block's parts, fwd+bwd median ms (ours / Wan / ratio)"]
    for name, st in part.items():
      wan = st.get("torch")
      lines.append(f"  {name:<11} {st['jax']['median']:>8.1f}" + (
          f" {wan['median']:>8.1f} {st['ratio_median']:>6.2f}" if wan else ""))
  if report["peer_missing"]:
    lines += ["", report["peer_missing"]]
  return "\n".join(lines)


def main(argv):
  del argv
  # XLA reads its flags when the CPU backend starts, at the first jax call below. A YNNPACK
  # setting already in XLA_FLAGS wins, as in spacetime_dit.cli.
  if _MALLOC.value == "reuse" and not reuse_freed_memory():
    raise RuntimeError("--malloc=reuse needs glibc's mallopt (libc.so.6); run with --malloc=default.")
  flag = YNN_MODES[_YNN.value]
  flags_now = os.environ.get("XLA_FLAGS", "")
  if flag and "xla_cpu_experimental_ynn_fusion_type" not in flags_now:
    os.environ["XLA_FLAGS"] = f"{flags_now} {flag}".strip()
  cfg = BenchConfig(variant=_VARIANT.value, tokens=tuple(int(n) for n in _TOKENS.value),
                    depth=_DEPTH.value, ops=tuple(_OPS.value), reps=_REPS.value,
                    warmup=_WARMUP.value, settle_s=_SETTLE.value, peer=_PEER.value,
                    torch_threads=_TORCH_THREADS.value,
                    matmul_sizes=tuple(int(n) for n in _MATMUL_SIZES.value),
                    matmul_reps=_MATMUL_REPS.value, xla_cpu_ynn=_YNN.value,
                    wan_ffn_dim=_WAN_FFN.value,
                    attention_impl=_ATTN.value, remat=_REMAT.value, malloc=_MALLOC.value,
                    breakdown=_BREAKDOWN.value, seed=_SEED.value, dtype=_DTYPE.value,
                    torch_device=_TORCH_DEVICE.value)
  report = run_benchmark(cfg)
  print(format_table(report))
  if _OUT.value:
    reporting.write_json(_OUT.value, report)


if __name__ == "__main__":
  define_flags()
  app.run(main)
