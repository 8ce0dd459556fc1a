"""Numerics shared by every mode: chunked token log-probs (and entropy), cross-entropy, masked reductions, and
RL's KL estimators and loss aggregations.

The output head is applied in chunks of tokens under `jax.checkpoint`, so neither the forward nor the
backward pass ever holds a [batch, length, vocab] float32 array: only [chunk, vocab] at a time.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def map_token_chunks(fn: Callable[..., Any], chunk_size: int, *arrays: jax.Array) -> Any:
  """fn over chunks of `chunk_size` tokens of arrays [N, ...] (0 = all at once) -> its outputs, each [N, ...].

  Each chunk runs under jax.checkpoint, so the backward pass recomputes a chunk's [chunk, vocab] temporaries
  instead of keeping every chunk's. The last chunk is padded with zeros; its padding rows are cut off.
  """
  total = arrays[0].shape[0]
  if chunk_size <= 0 or chunk_size >= total:
    return fn(*arrays)
  num_chunks = -(-total // chunk_size)
  pad = num_chunks * chunk_size - total
  chunks = tuple(jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)).reshape(num_chunks, chunk_size, *a.shape[1:])
                 for a in arrays)
  out = jax.lax.map(jax.checkpoint(lambda c: fn(*c)), chunks)
  return jax.tree.map(lambda o: o.reshape(-1, *o.shape[2:])[:total], out)


def token_log_probs(logits_fn: Callable[[jax.Array], jax.Array], hidden: jax.Array, targets: jax.Array,
                    chunk_size: int = 0) -> jax.Array:
  """log p(targets) under logits_fn(hidden): hidden [..., E], targets [...] -> float32 [...].

  chunk_size is in tokens (0 = all at once). The gather picks the target logit by index, never a one-hot.
  """
  def chunk_log_probs(h: jax.Array, t: jax.Array) -> jax.Array:
    logits = logits_fn(h).astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
    return target_logit - jax.nn.logsumexp(logits, axis=-1)

  flat = map_token_chunks(chunk_log_probs, chunk_size, hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1))
  return flat.reshape(targets.shape)



def token_log_probs_and_entropy(logits_fn: Callable[[jax.Array], jax.Array], hidden: jax.Array,
                                targets: jax.Array, chunk_size: int = 0) -> tuple[jax.Array, jax.Array]:
  """(log p(targets), entropy of the whole next-token distribution) per token, float32 [...], from one pass of the
  head over each chunk (RL logs the entropy; PPO's entropy bonus differentiates it)."""
  def chunk(h: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    log_probs = jax.nn.log_softmax(logits_fn(h).astype(jnp.float32), axis=-1)
    return (jnp.take_along_axis(log_probs, t[:, None], axis=-1)[:, 0],
            -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1))
  out = map_token_chunks(chunk, chunk_size, hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1))
  return jax.tree.map(lambda x: x.reshape(targets.shape), out)

def masked_sum(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Sum of values where mask is set, in float32."""
  return jnp.sum(values.astype(jnp.float32) * mask.astype(jnp.float32))


def last_index(mask: jax.Array) -> jax.Array:
  """Index of the last set entry along the last axis of mask [..., T] -> int32 [...] (0 for an empty row)."""
  flags = mask > 0
  length = flags.shape[-1]
  return jnp.where(jnp.any(flags, axis=-1), length - 1 - jnp.argmax(jnp.flip(flags, axis=-1), axis=-1), 0
                   ).astype(jnp.int32)


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
