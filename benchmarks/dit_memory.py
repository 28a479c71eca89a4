"""Peak memory of the DiT train step (forward + backward) against token count, per attention.

  python -m benchmarks.dit_memory --variant=s --depth=4 --tokens=1024,4096,16384 \
      --attention=xla,chunked --out=runs/dit_memory.json

Compile only, nothing is allocated or run: the parameters are abstract (`jax.eval_shape` of the
init), and the step `grad(flow-matching loss)(params)` is lowered and compiled for
`jax.ShapeDtypeStruct` inputs. Memory is XLA's own accounting of the compiled program
(`Compiled.memory_analysis()`): arguments (parameters, batch) + outputs (gradients, loss) +
temporaries (activations saved for the backward pass and the scratch of both passes), which is
what a device must hold at once. The latent is (T, H, W) = (tokens / 1024, 64, 64) with 16
channels, i.e. 32 x 32 patch tokens of patch (1, 2, 2) per latent frame, batch 1.

With "xla" attention every block keeps its (B, N, L, L) softmax for the backward pass, so the
temporaries grow ~L^2 (16x the tokens: ~256x); with "chunked" they grow ~L (~16x). The table
prints that growth from the smallest to the largest token count. Depth is a flag because the
temporaries are per block (they scale with depth) while compile time grows with it too.
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
from absl import flags
from flax import linen as nn

from benchmarks import reporting
from spacetime_dit import cli
from spacetime_dit.diffusion import flow
from spacetime_dit.models import dit as dit_lib
from spacetime_dit.training import builders

_VARIANT = flags.DEFINE_string("variant", "s", "Model size from experiments/base.py.")
_DEPTH = flags.DEFINE_integer(
    "depth", 4, "Blocks (0 = the variant's own depth); fewer keeps compiles short.")
_TOKENS = flags.DEFINE_list("tokens", ["1024", "4096", "16384"],
                            "Token counts L (multiples of 1024: 32 x 32 tokens per frame).")
_ATTENTION = flags.DEFINE_list("attention", ["xla", "chunked"], "DiTConfig.attention_impl values.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(dit_lib.DTYPES), "Compute dtype.")
_REMAT = flags.DEFINE_string(
    "remat", "none", "Block rematerialisation: 'none' or 'full' (or a DiTConfig.remat_policy).")
_LATENT_CHANNELS = flags.DEFINE_integer("latent_channels", 16, "C of the latent.")
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")

_MIB = 2**20
_TOKENS_PER_FRAME = 1024


def _config(variant: str, depth: int, attention: str, dtype: str, remat: str) -> dit_lib.DiTConfig:
  # Imported here: experiments/ is a top-level package of the repository, not of the library.
  from experiments import base  # pylint: disable=g-import-not-at-top
  cfg = builders.dit_config(base.get_config(variant), _LATENT_CHANNELS.value)
  changes = dict(attention_impl=attention, dtype=dtype)
  if depth:
    changes["depth"] = depth
  names = {f.name for f in dataclasses.fields(cfg)}
  if "remat_policy" in names:
    changes["remat_policy"] = remat
  elif remat in ("none", "full"):
    changes["remat"] = remat == "full"
  else:
    raise ValueError(f"--remat={remat!r}: this DiTConfig knows only 'none' and 'full'.")
  return dataclasses.replace(cfg, **changes)


def _memory_stats(compiled) -> dict[str, int]:
  stats = compiled.memory_analysis()
  names = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
           "alias_size_in_bytes")
  out = {name.removesuffix("_size_in_bytes"): int(getattr(stats, name)) for name in names}
  out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def train_step_memory(cfg: dit_lib.DiTConfig, tokens: int) -> dict:
  """Compiles grad(loss)(params) for L=`tokens`, batch 1; returns XLA's memory figures (bytes)."""
  if tokens % _TOKENS_PER_FRAME:
    raise ValueError(f"--tokens={tokens} must be a multiple of {_TOKENS_PER_FRAME} "
                     "(32 x 32 patch tokens per latent frame), e.g. 4096.")
  model = dit_lib.DiT(cfg)
  pt, ph, pw = cfg.patch_size
  latent = jax.ShapeDtypeStruct(
      (1, pt * tokens // _TOKENS_PER_FRAME, 32 * ph, 32 * pw, cfg.latent_channels), jnp.float32)
  text_len = cfg.text.max_length
  ids = jax.ShapeDtypeStruct((1, text_len), jnp.int32)
  mask = jax.ShapeDtypeStruct((1, text_len), jnp.bool_)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  small = jnp.zeros((1, pt, ph, pw, cfg.latent_channels))
  params = jax.eval_shape(lambda: model.init(
      jax.random.key(0), small, jnp.zeros((1,)), jnp.zeros((1, text_len), jnp.int32),
      jnp.ones((1, text_len), bool))["params"])
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        nn.unbox(params))

  def step(params, x_t, t, ids, mask, target):
    def loss_fn(params):
      pred = model.apply({"params": params}, x_t, t, ids, mask)
      return flow.flow_matching_loss(pred, target)
    return jax.value_and_grad(loss_fn)(params)

  start = time.perf_counter()
  compiled = jax.jit(step).lower(params, latent, t, ids, mask, latent).compile()
  result = _memory_stats(compiled)
  result["compile_s"] = round(time.perf_counter() - start, 1)
  result["params"] = dit_lib.count_params(params)
  return result


def _table(results: dict) -> str:
  rows = [("attention", "tokens", "total MiB", "temp MiB", "args MiB", "out MiB", "compile s")]
  for impl, by_tokens in results["runs"].items():
    for tokens, r in by_tokens.items():
      rows.append((impl, tokens, f"{r['total'] / _MIB:.0f}", f"{r['temp'] / _MIB:.0f}",
                   f"{r['argument'] / _MIB:.0f}", f"{r['output'] / _MIB:.0f}",
                   f"{r['compile_s']:.1f}"))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
  lo, hi = results["tokens"][0], results["tokens"][-1]
  lines.append(f"growth {hi}/{lo} tokens (x{hi // lo}; linear ~x{hi // lo}, quadratic "
               f"~x{(hi // lo) ** 2}):")
  for impl, growth in results["growth"].items():
    lines.append(f"  {impl}: temp x{growth['temp']:.1f}, total x{growth['total']:.1f}")
  return "\n".join(lines)


def main(argv):
  del argv
  tokens = sorted(int(n) for n in _TOKENS.value)
  first = _config(_VARIANT.value, _DEPTH.value, "xla", _DTYPE.value, _REMAT.value)
  results = {
      "variant": _VARIANT.value, "depth": first.depth, "width": first.width,
      "num_heads": first.num_heads, "dtype": _DTYPE.value, "remat": _REMAT.value,
      "tokens": tokens, "batch": 1, "device": str(jax.devices()[0]),
      "runs": {}, "growth": {},
  }
  for impl in _ATTENTION.value:
    cfg = _config(_VARIANT.value, _DEPTH.value, impl, _DTYPE.value, _REMAT.value)
    runs = results["runs"][impl] = {}
    for n in tokens:
      runs[str(n)] = train_step_memory(cfg, n)
      print(f"{impl} {n} tokens: {runs[str(n)]['total'] / _MIB:.0f} MiB "
            f"(compile {runs[str(n)]['compile_s']} s)", flush=True)
    lo, hi = runs[str(tokens[0])], runs[str(tokens[-1])]
    results["growth"][impl] = {k: hi[k] / max(lo[k], 1) for k in ("temp", "total")}
  results["params"] = next(iter(next(iter(results["runs"].values())).values()))["params"]
  print(f"variant {_VARIANT.value}: width {first.width}, heads {first.num_heads}, depth "
        f"{first.depth}, {results['params'] / 1e6:.1f}M params, {_DTYPE.value}, remat "
        f"{_REMAT.value}, batch 1")
  print(_table(results))
  if _OUT.value:
    reporting.write_json(_OUT.value, results)


if __name__ == "__main__":
  cli.run(main)
