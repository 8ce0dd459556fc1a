"""Times the jitted train step for a config and prints a table: step time, tokens/s, MFU.

  python3 benchmarks/train_step.py [--measure_steps N] [--warmup_steps N] configs/base.yml [key=value ...]

Batches come from the configured data pipeline and are placed on the devices before timing, so the
figure is the step itself (the training loop overlaps data loading with the device anyway). Each timed
step is dispatched back to back; the clock stops when the last one's results are ready.
"""

import argparse
import statistics
import sys
import time

import jax

from tunix_core import config as config_lib, metrics as metrics_lib, models, train
from tunix_core.data import pipeline, tokenizer as tokenizer_lib
from tunix_core.errors import UserError


def benchmark(argv: list[str], measure_steps: int, warmup_steps: int) -> dict[str, float]:
  config = config_lib.load(argv)
  tokenizer = tokenizer_lib.load_tokenizer(config.tokenizer_path)
  iterator = pipeline.make_train_iterator(config, tokenizer)
  setup = train.build(config)
  with setup.activate():
    state = setup.initial_state(config, None, None)
    batches = [train.to_device_batch(next(iterator), config, setup.train_batch_sharding, accumulate=True)
               for _ in range(min(measure_steps, 8))]
    start = time.perf_counter()
    state, step_metrics = setup.train_step(state, batches[0])
    jax.block_until_ready(step_metrics)
    compile_and_first = time.perf_counter() - start
    for i in range(warmup_steps):
      state, step_metrics = setup.train_step(state, batches[i % len(batches)])
    jax.block_until_ready(step_metrics)
    times = []
    for i in range(measure_steps):
      start = time.perf_counter()
      state, step_metrics = setup.train_step(state, batches[i % len(batches)])
      jax.block_until_ready(step_metrics)
      times.append(time.perf_counter() - start)
  step_time = statistics.median(times)
  memory = jax.devices()[0].memory_stats() or {}  # None on CPU
  tokens = config.global_batch_size * config.max_target_length
  n_params = models.num_params(setup.abstract_params)
  flops = train.model_flops_per_token(config, n_params)
  tokens_per_sec = tokens / step_time
  utilisation = metrics_lib.mfu(tokens_per_sec / config.num_devices, flops,
                                metrics_lib.device_peak_flops(jax.devices()[0]))
  return {"device": f"{config.num_devices} x {jax.devices()[0].device_kind}", "params": n_params,
          "batch": f"{config.global_batch_size} x {config.max_target_length}", "first step (compile) s": compile_and_first,
          "step ms (median)": 1000 * step_time, "step ms (min)": 1000 * min(times),
          "tokens/s": tokens_per_sec, "TFLOP/s/device": tokens_per_sec * flops / config.num_devices / 1e12,
          "MFU": utilisation if utilisation is not None else float("nan"), "final loss": float(step_metrics["loss"]),
          "peak device GiB": memory.get("peak_bytes_in_use", float("nan")) / 2**30}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--measure_steps", type=int, default=20)
  parser.add_argument("--warmup_steps", type=int, default=3)
  args, config_args = parser.parse_known_args()
  try:
    result = benchmark(config_args, args.measure_steps, args.warmup_steps)
  except UserError as e:
    sys.exit(f"benchmarks/train_step.py: error: {e}")
  width = max(map(len, result))
  print(f"\n{'metric'.ljust(width)} | value")
  print(f"{'-' * width}-|-{'-' * 20}")
  for key, value in result.items():
    shown = f"{value:,.4g}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else value
    print(f"{key.ljust(width)} | {shown}")
  print(f"\ncommand: python3 benchmarks/train_step.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
  main()
