"""Times GRPO's jitted update with one row per completion and with pack_groups, and prints a table.

  python3 benchmarks/grpo_update.py [--measure_steps N] [configs/grpo_default.yml] [key=value ...]

The rollout is synthetic, in the config's shapes: rollout_batch_size groups of num_generations, prompt lengths drawn
from half to all of the longest prompt the data lets through (max_target_length + 1 - max_new_tokens) and
completion lengths from a third to all of max_new_tokens (for configs/grpo_default.yml, 16-33 and 10-32: the bundled
arithmetic task's ranges). The weights are the seeded init or load_parameters_path/hf_path: the update's cost does
not depend on them.
"""

import argparse
import statistics
import sys
import time

import jax
import numpy as np

from tunix_core import config as config_lib, train
from tunix_core.errors import UserError
from tunix_core.rl import group_rows, rollout


def synthetic_rollout(config, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
  """(one prompt per group, num_generations completions per group) of random token ids."""
  rng = np.random.default_rng(seed)
  longest_prompt, longest_completion = config.max_target_length + 1 - config.max_new_tokens, config.max_new_tokens
  prompts = [list(rng.integers(3, config.vocab_size, rng.integers(longest_prompt // 2, longest_prompt + 1)))
             for _ in range(config.rollout_batch_size)]
  completions = [list(rng.integers(3, config.vocab_size, rng.integers(longest_completion // 3, longest_completion + 1)))
                 for _ in range(config.rollout_batch_size * config.num_generations)]
  return prompts, completions


def time_update(argv: list[str], measure_steps: int) -> dict[str, float]:
  config = config_lib.load(argv)
  prompts, completions = synthetic_rollout(config)
  if config.pack_groups:
    rows = group_rows.pack(prompts, completions, config.num_generations, config.max_target_length,
                           config.max_new_tokens)
  else:
    rows = rollout.token_rows([p for p in prompts for _ in range(config.num_generations)], completions,
                              config.max_target_length)
  rng = np.random.default_rng(1)
  rows.update(old_logps=np.zeros_like(rows["loss_mask"]), on_policy=np.ones(len(completions), np.float32),
              advantages=rng.normal(size=len(completions)).astype(np.float32))
  rows = {k: v[:config.global_batch_size] for k, v in rows.items()}
  setup = train.build(config)
  with setup.activate():
    state = setup.initial_state(config, None, None)
    batch = train.to_device_batch(rows, config, setup.train_batch_sharding, accumulate=True)
    state, step_metrics = setup.train_step(state, batch)
    jax.block_until_ready(step_metrics)
    times = []
    for _ in range(measure_steps):
      start = time.perf_counter()
      state, step_metrics = setup.train_step(state, batch)
      jax.block_until_ready(step_metrics)
      times.append(time.perf_counter() - start)
  tokens = config.global_batch_size * train.row_length(config)
  return {"tokens": tokens, "median_s": statistics.median(times), "min_s": min(times)}


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--measure_steps", type=int, default=8)
  args, rest = parser.parse_known_args(argv)
  rest = rest or ["configs/grpo_default.yml"]
  print("| layout | tokens an update | median update | fastest |")
  print("| --- | --- | --- | --- |")
  for packed in (False, True):
    try:
      result = time_update([*rest, f"pack_groups={str(packed).lower()}"], args.measure_steps)
    except UserError as error:
      sys.exit(f"error: {error}")
    name = "pack_groups (one row per group)" if packed else "one row per completion"
    print(f"| {name} | {result['tokens']:,} | {1000 * result['median_s']:.0f} ms | {1000 * result['min_s']:.0f} ms |",
          flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
