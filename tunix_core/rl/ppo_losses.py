"""PPO's numerics as pure functions on [batch, time] arrays: GAE, whitening, the clipped policy and value losses,
per-token entropy from hidden states, and KL-shaped per-token rewards.

`mask` [B, T] is 1 on the tokens that are actions (completion tokens) and 0 on prompt, environment and padding
tokens. Per-token losses come back multiplied by the mask: a mode sums them (LossOutput.loss_sum) and counts the
mask (LossOutput.weight), so the train step normalises them over every token of the step, as for SFT.
Everything is computed in float32.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from tunix_core import losses


def _f32(x: jax.Array) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, *, gamma: float, lam: float
        ) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation (Schulman et al. 2016, arXiv 1506.02438) over each row's masked tokens.

  For the masked tokens t of a row, with t' the next masked token after t (none after the last one):
    delta_t = r_t + gamma V(t') - V(t),   A_t = delta_t + gamma lam A(t'),   V(none) = A(none) = 0.
  Unmasked tokens are not steps of the episode: they are skipped (a gap inside the completion, e.g. tool output,
  joins its neighbours), and the last masked token ends the episode. Returns (advantages, returns = A + V), both
  float32 [B, T] and 0 outside the mask. A reverse lax.scan over time.
  """
  r, v, m = (_f32(x).T for x in (rewards, values, mask))

  def step(carry, per_token):
    next_value, next_advantage = carry
    reward, value, active = per_token
    advantage = reward + gamma * next_value - value + gamma * lam * next_advantage
    keep = active > 0
    carry = (jnp.where(keep, value, next_value), jnp.where(keep, advantage, next_advantage))
    return carry, jnp.where(keep, advantage, 0.0)

  zeros = jnp.zeros(r.shape[1], jnp.float32)
  _, advantages = jax.lax.scan(step, (zeros, zeros), (r, v, m), reverse=True)
  return advantages.T, (advantages + v).T * m.T


def whiten(values: jax.Array, mask: jax.Array, *, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
  """(x - mean) / sqrt(var + eps) over the masked entries of the whole batch, with the unbiased variance (TRL's
  masked_whiten); shift_mean=False adds the mean back. 0 outside the mask."""
  x, m = _f32(values), _f32(mask)
  count = jnp.sum(m)
  mean = jnp.sum(x * m) / jnp.maximum(count, 1.0)
  variance = jnp.sum(jnp.square((x - mean) * m)) / jnp.maximum(count - 1.0, 1.0)
  whitened = (x - mean) * jax.lax.rsqrt(variance + eps)
  return (whitened if shift_mean else whitened + mean) * m


class PolicyLoss(NamedTuple):
  """Per-token terms of the clipped policy loss, each [B, T] and 0 outside the mask."""
  loss: jax.Array
  clipped: jax.Array      # 1 where the clipped objective was the larger (no gradient flows there)
  approx_kl: jax.Array    # 0.5 (log pi - log pi_old)^2, the KL estimate PPO implementations log


def policy_loss(log_probs: jax.Array, old_log_probs: jax.Array, advantages: jax.Array, mask: jax.Array, *,
                clip_epsilon: float, clip_epsilon_high: float | None = None) -> PolicyLoss:
  """PPO's clipped surrogate (Schulman et al. 2017, arXiv 1707.06347, eq. 7), as a loss per token:
  max(-A r, -A clip(r, 1 - eps, 1 + eps_high)) with r = exp(log_probs - old_log_probs).

  clip_epsilon_high (default clip_epsilon) is DAPO's decoupled upper bound. Gradients flow through log_probs only.
  """
  m = _f32(mask)
  log_ratio = _f32(log_probs) - jax.lax.stop_gradient(_f32(old_log_probs))
  ratio = jnp.exp(log_ratio)
  advantages = jax.lax.stop_gradient(_f32(advantages))
  high = clip_epsilon if clip_epsilon_high is None else clip_epsilon_high
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_epsilon, 1.0 + high)
  return PolicyLoss(loss=jnp.maximum(unclipped, clipped) * m, clipped=(clipped > unclipped) * m,
                    approx_kl=0.5 * jnp.square(jax.lax.stop_gradient(log_ratio)) * m)


class ValueLoss(NamedTuple):
  """Per-token terms of the value loss, each [B, T] and 0 outside the mask."""
  loss: jax.Array
  clipped: jax.Array      # 1 where the clipped error was the larger


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array, *,
               clip_range: float) -> ValueLoss:
  """0.5 max((V - R)^2, (V_clip - R)^2) per token with V_clip = V_old + clip(V - V_old, -clip_range, clip_range)
  (the clipped value loss of OpenAI's PPO2 and TRL); clip_range 0 = no clipping, 0.5 (V - R)^2."""
  m = _f32(mask)
  v = _f32(values)
  old, target = jax.lax.stop_gradient(_f32(old_values)), jax.lax.stop_gradient(_f32(returns))
  unclipped = jnp.square(v - target)
  if clip_range <= 0:
    return ValueLoss(loss=0.5 * unclipped * m, clipped=jnp.zeros_like(m))
  clipped = jnp.square(old + jnp.clip(v - old, -clip_range, clip_range) - target)
  return ValueLoss(loss=0.5 * jnp.maximum(unclipped, clipped) * m, clipped=(clipped > unclipped) * m)


def _entropy(logits: jax.Array) -> jax.Array:
  """Entropy of softmax(logits) over the last axis: logsumexp(z) - sum(softmax(z) z)."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)


def token_entropy(logits_fn: Callable[[jax.Array], jax.Array], hidden: jax.Array, chunk_size: int = 0
                  ) -> jax.Array:
  """Entropy of the next-token distribution logits_fn(hidden) per token: hidden [..., E] -> float32 [...], the
  head applied in chunks of chunk_size tokens (losses.map_token_chunks), never to all tokens at once. Scale
  logits_fn by 1 / temperature to match a sampling temperature."""
  flat = losses.map_token_chunks(lambda h: _entropy(logits_fn(h).astype(jnp.float32)), chunk_size,
                                 hidden.reshape(-1, hidden.shape[-1]))
  return flat.reshape(hidden.shape[:-1])


def kl_shaped_rewards(sequence_rewards: jax.Array, kl: jax.Array, mask: jax.Array, *, beta: float) -> jax.Array:
  """Per-token rewards -beta kl_t on the masked tokens, plus each row's sequence reward on its last masked token
  (Ziegler et al. 2019, arXiv 1909.08593; TRL's PPOTrainer). kl [B, T] is a per-token estimate of
  KL(policy || reference) (e.g. log pi - log pi_ref); sequence_rewards [B]. A row without masked tokens gets 0."""
  m = _f32(mask)
  last = jax.nn.one_hot(losses.last_index(m), m.shape[-1], dtype=jnp.float32) * m
  return -beta * _f32(kl) * m + last * _f32(sequence_rewards)[:, None]
