"""AdamW with warmup, cosine decay and global-norm clipping."""

import optax

from spacetime_dit.config_types import OptimizerConfig


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


def make_optimizer(config: OptimizerConfig, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (optimizer, schedule). The schedule is also logged as `learning_rate`."""
  schedule = learning_rate_schedule(config, num_steps)
  parts = []
  if config.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip))
  parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay))
  return optax.chain(*parts), schedule
