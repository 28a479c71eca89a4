#!/usr/bin/env bash
# One-shot check of this repository on a lent GPU machine (an H100 or H200 borrowed through the
# workplace's device tool, which runs a command from the repository root and returns what the
# command writes under $OUT). It is prepared and dry-run on the CPU so that the one run works
# first time:
#
#   bash benchmarks/gpu_check.sh                                 # on the GPU machine (carry .whl)
#   GPU_CHECK_CPU=1 GPU_CHECK_TIME_SCALE=8 OUT=runs/gpu_check_cpu bash benchmarks/gpu_check.sh
#                                                   # CPU dry run: tiny sizes, ~20 min on 2 cores
#
# The GPU machine has its own python3 (3.12, jax + CUDA plugin, torch, flax, optax, orbax...) and
# no network, so the packages it lacks travel as wheels in the ignored folder .whl (base/: our
# pins of flax/orbax/optax/chex and grain, ml_collections, array_record, av, tensorboardX,
# portpicker; peer/: diffusers for the Wan peer). They are installed with --no-deps into
# runs/gpu_check_work/site, which goes first on PYTHONPATH; jax, jaxlib and the CUDA plugin are never carried,
# so the machine's own stay in use.
#
# Steps, most important first; each has a timeout, and a step is skipped once the whole run's
# budget (GPU_CHECK_BUDGET_S, default 420 s) has too little left, so one hang cannot eat the lease:
#   wheels     pip install .whl/base/*.whl .whl/peer/*.whl into $WORK/site
#   env        nvidia-smi, versions and paths of every package, jax.devices(), our train imports
#   checks     cuDNN attention against a float32 reference, forward and gradients, with masks
#   speed_s    benchmarks/dit_speed.py, variant s, bf16, cudnn attention, L=4096,16384, + Wan (cuda)
#   smoke      the real CLIs: a shortened `cpu` autoencoder, the `cpu` DiT, then sample an mp4
#   speed_b    variant b, cudnn, + Wan
#   speed_s_xla, pytest (attention and DiT tests on the GPU), speed_b_xla
# Everything is logged to $OUT/log.txt (at most 8 files land in $OUT: the device's limit); the
# summary table comes last on stdout. OUT unset: ./runs/gpu_check.
#
# Environment knobs: GPU_CHECK_CPU=1 (tiny sizes, CPU, no wheels), GPU_CHECK_SKIP_WHEELS=1,
# GPU_CHECK_BUDGET_S=<seconds>, GPU_CHECK_TIME_SCALE=<n> (every timeout times n),
# GPU_CHECK_STEPS="env checks speed_s ..." (run only these), PYTHON=<interpreter> (python3).

set -u -o pipefail

OUT="${OUT:-$PWD/runs/gpu_check}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
# Scratch space under the ignored runs/, beside (not inside) $OUT, whose files all travel back.
WORK="${GPU_CHECK_WORK:-$PWD/runs/gpu_check_work}"
SITE="$WORK/site"  # The carried wheels, installed.
rm -rf "$WORK"
mkdir -p "$WORK"
CPU="${GPU_CHECK_CPU:-0}"
SKIP_WHEELS="${GPU_CHECK_SKIP_WHEELS:-$CPU}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-420}"
# Every step's timeouts are multiplied by this (the CPU dry run compiles and runs far slower).
SCALE="${GPU_CHECK_TIME_SCALE:-1}"
ONLY="${GPU_CHECK_STEPS:-}"
PY="${PYTHON:-python3}"
START=$SECONDS
DEADLINE=$((START + BUDGET_S))
SUMMARY="$WORK/summary.txt"
: >"$SUMMARY"

exec > >(tee -a "$LOG") 2>&1

export PYTHONUNBUFFERED=1
# JAX takes GPU memory as it needs it instead of 75% up front: the Wan peer shares the process.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# Full tracebacks from our CLIs (they print one `error:` line otherwise).
export SPACETIME_DIT_TRACEBACK=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ "$CPU" == 1 ]]; then
  export JAX_PLATFORMS=cpu
  PLATFORM=cpu
