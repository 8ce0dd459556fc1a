"""Numerics shared by every mode: chunked token log-probs, cross-entropy and masked reductions.

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


def masked_sum(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Sum of values where mask is set, in float32."""
  return jnp.sum(values.astype(jnp.float32) * mask.astype(jnp.float32))


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of values where mask is set (0 when the mask is empty)."""
  count = jnp.sum(mask.astype(jnp.float32))
  return masked_sum(values, mask) / jnp.maximum(count, 1.0)
