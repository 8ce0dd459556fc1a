"""Pallas flash attention (interpret mode on CPU) against a float64 numpy reference: output and dq, dk, dv.

Each case compiles one forward+backward computation (~2-3 s in interpret mode on 2 cores), so the cases combine
features instead of taking the full cross product. Blocks are tiny (8/16) so that every case walks several blocks
and a ragged tail. The GPU (Triton) and TPU (Mosaic) lowerings are checked by cross-platform `.lower()` only.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from kernels.flash_attention import BlockSizes, flash_attention

SMALL = BlockSizes(block_q=16, block_kv=8, block_q_dkv=8, block_kv_dkv=16, block_q_dq=16, block_kv_dq=8)
SQUARE = BlockSizes(16, 16, 16, 16, 16, 16)
TOLERANCE = {np.float32: 1e-5, jnp.bfloat16: 2e-2}


@pytest.fixture(autouse=True, scope="module")
def _fast_compiles():
  """Interpret-mode kernels are big XLA loops; XLA's optimisations only cost compile time here."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


@dataclasses.dataclass(frozen=True)
class Case:
  batch: int = 1
  q_len: int = 40
  kv_len: int | None = None  # None: q_len
  heads: int = 2
  kv_heads: int = 1
  head_dim: int = 64
  causal: bool = True
  segments: bool = False
  window: int | None = None
  softcap: float | None = None
  q_gain: float = 1.0  # scales q so that a soft-cap binds
  dtype: type = np.float32
  blocks: BlockSizes | None = SMALL
  seed: int = 0


CASES = {
    "causal_mha_batch2": Case(batch=2, heads=2, kv_heads=2),
    "noncausal_gqa2_cross_lengths_window": Case(q_len=24, kv_len=40, heads=4, kv_heads=2, causal=False, window=30,
                                                blocks=SQUARE),
    "gqa4_sliding_window": Case(q_len=48, heads=4, kv_heads=1, window=11, blocks=SQUARE),
    "gqa8_segments_with_padding": Case(batch=2, heads=8, kv_heads=1, segments=True),
    "softcap_binding_d128": Case(q_len=33, head_dim=128, softcap=5.0, q_gain=8.0),
    "decode_shape_kv_longer_window": Case(q_len=20, kv_len=45, heads=4, kv_heads=2, window=12),
    "q_longer_than_kv_empty_rows": Case(q_len=40, kv_len=24),
    "head_dim_256": Case(q_len=24, head_dim=256),
    "head_dim_80_default_blocks": Case(q_len=37, heads=2, kv_heads=2, head_dim=80, blocks=None),
    "bf16_gqa2_segments_window_d128": Case(batch=2, heads=4, kv_heads=2, head_dim=128, segments=True, window=9,
                                           dtype=jnp.bfloat16),
    "bf16_noncausal_softcap_cross": Case(q_len=32, kv_len=40, causal=False, softcap=5.0, q_gain=8.0,
                                         dtype=jnp.bfloat16, blocks=SQUARE),
}