else
  PLATFORM=cuda
fi

log() { echo "[gpu_check $(date -u +%H:%M:%S) +$((SECONDS - START))s] $*"; }

# step NAME MAX_S MIN_S CMD...: runs CMD (a function of this script) under `timeout` for at most
# MAX_S seconds and the budget left; skips it when less than MIN_S is left or GPU_CHECK_STEPS
# leaves it out. `timeout` signals its whole process group, so the step's children end with it.
step() {
  local name=$1 max_s=$(($2 * SCALE)) min_s=$(($3 * SCALE))
  shift 3
  if [[ -n "$ONLY" && " $ONLY " != *" $name "* ]]; then
    return 0
  fi
  local left=$((DEADLINE - SECONDS))
  if ((left < min_s)); then
    log "SKIP $name: ${left}s of the budget left, it needs ${min_s}s"
    printf '%-12s %-8s %6s\n' "$name" "skipped" "-" >>"$SUMMARY"
    return 0
  fi
  local limit=$((left < max_s ? left : max_s))
  log "BEGIN $name (timeout ${limit}s)"
  local t0=$SECONDS
  export -f log limit "$1"  # The step runs in a child bash, which needs the functions.
  timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@"
  local rc=$?
  local status=ok
  ((rc == 124 || rc == 137)) && status=timeout
  ((rc != 0 && rc != 124 && rc != 137)) && status="rc=$rc"
  log "END $name: $status in $((SECONDS - t0))s"
  printf '%-12s %-8s %6s\n' "$name" "$status" "$((SECONDS - t0))s" >>"$SUMMARY"
  return 0
}

# Inner per-command limits: --foreground keeps the command in the step's process group, so the
# step's own timeout still reaches it.
limit() { local s=$1; shift; timeout --foreground -k 5 $((s * SCALE)) "$@"; }

# ------------------------------------------------------------------------------------ env

install_wheels() {
  shopt -s nullglob
  local wheels=(.whl/base/*.whl .whl/peer/*.whl)
  shopt -u nullglob
  if ((${#wheels[@]} == 0)); then
    echo "no wheels under .whl/ (carry .whl/base and .whl/peer): using the machine's packages"
    return 0
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "${wheels[@]}" || return 1
  # A package carried here must not shadow the machine's jax/jaxlib/CUDA plugin.
  if ls "$SITE" | grep -qiE '^(jax|jaxlib|jax_cuda|jax_plugins)'; then
    echo "error: $SITE holds a jax package; remove it from .whl/" && return 1
  fi
  echo "installed: ${wheels[*]##*/}"
}

env_info() {
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  "$PY" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "chex", "grain", "ml_collections",
             "array_record", "av", "tensorboardX", "tensorstore", "numpy", "torch", "diffusers"):
  try:
    mod = importlib.import_module(name)
    print(f"  {name:<17} {getattr(mod, '__version__', '?'):<12} {mod.__file__}")
  except Exception as e:  # pylint: disable=broad-except
    print(f"  {name:<17} MISSING ({type(e).__name__}: {e})")
import jax
print("jax.devices():", jax.devices(), "backend:", jax.default_backend())
try:
  import torch
  print("torch cuda:", torch.cuda.is_available(), torch.version.cuda,
        torch.cuda.get_device_name() if torch.cuda.is_available() else "")
except ImportError:
  pass
import spacetime_dit.train  # noqa: F401  (the train path imports cleanly)
print("spacetime_dit.train imports")
EOF
}

export OUT WORK SITE CPU PY PLATFORM SCALE

if [[ "$SKIP_WHEELS" != 1 ]]; then
  step wheels 60 5 install_wheels
  export PYTHONPATH="$SITE:$PYTHONPATH"
fi
step env 60 10 env_info

# --------------------------------------------------------------------------------- checks

