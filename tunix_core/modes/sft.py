"""Supervised fine-tuning: next-token cross-entropy on the loss-masked (completion) tokens."""

import jax
import jax.numpy as jnp

from tunix_core import losses
from tunix_core.modes.base import LossOutput


WEIGHT_NAME = "loss_tokens"  # what LossOutput.weight counts (tokens in the loss), as logged


def needs_reference(config) -> bool:  # pylint: disable=unused-argument
  return False


def loss(model, batch: dict[str, jax.Array], config, reference=None) -> LossOutput:  # pylint: disable=unused-argument
  """Summed token cross-entropy; the train step divides by the total loss tokens of the whole step."""
  hidden = model.hidden_states(batch["inputs"], batch["positions"], batch["segment_ids"])
  log_probs = losses.token_log_probs(model.logits, hidden, batch["targets"], config.loss_chunk_size)
  mask = batch["loss_mask"]
  return LossOutput(loss_sum=-losses.masked_sum(log_probs, mask), weight=jnp.sum(mask.astype(jnp.float32)),
                    metrics={})
