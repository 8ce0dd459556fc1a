"""Attention forward and forward+backward TFLOP/s for each implementation, at the shapes we track.

  python3 benchmarks/attention.py [--impls xla,cudnn,tokamax,flash] [--shapes default|cpu] [--iters 20]
  python3 benchmarks/attention.py --block_sweep   (our kernel's tile sizes at the first shape)

FLOPs follow the FlashAttention papers' convention: forward = 4·B·S²·H·D, halved for causal;
forward + backward = 3.5 × forward (the backward pass does 2.5 × the forward's matmul work).
A failing implementation (not installed, not supported on this device) is reported, not fatal.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from tunix_core.models import attention as attention_lib

# (name, batch, seq, q_heads, kv_heads, head_dim): the reference shape first.
GPU_SHAPES = [("S4k H16 D128", 2, 4096, 16, 16, 128), ("S1k H16 D128", 8, 1024, 16, 16, 128),
              ("S16k H16 D128", 1, 16384, 16, 16, 128), ("S4k GQA 32:8 D128", 2, 4096, 32, 8, 128),
              ("S4k H8 D256", 2, 4096, 8, 8, 256)]
CPU_SHAPES = [("S256 H4 D64", 1, 256, 4, 4, 64)]

# Tile-size variants of our kernel for --block_sweep, as changes to BlockSizes.default, by head_dim: forward
# (block_q, block_kv, num_warps, num_stages), then backward (dk/dv kernel's streamed queries and held keys, dq
# kernel's held queries and streamed keys, num_warps_bwd, num_stages_bwd).
SWEEP_VARIANTS = {
    128: [dict(num_stages=4), dict(block_kv=128), dict(block_kv=32, num_stages=4), dict(num_warps=8),
          dict(block_q=128, block_kv=128, num_warps=8),
          dict(num_stages_bwd=3), dict(num_warps_bwd=8), dict(block_q_dkv=32, block_kv_dq=32),
          dict(block_kv_dkv=128, block_q_dq=128, num_warps_bwd=8),
          dict(block_q_dkv=32, block_kv_dkv=128, block_q_dq=128, block_kv_dq=32, num_warps_bwd=8)],
    256: [dict(block_kv=64), dict(num_warps_bwd=4), dict(num_stages_bwd=1), dict(num_stages=3),
          dict(block_q_dkv=32, block_kv_dq=32), dict(block_kv_dkv=32, block_q_dq=32)],
}


def implementations() -> dict:
  def xla(q, k, v):
    segments = jnp.ones(q.shape[:2], jnp.int32)
    return attention_lib.dot_product_attention(q, k, v, segments, q.shape[-1] ** -0.5)

  def cudnn(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

  def tokamax(q, k, v):
    import tokamax as tk  # pylint: disable=import-outside-toplevel
    return tk.dot_product_attention(q, k, v, is_causal=True)

  def flash(q, k, v):
    from kernels.flash_attention import flash_attention  # pylint: disable=import-outside-toplevel
    return flash_attention(q, k, v, causal=True)

  return {"xla": xla, "cudnn": cudnn, "tokamax": tokamax, "flash": flash}


def timed(fn, *args, iters: int, repeats: int = 5) -> float:
  """Median over `repeats` of the mean time of `iters` back-to-back calls: dispatching them without waiting keeps
  the host's launch overhead out of sub-millisecond kernels."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / iters)
  return statistics.median(times)


def measure(impl, shape, iters: int) -> tuple[float, float]:
  _, batch, seq, heads, kv_heads, dim = shape
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (batch, seq, heads, dim), jnp.bfloat16)
  k = jax.random.normal(keys[1], (batch, seq, kv_heads, dim), jnp.bfloat16)
  v = jax.random.normal(keys[2], (batch, seq, kv_heads, dim), jnp.bfloat16)
  cotangent = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
  forward = jax.jit(impl)
  backward = jax.jit(jax.grad(lambda q, k, v: jnp.sum(impl(q, k, v).astype(jnp.float32) * cotangent),
                              argnums=(0, 1, 2)))
  flops = 4 * batch * seq * seq * heads * dim / 2
  return flops / timed(forward, q, k, v, iters=iters) / 1e12, 3.5 * flops / timed(backward, q, k, v, iters=iters) / 1e12


def block_sweep(shape, iters: int) -> None:
  import dataclasses  # pylint: disable=import-outside-toplevel
  from kernels.flash_attention import BlockSizes, flash_attention  # pylint: disable=import-outside-toplevel
  default = BlockSizes.default(shape[-1])
  print(f"block sweep at {shape[0]}; default {default}")
  for change in [{}, *SWEEP_VARIANTS[shape[-1]]]:
    blocks = dataclasses.replace(default, **change)
    try:
      fwd, both = measure(lambda q, k, v, b=blocks: flash_attention(q, k, v, causal=True, block_sizes=b), shape, iters)
      print(f"{str(change or 'default'):96s} | {fwd:7.1f} | {both:7.1f}", flush=True)
    except Exception as e:  # pylint: disable=broad-except
      print(f"{str(change):96s} | failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}", flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--impls", default="xla,cudnn,tokamax,flash")
  parser.add_argument("--shapes", choices=("default", "cpu"), default="default")
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--block_sweep", action="store_true", help="time tile-size variants of our kernel instead")
  parser.add_argument("--sweep_shapes", default="S4k H16 D128", help="comma-separated shape names the sweep covers")
  args = parser.parse_args()
  shapes = CPU_SHAPES if args.shapes == "cpu" else GPU_SHAPES
  if args.block_sweep:
    for shape in shapes:
      if shape[0] in args.sweep_shapes.split(","):
        block_sweep(shape, args.iters)
    return
  device = jax.devices()[0].device_kind
  print(f"device: {device}, jax {jax.__version__}, bf16, causal")
  print(f"{'shape':20s} | {'impl':8s} | {'fwd TFLOP/s':>11s} | {'fwd+bwd TFLOP/s':>15s}")
  for shape in shapes:
    for name in args.impls.split(","):
      try:
        fwd, both = measure(implementations()[name], shape, args.iters)
        print(f"{shape[0]:20s} | {name:8s} | {fwd:11.3f} | {both:15.3f}", flush=True)
      except Exception as e:  # pylint: disable=broad-except
        print(f"{shape[0]:20s} | {name:8s} | failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}", flush=True)


if __name__ == "__main__":
  main()
