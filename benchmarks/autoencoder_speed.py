"""Speed of our causal VAE against diffusers' Wan 2.1 VAE, on the same CPU, in one run.

  python -m benchmarks.autoencoder_speed --size=S --reps=5 --out=autoencoder_speed.json
  python -m benchmarks.autoencoder_speed --conv_impls=stacked2d,conv3d,taps2d --reps=3

Times `CausalVideoAutoencoder` (ours, JAX) and `diffusers.AutoencoderKLWan` (PyTorch, random
weights from `torch.manual_seed`, nothing downloaded) at the same channels, factors and input:
base 32 channels, multipliers (1, 2, 4, 4), one residual block per level, 16 latent channels,
4x temporal and 8x spatial compression, float32, batch 1. Three operations:
  encode  video -> posterior mean;
  decode  latent -> video;
  train   encode -> posterior sample -> decode -> MSE + 1e-6 KL, backward, AdamW update
          (ours: one jitted step with the parameters and optimizer state donated; Wan:
          torch.optim.AdamW).
Repetitions alternate between the frameworks (and swap which goes first each time), so a
change in load on a shared machine hits both; median and min are reported, and the ratio
torch_ms / jax_ms (> 1: ours is faster). Compile time (trace + lower + compile) is excluded
from benchmarks import reporting
from the timings and reported on its own. The architectures are not identical (Wan's decoder
has one more residual block per level and an attention block in its middle), so parameter
counts are printed too.

Needs PyTorch and diffusers: `pip install -e ".[bench]"`.
"""

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Sequence

from absl import app
from absl import flags

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from spacetime_dit.models import autoencoder as ae
from spacetime_dit.models import conv3d

# Video (T, H, W) per size; the latent is (1 + (T-1)/4, H/8, W/8) with 16 channels.
SIZES = {"S": (17, 128, 128), "M": (17, 256, 256)}
OPS = ("encode", "decode", "train")
# diffusers.AutoencoderKLWan at our `cpu`-scale channels: attn_scales=[] drops the per-level
# attention (ours has none); temperal_downsample (sic) halves time on the two lowest levels.
WAN_CONFIG = dict(base_dim=32, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                  temperal_downsample=[False, True, True], dropout=0.0)
OUR_CONFIG = dict(base_channels=32, latent_channels=16, channel_multipliers=(1, 2, 4, 4),
                  num_res_blocks=1, temporal_factor=4, spatial_factor=8)
# An empty list turns off every YNNPACK fusion of XLA:CPU; "-individual_convolution" alone
# would still leave convolutions that are fused with a following norm on YNNPACK.
NO_YNN = "--xla_cpu_experimental_ynn_fusion_type="
KL_WEIGHT = 1e-6
LEARNING_RATE = 1e-4

_SIZE = flags.DEFINE_enum("size", "S", list(SIZES), "S: 1x3x17x128x128; M: 1x3x17x256x256.")
_CONV_IMPLS = flags.DEFINE_list(
    "conv_impls", ["stacked2d"],
    f"Our causal conv implementations to time, of {conv3d.CONV_IMPLS}; they share one set of "
    "parameters.")
_OPS = flags.DEFINE_list("ops", list(OPS), f"Operations to time, of {OPS}.")
_REPS = flags.DEFINE_integer("reps", 5, "Timed repetitions of each operation per framework.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed runs of each operation before timing.")
_SETTLE = flags.DEFINE_float(
    "settle_s", 0.2, "Pause between runs, so the other framework's spinning worker threads sleep.")
_TORCH_THREADS = flags.DEFINE_integer(
    "torch_threads", None, "torch.set_num_threads; default: torch's own (the usable cores).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the input video and both models' weights.")
_OUT = flags.DEFINE_string("out", None, "Also write the results here as JSON.")
_YNN = flags.DEFINE_bool(
    "xla_cpu_ynn", True,
    "Let XLA:CPU hand convolutions (and the norms fused into them) to YNNPACK, its default in "
    f"jax 0.10. False adds {NO_YNN} to XLA_FLAGS: YNNPACK runs the kernel-gradient "
    "convolutions of the train step several times slower than XLA's own (Eigen) ones.")


def _import_peer():
  """Imports torch and diffusers, or raises an error that names the install command."""
  try:
    import diffusers  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"benchmarks.autoencoder_speed compares against diffusers.AutoencoderKLWan and needs "
        f"PyTorch and diffusers ({e}). Install them with: pip install -e \".[bench]\"") from e
  return torch, diffusers



# ----------------------------------------------------------------------------------------- ours


