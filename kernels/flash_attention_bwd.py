"""FlashAttention-2 backward in Pallas: a dq kernel and a dk/dv kernel (see kernels/flash_attention.py's docstring
for what runs where, the layouts, and what is untested on hardware).

From the forward's per-row logsumexp `lse` (base 2, like the scores; +inf for rows with nothing visible) and
delta = rowsum(dO * O):
  P = exp2(S - lse),  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta) [* (1 - tanh^2) with a soft-cap],
  dQ = scale * dS K,  dK = scale * dS^T Q.
The dq kernel owns a q block and streams kv blocks (the forward's loop). The dk/dv kernel owns a kv block of one kv
head and streams the q blocks of every q head in its group, so GQA gradients are summed in registers and K/V-sized
gradients are written once. It works on transposed tiles (S^T = K Q^T, [block_kv, block_q]) so that the per-query
statistics are rows [1, block_q], which keeps them lane-dense on TPU. Neither kernel forms a [Lq, Lkv] array
outside a tile; delta is a plain XLA reduction over O and dO.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import flash_attention as fa


def _dq_kernel(*refs, cfg: fa.Config):
  if cfg.segmented:
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref, dq_ref = refs
  else:
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref), q_seg_ref, kv_seg_ref = refs, None, None
  block_q, block_kv = cfg.blocks.block_q_dq, cfg.blocks.block_kv_dq
  q_start = pl.program_id(0) * block_q
  q, do = q_ref[...], do_ref[...]  # [block_q, D]
  lse, delta = lse_ref[...], delta_ref[...]  # [block_q, 1]
  q_seg = q_seg_ref[...] if cfg.segmented else None  # [block_q, 1]
  tile = (block_q, block_kv)
  q_idx = q_start + lax.broadcasted_iota(jnp.int32, tile, 0) if cfg.needs_positions else None

  def body(j, dq):
    k_start = pl.multiple_of(j * block_kv, block_kv)
    k = k_ref[pl.ds(k_start, block_kv), :]
    v = v_ref[pl.ds(k_start, block_kv), :]
    s, t = fa.scores(cfg, q, k)
    k_idx = k_start + lax.broadcasted_iota(jnp.int32, tile, 1) if cfg.needs_positions else None
    k_seg = kv_seg_ref[:, pl.ds(k_start, block_kv)] if cfg.segmented else None  # [1, block_kv]
    mask = fa.visible(cfg, q_idx, k_idx, q_seg, k_seg)
    if mask is not None:
      s = jnp.where(mask, s, fa.MASK_VALUE)
    p = jnp.exp2(s - lse)
    dp = fa.matmul(cfg, do, v, fa.NT_DIMS)
    ds = p * (dp - delta)
    if t is not None:
      ds = ds * (1.0 - t * t)
    return dq + fa.matmul(cfg, ds.astype(k.dtype), k)

  lo, hi = fa.kv_block_range(cfg, q_start, block_q, block_kv)
  dq = lax.fori_loop(lo, hi, body, jnp.zeros((block_q, cfg.head_dim), jnp.float32))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg: fa.Config):
  if cfg.segmented:
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref, dk_ref, dv_ref = refs
  else:
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref), q_seg_ref, kv_seg_ref = refs, None, None
  block_q, block_kv = cfg.blocks.block_q_dkv, cfg.blocks.block_kv_dkv
  k_start = pl.program_id(0) * block_kv
  k, v = k_ref[...], v_ref[...]  # [block_kv, D]
  k_seg = kv_seg_ref[...] if cfg.segmented else None  # [block_kv, 1]
  tile = (block_kv, block_q)  # transposed: rows are keys, columns are queries
  k_idx = k_start + lax.broadcasted_iota(jnp.int32, tile, 0) if cfg.needs_positions else None

  def rows(ref, g, q_start):  # [block_q, D] of q head g of this kv group
    if cfg.platform == "tpu":  # ref [G, Lq, D]
      return ref[g, pl.ds(q_start, block_q), :]
    return ref[pl.ds(q_start, block_q), g, :]  # ref [Lq, G, D]

  def q_block(g, i, carry):
    dk, dv = carry
    q_start = pl.multiple_of(i * block_q, block_q)
    q, do = rows(q_ref, g, q_start), rows(do_ref, g, q_start)
    lse = lse_ref[g, :, pl.ds(q_start, block_q)]  # [1, block_q]
    delta = delta_ref[g, :, pl.ds(q_start, block_q)]
    s, t = fa.scores(cfg, k, q)  # S^T
    q_idx = q_start + lax.broadcasted_iota(jnp.int32, tile, 1) if cfg.needs_positions else None
    q_seg = q_seg_ref[:, pl.ds(q_start, block_q)] if cfg.segmented else None  # [1, block_q]
    mask = fa.visible(cfg, q_idx, k_idx, q_seg, k_seg)
    if mask is not None:
      s = jnp.where(mask, s, fa.MASK_VALUE)
    p = jnp.exp2(s - lse)  # P^T
    dv = dv + fa.matmul(cfg, p.astype(do.dtype), do)
    dp = fa.matmul(cfg, v, do, fa.NT_DIMS)  # dP^T
    ds = p * (dp - delta)
    if t is not None:
      ds = ds * (1.0 - t * t)
    dk = dk + fa.matmul(cfg, ds.astype(q.dtype), q)
    return dk, dv

  lo, hi = fa.q_block_range(cfg, k_start, block_kv, block_q)

  def head(g, carry):
    return lax.fori_loop(lo, hi, functools.partial(q_block, g), carry)

  zeros = jnp.zeros((block_kv, cfg.head_dim), jnp.float32)
  if cfg.groups == 1:
    dk, dv = head(0, (zeros, zeros))
  else:
    dk, dv = lax.fori_loop(0, cfg.groups, head, (zeros, zeros))
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(cfg: fa.Config, residuals, d_out):
  """(dq, dk, dv) for the prepared (padded, laid out) arrays of `fa._attention`."""
  q, k, v, segment_ids, out, lse = residuals
  batch, groups = q.shape[0], cfg.groups
  delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1)
  if cfg.platform != "tpu":  # [B, L, H] -> [B, H, L]
    delta = delta.transpose(0, 2, 1)
  delta = delta[..., None]  # [B, H, q_pad, 1], like lse
  cost = pl.CostEstimate(flops=int(2.5 * fa.attention_flops(cfg, batch)),
                         transcendentals=2 * batch * cfg.heads * cfg.q_pad * cfg.kv_pad,
                         bytes_accessed=2 * (q.size + k.size + v.size + 2 * out.size) * q.dtype.itemsize)
  segmented = cfg.segmented

  # dq: grid (q block, batch, q head), like the forward.
  block_q = cfg.blocks.block_q_dq
  q_tile = lambda i, b, h: (b, h, i)  # noqa: E731
  kv_all = lambda i, b, h: (b, lax.div(h, groups), 0)  # noqa: E731
  in_specs = [fa.tile_spec(cfg, block_q, q_tile), fa.tile_spec(cfg, cfg.kv_pad, kv_all),
              fa.tile_spec(cfg, cfg.kv_pad, kv_all), fa.tile_spec(cfg, block_q, q_tile),
              pl.BlockSpec((None, None, block_q, 1), lambda i, b, h: (b, h, i, 0)),
              pl.BlockSpec((None, None, block_q, 1), lambda i, b, h: (b, h, i, 0))]
  args = [q, k, v, d_out, lse, delta]
  if segmented:
    in_specs += [pl.BlockSpec((None, block_q, 1), lambda i, b, h: (b, i, 0)),
                 pl.BlockSpec((None, 1, cfg.kv_pad), lambda i, b, h: (b, 0, 0))]
    args += [segment_ids[:, :, None], segment_ids[:, None, :]]
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg), grid=(cfg.q_pad // block_q, batch, cfg.heads), in_specs=in_specs,
      out_specs=fa.tile_spec(cfg, block_q, q_tile), out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=fa.compiler_params(cfg, backward=True), interpret=cfg.interpret, cost_estimate=cost,
      name="flash_attention_dq")(*args)

  # dk, dv: grid (kv block, batch, kv head); each program reads its group's q heads whole.
  block_kv = cfg.blocks.block_kv_dkv
  kv_tile = lambda j, b, h: (b, h, j)  # noqa: E731
  q_group = lambda j, b, h: (b, h, 0)  # noqa: E731
  stats = lambda j, b, h: (b, h, 0, 0)  # noqa: E731
  in_specs = [fa.tile_spec(cfg, cfg.q_pad, q_group, heads=groups), fa.tile_spec(cfg, block_kv, kv_tile),
              fa.tile_spec(cfg, block_kv, kv_tile), fa.tile_spec(cfg, cfg.q_pad, q_group, heads=groups),
              pl.BlockSpec((None, groups, 1, cfg.q_pad), stats), pl.BlockSpec((None, groups, 1, cfg.q_pad), stats)]
  rows_shape = (batch, cfg.heads, 1, cfg.q_pad)  # same memory order as [B, H, q_pad, 1]: a free reshape
  args = [q, k, v, d_out, lse.reshape(rows_shape), delta.reshape(rows_shape)]
  if segmented:
    in_specs += [pl.BlockSpec((None, 1, cfg.q_pad), lambda j, b, h: (b, 0, 0)),
                 pl.BlockSpec((None, block_kv, 1), lambda j, b, h: (b, j, 0))]
    args += [segment_ids[:, None, :], segment_ids[:, :, None]]
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg), grid=(cfg.kv_pad // block_kv, batch, cfg.heads // groups),
      in_specs=in_specs, out_specs=[fa.tile_spec(cfg, block_kv, kv_tile), fa.tile_spec(cfg, block_kv, kv_tile)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=fa.compiler_params(cfg, backward=True), interpret=cfg.interpret, cost_estimate=cost,
      name="flash_attention_dkv")(*args)
  return dq, dk, dv
