"""Numerics shared by every mode: chunked token log-probs, cross-entropy, masked reductions, and RL's KL
estimators and loss aggregations.

The output head is applied in chunks of tokens under `jax.checkpoint`, so neither the forward nor the
backward pass ever holds a [batch, length, vocab] float32 array: only [chunk, vocab] at a time.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp


def token_log_probs(logits_fn: Callable[[jax.Array], jax.Array], hidden: jax.Array, targets: jax.Array,
                    chunk_size: int = 0) -> jax.Array:
  """log p(targets) under logits_fn(hidden): hidden [..., E], targets [...] -> float32 [...].

  chunk_size is in tokens (0 = all at once). The gather picks the target logit by index, never a one-hot.
  """
  return _chunked(lambda h, t: _target_log_probs(logits_fn(h).astype(jnp.float32), t), hidden, targets,
                  chunk_size)


def token_log_probs_and_entropy(logits_fn: Callable[[jax.Array], jax.Array], hidden: jax.Array,
                                targets: jax.Array, chunk_size: int = 0) -> tuple[jax.Array, jax.Array]:
  """token_log_probs and the entropy of each position's whole distribution (float32 [...], no gradient: RL
  logs it), from the same chunks of logits."""

  def log_probs_and_entropy(h, t):
    logits = logits_fn(h).astype(jnp.float32)
    log_softmax = jax.nn.log_softmax(jax.lax.stop_gradient(logits), axis=-1)
    entropy = -jnp.sum(jnp.exp(log_softmax) * log_softmax, axis=-1)
    return _target_log_probs(logits, t), entropy

  return _chunked(log_probs_and_entropy, hidden, targets, chunk_size)


def _target_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
  return target_logit - jax.nn.logsumexp(logits, axis=-1)


def _chunked(fn: Callable, hidden: jax.Array, targets: jax.Array, chunk_size: int):
  """fn(hidden [n, E], targets [n]) -> per-token arrays [n] (or a tuple of them), applied in chunks of tokens
  under jax.checkpoint and reshaped to targets' shape."""
  lead_shape = targets.shape
  flat_hidden = hidden.reshape(-1, hidden.shape[-1])
  flat_targets = targets.reshape(-1)
  total = flat_targets.shape[0]
  if chunk_size <= 0 or chunk_size >= total:
    out = fn(flat_hidden, flat_targets)
    return jax.tree.map(lambda x: x.reshape(lead_shape), out)
  num_chunks = -(-total // chunk_size)
  pad = num_chunks * chunk_size - total
  flat_hidden = jnp.pad(flat_hidden, ((0, pad), (0, 0)))
  flat_targets = jnp.pad(flat_targets, (0, pad))
  chunks = (flat_hidden.reshape(num_chunks, chunk_size, -1), flat_targets.reshape(num_chunks, chunk_size))
  out = jax.lax.map(jax.checkpoint(lambda c: fn(*c)), chunks)
  return jax.tree.map(lambda x: x.reshape(-1)[:total].reshape(lead_shape), out)


def masked_sum(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Sum of values where mask is set, in float32."""
  return jnp.sum(values.astype(jnp.float32) * mask.astype(jnp.float32))


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of values where mask is set (0 when the mask is empty)."""
  count = jnp.sum(mask.astype(jnp.float32))
  return masked_sum(values, mask) / jnp.maximum(count, 1.0)


KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("token-mean", "sequence-mean-token-mean", "sequence-mean-token-sum", "sequence-mean-token-sum-norm")


def kl_penalty(log_probs: jax.Array, reference_log_probs: jax.Array, estimator: str) -> jax.Array:
  """Per-token estimate of KL(policy || reference) from tokens sampled by the policy (Schulman 2020,
  "Approximating KL divergence"): with d = reference - policy log-prob, k1 = -d, k2 = d^2 / 2, k3 = e^d - d - 1.
  k1 is unbiased, k3 unbiased and never negative, k2 biased with low variance."""
  delta = reference_log_probs.astype(jnp.float32) - log_probs.astype(jnp.float32)
  if estimator == "k1":
    return -delta
  if estimator == "k2":
    return 0.5 * jnp.square(delta)
  if estimator == "k3":
    return jnp.exp(delta) - delta - 1.0
  raise ValueError(f"kl estimator {estimator!r}: expected one of {', '.join(KL_ESTIMATORS)}")


def aggregate(token_losses: jax.Array, mask: jax.Array, how: str, horizon: int = 0) -> tuple[jax.Array, jax.Array]:
  """(loss_sum, weight) of per-token losses [rows, length], so that a step's loss is sum(loss_sum) / sum(weight) over
  its micro-batches, exactly as if the whole step were one batch:
    token-mean                   every token of the step weighs the same (DAPO)
    sequence-mean-token-mean     each row's token mean, averaged over rows (GRPO)
    sequence-mean-token-sum      each row's token sum, averaged over rows
    sequence-mean-token-sum-norm each row's token sum / horizon, averaged over rows (Dr. GRPO: horizon = the
                                 longest completion allowed, a constant, so no length bias)
  Rows without loss tokens count nowhere."""
  mask = mask.astype(jnp.float32)
  row_sums = jnp.sum(token_losses.astype(jnp.float32) * mask, axis=-1)
  row_tokens = jnp.sum(mask, axis=-1)
  rows = jnp.sum((row_tokens > 0).astype(jnp.float32))
  if how == "token-mean":
    return jnp.sum(row_sums), jnp.sum(row_tokens)
  if how == "sequence-mean-token-mean":
    return jnp.sum(row_sums / jnp.maximum(row_tokens, 1.0)), rows
  if how == "sequence-mean-token-sum":
    return jnp.sum(row_sums), rows
  if how == "sequence-mean-token-sum-norm":
    if horizon <= 0:
      raise ValueError("sequence-mean-token-sum-norm needs a positive horizon (the longest completion allowed)")
    return jnp.sum(row_sums) / horizon, rows
  raise ValueError(f"aggregation {how!r}: expected one of {', '.join(AGGREGATIONS)}")