def _segment_ids(batch: int, length: int) -> np.ndarray:
  """Packed rows: a few documents, then padding with id 0."""
  rows = []
  for b in range(batch):
    cuts = [0, length // 3 + b, 2 * length // 3 + 2 * b, length - 5, length]
    rows.append(np.concatenate([np.full(hi - lo, i + 1 if hi < length else 0) for i, (lo, hi) in
                                enumerate(zip(cuts[:-1], cuts[1:]))]))
  return np.stack(rows).astype(np.int32)


def _inputs(case: Case):
  rng = np.random.default_rng(case.seed)
  kv_len = case.kv_len or case.q_len
  q = rng.normal(size=(case.batch, case.q_len, case.heads, case.head_dim)) * case.q_gain
  k = rng.normal(size=(case.batch, kv_len, case.kv_heads, case.head_dim))
  v = rng.normal(size=(case.batch, kv_len, case.kv_heads, case.head_dim))
  d_out = rng.normal(size=q.shape)
  arrays = [jnp.asarray(x, case.dtype) for x in (q, k, v, d_out)]
  segment_ids = jnp.asarray(_segment_ids(case.batch, case.q_len)) if case.segments else None
  return arrays, segment_ids


def reference(q, k, v, d_out, *, causal, segment_ids=None, window=None, softcap=None, scale=None):
  """float64 attention and its gradients; a query with no visible key gives 0 and zero gradients."""
  q, k, v, d_out = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v, d_out))
  batch, q_len, heads, dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  groups = heads // kv_heads
  scale = dim ** -0.5 if scale is None else scale
  k_h, v_h = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)  # q head h reads kv head h // groups
  raw = np.einsum("bqhd,bkhd->bhqk", q, k_h) * scale
  s, tanh = raw, None
  if softcap:
    tanh = np.tanh(raw / softcap)
    s = softcap * tanh
  query_pos = np.arange(q_len)[:, None] + (kv_len - q_len)  # bottom-right alignment
  key_pos = np.arange(kv_len)[None, :]
  mask = np.ones((batch, 1, q_len, kv_len), bool)
  if causal:
    mask &= key_pos <= query_pos
  if window:
    mask &= key_pos > query_pos - window
  if segment_ids is not None:
    seg = np.asarray(segment_ids)
    mask &= (seg[:, :, None] == seg[:, None, :])[:, None]
  row_max = np.where(mask, s, -np.inf).max(-1, keepdims=True)
  row_max = np.where(np.isfinite(row_max), row_max, 0.0)
  e = np.where(mask, np.exp(s - row_max), 0.0)
  total = e.sum(-1, keepdims=True)
  p = e / np.where(total > 0, total, 1.0)
  out = np.einsum("bhqk,bkhd->bqhd", p, v_h)
  dp = np.einsum("bqhd,bkhd->bhqk", d_out, v_h)
  ds = p * (dp - (p * dp).sum(-1, keepdims=True))
  if softcap:
    ds = ds * (1.0 - tanh ** 2)
  dq = np.einsum("bhqk,bkhd->bqhd", ds, k_h) * scale
  per_head = lambda x: x.reshape(batch, kv_len, kv_heads, groups, dim).sum(3)  # noqa: E731
  dk = per_head(np.einsum("bhqk,bqhd->bkhd", ds, q)) * scale
  dv = per_head(np.einsum("bhqk,bqhd->bkhd", p, d_out))
  return out, (dq, dk, dv), np.abs(raw).max()


def _run(case: Case, interpret=None):
  (q, k, v, d_out), segment_ids = _inputs(case)
  kwargs = dict(causal=case.causal, segment_ids=segment_ids, sliding_window=case.window, logit_softcap=case.softcap,
                block_sizes=case.blocks, interpret=interpret)

  @jax.jit
  def forward_backward(q, k, v, d_out):
    out, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, **kwargs), q, k, v)
    return out, vjp(d_out)

  out, grads = forward_backward(q, k, v, d_out)
  want_out, want_grads, max_score = reference(q, k, v, d_out, causal=case.causal, segment_ids=segment_ids,
                                              window=case.window, softcap=case.softcap)
  return (out, grads), (want_out, want_grads), max_score


def _relative_error(got, want) -> float:
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


def _check(case: Case, got, want):
  (out, grads), (want_out, want_grads) = got, want
  tolerance = TOLERANCE[case.dtype]
  for name, g, w in zip(("out", "dq", "dk", "dv"), (out, *grads), (want_out, *want_grads)):
    assert g.dtype == case.dtype and g.shape == w.shape, (name, g.dtype, g.shape)
    assert not np.isnan(np.asarray(g, np.float32)).any(), f"{name} has NaN"
    error = _relative_error(g, w)
    assert error < tolerance, f"{name}: relative error {error:.2e} >= {tolerance:.0e}"


