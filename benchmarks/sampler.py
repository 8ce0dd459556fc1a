"""Times the sampler (tunix_core/generate) for a config and prints a table per batch size: prefill tokens/s,
decode tokens/s, and the decode step time against its memory floor.

  python3 benchmarks/sampler.py [--batch_sizes 1,16,64,256] [--prompt_length 128] [--new_tokens 128]
                                [--bandwidth_gbs GB/s] configs/base.yml [key=value ...]

Weights are the config's (load_parameters_path, hf_path, else a seeded init: speed does not depend on them).
Prompts are random tokens of exactly --prompt_length; no EOS ends a row, so every row decodes --new_tokens.
Prefill is timed alone (the jitted prefill into a fresh cache); the decode step is (whole generation -
prefill) / (new_tokens - 1), i.e. the real sampler loop with sampling and stopping checks included.

The floor of one decode step is the bytes it must read divided by the device's bandwidth: every parameter
once, plus the valid KV-cache entries of every row (on average prompt_length + new_tokens / 2 per row, all
layers, keys and values). The bandwidth is measured here with a large device-to-device copy (read + write
bytes / time), or given with --bandwidth_gbs.
"""

import argparse
import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from tunix_core import config as config_lib, train
from tunix_core.errors import UserError
from tunix_core.generate import engine, sampler
from tunix_core.generate.sampling import SamplingParams


def measure_bandwidth(num_bytes: int, repeats: int = 10) -> float:
  """Bytes/s of a device-to-device copy: read + write counted, as HBM bandwidth is usually quoted."""
  x = jnp.ones((num_bytes // 4,), jnp.float32)
  copy = jax.jit(lambda a: a + 1.0)
  copy(x).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    copy(x).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * x.nbytes / min(times)


def timed(fn, repeats: int) -> float:
  """Median seconds of fn() (results blocked on), after one untimed call (compile)."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def benchmark(config, batch_sizes: list[int], prompt_length: int, new_tokens: int, bandwidth: float,
              repeats: int) -> list[dict]:
  setup = train.build(config)
  rows = []
  with setup.activate():
    weights = setup.starting_params(config)
    cfg = setup.model_config
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(weights))
    length = engine.cache_length(prompt_length, new_tokens)
    sampling = SamplingParams(max_new_tokens=new_tokens)  # greedy, no EOS: every row runs to the end
    graphdef = setup.graphdef

    @functools.partial(jax.jit, static_argnames=("length",))
    def prefill(weights, tokens, lengths, length):
      return engine.prefill(engine.model_for_generation(graphdef, weights), tokens, lengths, length)

    for batch in batch_sizes:
      tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt_length)).astype(np.int32)
      mask = np.ones_like(tokens, bool)
      lengths = np.full((batch,), prompt_length, np.int32)
      prefill_s = timed(lambda: prefill(weights, tokens, lengths, length), repeats)
      whole_s = timed(lambda: sampler.sample_arrays(graphdef, weights, tokens, mask, np.arange(batch, dtype=np.int32),
                                                    np.uint32(0), sampling=sampling, cache_length=length, pad_id=0),
                      repeats)
      step_s = (whole_s - prefill_s) / max(new_tokens - 1, 1)
      kv_bytes = (batch * (prompt_length + new_tokens / 2) * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim
                  * jnp.dtype(cfg.dtype).itemsize)
      floor_s = (param_bytes + kv_bytes) / bandwidth
      rows.append({"batch": batch, "prefill tok/s": batch * prompt_length / prefill_s,
                   "decode tok/s": batch / step_s, "step ms": 1e3 * step_s, "floor ms": 1e3 * floor_s,
                   "step / floor": step_s / floor_s, "params GB": param_bytes / 1e9, "KV GB read": kv_bytes / 1e9})
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch_sizes", default="1,16,64,256")
  parser.add_argument("--prompt_length", type=int, default=128)
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--bandwidth_gbs", type=float, default=0.0, help="device bandwidth in GB/s (0 = measure it)")
  parser.add_argument("--bandwidth_bytes", type=int, default=2**30, help="size of the copy that measures it")
  parser.add_argument("--repeats", type=int, default=3)
  args, config_args = parser.parse_known_args()
  try:
    config = config_lib.load(config_args)
    bandwidth = args.bandwidth_gbs * 1e9 or measure_bandwidth(args.bandwidth_bytes)
    rows = benchmark(config, [int(b) for b in args.batch_sizes.split(",")], args.prompt_length, args.new_tokens,
                     bandwidth, args.repeats)
  except UserError as e:
    sys.exit(f"benchmarks/sampler.py: error: {e}")
  device = jax.devices()[0]
  print(f"\ndevice: {len(jax.devices())} x {device.device_kind}; bandwidth {bandwidth / 1e9:,.0f} GB/s "
        f"({'given' if args.bandwidth_gbs else 'measured, copy read + write'}); prompt {args.prompt_length} tokens, "
        f"{args.new_tokens} new; model dtype {config.dtype}, attention {config.attention}, "
        f"scan_layers {config.scan_layers}")
  keys = list(rows[0])
  print(" | ".join(keys))
  print(" | ".join("-" * len(k) for k in keys))
  for row in rows:
    print(" | ".join(f"{v:,}" if isinstance(v, int) else f"{v:,.4g}" for v in row.values()))
  print(f"\ncommand: python3 benchmarks/sampler.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
  main()
