"""What a rollout needs from the model: sampling with the current policy's own arrays, the completions laid out as
training rows, and per-token log-probs of those rows under the policy and the reference at the rollout's
temperature. `RolloutContext` bundles them (and the prompts and the reward functions) for a mode's `prepare`.
"""

from collections.abc import Callable
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tunix_core import distributed, losses, peft
from tunix_core.generate import sampler as sampler_lib
from tunix_core.generate.sampling import SamplingParams
from tunix_core.rewards import runner as rewards_lib
from tunix_core.rl import group_rows
from tunix_core.rl.data import Prompt

TOKEN_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def token_keys(config) -> tuple[str, ...]:
  """The token arrays of a rollout's rows (pack_groups adds where each completion token's hidden state is)."""
  return group_rows.TOKEN_KEYS if config.pack_groups else TOKEN_KEYS


def scaled_log_probs(model, batch: dict[str, jax.Array], config, with_entropy: bool = False):
  """Per-token log-probs of batch["targets"] (its shape: [rows, length], or [completions, max_new_tokens] with
  pack_groups) under the model's logits divided by the rollout temperature, the distribution the completions were
  sampled from (and, with_entropy, its entropy too)."""
  if config.pack_groups:
    hidden = group_rows.hidden_states(model, batch, config.num_generations)
  else:
    hidden = model.hidden_states(batch["inputs"], batch["positions"], batch["segment_ids"])
  logits = lambda h: model.logits(h) / config.temperature
  if with_entropy:
    return losses.token_log_probs_and_entropy(logits, hidden, batch["targets"], config.loss_chunk_size)
  return losses.token_log_probs(logits, hidden, batch["targets"], config.loss_chunk_size)


def _deep_merge(a: dict, b: dict) -> dict:
  out = dict(a)
  for key, value in b.items():
    out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and key in out else value
  return out


def policy_weights(setup, state) -> tuple[nnx.GraphDef, dict]:
  """The graph and weights the sampler runs the current policy with: the train state's own arrays (no copy); with
  LoRA/QLoRA the adapted graph over the frozen base and the adapters."""
  if setup.lora is None:
    return setup.graphdef, setup.policy_params_of(state["params"])
  return setup.lora.graphdef, _deep_merge(state["frozen"]["base"], state["params"])


def sampling_params(config, tokenizer, *, greedy: bool = False) -> SamplingParams:
  """The rollout's sampling (generation keys; greedy for eval/accuracy), one completion per row."""
  stop = tuple(tuple(tokenizer.encode(s)) for s in config.stop_sequences)
  return SamplingParams(max_new_tokens=config.max_new_tokens, temperature=0.0 if greedy else config.temperature,
                        top_k=config.top_k, top_p=config.top_p, min_p=config.min_p,
                        eos_ids=sampler_lib.eos_ids(config, tokenizer), stop_sequences=stop)


def token_rows(prompt_ids: list[list[int]], completion_ids: list[list[int]], length: int) -> dict[str, np.ndarray]:
  """Prompt + completion per row as training rows [rows, length]: inputs/targets shifted by one, loss_mask on the
  completion's targets, one segment per row, padding after."""
  rows = len(prompt_ids)
  out = {"inputs": np.zeros((rows, length), np.int32), "targets": np.zeros((rows, length), np.int32),
         "loss_mask": np.zeros((rows, length), np.float32), "segment_ids": np.zeros((rows, length), np.int32),
         "positions": np.zeros((rows, length), np.int32)}
  for r, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
    ids = np.asarray(list(prompt) + list(completion), np.int32)[:length + 1]
    n = len(ids) - 1
    out["inputs"][r, :n], out["targets"][r, :n] = ids[:-1], ids[1:]
    out["loss_mask"][r, len(prompt) - 1:n] = 1.0
    out["segment_ids"][r, :n] = 1
    out["positions"][r, :n] = np.arange(n)
  return out


def _log_probs(setup, config, params, frozen: dict, batch: dict, policy: bool, reference: bool, values: bool
               ) -> dict[str, jax.Array]:
  out = {}
  if "base" in frozen:
    policy_model = nnx.merge(setup.lora.graphdef, frozen["base"], params)
    reference_model = nnx.merge(setup.lora.graphdef, frozen["base"], peft.adapters_off(params))
  else:
    policy_model = nnx.merge(setup.graphdef, setup.policy_params_of(params))
    reference_model = nnx.merge(setup.graphdef, frozen["reference"]) if "reference" in frozen else None
  if policy:
    out["old_logps"] = scaled_log_probs(policy_model, batch, config)
  if reference:
    out["ref_logps"] = scaled_log_probs(reference_model, batch, config)
  if values:
    critic = nnx.merge(setup.critic_graphdef, params["critic"])
    out["old_values"] = critic.values(batch["inputs"], batch["positions"], batch["segment_ids"])
  return out


