"""Plan a DiT run before launch: compile its train step ahead of time for a mesh of fake devices.

  python -m benchmarks.plan --config=experiments/base.py:xl --mesh=data=2,fsdp=4 \
      --tokens=4096 --memory_gb=16 --out=runs/plan_xl.json

Nothing is allocated: parameters and optimizer state come from `jax.eval_shape`, the batch is
`jax.ShapeDtypeStruct`s with their shardings, and the step (`steps.dit_step` on cached latents,
so no autoencoder is needed) goes through `jax.jit(...).lower(...).compile()` for --devices fake
CPU devices (`--xla_force_host_platform_device_count`). An `xl` model of billions of parameters
plans on a laptop. It prints:
- the parameter count;
- FLOPs per step: XLA's count of the compiled per-device program (`Compiled.cost_analysis()`),
  times the device count, and the analytic model FLOPs 6 N tokens + attention (what MFU uses);
- per-device memory from XLA's buffer assignment (`Compiled.memory_analysis()`): arguments
  (state + batch), outputs, temporaries, aliased (donated state), generated code;
- for each remat policy, the largest token count per device that fits --memory_gb, found by
  doubling (or halving) the number of latent frames from --tokens' and then bisecting (each
  probe is one AOT compile; --max_probes bounds them).

Clips are (T', H', W') token grids with a fixed frame (--frame_grid, default 16 x 16 tokens: a
256 x 256 video through the 8x autoencoder and a 2 x 2 patch); --tokens picks T'.

Caveats: the figures are XLA:CPU's. Its fusion and buffer assignment differ from the GPU and
TPU compilers', so treat them as estimates of a real accelerator's use (they count every byte
of state exactly; temporaries are the approximate part). Blocks are planned scanned
(--scan_blocks, default on): XLA:CPU schedules the recomputation of unrolled remat blocks
next to the forward pass, so an unrolled plan shows no remat saving on CPU (see
tests/test_dit_remat.py), and a scan compiles one block instead of `depth`. XLA's cost
analysis counts a loop body once, so with scanned blocks its FLOPs cover one block of `depth`
(plus everything outside the blocks): compare the analytic figure, or plan --noscan_blocks.
"""

import dataclasses
import functools
import math
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import flags
from ml_collections import config_flags

from benchmarks import reporting
from spacetime_dit import cli
from spacetime_dit import config_types
from spacetime_dit.models import dit
from spacetime_dit.sharding import axes
from spacetime_dit.sharding import mesh as mesh_lib
from spacetime_dit.sharding.rules import MESH_AXES
from spacetime_dit.training import builders
from spacetime_dit.training import state as state_lib
from spacetime_dit.training import steps

# Importing JAX does not start its backend: main() still sets the fake device count in time.

_CONFIG = None  # Set by define_flags().
_MESH = None  # Set by define_flags().
_DEVICES = None  # Set by define_flags().
_TOKENS = None  # Set by define_flags().
_FRAME_GRID = None  # Set by define_flags().
_BATCH = None  # Set by define_flags().
_MEMORY_GB = None  # Set by define_flags().
_POLICIES = None  # Set by define_flags().
_MAX_PROBES = None  # Set by define_flags().
_SCAN = None  # Set by define_flags().
_LATENT_CHANNELS = None  # Set by define_flags().
_OUT = None  # Set by define_flags().


def define_flags() -> None:
  """Defines the command-line flags; only when run as a program, so that importing this
  module (tests) never clashes with another entry point's flags (--out, ...)."""
  global _CONFIG, _MESH, _DEVICES, _TOKENS, _FRAME_GRID, _BATCH, _MEMORY_GB, _POLICIES, _MAX_PROBES, _SCAN, _LATENT_CHANNELS, _OUT
  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "DiT experiment, e.g. experiments/base.py:xl.")
  _MESH = flags.DEFINE_string(
      "mesh", "data=-1", "Mesh axis sizes, e.g. data=2,fsdp=4 (axes not named are 1; one may be -1).")
  _DEVICES = flags.DEFINE_integer(
      "devices", 0, "Fake devices (0: the product of --mesh, which then may not hold -1).")
  _TOKENS = flags.DEFINE_integer("tokens", 4096, "Tokens per clip of the reported step (T' H' W').")
  _FRAME_GRID = flags.DEFINE_list("frame_grid", ["16", "16"], "H',W' tokens of one latent frame.")
  _BATCH = flags.DEFINE_integer("batch", 0, "Global batch (0: one clip per batch shard).")
  _MEMORY_GB = flags.DEFINE_float("memory_gb", 16.0, "Device memory (GiB) the search fits into.")
  _POLICIES = flags.DEFINE_list("policies", [], "Remat policies to plan (default: all).")
  _MAX_PROBES = flags.DEFINE_integer("max_probes", 6, "AOT compiles per policy in the search.")
  _SCAN = flags.DEFINE_bool("scan_blocks", True, "Plan with nn.scan over blocks (see the docstring).")
  _LATENT_CHANNELS = flags.DEFINE_integer(
      "latent_channels", 0, "C of the latent (0: from experiments/autoencoder.py of the variant).")
  _OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")