gpu_checks() {
  GPU_CHECK_OUT="$OUT/gpu_checks.json" "$PY" - <<'EOF'
"""cuDNN attention (GPU) or chunked (CPU dry run) against float32 XLA attention, fwd and grads,
and the bf16 DiT forward with cudnn against the same DiT with XLA attention."""
import dataclasses, functools, json, os
import jax, jax.numpy as jnp, numpy as np
from spacetime_dit.models import attention, dit
impl = "cudnn" if jax.default_backend() == "gpu" else "chunked"
key = jax.random.split(jax.random.key(int.from_bytes(os.urandom(4), "little")), 8)
b, l, s, n, k = 2, 1024, 77, 4, 64

def rel(a, ref):
  a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(a - ref) / np.linalg.norm(ref)) if np.isfinite(a).all() else float("nan")

q = jax.random.normal(key[0], (b, l, n, k), jnp.bfloat16)
kv_self = [jax.random.normal(kk, (b, l, n, k), jnp.bfloat16) for kk in key[1:3]]
kv_cross = [jax.random.normal(kk, (b, s, n, k), jnp.bfloat16) for kk in key[3:5]]
key_mask = jnp.arange(s)[None] < jnp.array([[s - 20], [7]])
seg = jnp.concatenate([jnp.full((b, 600), 1), jnp.full((b, l - 600), 2)], axis=1).astype(jnp.int32)
cases = {
    "self_nomask": (q, *kv_self, {}),
    "cross_keymask": (q, *kv_cross, {"key_mask_bs": key_mask}),
    "self_segments": (q, *kv_self, {"q_segment_ids_bl": seg, "kv_segment_ids_bs": seg}),
}
out = {"impl": impl, "backend": jax.default_backend(), "device": jax.devices()[0].device_kind}

def check_case(qq, kk, vv, masks):
  f = lambda q, k, v, impl: attention.attention(q, k, v, impl=impl, **masks)
  ref_f = lambda q, k, v: f(*(x.astype(jnp.float32) for x in (q, k, v)), "xla")
  loss = lambda fn: (lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * jnp.cos(jnp.arange(k.shape[-1]))))
  got = jax.jit(lambda q, k, v: f(q, k, v, impl))(qq, kk, vv)
  g_got = jax.jit(jax.grad(loss(lambda q, k, v: f(q, k, v, impl)), argnums=(0, 1, 2)))(qq, kk, vv)
  with jax.default_matmul_precision("highest"):  # A float32 reference, not TF32.
    ref = jax.jit(ref_f)(qq, kk, vv)
    g_ref = jax.jit(jax.grad(loss(ref_f), argnums=(0, 1, 2)))(qq, kk, vv)
  return {"fwd": rel(got, ref), **{f"grad_{w}": rel(a, r) for w, a, r in zip("qkv", g_got, g_ref)}}


def check_dit():
  """The DiT at the `s` head shape (K=64), tiny depth, bf16: `impl` vs xla attention, same params."""
  cfg = dataclasses.replace(dit.DiTConfig(), width=256, depth=2, num_heads=4, dtype="bfloat16")
  cfg = dataclasses.replace(cfg, attention_impl=impl)
  model_x = dit.DiT(dataclasses.replace(cfg, attention_impl="xla"))
  x = jax.random.normal(key[5], (1, 4, 16, 16, cfg.latent_channels))
  t = jnp.array([0.3])
  ids = jax.random.randint(key[6], (1, cfg.text.max_length), 1, cfg.text.vocab_size)
  mask = jnp.arange(cfg.text.max_length)[None] < 5
  params = jax.jit(model_x.init)(key[7], x, t, ids, mask)
  # adaLN-Zero (DiT, Peebles & Xie 2023) zero-initialises the output layer: perturb every weight
  # so that the output, and so the comparison, is not identically zero.
  leaves, tree = jax.tree.flatten(params)
  noise = jax.random.split(key[4], len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(kk, p.shape, p.dtype)
                                     for p, kk in zip(leaves, noise)])
  ours = jax.jit(dit.DiT(cfg).apply)(params, x, t, ids, mask)
  xla = jax.jit(model_x.apply)(params, x, t, ids, mask)
  return {"fwd": rel(ours, xla)}


