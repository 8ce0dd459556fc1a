"""Attention of one new token per row against a KV cache (generation's decode step), behind one function.

The implementation follows the model's `attention` setting: where it resolves to a kernel (flash or cudnn:
NVIDIA GPUs, or attention=flash explicitly) the Pallas decode kernel (kernels/decode_attention.py) runs, which
reads only each row's visible cache blocks; otherwise plain XLA over the whole cache with a mask. On CPU the
kernel only runs interpreted (slow; the tests use it), so `auto` stays with XLA there.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from tunix_core.models import attention as attention_lib
from tunix_core.sharding import logical_to_spec


def xla_attend_one(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array, scale: float,
                   window: jax.Array | int = 0, logit_softcap: float = 0.0) -> jax.Array:
  """q [B, H, D] against k/v [B, K, T, D] where row b holds `lengths[b]` valid entries and the query sits at
  position lengths - 1 -> [B, H, D]. Scores in float32, soft-capped before masking, as the training path."""
  batch, heads, dim = q.shape
  kv_heads = k_cache.shape[1]
  q = q.reshape(batch, kv_heads, heads // kv_heads, dim)
  scores = jnp.einsum("bkgd,bktd->bkgt", q, k_cache).astype(jnp.float32) * scale
  if logit_softcap:
    scores = logit_softcap * jnp.tanh(scores / logit_softcap)
  keys = jnp.arange(k_cache.shape[2])[None, :]
  last = lengths[:, None]
  visible = (keys < last) & ((window <= 0) | (keys >= last - window))
  scores = jnp.where(visible[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
  return jnp.einsum("bkgt,bktd->bkgd", probs, v_cache).reshape(batch, heads, dim)


def kernel_applies(head_dim: int) -> bool:
  """The Triton lowering of the decode kernel needs a power-of-two head_dim >= 16."""
  return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def pallas_attend_one(q, k_cache, v_cache, lengths, scale, window, logit_softcap) -> jax.Array:
  """The Pallas decode kernel on each device's block (a pallas_call cannot be partitioned by XLA): rows stay
  split as the batch is, heads as the kv heads are; each device holds whole cache rows."""
  from kernels.decode_attention import decode_attention  # pylint: disable=import-outside-toplevel

  def run(q, k_cache, v_cache, lengths, window):
    return decode_attention(q, k_cache, v_cache, lengths, sliding_window=window, logit_softcap=logit_softcap or None,
                            scale=scale)

  window = jnp.asarray(window, jnp.int32)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return run(q, k_cache, v_cache, lengths, window)
  batch, heads, kv_heads = (logical_to_spec((name,))[0] for name in
                            ("activation_batch", "activation_heads", "activation_kv_heads"))
  q_spec = PartitionSpec(batch, heads, None)
  cache_spec = PartitionSpec(batch, kv_heads, None, None)
  return jax.shard_map(run, in_specs=(q_spec, cache_spec, cache_spec, PartitionSpec(batch), PartitionSpec()),
                       out_specs=q_spec, check_vma=False)(q, k_cache, v_cache, lengths, window)


def attend_one(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array, *, scale: float,
               window: jax.Array | int = 0, logit_softcap: float = 0.0, implementation: str = "auto") -> jax.Array:
  """One query per row: q [B, H, D], k/v caches [B, K, T, D], lengths [B] valid entries (the query's own k/v
  included, at lengths - 1) -> [B, H, D]. window > 0 keeps the last `window` keys (may be traced)."""
  # Any kernel choice (flash, or cudnn, which has no decode path of its own) means this one.
  resolved = attention_lib.resolve(implementation)
  if resolved in ("flash", "cudnn") and kernel_applies(q.shape[-1]):
    return pallas_attend_one(q, k_cache, v_cache, lengths, scale, window, logit_softcap)
  return xla_attend_one(q, k_cache, v_cache, lengths, scale, window, logit_softcap)