_GIB = 2**30


def parse_mesh(spec: str) -> dict[str, int]:
  """"data=2,fsdp=4" -> {"data": 2, "fsdp": 4, "tensor": 1, "sequence": 1}."""
  sizes = {axis: 1 for axis in MESH_AXES}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    name, _, value = item.partition("=")
    if name not in sizes or not value.lstrip("-").isdigit():
      raise ValueError(
          f"--mesh item {item!r} must be AXIS=SIZE with AXIS one of {MESH_AXES}, e.g."
          " --mesh=data=2,fsdp=4.")
    sizes[name] = int(value)
  return sizes


def _memory(compiled) -> dict[str, int]:
  stats = compiled.memory_analysis()
  names = ("argument", "output", "temp", "alias", "generated_code")
  out = {n: int(getattr(stats, f"{n}_size_in_bytes")) for n in names}
  # Donated state is both an argument and an output; it occupies its buffers once.
  out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older jax: one dict per program.
    cost = cost[0]
  return float(cost.get("flops", 0.0))


def analytic_flops(cfg, *, batch: int, grid: tuple[int, int, int], text_len: int,
                   trunk_params: int, text_params: int) -> float:
  """Model FLOPs of one train step (forward + backward = 3x forward), without recomputation.

  6 N per token for the weights (Kaplan et al. 2020): the trunk over the B L spacetime tokens,
  the text encoder over B S text tokens. Attention adds 4 L_kv D FLOPs per query and layer
  forward (2 L_kv D multiply-adds for QK^T and PV), i.e. 12 L L_kv D per layer for a train step; L_kv is L for full
  self-attention, H'W' + T' for the factorised layout, and S for cross-attention.
  """
  length = math.prod(grid)
  self_kv = length if cfg.attention_layout == "full" else grid[1] * grid[2] + grid[0]
  attention = 12 * cfg.depth * batch * length * (self_kv + text_len) * cfg.width
  return float(6 * trunk_params * batch * length + 6 * text_params * batch * text_len + attention)


