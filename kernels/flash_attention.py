"""FlashAttention-2 in Pallas: forward kernel, configuration and the public `flash_attention` function.

The backward kernels live in kernels/flash_attention_bwd.py. Both directions are tested against a float64 numpy
reference in tests/test_flash_attention.py, on CPU in interpret mode.

What runs where (`interpret=None` picks by `jax.default_backend()`; `backend=` forces a target):
  * CPU: `interpret=True`, Pallas' generic interpreter runs the GPU kernels (same bodies, same [B, L, H, D] layout,
    same block specs) as ordinary JAX ops. This is what the tests exercise.
  * GPU: the Triton lowering of `pallas_call`, with `num_warps` / `num_stages` from the block sizes. Inputs stay in
    their [batch, len, heads, head_dim] layout; a program owns one (q block, batch, head) and loops over kv blocks.
  * TPU: the Mosaic TPU lowering of the same kernel bodies. Inputs are transposed to [batch, heads, len, head_dim]
    so that every block's last two dims are (rows, head_dim) with rows a multiple of 128; row statistics and segment
    ids use (rows, 1) / (1, cols) shapes. A TPU program keeps one head's whole K and V (forward, dq) or one kv
    group's whole Q and dO (dk/dv) in VMEM, so long sequences are bounded by VMEM: about L * D * 8 bytes for K+V
    double-buffered in bf16 (8 MiB at L=8192, D=128), and G times that (plus ~128 * G * L bytes of statistics) for
    the dk/dv kernel, against a default scoped-VMEM limit of 16-32 MiB (no `vmem_limit_bytes` is set). Tiling the
    sequence axis in the grid, with scratch accumulators, is the missing piece for long TPU sequences.
    `interpret=pltpu.InterpretParams()` runs this TPU layout in Pallas' TPU interpreter on CPU (one test does).

Hardware status. GPU: compiled and run on an H100 (jax 0.11.2, 2026-11-26): forward, all three gradients and the
decode kernel match XLA attention in bf16 (relative error <= 7e-3) with packing, GQA, windows, soft-caps and
head_dim 64/128/256 (end_to_end/gpu/check_kernels.py); figures in benchmarks/RESULTS.md. jax 0.11 marks the Pallas
Triton backend as deprecated (in favour of Mosaic GPU). TPU: the Mosaic lowering has only been checked in Pallas'
TPU interpreter and by cross-platform `.lower()`; it has never run on TPU hardware.

Semantics. q [B, Lq, H, D]; k, v [B, Lkv, K, D] with K dividing H (GQA / MQA: the kv head of q head h is h // (H/K),
chosen in the block index maps, so K/V are never repeated in memory). Query i attends key j when
  * causal: j <= i + (Lkv - Lq): queries are aligned to the END of the keys (query i sits at position
    Lkv - Lq + i), as Hugging Face does for cached decoding; with Lq == Lkv this is the usual j <= i;
  * sliding_window=W: (i + Lkv - Lq) - W < j, W keys including itself (Gemma 2/3, and `attention_mask` in
    tunix_core/models/attention.py); it bounds the past only, whether or not `causal` is set;
  * segment_ids (self-attention, Lq == Lkv): same id. Id 0 is an ordinary id, as in attention.py;
  * logit_softcap=c: scores s = scale * q.k become c * tanh(s / c) before masking (the gradient includes the
    1 - tanh^2 factor).
A query with no visible key returns 0 and zero gradients. Softmax statistics and all accumulation are float32 (in
base 2: exp2 and a log2-sum-exp residual); P and dS are cast to the input dtype for the second matmul of each pair
(as FlashAttention does). Fully masked kv (or q) blocks are skipped by the loop bounds on every platform (causal,
sliding window, padding; not segments, which are data). float32 inputs use exact float32 dots
(Precision.HIGHEST: IEEE on Triton, not TF32), so they are slow on GPU but accurate.
Lengths that are not multiples of the block sizes, and head dims that are not powers of two, are zero-padded
outside the kernels (no copy when they already fit); padded keys are masked inside.

Block sizes (`BlockSizes.default`), tuned on an H100 with `benchmarks/attention.py --block_sweep` (RESULTS.md).
bf16/fp16 with head_dim <= 128: 64 x 64 tiles in all three kernels, 4 warps, 3 forward / 2 backward pipeline
stages (318 TFLOP/s fwd+bwd at causal B2 S4k H16 D128, against 248 for the 128 x 64 FlashAttention-2 tiling
with 8 warps). head_dim 256: forward 64 queries x 32 keys with 4 warps, backward 64 x 64 with 8 warps (176
against 124). More warps or stages lost everywhere they were tried (register pressure: a 64 x D float32
accumulator per kernel plus the score tile). float32 rows are twice as wide, so their tiles halve again (not
tuned). Sequence lengths are padded to a multiple of the largest q (and kv) block, so other lengths cost one
padded copy. TPU: 128 everywhere (the lane width: the kv block of the forward and dq kernels and the q block of
the dk/dv kernel become lane dimensions, so they must be multiples of 128).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: exp2(MASK - m) is 0, never NaN
NT_DIMS = (((1,), (1,)), ((), ()))  # a @ b.T
NN_DIMS = (((1,), (0,)), ((), ()))  # a @ b
LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes. Forward: block_q x block_kv. dk/dv kernel: block_kv_dkv keys held, block_q_dkv queries streamed.
  dq kernel: block_q_dq queries held, block_kv_dq keys streamed. num_warps / num_stages (forward) and
  num_warps_bwd / num_stages_bwd are Triton-only; None takes `default`'s for the call's head_dim and dtype."""
  block_q: int = 128
  block_kv: int = 64
  block_q_dkv: int = 32
  block_kv_dkv: int = 128
  block_q_dq: int = 128
  block_kv_dq: int = 32
  num_warps: int | None = None
  num_stages: int | None = None
  num_warps_bwd: int | None = None
  num_stages_bwd: int | None = None

  @classmethod
  def default(cls, head_dim: int, platform: str = "gpu", dtype: Any = jnp.bfloat16) -> BlockSizes:
    """Measured on an H100 (see the module docstring): smaller tiles for wider rows (head_dim 256, float32)."""
    if platform == "tpu":
      return cls(128, 128, 128, 128, 128, 128)
    half = jnp.dtype(dtype).itemsize <= 2
    if half and head_dim <= 128:
      return cls(64, 64, 64, 64, 64, 64, num_warps=4, num_stages=3, num_warps_bwd=4, num_stages_bwd=2)
    if half:  # head_dim 256
      return cls(64, 32, 64, 64, 64, 64, num_warps=4, num_stages=2, num_warps_bwd=8, num_stages_bwd=2)
    if head_dim <= 128:  # float32
      return cls(64, 32, 32, 64, 64, 32, num_warps=8, num_stages=2, num_warps_bwd=8, num_stages_bwd=2)
    return cls(32, 32, 32, 32, 32, 32, num_warps=4, num_stages=2, num_warps_bwd=4, num_stages_bwd=2)


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything static about one call; the kernels read it, and it is the custom_vjp's non-differentiable argument."""
  platform: str  # "gpu" ([B, L, H, D] layout, Triton) or "tpu" ([B, H, L, D] layout, Mosaic)
  interpret: Any  # pallas_call's `interpret`: False, True or a pltpu.InterpretParams
  blocks: BlockSizes  # effective sizes, already clamped to the lengths
  scale: float
  causal: bool
  window: int | None
  softcap: float | None
  q_len: int  # true lengths; the arrays the kernels see are padded to q_pad / kv_pad
  kv_len: int
  q_pad: int
  kv_pad: int
  heads: int  # q heads
  groups: int  # q heads per kv head
  head_dim: int  # padded head dim the kernels see
  segmented: bool
  precision: Any

  @property
  def offset(self) -> int:
    """Position of query 0 among the keys (bottom-right causal alignment)."""
    return self.kv_len - self.q_len

  @property
  def needs_positions(self) -> bool:
    return self.causal or bool(self.window) or self.kv_pad != self.kv_len


