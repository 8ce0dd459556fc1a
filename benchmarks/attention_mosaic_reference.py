"""How much a Mosaic GPU lowering could gain: JAX's own Mosaic GPU attention example
(jax.experimental.pallas.ops.gpu.attention_mgpu: FlashAttention-3-style warp-specialised Hopper kernels, a causal
forward and a non-causal backward) against cuDNN and our Triton-lowered kernel at B2 S4k H16 D128, causal and not.

  python3 benchmarks/attention_mosaic_reference.py   (an H100; float16, the dtype the example kernel is written for)

The example kernel does not scale the scores, so its rows get q pre-multiplied by head_dim^-0.5 (one elementwise
op, inside the timing); "max diff" is each output's largest difference to cuDNN's. FLOPs as benchmarks/attention.py.
"""

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention_mgpu

from attention import timed  # benchmarks/attention.py (a script's own directory is on sys.path)
from kernels.flash_attention import flash_attention

BATCH, SEQ, HEADS, HEAD_DIM = 2, 4096, 16, 128
# (forward block_q, block_kv), then the backward's (block_q_dkv, block_kv_dkv, block_q_dq, block_kv_dq).
MOSAIC_TILES = [((64, 64), (64, 64, 64, 64)), ((64, 128), (64, 64, 64, 64)), ((64, 128), (64, 128, 128, 64))]


def implementations(causal: bool) -> dict:
  impls = {"cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn"),
           "ours": lambda q, k, v: flash_attention(q, k, v, causal=causal)}
  for (block_q, block_kv), backward in MOSAIC_TILES:
    config = attention_mgpu.TuningConfig(block_q=block_q, block_kv=block_kv, max_concurrent_steps=2, causal=causal,
                                         block_q_dkv=backward[0], block_kv_dkv=backward[1], block_q_dq=backward[2],
                                         block_kv_dq=backward[3])
    impls[f"jax mosaic {block_q}x{block_kv}, bwd {backward}"] = (
        lambda q, k, v, config=config: attention_mgpu.attention(q * HEAD_DIM ** -0.5, k, v, config))
  return impls


def main() -> None:
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, cotangent = (jax.random.normal(key, (BATCH, SEQ, HEADS, HEAD_DIM), jnp.float16) for key in keys)
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, float16, B{BATCH} S{SEQ} H{HEADS} D{HEAD_DIM}")
  print(f"{'causal':6s} | {'impl':40s} | {'fwd TFLOP/s':>11s} | {'fwd+bwd TFLOP/s':>15s} | max diff")
  for causal in (True, False):
    flops = 4 * BATCH * SEQ * SEQ * HEADS * HEAD_DIM / (2 if causal else 1)
    reference = None
    for name, impl in implementations(causal).items():
      row = f"{causal!s:6s} | {name:40s}"
      try:
        forward = jax.jit(impl)
        out = forward(q, k, v).astype(jnp.float32)
        reference = out if reference is None else reference
        row += f" | {flops / timed(forward, q, k, v, iters=10) / 1e12:11.1f}"
        backward = jax.jit(jax.grad(lambda q, k, v, impl=impl: jnp.sum(impl(q, k, v).astype(jnp.float32) * cotangent),
                                    argnums=(0, 1, 2)))
        try:
          row += f" | {3.5 * flops / timed(backward, q, k, v, iters=10) / 1e12:15.1f}"
        except NotImplementedError:
          row += f" | {'no backward':>15s}"
        row += f" | {float(jnp.max(jnp.abs(out - reference))):.1e}"
      except Exception as e:  # pylint: disable=broad-except
        row += f" | failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
      print(row, flush=True)


if __name__ == "__main__":
  main()
