"""On a GPU: the compiled Pallas kernels and cuDNN attention against XLA attention (forward and gradients),
at real shapes, with the masks the model uses (packed segments, sliding windows).

  python3 end_to_end/gpu/check_kernels.py [--impls flash,cudnn]

Prints one line per case and exits non-zero if any case mismatches. bf16 inputs; tolerance relative to the
largest reference value, 2e-2 as in the interpret-mode tests. cuDNN has no soft-capping: those cases skip it.
"""

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from kernels.decode_attention import decode_attention
from kernels.flash_attention import flash_attention
from tunix_core.models import attention as attention_lib

CASES = [  # (batch, seq, q_heads, kv_heads, head_dim, sliding_window, softcap, packed)
    (2, 2048, 16, 16, 128, None, None, False),
    (2, 2048, 32, 8, 128, None, None, True),
    (1, 1500, 8, 4, 256, 512, 50.0, False),
    (2, 1024, 16, 16, 64, None, None, False),
    (1, 1536, 8, 4, 256, 512, None, True),
]


def relative_error(ours, reference) -> float:
  ours, reference = np.asarray(ours, np.float32), np.asarray(reference, np.float32)
  return float(np.max(np.abs(ours - reference)) / max(np.max(np.abs(reference)), 1e-6))


def check_case(impl: str, case) -> bool | None:
  """Prints the case's errors; True if within tolerance, None where the implementation does not apply."""
  batch, seq, heads, kv_heads, dim, window, cap, packed = case
  if impl == "cudnn" and cap:
    return None
  keys = jax.random.split(jax.random.key(seq + dim), 4)
  q = jax.random.normal(keys[0], (batch, seq, heads, dim), jnp.bfloat16)
  k = jax.random.normal(keys[1], (batch, seq, kv_heads, dim), jnp.bfloat16)
  v = jax.random.normal(keys[2], (batch, seq, kv_heads, dim), jnp.bfloat16)
  do = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
  segments = jnp.where(jnp.arange(seq) < seq // 3, 1, 2)[None].repeat(batch, 0) if packed else \
      jnp.ones((batch, seq), jnp.int32)
  scale = dim ** -0.5

  def ours(q, k, v):
    if impl == "cudnn":
      return attention_lib.cudnn_attention(q, k, v, segments, scale, window or 0, window or 0)
    return flash_attention(q, k, v, causal=True, segment_ids=segments, sliding_window=window, logit_softcap=cap,
                           scale=scale)

  def reference(q, k, v):
    return attention_lib.dot_product_attention(q, k, v, segments, scale, window or 0, cap or 0.0)

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * do)

  errors = [relative_error(jax.jit(ours)(q, k, v), jax.jit(reference)(q, k, v))]
  grads = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q, k, v)
  expected = jax.jit(jax.grad(loss(reference), argnums=(0, 1, 2)))(q, k, v)
  errors += [relative_error(g, e) for g, e in zip(grads, expected)]
  line = f"out {errors[0]:.1e} dq {errors[1]:.1e} dk {errors[2]:.1e} dv {errors[3]:.1e}"
  if impl == "flash" and not packed:
    lengths = jnp.full((batch,), seq, jnp.int32)
    decoded = jax.jit(lambda q, k, v: decode_attention(q, k, v, lengths, sliding_window=window, logit_softcap=cap,
                                                       scale=scale))(q[:, -1], k.swapaxes(1, 2), v.swapaxes(1, 2))
    errors.append(relative_error(decoded, jax.jit(reference)(q, k, v)[:, -1]))
    line += f" decode {errors[-1]:.1e}"
  ok = max(errors) < 2e-2
  print(f"{impl:5s} B{batch} S{seq} H{heads}/{kv_heads} D{dim} window={window} cap={cap} packed={packed}: {line} "
        f"{'ok' if ok else 'MISMATCH'}", flush=True)
  return ok


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--impls", default="flash,cudnn")
  args = parser.parse_args()
  results = [check_case(impl, case) for impl in args.impls.split(",") for case in CASES]
  return 1 if False in results else 0


if __name__ == "__main__":
  sys.exit(main())