class JaxRunner:
  """Our autoencoder's encode, decode and train step, compiled once for one conv impl.

  Attributes:
    compile_s: seconds to trace, lower and compile each operation.
    gflop: XLA's count of each operation's floating-point work, in GFLOP.
    ynn_fusions: how many of each operation's kernels XLA:CPU handed to YNNPACK.
  """

  def __init__(self, impl: str, params, video_bthwc: jax.Array, latent_bthwc: jax.Array,
               ops: Sequence[str], seed: int):
    self.model = ae.CausalVideoAutoencoder(ae.AutoencoderConfig(**OUR_CONFIG, conv_impl=impl))
    self.video_bthwc, self.latent_bthwc = video_bthwc, latent_bthwc
    self.params = params
    self.tx = optax.adamw(LEARNING_RATE, weight_decay=0.0)
    # A copy per runner: the train step donates (and so invalidates) the buffers it is given.
    self.state = (jax.tree.map(jnp.copy, params), self.tx.init(params))
    self.rng = jax.random.key(seed)
    self.calls = 0
    self.compiled, self.compile_s, self.gflop, self.ynn_fusions = {}, {}, {}, {}
    args = {"encode": (params, video_bthwc), "decode": (params, latent_bthwc),
            "train": (*self.state, video_bthwc, self.rng)}
    fns = {"encode": (self._encode, ()), "decode": (self._decode, ()),
           "train": (self._train_step, (0, 1))}
    for op in ops:
      fn, donate = fns[op]
      start = time.perf_counter()
      self.compiled[op] = jax.jit(fn, donate_argnums=donate).lower(*args[op]).compile()
      self.compile_s[op] = time.perf_counter() - start
      self.gflop[op] = self.compiled[op].cost_analysis().get("flops", float("nan")) / 1e9
      self.ynn_fusions[op] = self.compiled[op].as_text().count('"kind":"__ynn_fusion"')

  def _encode(self, params, video_bthwc):
    return self.model.apply({"params": params}, video_bthwc, method="encode")[0]

  def _decode(self, params, latent_bthwc):
    return self.model.apply({"params": params}, latent_bthwc, method="decode")

  def _train_step(self, params, opt_state, video_bthwc, rng):
    def loss_fn(p):
      recon_bthwc, mean_bthwc, logvar_bthwc = self.model.apply(
          {"params": p}, video_bthwc, sample_posterior=True, rngs={"sample": rng})
      kl = jnp.mean(ae.gaussian_kl(mean_bthwc, logvar_bthwc))
      return jnp.mean(jnp.square(recon_bthwc - video_bthwc)) + KL_WEIGHT * kl

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = self.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def run(self, op: str) -> None:
    """Runs `op` once and waits for its result."""
    if op == "encode":
      self.compiled[op](self.params, self.video_bthwc).block_until_ready()
    elif op == "decode":
      self.compiled[op](self.params, self.latent_bthwc).block_until_ready()
    else:
      self.calls += 1
      rng = jax.random.fold_in(self.rng, self.calls)
      params, opt_state, loss = self.compiled[op](*self.state, self.video_bthwc, rng)
      loss.block_until_ready()
      self.state = (params, opt_state)


def init_ours(video_bthwc: jax.Array, seed: int):
  """Random parameters of our autoencoder (the same for every conv impl) and its latent shape."""
  model = ae.CausalVideoAutoencoder(ae.AutoencoderConfig(**OUR_CONFIG))
  # Parameter shapes do not depend on the input size, so a one-frame 8x8 video initialises
  # them without spending a full-size forward pass.
  tiny_bthwc = jnp.zeros((1, 1, 8, 8, 3), jnp.float32)
  init = jax.jit(lambda k: model.init({"params": k, "sample": k}, tiny_bthwc,
                                      sample_posterior=False)["params"])
  params = nn.unbox(init(jax.random.key(seed)))
  t, h, w = ae.latent_shape(model.config, *video_bthwc.shape[1:4])
  return params, (video_bthwc.shape[0], t, h, w, model.config.latent_channels)


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------------- peer


