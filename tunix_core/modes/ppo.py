"""mode=ppo: PPO with a learned critic on rollouts of the current policy (Ouyang et al. 2022; TRL's PPOTrainer).

The train step's model is value_head.ActorCritic: the policy and a critic (the decoder with a scalar head, started
from the policy's weights under a zero head, or critic_load_parameters_path), both updated by one optimizer from
policy loss + vf_coef * value loss - entropy_coef * entropy.

`prepare` (host side, once per rollout batch): num_generations completions per prompt, their sequence rewards
(reward_functions, plus a reward model's score with reward_model_path), per-token log-probs of the policy before any
update and of the reference (beta > 0) at the rollout temperature, the critic's values, per-token rewards
-beta KL(policy || reference) (kl_estimator) with the sequence reward on the last completion token, GAE (gamma, lam)
and advantages whitened over the rollout batch. Rows flagged on_policy (the first update of each rollout batch) take
the old log-probs and values as stop_gradient(current), so their ratio is exactly 1 and nothing is clipped.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tunix_core import losses
from tunix_core.modes.base import LossOutput
from tunix_core.rewards import runner as rewards_lib
from tunix_core.rl import ppo_losses, reward_model, step_metrics
from tunix_core.rl.rollout import RolloutContext, scaled_log_probs

WEIGHT_NAME = "loss_weight"  # what LossOutput.weight counts: tokens (token-mean) or completions, as logged
REFERENCE_IN_LOSS = False  # the KL goes into the rewards in `prepare`; the loss never reads the reference
_SUMS = ("tokens", "clip", "value_clip", "ratio", "ratio_sq", "entropy", "approx_kl", "policy_loss", "value_loss")


def needs_reference(config) -> bool:
  """A frozen reference copy only when the rewards carry the KL term."""
  return config.beta > 0


def batch_keys(config) -> tuple[tuple[str, ...], tuple[str, ...]]:  # pylint: disable=unused-argument
  """(per-token, per-row) arrays `prepare` adds to the token arrays of a batch."""
  return ("old_logps", "old_values", "advantages", "returns"), ("on_policy",)


def reward_functions(config) -> list[rewards_lib.RewardFunction]:
  return rewards_lib.resolve(config)


def loss(model, batch: dict[str, jax.Array], config, reference=None) -> LossOutput:  # pylint: disable=unused-argument
  """Clipped policy loss + vf_coef * clipped value loss - entropy_coef * entropy of one micro-batch; `model` is a
  value_head.ActorCritic."""
  log_probs, entropy = scaled_log_probs(model.policy, batch, config, with_entropy=True)
  values = model.critic.values(batch["inputs"], batch["positions"], batch["segment_ids"])
  mask = batch["loss_mask"].astype(jnp.float32)
  on_policy = batch["on_policy"][:, None] > 0
  old_log_probs = jnp.where(on_policy, jax.lax.stop_gradient(log_probs), batch["old_logps"])
  old_values = jnp.where(on_policy, jax.lax.stop_gradient(values), batch["old_values"])
  policy = ppo_losses.policy_loss(log_probs, old_log_probs, batch["advantages"], mask, clip_epsilon=config.epsilon,
                                  clip_epsilon_high=config.epsilon_high)
  value = ppo_losses.value_loss(values, old_values, batch["returns"], mask, clip_range=config.cliprange_value)
  token_losses = policy.loss + config.vf_coef * value.loss - config.entropy_coef * entropy
  loss_sum, weight = losses.aggregate(token_losses, mask, config.loss_aggregation, config.max_new_tokens)
  ratio = jnp.exp(jax.lax.stop_gradient(log_probs - old_log_probs))
  # Token sums; `host_metrics` divides them by "tokens" (the step scales every metric alike, so ratios are exact).
  sums = {"tokens": mask, "clip": policy.clipped, "value_clip": value.clipped, "ratio": ratio,
          "ratio_sq": jnp.square(ratio), "entropy": jax.lax.stop_gradient(entropy), "approx_kl": policy.approx_kl,
          "policy_loss": jax.lax.stop_gradient(policy.loss), "value_loss": jax.lax.stop_gradient(value.loss)}
  return LossOutput(loss_sum=loss_sum, weight=weight,
                    metrics={f"ppo/{k}_sum": losses.masked_sum(v, mask) for k, v in sums.items()})


def host_metrics(metrics: dict[str, float]) -> dict[str, float]:
  """The step's token sums as per-token means: clip fractions, importance-ratio mean and std, entropy, losses."""
  mean = step_metrics.token_means(metrics, "ppo", _SUMS)
  if mean is None:
    return metrics
  metrics.update({"clip_fraction": mean["clip"], "clip_fraction/value": mean["value_clip"],
                  "ratio/mean": mean["ratio"], "ratio/std": mean["ratio_std"], "entropy": mean["entropy"],
                  "approx_kl": mean["approx_kl"], "loss/policy": mean["policy_loss"], "loss/value": mean["value_loss"]})
  return metrics


