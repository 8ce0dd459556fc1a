"""kernels/decode_attention.py against a float64 numpy reference (interpret mode on CPU, compiled on a GPU).

Errors are measured as max|ours - ref| / max|ref|: < 1e-5 for float32, < 2e-2 for bf16 (the reference then
runs on the bf16-rounded inputs). Every case batches ragged lengths: 0, 1, a full cache, and lengths that are
not multiples of block_kv, including ones ending in the shifted tail block of a cache that is not a multiple
of block_kv either.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.decode_attention import decode_attention
from tunix_core.models.attention import dot_product_attention

MAX_LEN = 40          # not a multiple of BLOCK_KV: the last block is loaded shifted back
BLOCK_KV = 16
LENGTHS = (0, 1, 23, 40, 33, 16)
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
# None picks by platform: interpret mode on CPU (conftest's default JAX_PLATFORMS=cpu); the compiled Triton
# kernel when the suite runs on a GPU (JAX_PLATFORMS=cuda), which makes this file the GPU check as well.
INTERPRET = None


def _inputs(seed, *, kv_heads, groups, head_dim, dtype, max_len=MAX_LEN, lengths=LENGTHS, q_scale=1.0):
  rng = np.random.default_rng(seed)
  batch = len(lengths)
  q = rng.standard_normal((batch, kv_heads * groups, head_dim)) * q_scale
  k = rng.standard_normal((batch, kv_heads, max_len, head_dim))
  v = rng.standard_normal((batch, kv_heads, max_len, head_dim))
  q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
  return q, k, v, jnp.asarray(lengths, jnp.int32)


def _reference(q, k, v, lengths, *, window=None, softcap=None, scale=None):
  """float64: softmax over keys j < length (and j > length - 1 - window); zero rows for length 0."""
  q, k, v = (np.asarray(x.astype(jnp.float32), np.float64) for x in (q, k, v))
  lengths = np.asarray(lengths)
  batch, q_heads, head_dim = q.shape
  kv_heads, max_len = k.shape[1], k.shape[2]
  groups = q_heads // kv_heads
  scale = head_dim ** -0.5 if scale is None else scale
  qg = q.reshape(batch, kv_heads, groups, head_dim)
  scores = np.einsum("bkgd,bktd->bkgt", qg, k) * scale
  if softcap:
    scores = softcap * np.tanh(scores / softcap)
  keys = np.arange(max_len)[None, :]
  visible = keys < lengths[:, None]
  if window:
    visible &= keys > lengths[:, None] - 1 - window
  visible = visible[:, None, None, :]
  scores = np.where(visible, scores, -np.inf)
  peak = np.max(scores, axis=-1, keepdims=True)
  probs = np.where(visible, np.exp(scores - np.where(np.isfinite(peak), peak, 0.0)), 0.0)
  total = probs.sum(-1, keepdims=True)
  probs = probs / np.where(total > 0, total, 1.0)
  return np.einsum("bkgt,bktd->bkgd", probs, v).reshape(batch, q_heads, head_dim)


def _rel_error(ours, ref):
  ours = np.asarray(ours.astype(jnp.float32), np.float64)
  assert np.all(np.isfinite(ours))
  return np.max(np.abs(ours - ref)) / np.max(np.abs(ref))


# (dtype, head_dim, kv_heads, groups, num_splits, window, softcap): GQA ratios 1/2/8, head_dim 64/128/256,
# one and several splits (3 does not divide the 3 blocks of a 40-key row evenly with windows), window, soft-cap.
CASES = [
    (jnp.float32, 64, 2, 1, 1, None, None),
    (jnp.float32, 64, 1, 2, 3, 7, None),
    (jnp.float32, 128, 1, 8, 2, None, 5.0),
    (jnp.float32, 256, 2, 2, 4, 20, 5.0),
    (jnp.bfloat16, 64, 1, 8, 1, 9, None),
    (jnp.bfloat16, 128, 2, 1, 3, 7, 5.0),
    (jnp.bfloat16, 256, 1, 2, 2, None, None),
]


@pytest.mark.parametrize("dtype,head_dim,kv_heads,groups,num_splits,window,softcap", CASES,
                         ids=lambda x: getattr(x, "__name__", str(x)))
def test_matches_reference(dtype, head_dim, kv_heads, groups, num_splits, window, softcap):
  # q_scale 3 makes soft-capping at 5 bind (|scores| reach ~10) where it is on.
  q, k, v, lengths = _inputs(head_dim + groups, kv_heads=kv_heads, groups=groups, head_dim=head_dim, dtype=dtype,
                             q_scale=3.0 if softcap else 1.0)
  out = decode_attention(q, k, v, lengths, sliding_window=window, logit_softcap=softcap, block_kv=BLOCK_KV,
                         num_splits=num_splits, interpret=INTERPRET)
  assert out.shape == q.shape and out.dtype == q.dtype
  ref = _reference(q, k, v, lengths, window=window, softcap=softcap)
  assert _rel_error(out, ref) < TOLERANCE[dtype]
  assert np.all(np.asarray(out[0]) == 0)  # length 0: exact zeros, no NaN
  if softcap:  # the cap binds: it changes the answer a lot
    assert np.max(np.abs(ref - _reference(q, k, v, lengths, window=window))) > 0.1


def test_traced_window_scale_and_defaults():
  """Window as a traced scalar under jit (one compilation for every window), a custom scale, default
  block_kv/num_splits, and windows of 1 (the token itself) and >= length (no effect)."""
  q, k, v, lengths = _inputs(2, kv_heads=2, groups=2, head_dim=64, dtype=jnp.float32)
  run = jax.jit(lambda w: decode_attention(q, k, v, lengths, sliding_window=w, scale=0.3, interpret=INTERPRET))
  for window in (1, 5, 100, 0):
    ref = _reference(q, k, v, lengths, window=window, scale=0.3)
    assert _rel_error(run(jnp.int32(window)), ref) < 1e-5, window
  assert run._cache_size() == 1


def test_short_cache_and_lengths_beyond_cache():
  """A cache shorter than one block (padded internally) and lengths past the cache end (clipped)."""
  q, k, v, _ = _inputs(3, kv_heads=1, groups=8, head_dim=64, dtype=jnp.float32, max_len=10, lengths=(0, 1, 7, 10))
  lengths = jnp.asarray([0, 1, 7, 12], jnp.int32)
  out = decode_attention(q, k, v, lengths, num_splits=2, interpret=INTERPRET)
  assert _rel_error(out, _reference(q, k, v, jnp.minimum(lengths, 10))) < 1e-5


@pytest.mark.parametrize("window,softcap", [(None, None), (6, 3.0)])
def test_equals_dot_product_attention_last_row(window, softcap):
  """Decoding the last token of a causal prefix equals the last query row of the XLA attention."""
  batch, seq, kv_heads, groups, head_dim = 2, 37, 2, 2, 64
  rng = np.random.default_rng(4)
  q = jnp.asarray(rng.standard_normal((batch, seq, kv_heads * groups, head_dim)) * 2.0, jnp.float32)
  k = jnp.asarray(rng.standard_normal((batch, seq, kv_heads, head_dim)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((batch, seq, kv_heads, head_dim)), jnp.float32)
  scale = head_dim ** -0.5
  with jax.default_matmul_precision("highest"):  # on a GPU, XLA's float32 matmuls would otherwise round to tf32
    full = dot_product_attention(q, k, v, jnp.ones((batch, seq), jnp.int32), scale, window or 0, softcap or 0.0)
  # The cache ([B, K, T, D]) has room past the prefix; garbage there must not leak in.
  pad = ((0, 0), (0, 0), (0, 11), (0, 0))
  k_cache = jnp.pad(k.swapaxes(1, 2), pad, constant_values=1e4)
  v_cache = jnp.pad(v.swapaxes(1, 2), pad, constant_values=1e4)
  out = decode_attention(q[:, -1], k_cache, v_cache, jnp.full((batch,), seq, jnp.int32), sliding_window=window,
                         logit_softcap=softcap, scale=scale, block_kv=BLOCK_KV, num_splits=2, interpret=INTERPRET)
  expected = np.asarray(full[:, -1], np.float64)
  assert _rel_error(out, expected) < 1e-5


def test_rejects_bad_arguments(monkeypatch):
  q, k, v, lengths = _inputs(5, kv_heads=2, groups=1, head_dim=64, dtype=jnp.float32, lengths=(3,))
  with pytest.raises(ValueError, match="multiple of kv_heads"):
    decode_attention(q[:, :1], k, v, lengths, interpret=INTERPRET)
  with pytest.raises(ValueError, match="block_kv"):
    decode_attention(q, k, v, lengths, block_kv=24, interpret=INTERPRET)
  with pytest.raises(ValueError, match="head_dim"):
    decode_attention(q[..., :48], k[..., :48], v[..., :48], lengths, interpret=INTERPRET)
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  with pytest.raises(NotImplementedError, match="TPU"):
    decode_attention(q, k, v, lengths)
