"""Reward-model training, mode=rm: a scalar head on the decoder (models/value_head.py) trained on preference pairs
with the Bradley-Terry loss, so that the chosen completion scores higher than the rejected one.

Batches are the preference batches (data/preference.py): row 2i is pair i's chosen sequence, row 2i+1 its rejected
one, each row's inputs the whole sequence. A sequence's reward is the head's value at its last token. The trained
model scores new sequences with tunix_core/rl/reward_model.py.
"""

import jax
import jax.numpy as jnp

from tunix_core.modes import preference_losses
from tunix_core.modes.base import LossOutput

WEIGHT_NAME = "pairs"  # what LossOutput.weight counts (real (non-padding) pairs), as logged


def needs_reference(config) -> bool:  # pylint: disable=unused-argument
  return False


def loss(model, batch: dict[str, jax.Array], config, reference=None) -> LossOutput:  # pylint: disable=unused-argument
  """Summed per-pair Bradley-Terry losses over the real pairs (padding pairs have no completion tokens)."""
  rewards = model.sequence_values(batch["inputs"], batch["positions"], batch["segment_ids"])
  has_completion = jnp.sum(batch["loss_mask"].astype(jnp.float32), axis=-1) > 0
  valid = (has_completion[0::2] & has_completion[1::2]).astype(jnp.float32)
  per_pair, chosen, rejected = preference_losses.bradley_terry(
      rewards[0::2], rewards[1::2], margin=config.rm_margin, center_coefficient=config.rm_center_rewards_coefficient)

  def pair_sum(values: jax.Array) -> jax.Array:
    return jnp.sum(values.astype(jnp.float32) * valid)

  return LossOutput(loss_sum=pair_sum(per_pair), weight=jnp.sum(valid), metrics={
      "rm/accuracy": pair_sum(chosen > rejected), "rm/margin": pair_sum(chosen - rejected),
      "rewards/chosen": pair_sum(chosen), "rewards/rejected": pair_sum(rejected)})