# One failing case (an unsupported shape, say) is recorded and the others still run.
jobs = {name: functools.partial(check_case, *case) for name, case in cases.items()}
jobs["dit_bf16_vs_xla"] = check_dit
for name, job in jobs.items():
  try:
    out[name] = job()
  except Exception as e:  # pylint: disable=broad-except
    out[name] = {"error": float("nan")}
    out.setdefault("errors", {})[name] = f"{type(e).__name__}: {str(e)[:400]}"
# bf16 keeps 8 significant bits (relative rounding 2^-9, about 2e-3 per value), so bf16 operands
# against a float32 reference land around 1e-3..1e-2; a wrong mask or layout gives O(1).
errors = [v for name in jobs for v in out[name].values()]
worst = float("nan") if any(np.isnan(errors)) else max(errors)
out["worst"], out["pass"] = worst, bool(worst < 2e-2)  # NaN never passes.
print(json.dumps(out, indent=1))
with open(os.environ["GPU_CHECK_OUT"], "w") as fh:
  json.dump(out, fh, indent=1)
print(f"checks: worst relative error {worst:.2e} -> {'PASS' if out['pass'] else 'FAIL'}")
raise SystemExit(0 if out["pass"] else 1)
EOF
}
step checks 90 20 gpu_checks

# ---------------------------------------------------------------------------------- speed

# speed NAME VARIANT ATTN PEER MEM_FRACTION: one benchmarks/dit_speed.py run into $WORK/NAME.json.
speed() {
  local name=$1 variant=$2 attn=$3 peer=$4 frac=$5
  local args
  if [[ "$CPU" == 1 ]]; then
    [[ "$attn" == cudnn ]] && attn=chunked  # cuDNN needs a GPU; the dry run checks the plumbing.
    args=(--variant=tiny --tokens=16,64 --ops=fwd,step --reps=1 --warmup=1 --matmul_sizes=128
          --matmul_reps=1)
  else
    local ops=fwd,step
    [[ "$variant" == b ]] && ops=step
    args=(--variant="$variant" --tokens=4096,16384 --ops="$ops" --reps=5 --warmup=1
          --matmul_sizes=8192,16384 --matmul_reps=5)
  fi
  XLA_PYTHON_CLIENT_MEM_FRACTION=$frac "$PY" -m benchmarks.dit_speed "${args[@]}" --dtype=bfloat16 \
    --attention_impl="$attn" --settle_s=0 --"$peer" --out="$WORK/$name.json" \
    | tee -a "$OUT/dit_speed.txt"
}
# With the peer, JAX keeps at most 40% of the GPU (it holds freed memory in its own pool) and
# torch the rest; alone, 90%.
step speed_s 120 60 speed speed_s s cudnn peer .4

# ---------------------------------------------------------------------------------- smoke

