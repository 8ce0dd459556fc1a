"""A scalar head on THE decoder: PPO's critic (a value per token) and a reward model (the value at each sequence's
last token). Not a second decoder: ValueModel holds the Transformer as `decoder` and one [emb_dim] vector
`value_head` applied to its final-norm hidden states, so its params are {"decoder": <a policy's params>,
"value_head": [E]} and any policy checkpoint (load_parameters_path, hf_path, a seeded init) can start one.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from tunix_core import checkpoint, losses
from tunix_core.models.transformer import ModelConfig, Transformer

HEAD_AXES = ("embed",)


class ValueModel(nnx.Module):
  """The decoder with a linear [emb_dim] -> scalar head in place of the output head."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.decoder = Transformer(cfg, rngs=rngs)
    # Zero: every value starts at 0, so a reward model's first Bradley-Terry loss is exactly ln 2 and a fresh critic
    # predicts no return; the decoder gets gradients once the head has moved.
    self.value_head = nnx.Param(nnx.with_partitioning(nnx.initializers.zeros, HEAD_AXES)(
        rngs.params(), (cfg.emb_dim,), cfg.weight_dtype))

  def values(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """The value after each token: float32 [B, L] (accumulated in float32 from the compute-dtype hidden states)."""
    hidden = self.decoder.hidden_states(tokens, positions, segment_ids)
    return jnp.einsum("ble,e->bl", hidden, self.value_head[...].astype(hidden.dtype),
                      preferred_element_type=jnp.float32)

  def sequence_values(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Each row's value at its last real token (the last segment_ids > 0), as Hugging Face's
    *ForSequenceClassification pools at the last non-padding token: float32 [B]; a reward model's rewards."""
    values = self.values(tokens, positions, segment_ids)
    return jnp.take_along_axis(values, losses.last_index(segment_ids)[:, None], axis=-1)[:, 0]


class ActorCritic(nnx.Module):
  """PPO's trainable pair as one module, so that one train step differentiates both: `policy` (the Transformer) and
  `critic` (a ValueModel, its own copy of the decoder). Its params are {"policy": ..., "critic": ...}."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.policy = Transformer(cfg, rngs=rngs)
    self.critic = ValueModel(cfg, rngs=rngs)


def starting_params(critic_path: str, abstract_params: dict, shardings: dict, decoder_params: Callable[[], dict]
                    ) -> dict:
  """A value model's starting weights: the checkpoint at critic_path (critic_load_parameters_path: a reward-model or
  critic run, whole), else decoder_params() (a policy's weights, in shardings["decoder"]) under a zero head.

  abstract_params/shardings are the ValueModel's (models.abstract_model(cfg, ValueModel), models.param_shardings).
  """
  if critic_path:
    return checkpoint.load_parameters(critic_path, checkpoint.abstract_with_shardings(abstract_params, shardings),
                                      key="critic_load_parameters_path")
  head = abstract_params["value_head"]
  return {"decoder": decoder_params(),
          "value_head": jax.jit(lambda: jnp.zeros(head.shape, head.dtype), out_shardings=shardings["value_head"])()}