@functools.cache
def _reward_model(path: str) -> reward_model.RewardModel:
  """Loaded once per process: every rollout batch of a run scores with the same weights."""
  return reward_model.load(path)


def reward_model_scores(path: str, rows: dict[str, np.ndarray]) -> np.ndarray:
  """The reward model's score of each row's whole sequence (prompt + completion with its EOS), float64 [rows]."""
  count, length = rows["inputs"].shape
  ends = rows["segment_ids"].sum(axis=-1)  # each row's last input token is at ends - 1, its last target there too
  tokens = np.zeros((count, length + 1), np.int32)
  tokens[:, :length] = rows["inputs"]
  tokens[np.arange(count), ends] = rows["targets"][np.arange(count), np.maximum(ends - 1, 0)]
  segment_ids = (np.arange(length + 1)[None] <= ends[:, None]).astype(np.int32)
  scores = _reward_model(path).score_tokens(jnp.asarray(tokens), jnp.asarray(segment_ids))
  return np.asarray(jax.device_get(scores), np.float64)


def advantages_and_returns(rows: dict[str, np.ndarray], rewards: np.ndarray, config
                           ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
  """KL-shaped per-token rewards -> GAE -> whitened advantages and returns, with their metrics."""
  mask = jnp.asarray(rows["loss_mask"])
  kl = jnp.zeros_like(mask)
  if config.beta > 0:
    kl = losses.kl_penalty(jnp.asarray(rows["old_logps"]), jnp.asarray(rows["ref_logps"]), config.kl_estimator) * mask
  token_rewards = ppo_losses.kl_shaped_rewards(jnp.asarray(rewards, jnp.float32), kl, mask, beta=config.beta)
  values = jnp.asarray(rows["old_values"]) * mask
  advantages, returns = ppo_losses.gae(token_rewards, values, mask, gamma=config.gamma, lam=config.lam)
  whitened = ppo_losses.whiten(advantages, mask)
  m = np.asarray(mask, bool)
  values_np, returns_np = np.asarray(values)[m], np.asarray(returns)[m]
  variance = float(np.var(returns_np))
  metrics = {"kl": float(np.asarray(kl)[m].mean()), "values/mean": float(values_np.mean()),
             "returns/mean": float(returns_np.mean()), "advantages/std": float(np.asarray(advantages)[m].std()),
             "critic/explained_variance": 1.0 - float(np.var(returns_np - values_np)) / variance if variance > 0
             else 0.0}
  return {"advantages": np.asarray(whitened), "returns": np.asarray(returns)}, metrics


def prepare(context: RolloutContext, state, step: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
  """One rollout batch as training rows with old log-probs, old values, advantages and returns, and its metrics."""
  config = context.config
  size = config.num_generations
  prompts = context.next_prompts(config.rollout_batch_size)
  row_prompts = [p for p in prompts for _ in range(size)]
  completions = context.sample(state, prompts, size, seed=(config.seed * 1_000_003 + step) * 64)
  rows = context.rows(row_prompts, completions)
  if context.reward_functions:
    scores = context.score(row_prompts, completions)
  else:
    scores = rewards_lib.Scores(np.zeros(len(completions)), {}, {})
  if config.reward_model_path:
    learned = reward_model_scores(config.reward_model_path, rows)
    scores = rewards_lib.Scores(scores.total + learned, {**scores.per_function, "reward_model": learned},
                                {**scores.errors, "reward_model": 0})
  rows["on_policy"] = np.zeros(len(completions), np.float32)
  rows.update(context.log_probs(state, rows, policy=True, reference=config.beta > 0, values=True))
  shaped, metrics = advantages_and_returns(rows, scores.total, config)
  rows.update(shaped)
  lengths = np.asarray([c.length for c in completions], np.float64)
  metrics.update(scores.metrics())
  metrics.update({"completions/mean_length": float(lengths.mean()), "completions/max_length": float(lengths.max()),
                  "completions/clipped_fraction": float(np.mean([c.finish_reason == "length" for c in completions])),
                  "completions/tokens": float(lengths.sum())})
  return rows, metrics