# ----------------------------------------------------------------------------------------------------------------
# Pieces shared by the forward and backward kernels.

def scores(cfg: Config, a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array | None]:
  """log2(e) * softcap(scale * a @ b.T) in float32, and tanh(raw / cap) (None without a cap) for the backward.

  The kernels work in base 2 (exp2, and the logsumexp residual is log2-based): on GPU exp2 is one MUFU.EX2
  instruction, while exp goes through libdevice.
  """
  s = lax.dot_general(a, b, NT_DIMS, precision=cfg.precision, preferred_element_type=jnp.float32)
  if not cfg.softcap:
    return s * (cfg.scale * LOG2E), None
  t = jnp.tanh(s * (cfg.scale / cfg.softcap))
  return t * (cfg.softcap * LOG2E), t


def matmul(cfg: Config, a: jax.Array, b: jax.Array, dims=NN_DIMS) -> jax.Array:
  return lax.dot_general(a, b, dims, precision=cfg.precision, preferred_element_type=jnp.float32)


def visible(cfg: Config, q_idx, k_idx, q_seg, k_seg) -> jax.Array | None:
  """Boolean tile of visible (query, key) pairs, or None when everything is visible.

  q_idx / k_idx are int32 query / key indices broadcast to the tile's shape (either orientation); q_seg / k_seg
  are segment ids shaped to broadcast against each other, or None.
  """
  conds = []
  if cfg.causal:
    conds.append(k_idx <= q_idx + cfg.offset)
  if cfg.window:
    conds.append(k_idx > q_idx + (cfg.offset - cfg.window))
  if cfg.kv_pad != cfg.kv_len:
    conds.append(k_idx < cfg.kv_len)
  if q_seg is not None:
    conds.append(q_seg == k_seg)
  return functools.reduce(operator.and_, conds) if conds else None


