"""The model side of generation: padded prompts -> prefill into a fresh KV cache -> one token per row per
decode step. Shared by the sampling loop (sampler.py) and beam search (beam.py); runs inside their jit.

The cache holds each row's prompt from entry 0 (prompts are right-aligned to the left edge whatever padding
they came with), so a row's valid entries are exactly [0, length): the layout the decode kernel reads.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tunix_core.models.transformer import KVCache, Transformer
from tunix_core.sharding import shard_count

DEFAULT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)


def bucket(length: int, buckets: Sequence[int]) -> int:
  """The padded prompt length for `length`: the first bucket that fits, else a multiple of the largest, so a
  new batch recompiles only when it needs a bucket not seen before."""
  for size in sorted(buckets):
    if size >= length:
      return size
  largest = max(buckets)
  return -(-length // largest) * largest


def cache_length(prompt_bucket: int, max_new_tokens: int) -> int:
  """Cache entries for a prompt bucket plus the new tokens, rounded up to a multiple of 16 (the decode kernel's
  smallest block)."""
  return -(-(prompt_bucket + max_new_tokens) // 16) * 16


def batch_shards() -> int:
  """How many ways the active mesh and rules split the batch (1 without a mesh): batches are padded to a multiple,
  since the decode kernel runs per shard and needs whole rows on each."""
  return shard_count("activation_batch")


def compact(tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Moves each row's real tokens (mask set) to the front, in order: left, right or any padding gives the
  same rows. Returns (tokens, lengths)."""
  order = jnp.argsort(jnp.logical_not(mask.astype(bool)), axis=1, stable=True)
  return jnp.take_along_axis(tokens, order, axis=1), jnp.sum(mask.astype(jnp.int32), axis=1)


def model_for_generation(graphdef: nnx.GraphDef, weights) -> Transformer:
  """The model to prefill and decode with: merged, with a scanned layer stack split into one module per layer
  (Transformer.unstack_layers says why). Call it inside jit, before the decode loop."""
  model = nnx.merge(graphdef, weights)
  model.unstack_layers()
  return model


def prefill(model: Transformer, tokens: jax.Array, lengths: jax.Array, length: int) -> tuple[jax.Array, KVCache]:
  """Runs front-aligned prompts [B, P] (lengths >= 1) through the model into a new cache of `length` entries;
  returns the logits [B, V] after each prompt's last token and the cache."""
  batch, prompt_length = tokens.shape
  cache = model.init_cache(batch, length)
  positions = jnp.broadcast_to(jnp.arange(prompt_length, dtype=jnp.int32), (batch, prompt_length))
  # Padding is its own segment: real tokens never attend to it.
  segment_ids = (positions < lengths[:, None]).astype(jnp.int32)
  hidden, cache = model.hidden_states(tokens, positions, segment_ids, cache, jnp.zeros((batch,), jnp.int32))
  last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
  return model.logits(last), cache


def decode(model: Transformer, tokens: jax.Array, positions: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
  """One token per row (tokens [B]) at `positions` [B] (= the entries each row's cache holds) -> logits [B, V]."""
  hidden, cache = model.hidden_states(tokens[:, None], positions[:, None], jnp.ones_like(tokens)[:, None], cache,
                                      positions)
  return model.logits(hidden[:, 0]), cache


def reorder(cache: KVCache, rows: jax.Array) -> KVCache:
  """The cache with its batch rows taken from `rows` (beam search's survivors; copies of a prompt's rows)."""
  return jax.tree.map(lambda a: jnp.take(a, rows, axis=0), cache)
