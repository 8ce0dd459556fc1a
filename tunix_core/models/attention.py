"""Attention implementations behind one function; `attention=` in the config picks one."""

import jax
import jax.numpy as jnp

from tunix_core.sharding import shard_activation

IMPLEMENTATIONS = ("dot_product",)


def attention_mask(segment_ids: jax.Array) -> jax.Array:
  """[B, S, S] boolean: causal, and only within the same segment (packed examples never see each other)."""
  length = segment_ids.shape[-1]
  causal = jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))
  same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
  return causal[None] & same_segment


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                          scale: float) -> jax.Array:
  """Plain XLA attention. q [B, S, H, D], k/v [B, S, K, D] with K dividing H -> [B, S, H, D].

  Softmax runs in float32. Masked scores use the dtype's lowest finite value rather than -inf so that
  a padding row (which sees only itself) never produces NaN.
  """
  batch, length, heads, dim = q.shape
  groups = heads // k.shape[2]
  q = q.reshape(batch, length, k.shape[2], groups, dim)
  scores = jnp.einsum("bskgd,btkd->bkgst", q, k).astype(jnp.float32) * scale
  mask = attention_mask(segment_ids)[:, None, None]
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgst,btkd->bskgd", probs, v).reshape(batch, length, heads, dim)
  return shard_activation(out, ("activation_batch", "activation_length", "activation_heads", None))


def attend(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, scale: float,
           implementation: str) -> jax.Array:
  """Dispatches to the configured implementation."""
  if implementation == "dot_product":
    return dot_product_attention(q, k, v, segment_ids, scale)
  raise ValueError(f"unknown attention implementation {implementation!r}; expected one of {IMPLEMENTATIONS}")