def kv_block_range(cfg: Config, q_start, block_q: int, block_kv: int):
  """[lo, hi) of the kv blocks holding a key that some query in [q_start, q_start + block_q) may see."""
  hi = pl.cdiv(cfg.kv_len, block_kv)  # blocks made only of padding are never visited
  if cfg.causal:  # the block's last query sees keys < q_start + block_q + offset
    end = jnp.maximum(q_start + (block_q + cfg.offset), 0)
    hi = jnp.minimum(hi, lax.div(end + (block_kv - 1), block_kv))
  lo = 0
  if cfg.window:  # the block's first query sees keys > q_start + offset - window
    lo = lax.div(jnp.maximum(q_start + (cfg.offset - cfg.window + 1), 0), block_kv)
  return lo, hi


def q_block_range(cfg: Config, k_start, block_kv: int, block_q: int):
  """[lo, hi) of the q blocks holding a query that sees some key in [k_start, k_start + block_kv)."""
  hi = pl.cdiv(cfg.q_len, block_q)  # padded queries have zero cotangents: skip their blocks
  lo = 0
  if cfg.causal:  # query i sees key k_start when i >= k_start - offset
    lo = lax.div(jnp.maximum(k_start - cfg.offset, 0), block_q)
  if cfg.window:  # query i sees the block's last key when i < k_start + block_kv - 1 + window - offset
    end = jnp.maximum(k_start + (block_kv - 1 + cfg.window - cfg.offset), 0)
    hi = jnp.minimum(hi, lax.div(end + (block_q - 1), block_q))
  return lo, hi



def tile_spec(cfg: Config, rows: int, index_map, heads: int | None = None) -> pl.BlockSpec:
  """BlockSpec of `rows` sequence positions x head_dim of a q/k/v-shaped array, in the platform's layout.

  index_map(*grid) -> (batch, head, row block). heads=None squeezes the head axis (the kernel sees [rows, D] of
  one head); an int takes that many consecutive heads, and then `head` counts in units of `heads`.
  """
  if cfg.platform == "tpu":  # [B, H, L, D]
    def tpu_map(*grid):
      b, h, r = index_map(*grid)
      return b, h, r, 0
    return pl.BlockSpec((None, heads, rows, cfg.head_dim), tpu_map)

  def gpu_map(*grid):  # [B, L, H, D]
    b, h, r = index_map(*grid)
    return b, r, h, 0
  return pl.BlockSpec((None, rows, heads, cfg.head_dim), gpu_map)


def compiler_params(cfg: Config, backward: bool):
  if cfg.interpret is True:
    return None
  if cfg.platform == "tpu":
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"))
  from jax.experimental.pallas import triton as plgpu
  blocks = cfg.blocks
  if backward:
    return plgpu.CompilerParams(num_warps=blocks.num_warps_bwd, num_stages=blocks.num_stages_bwd)
  return plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def attention_flops(cfg: Config, batch: int) -> int:
  """2 matmuls of 2*Lq*Lkv*D per head (no credit for skipped blocks)."""
  return 4 * batch * cfg.heads * cfg.q_pad * cfg.kv_pad * cfg.head_dim


