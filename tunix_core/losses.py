"""Numerics shared by every mode: chunked token log-probs, cross-entropy and masked reductions.

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
  lead_shape = targets.shape
  flat_hidden = hidden.reshape(-1, hidden.shape[-1])
  flat_targets = targets.reshape(-1)
  total = flat_targets.shape[0]

  def chunk_log_probs(h: jax.Array, t: jax.Array) -> jax.Array:
    logits = logits_fn(h).astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
    return target_logit - jax.nn.logsumexp(logits, axis=-1)

  if chunk_size <= 0 or chunk_size >= total:
    return chunk_log_probs(flat_hidden, flat_targets).reshape(lead_shape)
  num_chunks = -(-total // chunk_size)
  pad = num_chunks * chunk_size - total
  flat_hidden = jnp.pad(flat_hidden, ((0, pad), (0, 0)))
  flat_targets = jnp.pad(flat_targets, (0, pad))
  chunks = (flat_hidden.reshape(num_chunks, chunk_size, -1), flat_targets.reshape(num_chunks, chunk_size))
  log_probs = jax.lax.map(jax.checkpoint(lambda c: chunk_log_probs(*c)), chunks)
  return log_probs.reshape(-1)[:total].reshape(lead_shape)


def masked_sum(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Sum of values where mask is set, in float32."""
  return jnp.sum(values.astype(jnp.float32) * mask.astype(jnp.float32))


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of values where mask is set (0 when the mask is empty)."""
  count = jnp.sum(mask.astype(jnp.float32))
  return masked_sum(values, mask) / jnp.maximum(count, 1.0)
