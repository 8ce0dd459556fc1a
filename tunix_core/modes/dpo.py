"""Preference optimisation: mode=dpo (sigmoid, ipo, hinge, robust), mode=orpo and mode=simpo.

Batches interleave pairs: row 2i is pair i's chosen sequence, row 2i+1 its rejected one, so chosen and
rejected go through one forward pass. Sequence log-probs are sums over completion (loss-mask) tokens;
ipo, orpo and simpo use them divided by the completion length. DPO's reference log-probs come from the
reference model the train step passes in (a frozen copy, or the same base with adapters off), or, with
precompute_reference=true, from the batch itself (batch["reference_logps"], see tunix_core/reference.py).
"""

import jax
import jax.numpy as jnp

from tunix_core import losses
from tunix_core.modes import preference_losses
from tunix_core.modes.base import LossOutput


WEIGHT_NAME = "pairs"  # what LossOutput.weight counts (real (non-padding) pairs), as logged


def needs_reference(config) -> bool:
  """Whether the train step needs a reference model (precomputed log-probs need none)."""
  return config.mode == "dpo" and not config.precompute_reference


def sequence_log_probs(model, batch: dict[str, jax.Array], config) -> tuple[jax.Array, jax.Array]:
  """(sum of completion-token log-probs, number of completion tokens), each [rows]."""
  hidden = model.hidden_states(batch["inputs"], batch["positions"], batch["segment_ids"])
  token_log_probs = losses.token_log_probs(model.logits, hidden, batch["targets"], config.loss_chunk_size)
  mask = batch["loss_mask"].astype(jnp.float32)
  return jnp.sum(token_log_probs * mask, axis=-1), jnp.sum(mask, axis=-1)


def loss(model, batch: dict[str, jax.Array], config, reference=None) -> LossOutput:
  """Summed per-pair losses over the real pairs (padding pairs have no completion tokens); weight = pairs."""
  logps, lengths = sequence_log_probs(model, batch, config)
  chosen, rejected = logps[0::2], logps[1::2]
  chosen_len, rejected_len = lengths[0::2], lengths[1::2]
  valid = ((chosen_len > 0) & (rejected_len > 0)).astype(jnp.float32)
  chosen_mean = chosen / jnp.maximum(chosen_len, 1.0)
  rejected_mean = rejected / jnp.maximum(rejected_len, 1.0)
  if config.mode == "dpo":
    if "reference_logps" in batch:
      reference_logps = batch["reference_logps"]
    else:
      reference_logps = jax.lax.stop_gradient(sequence_log_probs(reference, batch, config)[0])
    per_pair, chosen_rewards, rejected_rewards = preference_losses.dpo(
        chosen, rejected, reference_logps[0::2], reference_logps[1::2], loss_type=config.dpo_loss,
        beta=config.dpo_beta, label_smoothing=config.dpo_label_smoothing,
        chosen_lengths=jnp.maximum(chosen_len, 1.0), rejected_lengths=jnp.maximum(rejected_len, 1.0))
  elif config.mode == "orpo":
    per_pair, chosen_rewards, rejected_rewards = preference_losses.orpo(
        chosen_mean, rejected_mean, -chosen_mean, lam=config.orpo_lambda)
  else:
    per_pair, chosen_rewards, rejected_rewards = preference_losses.simpo(
        chosen_mean, rejected_mean, beta=config.simpo_beta, gamma=config.simpo_gamma)

  def pair_sum(values: jax.Array) -> jax.Array:
    return jnp.sum(values.astype(jnp.float32) * valid)

  return LossOutput(loss_sum=pair_sum(per_pair), weight=jnp.sum(valid), metrics={
      "rewards/chosen": pair_sum(chosen_rewards), "rewards/rejected": pair_sum(rejected_rewards),
      "rewards/margin": pair_sum(chosen_rewards - rejected_rewards),
      "rewards/accuracy": pair_sum(chosen_rewards > rejected_rewards),
      "logps/chosen": pair_sum(chosen), "logps/rejected": pair_sum(rejected)})
