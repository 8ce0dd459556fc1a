"""Per-token clipped policy-gradient objectives of the GRPO family (grpo, gspo_token, dr_grpo, dapo).

Inputs are [rows, length] float arrays aligned with the batch's targets; only mask-set tokens matter. The caller
adds the KL term and aggregates (tunix_core.losses.aggregate); everything here is one token's loss.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

LOSS_ALGOS = ("grpo", "gspo_token", "dr_grpo", "dapo")


class PolicyLoss(NamedTuple):
  """Per-token losses and, for metrics, the importance ratio each token was weighted with and where clipping
  took effect (float 0/1): low = ratio under 1 - epsilon with a negative advantage, high = ratio over
  1 + epsilon_high with a positive one, dual = the dual clip's bound on a negative advantage."""
  token_losses: jax.Array
  ratio: jax.Array
  clipped_low: jax.Array
  clipped_high: jax.Array
  clipped_dual: jax.Array


def importance_ratio(log_probs: jax.Array, old_log_probs: jax.Array, mask: jax.Array, algo: str) -> jax.Array:
  """pi / pi_old per token. gspo_token (Zheng et al. 2025, arXiv 2507.18071, eq. 13) uses the sequence ratio
  s_i = exp(mean_t log(pi / pi_old)) as each token's value, with the gradient of the token's own log-prob:
  sg(s_i) * pi_t / sg(pi_t)."""
  log_ratio = log_probs - old_log_probs
  if algo != "gspo_token":
    return jnp.exp(log_ratio)
  mask = mask.astype(log_probs.dtype)
  sequence = jnp.sum(log_ratio * mask, axis=-1, keepdims=True) / jnp.maximum(jnp.sum(mask, -1, keepdims=True), 1.0)
  return jnp.exp(jax.lax.stop_gradient(sequence) + log_probs - jax.lax.stop_gradient(log_probs))


def policy_loss(log_probs: jax.Array, old_log_probs: jax.Array, advantages: jax.Array, mask: jax.Array, *,
                algo: str, epsilon: float, epsilon_high: float, dual_clip_c: float = 0.0) -> PolicyLoss:
  """PPO's clipped surrogate per token, -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A), with r from
  `importance_ratio`. advantages are per row [rows] (one per completion) or per token [rows, length].
  dual_clip_c > 1 bounds the loss of negative advantages by -c A (Ye et al. 2020, arXiv 1912.09729); 0 = off.
  dapo's clip-higher is epsilon_high > epsilon; grpo, dr_grpo and dapo share this per-token form and differ in
  aggregation, advantage scaling and KL, which the mode sets."""
  if algo not in LOSS_ALGOS:
    raise ValueError(f"loss algo {algo!r}: expected one of {', '.join(LOSS_ALGOS)}")
  log_probs = log_probs.astype(jnp.float32)
  old_log_probs = old_log_probs.astype(jnp.float32)
  advantages = jnp.asarray(advantages, jnp.float32)
  if advantages.ndim == log_probs.ndim - 1:
    advantages = advantages[..., None]
  ratio = importance_ratio(log_probs, old_log_probs, mask, algo)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - epsilon, 1.0 + epsilon_high)
  losses = jnp.maximum(unclipped, clipped)
  negative = advantages < 0
  dual = jnp.zeros_like(losses, dtype=bool)
  if dual_clip_c:
    bound = -advantages * dual_clip_c
    dual = negative & (losses > bound)
    losses = jnp.where(negative, jnp.minimum(losses, bound), losses)
  value = jax.lax.stop_gradient(ratio)
  low = negative & (value < 1.0 - epsilon)
  high = (advantages > 0) & (value > 1.0 + epsilon_high)
  as_float = lambda x: jnp.broadcast_to(x, losses.shape).astype(jnp.float32)
  return PolicyLoss(losses, value, as_float(low), as_float(high), as_float(dual))