# ----------------------------------------------------------------------------------------------------------------
# Forward.

def _forward_kernel(*refs, cfg: Config):
  if cfg.segmented:
    q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref = refs
  else:
    (q_ref, k_ref, v_ref, o_ref, lse_ref), q_seg_ref, kv_seg_ref = refs, None, None
  block_q, block_kv = cfg.blocks.block_q, cfg.blocks.block_kv
  q_start = pl.program_id(0) * block_q
  q = q_ref[...]  # [block_q, D]
  q_seg = q_seg_ref[...] if cfg.segmented else None  # [block_q, 1]
  tile = (block_q, block_kv)
  q_idx = q_start + lax.broadcasted_iota(jnp.int32, tile, 0) if cfg.needs_positions else None

  def body(j, carry):
    m, l, acc = carry
    k_start = pl.multiple_of(j * block_kv, block_kv)
    k = k_ref[pl.ds(k_start, block_kv), :]
    v = v_ref[pl.ds(k_start, block_kv), :]
    s, _ = scores(cfg, q, k)
    k_idx = k_start + lax.broadcasted_iota(jnp.int32, tile, 1) if cfg.needs_positions else None
    k_seg = kv_seg_ref[:, pl.ds(k_start, block_kv)] if cfg.segmented else None  # [1, block_kv]
    mask = visible(cfg, q_idx, k_idx, q_seg, k_seg)
    if mask is not None:
      s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new)  # a row with nothing visible yet has m_new == MASK_VALUE and p == 1: see below
    l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    acc = alpha * acc + matmul(cfg, p.astype(v.dtype), v)
    return m_new, l, acc

  init = (jnp.full((block_q, 1), MASK_VALUE, jnp.float32), jnp.zeros((block_q, 1), jnp.float32),
          jnp.zeros((block_q, cfg.head_dim), jnp.float32))
  lo, hi = kv_block_range(cfg, q_start, block_q, block_kv)
  m, l, acc = lax.fori_loop(lo, hi, body, init)
  # Rows that saw no visible key still have m == MASK_VALUE (any visible score is far larger, and its alpha wipes
  # what masked keys added before it): they return 0, and lse = +inf makes every backward probability
  # exp2(s - lse) exactly 0.
  empty = m <= 0.5 * MASK_VALUE
  l_safe = jnp.where(empty, 1.0, l)
  o_ref[...] = (acc * jnp.where(empty, 0.0, 1.0 / l_safe)).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(l_safe))


def forward(q, k, v, segment_ids, cfg: Config):
  """Runs the forward kernel on prepared (padded, laid out) arrays.

  Returns (out, lse): lse [B, H, q_pad, 1] float32 is the base-2 logsumexp of each row's log2-domain scores.
  """
  batch = q.shape[0]
  block_q = cfg.blocks.block_q
  groups = cfg.groups
  grid = (cfg.q_pad // block_q, batch, cfg.heads)
  in_specs = [
      tile_spec(cfg, block_q, lambda i, b, h: (b, h, i)),
      tile_spec(cfg, cfg.kv_pad, lambda i, b, h: (b, lax.div(h, groups), 0)),
      tile_spec(cfg, cfg.kv_pad, lambda i, b, h: (b, lax.div(h, groups), 0)),
  ]
  args = [q, k, v]
  if cfg.segmented:
    in_specs += [pl.BlockSpec((None, block_q, 1), lambda i, b, h: (b, i, 0)),
                 pl.BlockSpec((None, 1, cfg.kv_pad), lambda i, b, h: (b, 0, 0))]
    args += [segment_ids[:, :, None], segment_ids[:, None, :]]
  out_specs = [tile_spec(cfg, block_q, lambda i, b, h: (b, h, i)),
               pl.BlockSpec((None, None, block_q, 1), lambda i, b, h: (b, h, i, 0))]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((batch, cfg.heads, cfg.q_pad, 1), jnp.float32)]
  itemsize = q.dtype.itemsize
  cost = pl.CostEstimate(flops=attention_flops(cfg, batch), transcendentals=batch * cfg.heads * cfg.q_pad * cfg.kv_pad,
                         bytes_accessed=(2 * q.size + k.size + v.size) * itemsize)
  return pl.pallas_call(
      functools.partial(_forward_kernel, cfg=cfg), grid=grid, in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, compiler_params=compiler_params(cfg, backward=False), interpret=cfg.interpret,
      cost_estimate=cost, name="flash_attention_fwd")(*args)