class RolloutContext:
  """What a mode's `prepare` works with: prompts, sampling, rewards, training rows and log-probs. Times each part
  (seconds, summed until `take_times`)."""

  def __init__(self, config, setup, tokenizer, prompts, reward_functions: list[rewards_lib.RewardFunction]):
    self.config, self.setup, self.tokenizer = config, setup, tokenizer
    self.reward_functions = reward_functions
    self._prompts = prompts
    self._times: dict[str, float] = {}
    replicated = NamedSharding(setup.mesh, PartitionSpec())
    shardings = setup.shardings
    self._token_keys = token_keys(config)
    token_shardings = {k: setup.eval_batch_sharding for k in self._token_keys}
    self._log_probs = jax.jit(functools.partial(_log_probs, setup, config),
                              in_shardings=(shardings["params"], shardings["frozen"], token_shardings),
                              out_shardings=replicated, static_argnums=(3, 4, 5))

  def _timed(self, name: str, fn: Callable, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    self._times[name] = self._times.get(name, 0.0) + time.perf_counter() - start
    return result

  def take_times(self) -> dict[str, float]:
    times, self._times = self._times, {}
    return times

  def next_prompts(self, n: int) -> list[Prompt]:
    return [next(self._prompts) for _ in range(n)]

  def sample(self, state, prompts: list[Prompt], num_samples: int, seed: int, greedy: bool = False
             ) -> list[sampler_lib.Completion]:
    """num_samples completions per prompt with the current policy, flat: prompt i's are rows i*n .. i*n+n-1."""
    graphdef, weights = policy_weights(self.setup, state)
    generator = sampler_lib.Sampler(graphdef, weights, self.tokenizer, batch_size=self.config.generate_batch_size,
                                    prefill_buckets=self.config.prefill_length_buckets,
                                    decode_halvings=self.config.decode_halvings,
                                    threads=self.config.generate_threads)
    sampling = dataclasses.replace(sampling_params(self.config, self.tokenizer, greedy=greedy),
                                   num_samples=num_samples)
    groups = self._timed("sample", generator.generate, [p.ids for p in prompts], sampling, seed % 2**32)
    return [c for group in groups for c in group]

  def score(self, prompts: list[Prompt], completions: list[sampler_lib.Completion],
            functions: list[rewards_lib.RewardFunction] | None = None) -> rewards_lib.Scores:
    """Rewards of each completion; prompts[i] is completion i's prompt."""
    columns = {key: [p.columns.get(key) for p in prompts] for key in prompts[0].columns} if prompts else {}
    return self._timed("reward", rewards_lib.score, functions or self.reward_functions, [p.prompt for p in prompts],
                       [c.text for c in completions], columns, [c.token_ids for c in completions],
                       timeout_s=self.config.reward_timeout_s, error_default=self.config.reward_error_default)

  def rows(self, prompts: list[Prompt], completions: list[sampler_lib.Completion]) -> dict[str, np.ndarray]:
    """Training rows of the completions; prompts[i] is completion i's (with pack_groups, groups contiguous)."""
    config = self.config
    if config.pack_groups:
      return group_rows.pack([p.ids for p in prompts[::config.num_generations]], [c.token_ids for c in completions],
                             config.num_generations, config.max_target_length, config.max_new_tokens)
    return token_rows([p.ids for p in prompts], [c.token_ids for c in completions], config.max_target_length)

  def log_probs(self, state, rows: dict[str, np.ndarray], *, policy: bool, reference: bool, values: bool = False
                ) -> dict[str, np.ndarray]:
    """Per-token log-probs [rows, length] at the rollout temperature of the current policy ("old_logps") and/or
    the reference ("ref_logps"), and the critic's values ("old_values", mode=ppo), run in micro-batches."""
    if not (policy or reference or values):
      return {}
    micro = self.config.micro_batch_size
    total, parts = len(rows["inputs"]), []

    def run():
      for start in range(0, total, micro):
        local = {k: rows[k][start:start + micro] for k in self._token_keys}
        batch = distributed.global_batch(_process_part(local, self.config), self.setup.eval_batch_sharding, micro)
        parts.append(self._log_probs(state["params"], state["frozen"], batch, policy, reference, values))
      return {k: np.concatenate([np.asarray(jax.device_get(p[k])) for p in parts]) for k in parts[0]}

    return self._timed("log_probs", run)


def _process_part(rows: dict[str, np.ndarray], config) -> dict[str, np.ndarray]:
  """This process's contiguous share of a batch of global rows."""
  if config.num_processes == 1:
    return rows
  share = len(next(iter(rows.values()))) // config.num_processes
  return {k: v[config.process_index * share:(config.process_index + 1) * share] for k, v in rows.items()}
