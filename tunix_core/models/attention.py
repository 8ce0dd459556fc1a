"""Attention implementations behind one function; `attention=` in the config picks one."""

import jax
import jax.numpy as jnp

from tunix_core.sharding import shard_activation

IMPLEMENTATIONS = ("dot_product",)


def attention_mask(segment_ids: jax.Array, window: jax.Array | int = 0) -> jax.Array:
  """[B, S, S] boolean: causal, within the same segment, and (window > 0) only the last `window` keys.

  Query i sees key j when j <= i and i - window < j, the sliding-window convention of Hugging Face's
  Gemma 2/3. Packed segments are contiguous, so row offsets equal position offsets within a segment.
  """
  length = segment_ids.shape[-1]
  offsets = jnp.arange(length)[:, None] - jnp.arange(length)[None, :]
  visible = (offsets >= 0) & ((window <= 0) | (offsets < window))
  same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
  return visible[None] & same_segment


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, scale: float,
                          window: jax.Array | int = 0, logit_softcap: float = 0.0) -> jax.Array:
  """Plain XLA attention. q [B, S, H, D], k/v [B, S, K, D] with K dividing H -> [B, S, H, D].

  Softmax runs in float32. Soft-capping (Gemma 2) maps scores s to c * tanh(s / c) before masking.
  Masked scores use the lowest finite float32 rather than -inf so a padding row never produces NaN.
  """
  batch, length, heads, dim = q.shape
  groups = heads // k.shape[2]
  q = q.reshape(batch, length, k.shape[2], groups, dim)
  scores = jnp.einsum("bskgd,btkd->bkgst", q, k).astype(jnp.float32) * scale
  if logit_softcap:
    scores = logit_softcap * jnp.tanh(scores / logit_softcap)
  mask = attention_mask(segment_ids, window)[:, None, None]
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgst,btkd->bskgd", probs, v).reshape(batch, length, heads, dim)
  return shard_activation(out, ("activation_batch", "activation_length", "activation_heads", None))


def attend(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, scale: float,
           window: jax.Array | int = 0, logit_softcap: float = 0.0, implementation: str) -> jax.Array:
  """Dispatches to the configured implementation."""
  if implementation == "dot_product":
    return dot_product_attention(q, k, v, segment_ids, scale, window, logit_softcap)
  raise ValueError(f"unknown attention implementation {implementation!r}; expected one of {IMPLEMENTATIONS}")