@dataclasses.dataclass
class Planner:
  """Everything one AOT compile of the DiT step needs, fixed except the policy and clip length."""

  config: object  # The experiment ConfigDict.
  mesh: object
  rules: tuple
  latent_channels: int
  batch: int
  frame_grid: tuple[int, int]
  scan_blocks: bool = True

  def __post_init__(self):
    base = builders.dit_config(self.config, self.latent_channels)
    self.dit_config = dataclasses.replace(base, scan_blocks=self.scan_blocks)
    self.diffusion = config_types.dataclass_from_config(
        config_types.DiffusionConfig, self.config.diffusion, path="config.diffusion")
    self.tx, self.schedule = builders.build_optimizer(self.config)
    shards = mesh_lib.batch_axis_size(self.mesh, self.rules)
    if self.batch % shards:
      raise ValueError(
          f"--batch={self.batch} must be a multiple of the {shards} batch shards of the mesh"
          f" {dict(self.mesh.shape)} (data x fsdp), e.g. --batch={shards}.")
    (seq_axes,) = [m for name, m in self.rules if name == axes.ACT_TOKENS] or [None]
    seq_axes = (seq_axes,) if isinstance(seq_axes, str) else tuple(seq_axes or ())
    self.token_shards = shards * math.prod(self.mesh.shape[a] for a in seq_axes)
    model, init_params = self._model(self.dit_config)
    # The parameter shapes do not depend on the remat policy: one abstract state serves all.
    # The EMA (config.train.ema_decay > 0) is one more float32 copy of the parameters.
    self.abstract_state, self.state_shardings = state_lib.state_shardings(
        init_params, self.tx, self.mesh, self.rules, self.config.seed,
        ema_decay=self.config.train.ema_decay)
    params = self.abstract_state.params
    self.num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    self.text_params = sum(
        math.prod(x.shape) for x in jax.tree.leaves(params.get("text_encoder", {})))
    self.replicated = mesh_lib.replicated(self.mesh)
    self._compiled = {}

  def _model(self, cfg):
    model = dit.DiT(cfg)
    pt, ph, pw = cfg.patch_size
    dummy = jnp.zeros((1, pt, ph, pw, cfg.latent_channels), jnp.float32)
    ids = jnp.zeros((1, cfg.text.max_length), jnp.int32)

    def init_params(rng):
      return model.init(rng, dummy, jnp.zeros((1,)), ids, jnp.ones_like(ids, bool))["params"]

    return model, init_params

  def grid(self, frames: int) -> tuple[int, int, int]:
    return (frames, *self.frame_grid)

  def tokens_per_device(self, frames: int) -> float:
    return self.batch * math.prod(self.grid(frames)) / self.token_shards

  def compile(self, policy: str, frames: int):
    """AOT-compiles the step for clips of `frames` latent frames; returns (compiled, seconds).

    Memoised: the report at --tokens and the search's probe of the same length share a compile.
    """
    key = (policy, frames)
    if key not in self._compiled:
      self._compiled[key] = self._compile(policy, frames)
    return self._compiled[key]

  def _compile(self, policy: str, frames: int):


    cfg = dataclasses.replace(self.dit_config, remat=False, remat_policy=policy)
    model, _ = self._model(cfg)
    step = functools.partial(
        steps.dit_step, model=model, autoencoder=None, patch_size=cfg.patch_size,
        diffusion=self.diffusion, tx=self.tx, schedule=self.schedule)
    latent = tuple(g * p for g, p in zip(self.grid(frames), cfg.patch_size))
    text_len = cfg.text.max_length
    sharding = lambda ndim: mesh_lib.batch_sharding(self.mesh, self.rules, ndim)
    batch = {
        "latent": jax.ShapeDtypeStruct(
            (self.batch, *latent, cfg.latent_channels), jnp.float32, sharding=sharding(5)),
        "text_ids": jax.ShapeDtypeStruct((self.batch, text_len), jnp.int32, sharding=sharding(2)),
        "text_mask": jax.ShapeDtypeStruct((self.batch, text_len), jnp.bool_, sharding=sharding(2)),
    }
    stat = jax.ShapeDtypeStruct((cfg.latent_channels,), jnp.float32, sharding=self.replicated)
    frozen = {"latent_mean": stat, "latent_std": stat}
    start = time.perf_counter()
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      jitted = jax.jit(
          step,
          in_shardings=(self.state_shardings, jax.tree.map(lambda s: s.sharding, batch),
                        jax.tree.map(lambda s: s.sharding, frozen)),
          out_shardings=(self.state_shardings, self.replicated),
          donate_argnums=(0,),
      )
      compiled = jitted.lower(self.abstract_state, batch, frozen).compile()
    return compiled, time.perf_counter() - start

  def report(self, policy: str, frames: int) -> dict:
    """Memory, FLOPs and compile time of the step for one policy and clip length."""
    compiled, seconds = self.compile(policy, frames)
    grid = self.grid(frames)
    cfg = self.dit_config
    return {
        "policy": policy,
        "grid": list(grid),
        "tokens_per_clip": math.prod(grid),
        "tokens_per_device": self.tokens_per_device(frames),
        "memory_bytes": _memory(compiled),
        "xla_flops_per_device": _flops(compiled),
        "xla_flops": _flops(compiled) * self.mesh.size,
        "analytic_flops": analytic_flops(
            cfg, batch=self.batch, grid=grid, text_len=cfg.text.max_length,
            trunk_params=self.num_params - self.text_params, text_params=self.text_params),
        "compile_s": round(seconds, 2),
    }

  def largest_fit(self, policy: str, memory_bytes: float, max_probes: int, start: int = 1) -> dict:
    """The most latent frames (hence tokens per device) whose step fits `memory_bytes`.

    From `start` frames (the report's, already compiled) it doubles while probes fit or halves
    while they do not, then bisects between the last fit and the first miss; it stops after
    `max_probes` compiles ("exact" says whether the bracket closed).
    """
    lo, hi, frames, probes = 0, None, max(1, start), []
    while len(probes) < max_probes:
      compiled, seconds = self.compile(policy, frames)
      total = _memory(compiled)["total"]
      probes.append({"frames": frames, "total_bytes": total, "compile_s": round(seconds, 2)})
      if total <= memory_bytes:
        lo = frames
      else:
        hi = frames
      if hi is None:
        frames = 2 * lo
      elif lo == 0:
        if hi == 1:
          break  # Not even one frame fits.
        frames = hi // 2
      elif hi - lo <= 1:
        break
      else:
        frames = (lo + hi) // 2
    return {
        "policy": policy,
        "max_frames": lo,
        "first_miss_frames": hi,
        "max_tokens_per_device": self.tokens_per_device(lo) if lo else 0.0,
        "exact": hi is not None and hi - lo <= 1,
        "probes": probes,
    }


