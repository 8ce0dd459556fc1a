"""Pallas decode attention: one new query token per row against a KV cache (flash-decoding, split-K).

Where it runs
  GPU  Pallas' Triton lowering (`interpret=False`). The kernel sticks to what that lowering documents:
       power-of-two tensor sizes for loads/stores/dots, dots with M, N, K >= 16 (the GQA group is padded to
       16 rows), no scalar prefetch (lengths and the window are read as 0-d blocks), loops with dynamic bounds
       (scf.for). Compiled and run on an H100 (jax 0.11.2, 2026-11-26): it matches XLA attention's last row in
       bf16 (relative error <= 7.6e-3) at head_dim 64/128/256, GQA 2:1, a 512-key window and a soft-cap
       (end_to_end/gpu/check_kernels.py). With the [B, K, T, D] cache, tests/test_decode_attention.py passes
       compiled on an H200 (2026-11-27; float32 within 1e-5: its dots ask for full precision, not tf32). Its
       speed is measured through the sampler (benchmarks/sampler.py).
       jax 0.11 warns that the Pallas Triton backend is deprecated (in favour of Mosaic GPU).
  CPU  the same kernel in Pallas interpret mode (`interpret=True`; slow, meant for tests).
  TPU  not implemented: raises NotImplementedError (no Mosaic version yet).
  `interpret=None` picks by `jax.default_backend()`: gpu -> compiled, cpu -> interpret, tpu -> error.

Algorithm
  Grid (batch, kv_heads, num_splits). Each program takes the whole GQA group of one KV head (the q heads
  sharing it, padded to >= 16 rows) as the M dimension of its matmuls, so K/V are never repeated. The blocks
  of a row that can hold visible keys, [window start, length), are divided evenly among the `num_splits`
  programs of that (row, kv head); each walks its share in `block_kv` steps with an online softmax in float32
  and writes a normalised partial output and its log-sum-exp. Blocks past the row's length or before its
  window are never loaded. A small jnp step combines the splits. Caches are read in place ([B, K, T, D]: each
  program's keys are one contiguous [T, D] matrix), never transposed or padded, except caches shorter than one
  block (T < block_kv), which are padded.
  A tail block that would run past the cache end is loaded shifted back so that it ends at the cache end, with
  already-seen keys masked, so no load is ever out of bounds (identical behaviour compiled and interpreted).

Forward only: no gradient (decode serves sampling).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_MIN_BLOCK = 16          # Triton's tt.dot needs every matmul dimension >= 16.
_TARGET_PROGRAMS = 264   # ~2 waves of an H100's 132 SMs; used to pick num_splits.
_MAX_SPLITS = 32
_NUM_WARPS = 4
_NUM_STAGES = 2


def _is_pow2(n: int) -> bool:
  return n > 0 and (n & (n - 1)) == 0


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _floor_pow2(n: int) -> int:
  return 1 << (n.bit_length() - 1)


def _cdiv(a, b):
  return (a + b - 1) // b


def _resolve_interpret(interpret: bool | None) -> bool:
  if interpret is not None:
    return bool(interpret)
  backend = jax.default_backend()
  if backend == "gpu":
    return False
  if backend == "cpu":
    return True
  if backend == "tpu":
    raise NotImplementedError(
        "decode_attention has no TPU (Mosaic) version yet; use tunix_core.models.attention.dot_product_attention "
        "on the last query row instead, or pass interpret=True to run the GPU kernel interpreted (slow).")
  raise NotImplementedError(f"decode_attention: unsupported backend {backend!r}")


def _default_block_kv(head_dim: int, itemsize: int) -> int:
  # One K (or V) tile of <= 32 KiB: K+V double-buffered (num_stages=2) stays within an H100's shared memory.
  return max(_MIN_BLOCK, min(128, _floor_pow2(max(1, 32768 // (head_dim * itemsize)))))


def _kernel(lengths_ref, window_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale: float,
            logit_softcap: float | None, block_kv: int, num_splits: int, max_len: int):
  """One (row, kv head, split) program. q_ref [G, D]; k_ref/v_ref [T, D]; o_ref [G, D]; lse_ref [G]."""
  split = pl.program_id(2)
  length = lengths_ref[()]
  window = window_ref[()]
  start = jnp.where(window > 0, jnp.maximum(length - window, 0), 0)  # first visible key
  first_block = start // block_kv
  end_block = (length + (block_kv - 1)) // block_kv                  # one past the last block with a visible key
  per_split = (end_block - first_block + (num_splits - 1)) // num_splits
  lo = first_block + split * per_split
  hi = jnp.minimum(lo + per_split, end_block)

  q = q_ref[...]
  groups, head_dim = q.shape
  neg = jnp.finfo(jnp.float32).min
  key_iota = jnp.arange(block_kv, dtype=jnp.int32)[None, :]
  # Triton rounds float32 dot operands to tf32 by default (relative error ~3e-4); float32 inputs ask for full
  # precision, as the flash kernel does.
  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  align = math.gcd(block_kv, max_len)  # offsets are multiples of this

  def body(block, carry):
    acc, m_prev, l_prev = carry
    logical = block * block_kv
    # The last block may run past the cache end: load it shifted back to end at max_len instead.
    offset = jnp.minimum(logical, max_len - block_kv)
    if align > 1:
      offset = pl.multiple_of(offset, align)
    k = k_ref[pl.ds(offset, block_kv), :]
    v = v_ref[pl.ds(offset, block_kv), :]
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                        preferred_element_type=jnp.float32) * scale
    if logit_softcap:
      s = logit_softcap * jnp.tanh(s / logit_softcap)
    keys = offset + key_iota
    visible = (keys >= jnp.maximum(start, logical)) & (keys < length)
    s = jnp.where(visible, s, neg)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    correction = jnp.exp(m_prev - m_next)
    p = jnp.where(visible, jnp.exp(s - m_next[:, None]), 0.0)
    l_next = correction * l_prev + jnp.sum(p, axis=1)
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)
    return correction[:, None] * acc + pv, m_next, l_next

  init = (jnp.zeros((groups, head_dim), jnp.float32), jnp.full((groups,), neg, jnp.float32),
          jnp.zeros((groups,), jnp.float32))
  acc, m, l = lax.fori_loop(lo, hi, body, init)
  nonempty = l > 0.0
  safe_l = jnp.where(nonempty, l, 1.0)
  plgpu.store(o_ref, acc / safe_l[:, None])
  plgpu.store(lse_ref, jnp.where(nonempty, m + jnp.log(safe_l), -jnp.inf))


def _combine(o_parts: jax.Array, lse: jax.Array) -> jax.Array:
  """o_parts [B, K, S, G, D] (each normalised), lse [B, K, S, G] (-inf for empty splits) -> [B, K, G, D]."""
  lse_max = jnp.max(lse, axis=2, keepdims=True)
  # An all-empty row (length 0) has lse_max = -inf: weights become exp(-inf) = 0 and the output 0.
  lse_max = lax.optimization_barrier(jnp.where(jnp.isfinite(lse_max), lse_max, 0.0))
  weights = jnp.exp(lse - lse_max)
  total = jnp.sum(weights, axis=2)
  out = jnp.sum(weights[..., None] * o_parts, axis=2)
  return out / jnp.where(total > 0, total, 1.0)[..., None]


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array, *,
                     sliding_window: int | jax.Array | None = None, logit_softcap: float | None = None,
                     scale: float | None = None, block_kv: int | None = None, num_splits: int | None = None,
                     interpret: bool | None = None) -> jax.Array:
  """Attention of one new query token per row over a KV cache.

  Args:
    q: [batch, q_heads, head_dim], bf16 or float32.
    k_cache, v_cache: [batch, kv_heads, max_len, head_dim]; kv_heads divides q_heads. Query head h uses KV head
      h // (q_heads // kv_heads) (the grouping of tunix_core.models.attention).
    lengths: int32 [batch], valid cache entries per row. The new token's own k/v is already at lengths - 1, so
      the query (at position lengths - 1) sees keys 0 .. lengths - 1. Clipped to [0, max_len]. Rows with
      length 0 return zeros.
    sliding_window: W > 0 keeps only keys j > lengths - 1 - W (Hugging Face's Gemma 2/3 convention, as in
      attention_mask). None or <= 0: no window. May be a traced int32 scalar (per-layer windows in a scan):
      it is a kernel operand, so one compilation serves every window.
    logit_softcap: c > 0 maps scores s to c * tanh(s / c) (after scaling, before masking).
    scale: score scale, default head_dim ** -0.5.
    block_kv: keys per inner step, a power of two >= 16; default 128 for head_dim * itemsize <= 256 bytes,
      less for wider heads (K tile <= 32 KiB), never more than the largest power of two <= max_len.
    num_splits: parallel chunks per (row, kv head) (flash-decoding); each row's visible blocks are divided
      evenly among them, so it need not divide anything. Default: enough to give ~264 programs.
    interpret: True = Pallas interpret mode; False = compiled (Triton on GPU); None = by platform.

  Returns:
    [batch, q_heads, head_dim] in q's dtype. Accumulation is float32.

  Constraints (those of the Triton lowering, checked on every platform so interpreted results carry over):
  head_dim a power of two >= 16; block_kv a power of two >= 16.
  """
  if q.ndim != 3 or k_cache.ndim != 4 or v_cache.shape != k_cache.shape:
    raise ValueError(f"expected q [B, H, D] and k_cache = v_cache [B, K, T, D]; got q {q.shape}, "
                     f"k_cache {k_cache.shape}, v_cache {v_cache.shape}")
  batch, q_heads, head_dim = q.shape
  _, kv_heads, max_len, _ = k_cache.shape
  if k_cache.shape[0] != batch or k_cache.shape[3] != head_dim:
    raise ValueError(f"q {q.shape} and k_cache {k_cache.shape} disagree on batch or head_dim")
  if q_heads % kv_heads:
    raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
  lengths = jnp.asarray(lengths)
  if lengths.shape != (batch,):
    raise ValueError(f"lengths must have shape ({batch},), got {lengths.shape}")
  if not _is_pow2(head_dim) or head_dim < _MIN_BLOCK:
    raise ValueError(f"head_dim must be a power of two >= {_MIN_BLOCK} (Triton lowering); got {head_dim}")
  if block_kv is not None and (not _is_pow2(block_kv) or block_kv < _MIN_BLOCK):
    raise ValueError(f"block_kv must be a power of two >= {_MIN_BLOCK}; got {block_kv}")
  if num_splits is not None and num_splits < 1:
    raise ValueError(f"num_splits must be >= 1; got {num_splits}")
  if max_len == 0:
    return jnp.zeros_like(q)
  interpret = _resolve_interpret(interpret)
  lengths = jnp.clip(lengths.astype(jnp.int32), 0, max_len)

  if block_kv is None:
    block_kv = _default_block_kv(head_dim, jnp.dtype(k_cache.dtype).itemsize)
  block_kv = max(_MIN_BLOCK, min(block_kv, _floor_pow2(max_len)))
  if max_len < block_kv:  # only caches shorter than 16 entries
    pad = ((0, 0), (0, 0), (0, block_kv - max_len), (0, 0))
    k_cache, v_cache = jnp.pad(k_cache, pad), jnp.pad(v_cache, pad)
    max_len = block_kv
  num_blocks = _cdiv(max_len, block_kv)

  static_window = None
  if sliding_window is None:
    window = jnp.zeros((1,), jnp.int32)
  else:
    if isinstance(sliding_window, (int, np.integer)):
      static_window = sliding_window if sliding_window > 0 else None
    window = jnp.reshape(jnp.asarray(sliding_window, jnp.int32), (1,))
  if num_splits is None:
    most = num_blocks if static_window is None else min(num_blocks, _cdiv(static_window, block_kv) + 1)
    num_splits = max(1, min(_cdiv(_TARGET_PROGRAMS, batch * kv_heads), most, _MAX_SPLITS))

  if scale is None:
    scale = head_dim ** -0.5
  logit_softcap = float(logit_softcap) if logit_softcap else None
  return _decode(q, k_cache, v_cache, lengths, window, scale=float(scale), logit_softcap=logit_softcap,
                 block_kv=block_kv, num_splits=num_splits, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("scale", "logit_softcap", "block_kv", "num_splits", "interpret"))
def _decode(q, k_cache, v_cache, lengths, window, *, scale, logit_softcap, block_kv, num_splits, interpret):
  """The kernel and the combine, under one jit (so eager calls reuse the compiled program)."""
  batch, q_heads, head_dim = q.shape
  _, kv_heads, max_len, _ = k_cache.shape
  groups = q_heads // kv_heads
  groups_padded = max(_MIN_BLOCK, _next_pow2(groups))
  q_grouped = q.reshape(batch, kv_heads, groups, head_dim)
  if groups_padded != groups:  # zero query rows: finite scores, sliced off below
    q_grouped = jnp.pad(q_grouped, ((0, 0), (0, 0), (0, groups_padded - groups), (0, 0)))

  kernel = functools.partial(_kernel, scale=scale, logit_softcap=logit_softcap, block_kv=block_kv,
                             num_splits=num_splits, max_len=max_len)
  cache_spec = pl.BlockSpec((None, None, max_len, head_dim), lambda b, h, s: (b, h, 0, 0))
  o_parts, lse = pl.pallas_call(
      kernel,
      grid=(batch, kv_heads, num_splits),
      in_specs=[
          pl.BlockSpec((None,), lambda b, h, s: (b,)),                                     # lengths
          pl.BlockSpec((None,), lambda b, h, s: (0,)),                                     # window
          pl.BlockSpec((None, None, groups_padded, head_dim), lambda b, h, s: (b, h, 0, 0)),  # q
          cache_spec,                                                                      # k
          cache_spec,                                                                      # v
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, groups_padded, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
          pl.BlockSpec((None, None, None, groups_padded), lambda b, h, s: (b, h, s, 0)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((batch, kv_heads, num_splits, groups_padded, head_dim), jnp.float32),
          jax.ShapeDtypeStruct((batch, kv_heads, num_splits, groups_padded), jnp.float32),
      ],
      compiler_params=plgpu.CompilerParams(num_warps=_NUM_WARPS, num_stages=_NUM_STAGES),
      interpret=interpret,
      name="decode_attention",
  )(lengths, window, q_grouped, k_cache, v_cache)

  out = _combine(o_parts, lse)[:, :, :groups]
  return out.reshape(batch, q_heads, head_dim).astype(q.dtype)
