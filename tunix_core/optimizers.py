"""Optimizer and learning-rate schedule from the config (optax)."""

import optax


def learning_rate_schedule(config) -> optax.Schedule:
  """Linear warmup from 0 to learning_rate over warmup_steps, then cosine, linear or constant to the end."""
  peak, warmup = config.learning_rate, config.warmup_steps
  final = peak * config.cosine_learning_rate_final_fraction
  decay_steps = max(config.steps - warmup, 1)
  if config.learning_rate_schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.cosine_learning_rate_final_fraction)
  elif config.learning_rate_schedule == "linear":
    after = optax.linear_schedule(peak, final, decay_steps)
  else:
    after = optax.constant_schedule(peak)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def build_optimizer(config) -> optax.GradientTransformation:
  """Global-norm clipping (when gradient_clipping_threshold > 0), then the chosen optimizer."""
  schedule = learning_rate_schedule(config)
  if config.opt_type == "adamw":
    opt = optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                      weight_decay=config.adam_weight_decay)
  elif config.opt_type == "adam":
    opt = optax.adam(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps)
  elif config.opt_type == "sgd":
    opt = optax.sgd(schedule)
  else:
    opt = optax.adafactor(schedule, weight_decay_rate=config.adam_weight_decay or None)
  if config.gradient_clipping_threshold > 0:
    return optax.chain(optax.clip_by_global_norm(config.gradient_clipping_threshold), opt)
  return opt