# ----------------------------------------------------------------------------------------------------------------
# custom_vjp on prepared arrays: the public function pads and transposes outside it, so autodiff handles those.

@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, segment_ids, cfg: Config):
  return forward(q, k, v, segment_ids, cfg)[0]


def _attention_fwd(q, k, v, segment_ids, cfg: Config):
  out, lse = forward(q, k, v, segment_ids, cfg)
  return out, (q, k, v, segment_ids, out, lse)


def _attention_bwd(cfg: Config, residuals, d_out):
  from kernels import flash_attention_bwd  # imported here: that module imports this one
  dq, dk, dv = flash_attention_bwd.backward(cfg, residuals, d_out)
  return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


# ----------------------------------------------------------------------------------------------------------------
# Public function.

def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
                    segment_ids: jax.Array | None = None, sliding_window: int | None = None,
                    logit_softcap: float | None = None, scale: float | None = None,
                    block_sizes: BlockSizes | None = None, interpret: Any = None,
                    backend: str | None = None) -> jax.Array:
  """Memory-efficient attention: q [B, Lq, H, D], k/v [B, Lkv, K, D] (K divides H) -> [B, Lq, H, D], q's dtype.

  Args:
    causal: key j is visible to query i when j <= i + Lkv - Lq (queries aligned to the end of the keys).
    segment_ids: int [B, L] (requires Lq == Lkv); only equal ids attend to each other.
    sliding_window: W > 0 keeps keys j > (i + Lkv - Lq) - W (W keys including the query's own position).
      None or 0 disables it. Must be a Python int (static).
    logit_softcap: c > 0 maps scores s to c * tanh(s / c) before masking. None or 0 disables it.
    scale: score scale, default head_dim ** -0.5.
    block_sizes: tile sizes; default `BlockSizes.default(head_dim, platform)`. Clamped for short sequences.
    interpret: None picks by platform (GPU: Triton, TPU: Mosaic, CPU: interpret mode); True forces Pallas'
      generic interpreter; False forces compilation; a `pltpu.InterpretParams` runs the TPU kernels in Pallas'
      TPU interpreter.
    backend: "gpu" or "tpu" overrides `jax.default_backend()` as the compilation target (ahead-of-time or
      cross-platform lowering); with interpret=True it picks which layout's kernels are interpreted.
  """
  if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
    raise ValueError(f"expected q [B, Lq, H, D] and k, v [B, Lkv, K, D]; got {q.shape}, {k.shape}, {v.shape}")
  batch, q_len, heads, head_dim = q.shape
  _, kv_len, kv_heads, _ = k.shape
  if k.shape[0] != batch or k.shape[3] != head_dim:
    raise ValueError(f"q {q.shape} and k/v {k.shape} differ in batch or head_dim")
  if heads % kv_heads:
    raise ValueError(f"q heads ({heads}) must be a multiple of kv heads ({kv_heads})")
  if not (q.dtype == k.dtype == v.dtype) or not jnp.issubdtype(q.dtype, jnp.floating):
    raise ValueError(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
  if head_dim > 256:
    raise ValueError(f"head_dim {head_dim} > 256 is not supported")
  if segment_ids is not None:
    if q_len != kv_len or segment_ids.shape != (batch, q_len):
      raise ValueError(f"segment_ids must be [batch, len] for self-attention (Lq == Lkv); got {segment_ids.shape} "
                       f"for q {q.shape}, k {k.shape}")
    segment_ids = segment_ids.astype(jnp.int32)
  window = int(sliding_window or 0)
  if window < 0:
    raise ValueError(f"sliding_window must be positive (or None); got {sliding_window}")
  softcap = float(logit_softcap or 0.0)
  if softcap < 0:
    raise ValueError(f"logit_softcap must be positive (or None); got {logit_softcap}")

  platform, interpret = _resolve_target(interpret, backend)
  compiled = interpret is False
  blocks = _effective_blocks(block_sizes, head_dim, q.dtype, q_len, kv_len, platform, compiled)
  q_mult = math.lcm(blocks.block_q, blocks.block_q_dkv, blocks.block_q_dq)
  kv_mult = math.lcm(blocks.block_kv, blocks.block_kv_dkv, blocks.block_kv_dq)
  cfg = Config(
      platform=platform, interpret=interpret, blocks=blocks,
      scale=float(head_dim ** -0.5 if scale is None else scale), causal=bool(causal), window=window or None,
      softcap=softcap or None, q_len=q_len, kv_len=kv_len, q_pad=-(-q_len // q_mult) * q_mult,
      kv_pad=-(-kv_len // kv_mult) * kv_mult, heads=heads, groups=heads // kv_heads,
      head_dim=max(16, pl.next_power_of_2(head_dim)), segmented=segment_ids is not None,
      precision=lax.Precision.HIGHEST if q.dtype == jnp.float32 else None)
  return _run(q, k, v, segment_ids, cfg)


@functools.partial(jax.jit, static_argnums=(4,))
def _run(q, k, v, segment_ids, cfg: Config):
  q_len, head_dim = q.shape[1], q.shape[3]

  def prepare(x, length, pad):
    if pad != length or cfg.head_dim != head_dim:
      x = jnp.pad(x, ((0, 0), (0, pad - length), (0, 0), (0, cfg.head_dim - head_dim)))
    return x.transpose(0, 2, 1, 3) if cfg.platform == "tpu" else x

  if segment_ids is not None and cfg.q_pad != q_len:
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, cfg.q_pad - q_len)))
  out = _attention(prepare(q, q_len, cfg.q_pad), prepare(k, cfg.kv_len, cfg.kv_pad),
                   prepare(v, cfg.kv_len, cfg.kv_pad), segment_ids, cfg)
  if cfg.platform == "tpu":
    out = out.transpose(0, 2, 1, 3)
  return out[:, :q_len, :, :head_dim]