class TorchRunner:
  """diffusers.AutoencoderKLWan's encode, decode and train step on the same input."""

  def __init__(self, video_bcthw: np.ndarray, seed: int):
    torch, diffusers = _import_peer()
    self.torch = torch
    torch.manual_seed(seed)
    self.vae = diffusers.AutoencoderKLWan(**WAN_CONFIG)
    self.vae.train()  # dropout is 0 and there is no batch norm: train and eval modes agree.
    self.opt = torch.optim.AdamW(self.vae.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    self.video = torch.from_numpy(video_bcthw)
    with torch.inference_mode():
      self.latent = self.vae.encode(self.video).latent_dist.mode().clone()

  def param_counts(self) -> dict:
    def count(*modules):
      return sum(p.numel() for m in modules for p in m.parameters())
    return {"total": count(self.vae),
            "encoder": count(self.vae.encoder, self.vae.quant_conv),
            "decoder": count(self.vae.decoder, self.vae.post_quant_conv)}

  def count_gflop(self, op: str) -> float:
    """Runs `op` once under torch's FLOP counter (convs and matmuls, 2 per multiply-add)."""
    from torch.utils import flop_counter  # pylint: disable=g-import-not-at-top
    counter = flop_counter.FlopCounterMode(display=False)
    with counter:
      self.run(op)
    return counter.get_total_flops() / 1e9

  def run(self, op: str) -> None:
    """Runs `op` once (torch CPU ops are synchronous)."""
    torch, vae = self.torch, self.vae
    if op == "encode":
      with torch.inference_mode():
        vae.encode(self.video).latent_dist.mode()
    elif op == "decode":
      with torch.inference_mode():
        vae.decode(self.latent).sample
    else:
      self.opt.zero_grad(set_to_none=True)
      posterior = vae.encode(self.video).latent_dist
      recon = vae.decode(posterior.sample()).sample
      loss = torch.nn.functional.mse_loss(recon, self.video) + KL_WEIGHT * posterior.kl().mean()
      loss.backward()
      self.opt.step()


# ------------------------------------------------------------------------------------ the run


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """One benchmark run; see the flags for each field."""

  size: str = "S"
  conv_impls: tuple[str, ...] = ("stacked2d",)
  ops: tuple[str, ...] = OPS
  reps: int = 5
  warmup: int = 1
  settle_s: float = 0.2
  torch_threads: int | None = None
  seed: int = 0

  def __post_init__(self):
    if self.size not in SIZES:
      raise ValueError(f"size={self.size!r} is not one of {list(SIZES)}.")
    bad = [i for i in self.conv_impls if i not in conv3d.CONV_IMPLS]
    if bad or not self.conv_impls:
      raise ValueError(f"conv_impls={list(self.conv_impls)} must be a non-empty subset of "
                       f"{conv3d.CONV_IMPLS}; {bad} are not.")
    bad = [o for o in self.ops if o not in OPS]
    if bad or not self.ops:
      raise ValueError(f"ops={list(self.ops)} must be a non-empty subset of {OPS}; {bad} are not.")
    if self.reps < 1 or self.warmup < 0:
      raise ValueError(f"reps={self.reps} must be >= 1 and warmup={self.warmup} >= 0.")


def run_benchmark(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict:
  """Times every (op, impl) against the peer, alternating frameworks; returns the report."""
  torch, diffusers = _import_peer()
  if cfg.torch_threads:
    torch.set_num_threads(cfg.torch_threads)
  frames, height, width = SIZES[cfg.size]
  video_bthwc = np.random.default_rng(cfg.seed).uniform(
      -1, 1, (1, frames, height, width, 3)).astype(np.float32)

  log(f"building diffusers.AutoencoderKLWan (torch {torch.__version__}, "
      f"{torch.get_num_threads()} threads)")
  peer = TorchRunner(np.ascontiguousarray(video_bthwc.transpose(0, 4, 1, 2, 3)), cfg.seed)
  video_j = jnp.asarray(video_bthwc)
  params, latent_shape = init_ours(video_j, cfg.seed)
  latent_j = jnp.asarray(np.random.default_rng(cfg.seed + 1).standard_normal(latent_shape),
                         jnp.float32)
  if tuple(peer.latent.shape) != (latent_shape[0], latent_shape[4], *latent_shape[1:4]):
    raise RuntimeError(f"latent shapes differ: ours {latent_shape} (BTHWC), Wan "
                       f"{tuple(peer.latent.shape)} (BCTHW); the configs no longer match.")
  runners = {}
  for impl in cfg.conv_impls:
    log(f"compiling ours with conv_impl={impl}")
    runners[impl] = JaxRunner(impl, params, video_j, latent_j, cfg.ops, cfg.seed)

  results = []
  for op in cfg.ops:
    log(f"timing {op}")
    # The first warm-up run of the peer also counts its FLOPs: the architectures differ, so
    # the work per operation differs too (None with --warmup=0: no untimed run to count on).
    peer_gflop = peer.count_gflop(op) if cfg.warmup else None
    for i in range(cfg.warmup):
      if i:
        peer.run(op)
      for runner in runners.values():
        runner.run(op)
    jax_ms = {impl: [] for impl in runners}
    torch_ms = []
    for rep in range(cfg.reps):
      # Swap who goes first on every repetition, so neither always runs right after the other.
      order = ["torch", *runners] if rep % 2 else [*runners, "torch"]
      for who in order:
        time.sleep(cfg.settle_s)
        runner = peer if who == "torch" else runners[who]
        elapsed_ms = reporting.timed(functools.partial(runner.run, op))
        (torch_ms if who == "torch" else jax_ms[who]).append(elapsed_ms)
    peer_stats = reporting.stats(torch_ms)
    for impl, times in jax_ms.items():
      ours = reporting.stats(times)
      results.append({
          "op": op, "conv_impl": impl, "jax_ms": ours, "torch_ms": peer_stats,
          "ratio_median": peer_stats["median"] / ours["median"],
          "ratio_min": peer_stats["min"] / ours["min"],
          "jax_compile_s": runners[impl].compile_s[op],
          "jax_ynn_fusions": runners[impl].ynn_fusions[op],
          # Work per op (the models differ) and the rate at the median time, against the
          # CPU's peak (about 78 GFLOP/s per core on the 2-core dev box).
          "jax_gflop": runners[impl].gflop[op],
          "jax_gflop_per_s": runners[impl].gflop[op] / ours["median"] * 1e3,
          "torch_gflop": peer_gflop,
          "torch_gflop_per_s": peer_gflop and peer_gflop / peer_stats["median"] * 1e3})

  fastest = {op: min((r for r in results if r["op"] == op), key=lambda r: r["jax_ms"]["median"])
             ["conv_impl"] for op in cfg.ops}
  return {
      "size": cfg.size,
      "video_shape_bcthw": [1, 3, frames, height, width],
      "latent_shape_bcthw": list(peer.latent.shape),
      "config": dataclasses.asdict(cfg),
      "ours_config": OUR_CONFIG, "wan_config": WAN_CONFIG,
      "params": {"ours": {"total": _count(params), "encoder": _count(params["encoder"]),
                          "decoder": _count(params["decoder"])},
                 "wan": peer.param_counts()},
      "threads": {
          "torch": torch.get_num_threads(),
          # XLA:CPU sizes its intra-op thread pool to the cores this process may run on.
          "jax_xla_cpu": len(os.sched_getaffinity(0)),
          "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
      },
      "versions": {"jax": jax.__version__, "torch": torch.__version__,
                   "diffusers": diffusers.__version__,
                   "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()},
      "results": results,
      "fastest_conv_impl": fastest,
  }


def _num(x: float | None) -> str:
  return "-" if x is None else f"{x:.0f}"


def format_table(report: dict) -> str:
  """The report as a plain-text table."""
  p, th = report["params"], report["threads"]
  lines = [
      f"size {report['size']}: video {tuple(report['video_shape_bcthw'])} -> latent "
      f"{tuple(report['latent_shape_bcthw'])} (B, C, T, H, W), float32",
      f"params: ours {p['ours']['total']:,} (enc {p['ours']['encoder']:,}, dec "
      f"{p['ours']['decoder']:,}); Wan {p['wan']['total']:,} (enc {p['wan']['encoder']:,}, dec "
      f"{p['wan']['decoder']:,})",
      f"threads: torch {th['torch']}, XLA:CPU {th['jax_xla_cpu']}; reps "
      f"{report['config']['reps']}, ratio = torch / jax (> 1: ours faster); XLA_FLAGS "
      f"{th['XLA_FLAGS'] or '(none)'}",
      "",
      f"{'op':<7} {'conv_impl':<10} {'jax ms med':>11} {'(min)':>9} {'torch ms med':>13} "
      f"{'(min)':>9} {'ratio med':>10} {'(min)':>7} {'compile s':>10} {'GFLOP jax/torch':>16} "
      f"{'GFLOP/s jax/torch':>18}",
  ]
  for r in report["results"]:
    lines.append(
        f"{r['op']:<7} {r['conv_impl']:<10} {r['jax_ms']['median']:>11.0f} "
        f"{r['jax_ms']['min']:>9.0f} {r['torch_ms']['median']:>13.0f} {r['torch_ms']['min']:>9.0f} "
        f"{r['ratio_median']:>10.2f} {r['ratio_min']:>7.2f} {r['jax_compile_s']:>10.1f} "
        f"{r['jax_gflop']:>8.0f}/{_num(r['torch_gflop']):<7} "
        f"{r['jax_gflop_per_s']:>9.0f}/{_num(r['torch_gflop_per_s']):<8}")
  fastest = ", ".join(f"{op}: {impl}" for op, impl in report["fastest_conv_impl"].items())
  lines += ["", f"fastest conv_impl: {fastest}"]
  return "\n".join(lines)


def main(argv):
  del argv
  if not _YNN.value:
    # XLA reads its flags when the CPU backend starts, which is at the first jax call below.
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {NO_YNN}".strip()
  cfg = BenchConfig(size=_SIZE.value, conv_impls=tuple(_CONV_IMPLS.value), ops=tuple(_OPS.value),
                    reps=_REPS.value, warmup=_WARMUP.value, settle_s=_SETTLE.value,
                    torch_threads=_TORCH_THREADS.value, seed=_SEED.value)
  try:
    report = run_benchmark(cfg)
  except ImportError as e:
    raise SystemExit(str(e)) from e
  print(format_table(report))
  if _OUT.value:
    reporting.write_json(_OUT.value, report)


if __name__ == "__main__":
  app.run(main)
