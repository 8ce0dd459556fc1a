"""Attention implementations behind one function; `attention=` in the config picks one.

  xla    plain XLA einsums (materialises [S, S] scores per head; the reference for the others)
  flash  our Pallas kernel (kernels/flash_attention.py): GPU Triton lowering, TPU Mosaic, CPU interpret
  cudnn  jax.nn.dot_product_attention(implementation="cudnn"), NVIDIA GPUs only, no soft-capping
  auto   what benchmarks/RESULTS.md measured fastest among the correct options: cudnn on NVIDIA GPUs for bf16/fp16
         without soft-capping (flash there otherwise: Gemma 2, float32), xla on CPU (where Pallas only runs
         interpreted) and on TPU (the Mosaic lowering of our kernel is untested on TPU hardware)

The model passes each layer's window as a traced value (layers are scanned) plus the model's one static
window size; kernels that need a static window branch on it with lax.cond.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax.sharding import PartitionSpec

from tunix_core.sharding import logical_to_spec, shard_activation

IMPLEMENTATIONS = ("auto", "xla", "flash", "cudnn")


def resolve(implementation: str, platform: str | None = None, dtype=jnp.bfloat16, logit_softcap: float = 0.0) -> str:
  """The implementation `auto` stands for on this platform and call (others are returned as they are).

  On an H100 (benchmarks/RESULTS.md, 2026-11-26) cuDNN beat our kernel at every attention shape timed (fwd+bwd
  420 vs 318 TFLOP/s at causal B2 S4k H16 D128, 346 vs 176 at D256) and tied it in the Llama-3.2-1B train step
  with packed rows (88.0 vs 87.2 ms), so it is the GPU default wherever it applies; it has no soft-capping and
  needs half-precision inputs.
  """
  if implementation != "auto":
    return implementation
  platform = platform or jax.devices()[0].platform
  if platform == "gpu":
    half = jnp.dtype(dtype).itemsize == 2
    return "cudnn" if half and not logit_softcap else "flash"
  return "xla"


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


class GroupLayout(NamedTuple):
  """Rows that each hold one prompt and the completions sampled from it (GRPO's pack_groups): a prompt slot of
  `prompt_slot` tokens, then `completions` slots of equal width. Each slot is filled from its start and padded
  (segment id 0) after; a completion attends to the prompt slot and to itself, never to its siblings."""
  prompt_slot: int
  completions: int


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                      layout: GroupLayout, scale: float, window: jax.Array | int = 0, logit_softcap: float = 0.0
                      ) -> jax.Array:
  """Attention over rows in `layout`: q [B, S, H, D], k/v [B, S, K, D] -> [B, S, H, D], S = prompt slot + slots.

  Causality and sliding windows are read from `positions` (a completion's continue its prompt's), and a key is seen
  only where its segment id is not 0. The prompt slot attends to itself; each completion slot to the prompt slot and
  itself, under one softmax. Scores are [prompt, prompt] plus [slot, prompt + slot] per completion instead of
  [S, S]: 4.3 times fewer for the bundled GRPO task's 8 slots of 31 behind a prompt slot of 40. XLA einsums on
  every platform, with `dot_product_attention`'s conventions (float32 softmax, lowest-float masking).
  """
  batch, length, heads, dim = q.shape
  kv_heads, prompt, slots = k.shape[2], layout.prompt_slot, layout.completions
  width = (length - prompt) // slots
  q = q.reshape(batch, length, kv_heads, heads // kv_heads, dim)

  def split(x):
    return x[:, :prompt], x[:, prompt:].reshape(batch, slots, width, *x.shape[2:])

  (q_p, q_c), (k_p, k_c), (v_p, v_c) = split(q), split(k), split(v)
  (pos_p, pos_c), (seg_p, seg_c) = split(positions), split(segment_ids)

  def softmax(scores, query_positions, key_positions, key_segments):
    """Masked float32 softmax of scores [..., K, G, queries, keys]; the other arrays are [..., queries|keys]."""
    scores = scores.astype(jnp.float32) * scale
    if logit_softcap:
      scores = logit_softcap * jnp.tanh(scores / logit_softcap)
    offsets = query_positions[..., :, None] - key_positions[..., None, :]
    visible = (offsets >= 0) & ((window <= 0) | (offsets < window)) & (key_segments[..., None, :] != 0)
    return jax.nn.softmax(jnp.where(visible[..., None, None, :, :], scores, jnp.finfo(jnp.float32).min), axis=-1)

  prompt_probs = softmax(jnp.einsum("bskgd,btkd->bkgst", q_p, k_p), pos_p, pos_p, seg_p)
  out_p = jnp.einsum("bkgst,btkd->bskgd", prompt_probs.astype(v.dtype), v_p)
  shared = lambda x: jnp.broadcast_to(x[:, None], (batch, slots, prompt))
  probs = softmax(jnp.concatenate([jnp.einsum("bnskgd,btkd->bnkgst", q_c, k_p),
                                   jnp.einsum("bnskgd,bntkd->bnkgst", q_c, k_c)], axis=-1),
                  pos_c, jnp.concatenate([shared(pos_p), pos_c], -1), jnp.concatenate([shared(seg_p), seg_c], -1))
  probs = probs.astype(v.dtype)
  out_c = (jnp.einsum("bnkgst,btkd->bnskgd", probs[..., :prompt], v_p)
           + jnp.einsum("bnkgst,bntkd->bnskgd", probs[..., prompt:], v_c))
  out = jnp.concatenate([out_p, out_c.reshape(batch, slots * width, *out_c.shape[3:])], axis=1)
  return out.reshape(batch, length, heads, dim)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, scale: float,
                          window: jax.Array | int = 0, logit_softcap: float = 0.0, return_probs: bool = False):
  """Plain XLA attention. q [B, S, H, D], k/v [B, S, K, D] with K dividing H -> [B, S, H, D]; with return_probs
  also the float32 attention probabilities [B, H, S, S] (query head h uses key/value head h // (H / K)).

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
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bkgst,btkd->bskgd", probs.astype(v.dtype), v).reshape(batch, length, heads, dim)
  return (out, probs.reshape(batch, heads, length, length)) if return_probs else out


def _with_window(attention_fn, window: jax.Array | int, static_window: int):
  """Runs attention_fn(window_or_None) with the static window where the traced per-layer window is set."""
  if not static_window:
    return attention_fn(None)
  if isinstance(window, int):
    return attention_fn(static_window if window else None)
  return jax.lax.cond(window > 0, lambda: attention_fn(static_window), lambda: attention_fn(None))


def _per_shard(fn, q, k, v, segment_ids):
  """Runs a kernel on each device's block under shard_map: batch and heads stay split as the activations
  are, while the sequence is gathered (every query needs every key). A Pallas call cannot be partitioned
  by XLA itself, which would otherwise gather whole arrays onto every device."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(q, k, v, segment_ids)
  batch, heads, kv_heads = (logical_to_spec((name,))[0] for name in
                            ("activation_batch", "activation_heads", "activation_kv_heads"))
  q_spec = PartitionSpec(batch, None, heads, None)
  kv_spec = PartitionSpec(batch, None, kv_heads, None)
  return jax.shard_map(fn, in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec(batch, None)), out_specs=q_spec,
                       check_vma=False)(q, k, v, segment_ids)


def flash_attention(q, k, v, segment_ids, scale, window, static_window, logit_softcap) -> jax.Array:
  from kernels.flash_attention import flash_attention as kernel  # pylint: disable=import-outside-toplevel

  def run(q, k, v, segment_ids):
    return _with_window(lambda w: kernel(q, k, v, causal=True, segment_ids=segment_ids, sliding_window=w,
                                         logit_softcap=logit_softcap or None, scale=scale), window, static_window)

  return _per_shard(run, q, k, v, segment_ids)


def cudnn_attention(q, k, v, segment_ids, scale, window, static_window) -> jax.Array:
  mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  return _with_window(lambda w: jax.nn.dot_product_attention(
      q, k, v, mask=mask, scale=scale, is_causal=True, local_window_size=(w - 1, 0) if w else None,
      implementation="cudnn"), window, static_window)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, scale: float,
           window: jax.Array | int = 0, static_window: int = 0, logit_softcap: float = 0.0,
           implementation: str = "auto", return_probs: bool = False):
  """Causal self-attention within segments: q [B, S, H, D], k/v [B, S, K, D] -> [B, S, H, D].

  window is this layer's sliding window (0 = none; may be traced); static_window the model's window size.
  return_probs also returns the attention probabilities [B, H, S, S] (distillation's attention transfer): only
  the xla implementation materialises them, so it must be the one chosen.
  """
  implementation = resolve(implementation, dtype=q.dtype, logit_softcap=logit_softcap)
  if return_probs:
    if implementation != "xla":
      raise ValueError(f"attention probabilities need the xla implementation, not {implementation!r}")
    out, probs = dot_product_attention(q, k, v, segment_ids, scale, window, logit_softcap, return_probs=True)
    return shard_activation(out, ("activation_batch", "activation_length", "activation_heads", None)), probs
  if implementation == "xla":
    out = dot_product_attention(q, k, v, segment_ids, scale, window, logit_softcap)
  elif implementation == "flash":
    out = flash_attention(q, k, v, segment_ids, scale, window, static_window, logit_softcap)
  elif implementation == "cudnn":
    out = cudnn_attention(q, k, v, segment_ids, scale, window, static_window)
  else:
    raise ValueError(f"unknown attention implementation {implementation!r}; expected one of {IMPLEMENTATIONS}")
  return shard_activation(out, ("activation_batch", "activation_length", "activation_heads", None))