def plan(config, mesh_sizes: dict[str, int], *, tokens: int, frame_grid: tuple[int, int],
         batch: int = 0, memory_gb: float = 16.0, policies=(), max_probes: int = 6,
         scan_blocks: bool = True, latent_channels: int = 0, devices=None) -> dict:
  """Plans the DiT step of `config` on a mesh (see the module docstring).

  Args:
    config: a DiT experiment ConfigDict (experiments/base.py).
    mesh_sizes: {"data", "fsdp", "tensor", "sequence"} sizes (one may be -1).
    tokens: tokens per clip of the reported step; a multiple of the frame's H' W'.
    frame_grid: (H', W') tokens per latent frame.
    batch: global batch; 0 is one clip per batch shard.
    memory_gb: device memory (GiB) the search fits into.
    policies: remat policies (default: all of `dit.REMAT_POLICIES`).
    max_probes: AOT compiles per policy in the search (0 skips the search).
    scan_blocks: plan with scanned blocks.
    latent_channels: C; 0 reads it from experiments/autoencoder.py of the config's variant.
    devices: the devices of the mesh (default: all).

  Returns:
    A JSON-ready dict: "params", "steps" (one report per policy at `tokens`) and "fits".
  """

  policies = tuple(policies) or dit.REMAT_POLICIES
  for p in policies:
    if p not in dit.REMAT_POLICIES:
      raise ValueError(f"remat policy {p!r} is unknown; choose from {dit.REMAT_POLICIES}.")
  frame_tokens = math.prod(frame_grid)
  if tokens < frame_tokens or tokens % frame_tokens:
    raise ValueError(
        f"--tokens={tokens} must be a positive multiple of the {frame_tokens} tokens of one"
        f" latent frame (--frame_grid={','.join(map(str, frame_grid))}), e.g."
        f" --tokens={frame_tokens * max(1, tokens // frame_tokens)}.")
  if not latent_channels:
    # experiments/ is a top-level package of the repository, not of the library.
    from experiments import autoencoder as ae_experiment  # pylint: disable=g-import-not-at-top
    latent_channels = ae_experiment.get_config(config.autoencoder.variant).model.latent_channels
  mesh_cfg = config_types.dataclass_from_config(
      config_types.MeshConfig, config.mesh, path="config.mesh")
  mesh_cfg = dataclasses.replace(mesh_cfg, **mesh_sizes)
  devices = list(jax.devices() if devices is None else devices)
  mesh = mesh_lib.make_mesh(mesh_cfg, devices)
  shards = mesh_lib.batch_axis_size(mesh, mesh_cfg.rules)
  planner = Planner(config, mesh, tuple(mesh_cfg.rules), latent_channels, batch or shards,
                    tuple(frame_grid), scan_blocks)
  frames = tokens // frame_tokens
  result = {
      "variant": config.get("variant", ""),
      "mesh": dict(mesh.shape),
      "devices": mesh.size,
      "device_kind": devices[0].device_kind,
      "batch": planner.batch,
      "latent_channels": latent_channels,
      "scan_blocks": scan_blocks,
      "dtype": planner.dit_config.dtype,
      "params": planner.num_params,
      "text_params": planner.text_params,
      "memory_gb": memory_gb,
      "steps": [planner.report(p, frames) for p in policies],
      "fits": [planner.largest_fit(p, memory_gb * _GIB, max_probes, frames) for p in policies]
      if max_probes > 0 else [],
  }
  return result