smoke() {
  # One bucket shape per stage: one train step to compile on the GPU, not 16.
  local w="$WORK/smoke" ae_steps=150 dit_steps=300 cache=64 stats=16
  if [[ "$CPU" == 1 ]]; then
    ae_steps=3 dit_steps=3 cache=4 stats=2
  fi
  # The autoencoder stage on its own, shortened: W/autoencoder is then finished for the DiT.
  limit 130 "$PY" -m spacetime_dit.train --config=experiments/autoencoder.py:cpu \
    --workdir="$w/autoencoder" --config.train.num_steps=$ae_steps --config.data.max_buckets=1 \
    --config.train.log_every=25 --config.train.checkpoint_every=$ae_steps \
    --config.latent_stats_clips=$stats || return 1
  # 200 s: the first H200 run spent 72 s encoding a 256-clip cache (one compile per clip shape)
  # and was cut off at 130 s while writing its last checkpoint.
  limit 200 "$PY" -m spacetime_dit.train --config=experiments/base.py:cpu --workdir="$w" \
    --config.train.num_steps=$dit_steps --config.data.max_buckets=1 \
    --config.data.latent_cache_clips=$cache --config.train.log_every=25 \
    --config.train.checkpoint_every=$dit_steps || return 1
  limit 60 "$PY" -m spacetime_dit.sample --workdir="$w" --prompt="a red circle moving right" \
    --out="$OUT/sample.mp4" || return 1
  "$PY" - "$w" "$OUT/smoke_metrics.jsonl" <<'EOF'
import json, os, sys
w, out = sys.argv[1:]
with open(out, "w") as dst:
  for stage, path in (("autoencoder", f"{w}/autoencoder/metrics.jsonl"), ("dit", f"{w}/metrics.jsonl")):
    rows = [json.loads(line) for line in open(path)]
    for row in rows:
      dst.write(json.dumps({"stage": stage, **row}) + "\n")
    rates = [r["steps_per_sec"] for r in rows if "steps_per_sec" in r]
    losses = [r["loss"] for r in rows if "loss" in r]
    print(f"smoke {stage}: {rows[-1].get('step')} steps, steps/s last {rates[-1] if rates else None}"
          f" (max {max(rates) if rates else None}), loss first {losses[:1]} last {losses[-1:]}")
size = os.path.getsize(os.path.join(os.path.dirname(out), "sample.mp4"))
print(f"smoke sample.mp4: {size} bytes")
EOF
}
step smoke 330 120 smoke

step speed_b 130 70 speed speed_b b cudnn peer .4
step speed_s_xla 100 60 speed speed_s_xla s xla nopeer .9

# --------------------------------------------------------------------------------- pytest

gpu_pytest() {
  local sel=(tests/test_attention.py tests/test_dit.py)
  [[ "$CPU" == 1 ]] && sel+=(-k "bfloat16 or cudnn")  # The dry run checks the plumbing only.
  # conftest.py sets JAX_PLATFORMS=cpu only when unset: here the tests run on the GPU. Their
  # tolerances were set for float32 on the CPU; JAX may run float32 matmuls in TF32 on a GPU,
  # so full float32 precision, so that a failure means a wrong GPU path rather than TF32.
  JAX_PLATFORMS=$PLATFORM JAX_DEFAULT_MATMUL_PRECISION=highest "$PY" -m pytest -q -p no:cacheprovider --maxfail=10 \
    --junitxml="$OUT/pytest_junit.xml" "${sel[@]}"
}
step pytest 120 45 gpu_pytest

step speed_b_xla 100 70 speed speed_b_xla b xla nopeer .9

# -------------------------------------------------------------------------------- summary

"$PY" - "$WORK" "$OUT/dit_speed.json" <<'EOF'
import glob, json, os, sys
work, out = sys.argv[1:]
reports = {}
for path in sorted(glob.glob(os.path.join(work, "speed_*.json"))):
  with open(path) as fh:
    reports[os.path.basename(path)[:-5]] = json.load(fh)
if reports:
  with open(out, "w") as fh:
    json.dump(reports, fh, indent=1)
print(f"{'run':<12} {'L':>6} {'op':<5} {'ours ms':>8} {'MFU':>6} {'Wan ms':>8} {'MFU':>6} {'ratio':>6}"
      "   peaks TFLOP/s (jax, torch)")
for name, rep in reports.items():
  peaks = rep["matmul_peak"]
  pk = ", ".join(f"{p['flop_per_s'] / 1e12:.1f}" for p in peaks.values())
  for r in rep["results"]:
    j, t = r["jax"], r.get("torch")
    wan = f"{t['ms']['median']:>8.1f} {t['mfu']:>6.1%} {r['ratio_median']:>6.2f}" if t else f"{'-':>8} {'-':>6} {'-':>6}"
    print(f"{name:<12} {r['tokens']:>6} {r['op']:<5} {j['ms']['median']:>8.1f} {j['mfu']:>6.1%} {wan}   {pk}")
EOF
log "steps (name, status, seconds):"
cat "$SUMMARY"
log "done in $((SECONDS - START))s; files in $OUT:"
ls -la "$OUT"
sleep 1  # Lets tee write the last lines before the command returns.
