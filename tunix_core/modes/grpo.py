"""mode=grpo: the GRPO family (loss_algo = grpo, gspo_token, dr_grpo, dapo) on rollouts of the current policy.

`prepare` (host side, once per rollout batch): num_generations completions per prompt from the sampler with the
policy's own arrays, rewards, group advantages (scale_rewards), and per-token log-probs at the rollout temperature
of the policy before any update ("old", needed when a rollout batch gets more than one update) and of the reference
(beta > 0). `loss` (inside the train step): the clipped surrogate of tunix_core.rl.objectives plus beta * KL,
aggregated by loss_aggregation. Rows flagged on_policy (the first update of each rollout batch) take the old
log-probs as stop_gradient(current), so their importance ratio is exactly 1 at any temperature.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tunix_core import losses
from tunix_core.modes.base import LossOutput
from tunix_core.rewards import runner as rewards_lib
from tunix_core.rl import advantages as advantages_lib, dynamic_sampling, objectives, step_metrics
from tunix_core.rl.rollout import RolloutContext, scaled_log_probs

WEIGHT_NAME = "loss_weight"  # what LossOutput.weight counts: tokens (token-mean) or completions, as logged
_SUMS = ("tokens", "clip_low", "clip_high", "clip_dual", "ratio", "ratio_sq", "entropy", "kl")


def needs_reference(config) -> bool:
  """A frozen reference copy only when the KL term is on (LoRA's is the base with adapters off)."""
  return config.beta > 0


def batch_keys(config) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(per-token, per-row) arrays `prepare` adds to the token arrays of a batch."""
  tokens = ("old_logps",) + (("ref_logps",) if config.beta > 0 else ())
  if config.pack_groups:
    tokens += ("hidden_index",)
  return tokens, ("advantages", "on_policy")


def reward_functions(config) -> list[rewards_lib.RewardFunction]:
  """The configured reward functions; dapo adds its overlong shaping when it is not listed."""
  functions = rewards_lib.resolve(config)
  if config.loss_algo == "dapo" and "overlong" not in config.reward_functions:
    functions.append(rewards_lib.RewardFunction("overlong", rewards_lib.BUILTINS["overlong"](config), 1.0))
  return functions


def loss(model, batch: dict[str, jax.Array], config, reference=None) -> LossOutput:  # pylint: disable=unused-argument
  """The policy loss of one micro-batch; reference log-probs come with the batch (`prepare`)."""
  log_probs, entropy = scaled_log_probs(model, batch, config, with_entropy=True)
  mask = batch["loss_mask"].astype(jnp.float32)
  on_policy = batch["on_policy"][:, None] > 0
  old = jnp.where(on_policy, jax.lax.stop_gradient(log_probs), batch["old_logps"])
  policy = objectives.policy_loss(log_probs, old, batch["advantages"], mask, algo=config.loss_algo,
                                  epsilon=config.epsilon, epsilon_high=config.epsilon_high,
                                  dual_clip_c=config.dual_clip_c)
  token_losses = policy.token_losses
  kl = jnp.zeros_like(token_losses)
  if config.beta > 0:
    kl = losses.kl_penalty(log_probs, batch["ref_logps"], config.kl_estimator)
    token_losses = token_losses + config.beta * kl
  loss_sum, weight = losses.aggregate(token_losses, mask, config.loss_aggregation, config.max_new_tokens)
  # Token sums; `host_metrics` divides them by "tokens" (the step scales every metric alike, so ratios are exact).
  sums = {"tokens": mask, "clip_low": policy.clipped_low, "clip_high": policy.clipped_high,
          "clip_dual": policy.clipped_dual, "ratio": policy.ratio, "ratio_sq": jnp.square(policy.ratio),
          "entropy": entropy, "kl": jax.lax.stop_gradient(kl)}
  return LossOutput(loss_sum=loss_sum, weight=weight,
                    metrics={f"rl/{k}_sum": losses.masked_sum(v, mask) for k, v in sums.items()})


def host_metrics(metrics: dict[str, float]) -> dict[str, float]:
  """The step's token sums as per-token means: clip fractions, importance-ratio mean and std, entropy, kl."""
  mean = step_metrics.token_means(metrics, "rl", _SUMS)
  if mean is None:
    return metrics
  metrics.update({"clip_fraction/low": mean["clip_low"], "clip_fraction/high": mean["clip_high"],
                  "clip_fraction/dual": mean["clip_dual"], "ratio/mean": mean["ratio"], "ratio/std": mean["ratio_std"],
                  "entropy": mean["entropy"], "kl": mean["kl"]})
  return metrics


@dataclasses.dataclass
class _Group:
  prompt: object
  completions: list
  scores: rewards_lib.Scores


def prepare(context: RolloutContext, state, step: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
  """One rollout batch as training rows (groups contiguous) with advantages and log-probs, and its metrics."""
  config = context.config
  size, prompts_needed = config.num_generations, config.rollout_batch_size
  drawn: list[_Group] = []

  dynamic = config.dynamic_sampling == "on"
  round_prompts = (config.dynamic_sampling_prompts if dynamic else 0) or prompts_needed

  def draw(round_index: int) -> list[_Group]:
    prompts = context.next_prompts(round_prompts)
    completions = context.sample(state, prompts, size, seed=(config.seed * 1_000_003 + step) * 64 + round_index)
    scores = context.score([p for p in prompts for _ in range(size)], completions)
    groups = [_Group(p, completions[i * size:(i + 1) * size], scores.slice(i * size, (i + 1) * size))
              for i, p in enumerate(prompts)]
    drawn.extend(groups)
    return groups

  if dynamic:
    groups, metrics = dynamic_sampling.fill_groups(draw, prompts_needed, config.max_sampling_rounds,
                                                   lambda g: np.ptp(g.scores.total) > 0)
  else:
    groups, metrics = draw(0), {}
  row_prompts = [g.prompt for g in groups for _ in range(size)]
  completions = [c for g in groups for c in g.completions]
  rewards = np.concatenate([g.scores.total for g in groups])
  rows = context.rows(row_prompts, completions)
  rows["advantages"] = advantages_lib.group_advantages(rewards, size, config.scale_rewards)
  rows["on_policy"] = np.zeros(len(completions), np.float32)
  needs_old = config.num_iterations > 1 or config.updates_per_rollout > 1
  rows.update(context.log_probs(state, rows, policy=needs_old, reference=config.beta > 0))
  rows.setdefault("old_logps", np.zeros_like(rows["loss_mask"]))
  # Metrics describe what the policy produced: every drawn completion, kept or not.
  everything = [c for g in drawn for c in g.completions]
  lengths = np.asarray([c.length for c in everything], np.float64)
  metrics.update(rewards_lib.Scores.concatenate([g.scores for g in drawn]).metrics())
  metrics.update({"completions/mean_length": float(lengths.mean()), "completions/max_length": float(lengths.max()),
                  "completions/clipped_fraction": float(np.mean([c.finish_reason == "length" for c in everything])),
                  "completions/tokens": float(lengths.sum()),
                  "rollout/zero_std_groups": float(np.mean([np.ptp(g.scores.total) == 0 for g in drawn]))})
  return rows, metrics