def _resolve_target(interpret, backend) -> tuple[str, Any]:
  """(platform whose layout and lowering to use, value for pallas_call's interpret)."""
  from jax.experimental.pallas import tpu as pltpu
  if backend not in (None, "gpu", "tpu"):
    raise ValueError(f"backend must be None, 'gpu' or 'tpu'; got {backend!r}")
  if isinstance(interpret, pltpu.InterpretParams):
    if backend == "gpu":
      raise ValueError("a pltpu.InterpretParams interprets the TPU kernels; it cannot go with backend='gpu'")
    return "tpu", interpret
  if interpret is True:
    return backend or "gpu", True
  if interpret not in (None, False):
    raise ValueError(f"interpret must be None, True, False or a pltpu.InterpretParams; got {interpret!r}")
  target = backend or jax.default_backend()
  if target in ("gpu", "cuda", "rocm"):
    return "gpu", False
  if target == "tpu":
    return "tpu", False
  if interpret is False:
    raise ValueError(f"Pallas cannot compile for {target!r}; use interpret=True (or None) there")
  return "gpu", True


def _effective_blocks(blocks: BlockSizes | None, head_dim: int, dtype, q_len: int, kv_len: int, platform: str,
                      compiled: bool) -> BlockSizes:
  default = BlockSizes.default(head_dim, platform, dtype)
  blocks = blocks or default
  sizes = {f.name: getattr(blocks, f.name) for f in dataclasses.fields(BlockSizes) if f.name.startswith("block_")}
  for name, size in sizes.items():
    if not isinstance(size, int) or size < 1:
      raise ValueError(f"BlockSizes.{name} must be a positive int; got {size!r}")
    if compiled and platform == "gpu" and (size < 16 or size & (size - 1)):
      raise ValueError(f"BlockSizes.{name}={size}: Triton needs powers of two >= 16")
    if compiled and platform == "tpu" and size % 128:
      raise ValueError(f"BlockSizes.{name}={size}: the TPU kernels need multiples of 128")
  # Short sequences: no block larger than the sequence rounded up to a power of two (and the platform minimum).
  minimum = (128 if platform == "tpu" else 16) if compiled else 1
  for name, size in sizes.items():
    length = q_len if name.startswith("block_q") else kv_len
    sizes[name] = min(size, max(minimum, pl.next_power_of_2(length)))
  tuning = {name: getattr(blocks, name) if getattr(blocks, name) is not None else getattr(default, name)
            for name in ("num_warps", "num_stages", "num_warps_bwd", "num_stages_bwd")}
  return BlockSizes(**sizes, **tuning)
