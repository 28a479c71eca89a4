"""How long a checkpoint save stalls training: async (Orbax background write) vs synchronous.

  python -m benchmarks.checkpoint_blocking --out=runs/bench/checkpoint_blocking.json

A train-like loop (a jitted update of a float32 state of `--sizes_mb` megabytes, sharded
over the devices like FSDP parameters, plus an Adam-like second copy) runs `--steps` steps
and saves through `spacetime_dit.training.checkpointing.Checkpointer` every
`--save_every` steps. Per state size and mode it reports:

- `step_ms`: median step time between saves (the step alone);
- `blocked_ms`: median wall time of a step that saves (step + `save()` call) minus `step_ms`:
  what a save costs the training loop. Async saves still block for the device-to-host copy;
  the write to disk then overlaps the following steps;
- `save_call_ms`: median time in `save()` itself;
- `next_step_ms`: median time of the step after a save (an async write runs beside it and
  shares the host's cores and memory bandwidth);
- `write_ms` (async only): from `save()` until the write is on disk (`wait()`), i.e. the
  work hidden behind training;
- `overhead_per_save_ms`: (time of all steps with saves - the same steps without any save,
  mode `none`) / saves: the whole cost of a save to training, including how much the
  background write slows the steps it overlaps (on a 2-core host, a lot).
"""

import argparse
import os
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from benchmarks import reporting
from spacetime_dit.training import checkpointing


def _state(size_mb, mesh):
  """{"step", "params", "opt"}: size_mb MB in all, rows sharded over the mesh's devices."""
  devices = len(mesh.devices.flat)
  rows = max(devices, int(size_mb * 2**20 / 4 / 1024 / 2) // devices * devices)  # Two (rows, 1024) f32.
  sharding = NamedSharding(mesh, P("fsdp", None))
  make = jax.jit(lambda: {"step": jnp.int32(0), "params": jnp.ones((rows, 1024)), "opt": jnp.zeros((rows, 1024))},
                 out_shardings={"step": NamedSharding(mesh, P()), "params": sharding, "opt": sharding})
  return make()


@jax.jit
def _step(state):
  params = state["params"] - 1e-3 * state["opt"]
  return {"step": state["step"] + 1, "params": params, "opt": 0.9 * state["opt"] + 0.1 * params}


def measure(size_mb, async_save, *, steps, save_every, directory, save=True):
  mesh = jax.make_mesh((len(jax.devices()),), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  state = _state(size_mb, mesh)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  state = jax.block_until_ready(_step(state))  # Compile.
  checkpointer = checkpointing.Checkpointer(directory, max_to_keep=2, async_save=async_save)
  plain, saving, calls, writes, after = [], [], [], [], []
  pending = None
  for i in range(1, steps + 1):
    if i % save_every == 0 and pending is not None:
      # Real runs save every few hundred steps, long after the previous write finished:
      # let it finish outside the timings (`write_ms` records how long it took).
      checkpointer.wait()
      writes.append(time.perf_counter() - pending)
      pending = None
    start = time.perf_counter()
    state = jax.block_until_ready(_step(state))
    if i % save_every == 0 and save:
      call = time.perf_counter()
      checkpointer.save(i, state)
      calls.append(time.perf_counter() - call)
      pending = time.perf_counter() if async_save else None
      saving.append(time.perf_counter() - start)
    elif i % save_every == 1 and i > 1 and save:
      after.append(time.perf_counter() - start)  # Shares the cores with the background write.
    else:
      plain.append(time.perf_counter() - start)
  checkpointer.wait()
  if pending is not None:
    writes.append(time.perf_counter() - pending)
  checkpointer.close()
  ms = lambda xs: 1e3 * statistics.median(xs) if xs else None
  step_ms = ms(plain)
  return {
      "size_mb": round(nbytes / 2**20, 1), "mode": ("async" if async_save else "sync") if save else "none",
      "step_ms": step_ms, "total_ms": 1e3 * sum(plain + saving + after),
      "blocked_ms": ms(saving) - step_ms if saving else None, "save_call_ms": ms(calls), "next_step_ms": ms(after),
      "write_ms": ms(writes) if async_save else None,
      "saves": len(calls),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes_mb", default="16,64", help="State sizes (params + optimizer), MB.")
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--save_every", type=int, default=5)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  results = []
  root = tempfile.mkdtemp(prefix="checkpoint_blocking_")
  try:
    for size in [float(s) for s in args.sizes_mb.split(",")]:
      base = None
      for mode in ("none", "async", "sync"):
        directory = os.path.join(root, f"{size}_{mode}")
        r = measure(size, mode == "async", steps=args.steps, save_every=args.save_every, directory=directory,
                    save=mode != "none")
        if mode == "none":
          base = r["total_ms"]
        r["overhead_per_save_ms"] = (r["total_ms"] - base) / r["saves"] if r["saves"] else 0.0
        results.append(r)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  fmt = lambda v: "-" if v is None else f"{v:.1f}"
  print(f"{len(jax.devices())} devices ({jax.devices()[0].platform})")
  print(f"{'state MB':>9} {'mode':>6} {'step ms':>8} {'blocked ms':>11} {'save() ms':>10} {'next step ms':>13}"
        f" {'write ms':>9} {'cost/save ms':>13}")
  for r in results:
    print(f"{r['size_mb']:>9} {r['mode']:>6} {fmt(r['step_ms']):>8} {fmt(r['blocked_ms']):>11}"
          f" {fmt(r['save_call_ms']):>10} {fmt(r['next_step_ms']):>13} {fmt(r['write_ms']):>9}"
          f" {fmt(r['overhead_per_save_ms']):>13}")
  reporting.write_json(args.out, {"devices": len(jax.devices()), "platform": jax.devices()[0].platform,
                                  "steps": args.steps, "save_every": args.save_every, "results": results})


if __name__ == "__main__":
  main()
