"""AdamW with warmup, cosine decay and global-norm clipping, fused for XLA:CPU.

`make_optimizer` returns one `optax.GradientTransformation` that computes what
`optax.chain(optax.clip_by_global_norm(c), optax.adamw(schedule, ...))` computes (the reference,
`reference_optimizer`), with the same optimizer-state pytree (so checkpoints written with either
restore into the other), but written so that XLA:CPU makes no parameter-sized temporaries:

  * The chain clips into a new gradient tree that both Adam moments read, so XLA materialises the
    clipped gradients; here the clip is one scalar factor folded into each moment's update.
  * `optax.tree.norm` squares every leaf into a temporary before reducing it (XLA:CPU does not fuse
    a producer into a reduction); `global_norm` sums squares block by block instead.

On the 2-core dev box a parameter-sized temporary is expensive mostly because it is fresh memory:
glibc serves allocations above its mmap threshold (at most 32 MiB) from new pages, so every
step page-faults them in again (~5 us per 4 KiB page, i.e. a 37 MB temporary costs ~45 ms before
any arithmetic). For the `s` DiT at depth 4 (87M parameters), `steps.apply_gradients` (update plus
the `grad_norm` and `param_norm` metrics) took 1,344 ms median (1,284 min, 85,189 page faults)
with the chain and 449 ms (383 min, 1 page fault) with this, alternating in one process on the
2-core dev box under load ~8 (2026-11-25).
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from spacetime_dit.config_types import OptimizerConfig

# Elements per block of `sum_of_squares`' loop: 256 KiB of float32, so the squared block is a
# small, reused temporary; leaves at most this large are reduced in one piece.
NORM_BLOCK = 1 << 16
_EPS = 1e-8  # optax.adamw's default eps (outside the root).
_EPS_ROOT = 0.0  # optax.adamw's default eps_root (inside the root).


def learning_rate_schedule(config: OptimizerConfig, num_steps: int) -> optax.Schedule:
  """Linear warmup to the peak, then cosine decay to `final_lr_fraction` of it."""
  warmup = min(config.warmup_steps, max(num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=config.learning_rate,
      warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1),
      end_value=config.learning_rate * config.final_lr_fraction,
  )


def _blocked_sum_of_squares(x: jax.Array, block: int) -> jax.Array:
  """sum(x**2) in float32, a `block`-element slice at a time (no squared copy of x)."""
  flat = x.reshape(-1)
  full = flat.shape[0] // block

  def body(i, acc):
    part = jax.lax.dynamic_slice_in_dim(flat, i * block, block).astype(jnp.float32)
    return acc + jnp.sum(part * part)

  total = jnp.zeros((), jnp.float32)
  if full:
    total = jax.lax.fori_loop(0, full, body, total)
  tail = flat[full * block:].astype(jnp.float32)
  return total + jnp.sum(tail * tail)


def sum_of_squares(x: jax.Array, block: int = NORM_BLOCK) -> jax.Array:
  """sum(x**2) of one array, in float32.

  On a single CPU device, arrays larger than `block` elements are reduced block by block: XLA:CPU
  materialises `x * x` before a reduction, a fresh parameter-sized buffer per call. Elsewhere
  (accelerators, or several devices, where x may be sharded and flattening it would gather it)
  it is the plain `jnp.sum(x * x)`, which XLA fuses or shards well.
  """
  if x.size > block and jax.default_backend() == "cpu" and jax.device_count() == 1:
    return _blocked_sum_of_squares(x, block)
  x = x.astype(jnp.float32)
  return jnp.sum(x * x)


def global_norm(tree: Any) -> jax.Array:
  """The L2 norm of all leaves together, sqrt(sum of squares) (= `optax.tree.norm(tree)`)."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(sum_of_squares(x) for x in leaves))


def clip_factor(norm: jax.Array, max_norm: float) -> jax.Array:
  """The factor `optax.clip_by_global_norm(max_norm)` scales gradients of global norm `norm` by:
  1 when norm < max_norm, else max_norm / norm (Pascanu et al. 2013)."""
  return jnp.where(norm < max_norm, jnp.ones_like(norm), max_norm / norm)


def _safe_increment(count: jax.Array) -> jax.Array:
  """count + 1, saturating at the dtype's maximum (as `optax` counts)."""
  top = jnp.array(jnp.iinfo(count.dtype).max, count.dtype)
  return jnp.where(count < top, count + 1, top)


def reference_optimizer(config: OptimizerConfig, schedule: optax.Schedule
                        ) -> optax.GradientTransformation:
  """The plain optax chain that `clip_adamw` reproduces (its state layout, its numbers)."""
  parts = []
  if config.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip))
  parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=_EPS, eps_root=_EPS_ROOT,
                           weight_decay=config.weight_decay))
  return optax.chain(*parts)


def clip_adamw(config: OptimizerConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
  """Global-norm clipping + AdamW (Loshchilov & Hutter 2019), fused per parameter.

  Same state pytree as `reference_optimizer(config, schedule)`:
  `(EmptyState(), (ScaleByAdamState(count, mu, nu), EmptyState(), ScaleByScheduleState(count)))`
  with clipping, without it the same minus the first entry. Per parameter the update is
  optax's, operation for operation, except that the clipped gradient is `g * factor` (one
  scalar) rather than `(g / norm) * max_norm`, which differs by float rounding only.
  """
  reference = reference_optimizer(config, schedule)
  clip = config.grad_clip > 0
  b1, b2, wd = config.b1, config.b2, config.weight_decay

  def update_fn(grads, state, params=None):
    if params is None and wd != 0:
      raise ValueError("clip_adamw with weight_decay != 0 needs params in update(grads, state, "
                       "params).")
    clip_state, (adam, decay_state, lr_state) = state if clip else (None, state[0])
    factor = clip_factor(global_norm(grads), config.grad_clip) if clip else None
    count = _safe_increment(adam.count)
    # Bias corrections 1 - b^t, in float32 as optax computes them.
    correction1, correction2 = 1 - b1 ** count, 1 - b2 ** count
    step_size = -schedule(lr_state.count)

    def clipped(g):
      return g if factor is None else g * factor.astype(g.dtype)

    # optax.tree.update_moment(_per_elem_norm): (1 - b) * g^order + b * moment.
    mu = jax.tree.map(lambda g, m: (1 - b1) * clipped(g) + b1 * m, grads, adam.mu)
    nu = jax.tree.map(lambda g, v: (1 - b2) * (clipped(g) ** 2) + b2 * v, grads, adam.nu)

    def update(m, v, p):
      u = (m / correction1.astype(m.dtype)) / (
          jnp.sqrt(v / correction2.astype(v.dtype) + _EPS_ROOT) + _EPS)
      if wd != 0:
        u = u + wd * p
      return jnp.array(step_size, dtype=u.dtype) * u

    if params is None:
      updates = jax.tree.map(lambda m, v: update(m, v, None), mu, nu)
    else:
      updates = jax.tree.map(update, mu, nu, params)
    new_adam = type(adam)(count=count, mu=mu, nu=nu)
    new_lr = type(lr_state)(count=_safe_increment(lr_state.count))
    inner = (new_adam, decay_state, new_lr)
    return updates, ((clip_state, inner) if clip else (inner,))

  return optax.GradientTransformation(reference.init, update_fn)


def make_optimizer(config: OptimizerConfig, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (optimizer, schedule). The schedule is also logged as `learning_rate`."""
  schedule = learning_rate_schedule(config, num_steps)
  return clip_adamw(config, schedule), schedule
