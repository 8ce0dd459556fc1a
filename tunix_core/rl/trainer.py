"""The RL side of the training loop: rollout batches from the mode's `prepare`, split into the train step's
batches (num_iterations passes of updates_per_rollout updates), and eval/accuracy from greedy completions.

Any mode with `prepare(context, state, step) -> (rows, metrics)` plugs in: rows are numpy arrays with the rollout's
completions as rows (token arrays [rows, max_target_length], plus the mode's per-token and per-row values).
"""

import collections
import time

import jax
import numpy as np

from tunix_core.rewards import runner as rewards_lib
from tunix_core.rl.data import Prompt
from tunix_core.rl.rollout import RolloutContext


class RLTrainer:
  """Feeds the train loop: `next_batch(state, step)` gives this process's rows for the step and, on the first
  update of a rollout batch, the rollout's metrics."""

  def __init__(self, config, setup, tokenizer, mode, prompt_iterator, eval_prompts: list[Prompt]):
    self.config, self.mode = config, mode
    self.context = RolloutContext(config, setup, tokenizer, prompt_iterator, mode.reward_functions(config))
    self.eval_prompts = eval_prompts
    self.verifier = rewards_lib.resolve_one(config, config.eval_verifier) if config.eval_verifier else None
    self._queue: collections.deque = collections.deque()
    self._updates_started: float | None = None

  def next_batch(self, state, step: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    if not self._queue:
      self._rollout(state, step)
    return self._queue.popleft()

  def _rollout(self, state, step: int) -> None:
    config = self.config
    jax.block_until_ready(state["params"])  # the previous batch's updates end here, not inside the sampler
    start = time.perf_counter()
    rows, metrics = self.mode.prepare(self.context, state, step)
    times = self.context.take_times()
    metrics["time/rollout_s"] = time.perf_counter() - start
    metrics.update({f"time/{k}_s": v for k, v in times.items()})
    metrics["rollout/tokens_per_sec"] = metrics["completions/tokens"] / max(times.get("sample", 0.0), 1e-9)
    if self._updates_started is not None:
      metrics["time/update_s"] = start - self._updates_started
    self._updates_started = time.perf_counter()
    step_rows = config.global_batch_size
    for iteration in range(config.num_iterations):
      for update in range(config.updates_per_rollout):
        batch = {k: v[update * step_rows:(update + 1) * step_rows] for k, v in rows.items()}
        if iteration == 0 and update == 0:
          batch["on_policy"] = np.ones_like(batch["on_policy"])
        self._queue.append((self._process_rows(batch), metrics if not self._queue else {}))

  def _process_rows(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's rows of a step's batch: its share of every micro-batch (see train.to_device_batch)."""
    config = self.config
    if config.num_processes == 1:
      return batch
    accumulation, share = config.gradient_accumulation_steps, config.micro_batch_size // config.num_processes
    first = config.process_index * share

    def mine(array: np.ndarray) -> np.ndarray:
      micro = array.reshape(accumulation, config.micro_batch_size, *array.shape[1:])
      return micro[:, first:first + share].reshape(-1, *array.shape[1:])

    return {k: mine(v) for k, v in batch.items()}

  def evaluate(self, state) -> dict[str, float]:
    """eval/accuracy: the verifier's mean over greedy completions of the held-out prompts; {} without either."""
    if self.verifier is None or not self.eval_prompts:
      return {}
    completions = self.context.sample(state, self.eval_prompts, 1, seed=0, greedy=True)
    scores = self.context.score(self.eval_prompts, completions, [self.verifier])
    self.context.take_times()
    return {"eval/accuracy": float(scores.total.mean()),
            "eval/completion_length": float(np.mean([c.length for c in completions]))}