@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_reference(name):
  case = CASES[name]
  got, want, max_score = _run(case)
  if case.softcap:
    assert max_score > 3 * case.softcap, "the soft-cap should bind in this case"
  _check(case, got, want)
  if name == "q_longer_than_kv_empty_rows":  # queries 0..15 precede every key: exactly 0, no NaN
    out, (dq, _, _) = got[0], got[1]
    empty = case.q_len - case.kv_len
    assert np.all(np.asarray(out)[:, :empty] == 0) and np.all(np.asarray(dq)[:, :empty] == 0)


def test_tpu_kernels_in_tpu_interpret_mode():
  """The TPU layout ([B, H, L, D], transposed dk/dv tiles) through Pallas' TPU interpreter."""
  case = Case(q_len=24, heads=4, kv_heads=2, segments=True, window=10, softcap=5.0, q_gain=4.0, blocks=SQUARE)
  got, want, _ = _run(case, interpret=pltpu.InterpretParams())
  _check(case, got, want)


def test_jit_grad_of_a_loss():
  case = Case(q_len=29, heads=4, kv_heads=2, segments=True, blocks=SQUARE, seed=3)
  (q, k, v, weights), segment_ids = _inputs(case)

  def loss(q, k, v):
    out = flash_attention(q, k, v, segment_ids=segment_ids, block_sizes=case.blocks)
    return jnp.sum(out * weights)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  _, want_grads, _ = reference(q, k, v, weights, causal=True, segment_ids=segment_ids)
  for g, w in zip(grads, want_grads):
    assert _relative_error(g, w) < 1e-5


def _lower(platform: str, device_kind: str, dtype, **kwargs) -> str:
  q = jax.ShapeDtypeStruct((2, 300, 8, 128), dtype)
  kv = jax.ShapeDtypeStruct((2, 300, 2, 128), dtype)
  seg = jax.ShapeDtypeStruct((2, 300), jnp.int32)

  def forward_backward(q, k, v, segment_ids):
    out, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, segment_ids=segment_ids, interpret=False,
                                                        backend=platform, **kwargs), q, k, v)
    return out, vjp(out)

  device = AbstractDevice(device_kind=device_kind, num_cores=1, platform=platform)
  with jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=device)):
    lowered = jax.jit(forward_backward).trace(q, kv, kv, seg).lower(
        lowering_platforms=("cuda" if platform == "gpu" else "tpu",))
  return lowered.as_text()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_triton_lowering_for_h100():
  """Kernels lower to Triton IR for an abstract H100 (PTX compilation itself needs the GPU)."""
  text = _lower("gpu", "NVIDIA H100 80GB HBM3", jnp.bfloat16, sliding_window=100, logit_softcap=30.0)
  assert text.count("__gpu$xla.gpu.triton") == 3  # forward, dq, dk/dv


def test_mosaic_lowering_for_tpu():
  """Kernels lower to Mosaic for an abstract TPU v5e (Mosaic's layout passes run only on the TPU)."""
  text = _lower("tpu", "TPU v5 lite", jnp.float32, sliding_window=100)
  assert text.count("tpu_custom_call") == 3


def test_rejects_bad_arguments():
  q = jnp.zeros((1, 16, 4, 64))
  kv = jnp.zeros((1, 16, 3, 64))
  with pytest.raises(ValueError, match="multiple of kv heads"):
    flash_attention(q, kv, kv)
  with pytest.raises(ValueError, match="segment_ids"):
    flash_attention(q, q[:, :8], q[:, :8], segment_ids=jnp.zeros((1, 16), jnp.int32))
  with pytest.raises(ValueError, match="head_dim"):
    flash_attention(jnp.zeros((1, 16, 1, 320)), jnp.zeros((1, 16, 1, 320)), jnp.zeros((1, 16, 1, 320)))
  with pytest.raises(ValueError, match="powers of two"):
    flash_attention(q, q, q, interpret=False, backend="gpu", block_sizes=BlockSizes(block_q=48))
  with pytest.raises(ValueError, match="cannot compile"):
    flash_attention(q, q, q, interpret=False)