def _table(result: dict) -> str:
  gib = lambda b: f"{b / _GIB:.2f}"
  lines = [
      f"{result['variant']}: {result['params']:,} parameters ({result['text_params']:,} in the"
      f" text encoder), mesh {result['mesh']} on {result['devices']} fake"
      f" {result['device_kind']} devices, global batch {result['batch']}, {result['dtype']}"
      f" compute, scan_blocks={result['scan_blocks']}"]
  rows = [("policy", "tokens/clip", "tokens/dev", "XLA TFLOP", "model TFLOP", "args GiB",
           "out GiB", "temp GiB", "alias GiB", "total GiB", "code MiB", "compile s")]
  for s in result["steps"]:
    m = s["memory_bytes"]
    rows.append((s["policy"], str(s["tokens_per_clip"]), f"{s['tokens_per_device']:.0f}",
                 f"{s['xla_flops'] / 1e12:.2f}", f"{s['analytic_flops'] / 1e12:.2f}",
                 gib(m["argument"]), gib(m["output"]), gib(m["temp"]), gib(m["alias"]),
                 gib(m["total"]), f"{m['generated_code'] / 2**20:.1f}", f"{s['compile_s']:.1f}"))
  if result["fits"]:
    rows.append(("",) * len(rows[0]))
    rows.append(("policy", "max frames", "tokens/dev", "probes", "exact", "", "", "", "", "", "",
                 "compile s"))
    for f in result["fits"]:
      rows.append((f["policy"], str(f["max_frames"]), f"{f['max_tokens_per_device']:.0f}",
                   str(len(f["probes"])), str(f["exact"]), "", "", "", "", "", "",
                   f"{sum(p['compile_s'] for p in f['probes']):.1f}"))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
  lines.append(
      f"(Per device. XLA TFLOP: the compiled program's count x devices, remat recomputation"
      f" included, a scanned block counted once; model TFLOP: 6 N tokens + attention, all"
      f" devices. total = args + out + temp - alias; the"
      f" search fits total <= {result['memory_gb']} GiB by the number of latent frames.)")
  return "\n".join(lines)


def main(argv):
  del argv
  if _CONFIG.value is None:
    raise ValueError("--config is required, e.g. --config=experiments/base.py:xl.")
  sizes = parse_mesh(_MESH.value)
  devices = _DEVICES.value
  if not devices:
    if -1 in sizes.values():
      raise ValueError(f"--mesh={_MESH.value} holds -1: pass --devices=N as well.")
    devices = math.prod(sizes.values())
  # Before JAX starts its backend: XLA reads these flags once. The fake devices are CPU ones.
  os.environ["XLA_FLAGS"] = (
      f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}").strip()
  os.environ["JAX_PLATFORMS"] = "cpu"
  if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    # LLVM's optimisation of the CPU code is most of a compile and changes no buffer: XLA's
    # HLO passes and buffer assignment (the memory analysis) run before it. The `tiny` step
    # compiled in ~35 s at the default level on 2 busy cores.
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
  cli.use_fast_cpu_convolutions()
  frame_grid = tuple(int(v) for v in _FRAME_GRID.value)
  if len(frame_grid) != 2 or min(frame_grid) < 1:
    raise ValueError(f"--frame_grid={_FRAME_GRID.value} must be two positive ints H',W'.")
  start = time.perf_counter()
  result = plan(
      _CONFIG.value, sizes, tokens=_TOKENS.value, frame_grid=frame_grid, batch=_BATCH.value,
      memory_gb=_MEMORY_GB.value, policies=_POLICIES.value, max_probes=_MAX_PROBES.value,
      scan_blocks=_SCAN.value, latent_channels=_LATENT_CHANNELS.value)
  result["wall_s"] = round(time.perf_counter() - start, 1)
  print(_table(result))
  print(f"planned in {result['wall_s']} s")
  if _OUT.value:
    reporting.write_json(_OUT.value, result)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
