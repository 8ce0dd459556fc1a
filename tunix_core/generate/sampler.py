"""Greedy generation for one prompt, used for the sample completion at the end of a run.

Each new token re-runs the model over a fixed-size buffer (prompt + new tokens), so the whole loop is
one compiled program with no KV cache; causal masking keeps the not-yet-written tail from influencing
earlier positions. It is meant for short samples from small models.
"""

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import multihost_utils


@partial(jax.jit, static_argnames=("graphdef", "prompt_length", "eos_id"))
def _greedy(graphdef: nnx.GraphDef, params, buffer: jax.Array, prompt_length: int, eos_id: int) -> jax.Array:
  model = nnx.merge(graphdef, params)
  length = buffer.shape[1]
  positions = jnp.arange(length, dtype=jnp.int32)[None]
  segment_ids = jnp.ones((1, length), jnp.int32)

  def step(index, carry):
    tokens, done = carry
    hidden = model.hidden_states(tokens, positions, segment_ids)
    next_token = jnp.argmax(model.logits(hidden[:, index - 1]), axis=-1).astype(tokens.dtype)
    next_token = jnp.where(done, eos_id, next_token)
    return tokens.at[:, index].set(next_token), done | (next_token == eos_id)

  tokens, _ = jax.lax.fori_loop(prompt_length, length, step, (buffer, jnp.zeros((1,), jnp.bool_)))
  return tokens


def greedy_generate(graphdef: nnx.GraphDef, params, prompt_ids: Sequence[int], max_new_tokens: int,
                    eos_id: int) -> list[int]:
  """The greedily generated continuation of prompt_ids (without the prompt), cut at the first EOS."""
  buffer = jnp.zeros((1, len(prompt_ids) + max_new_tokens), jnp.int32).at[0, :len(prompt_ids)].set(
      jnp.asarray(prompt_ids, jnp.int32))
  # Gathered from every process: with several processes the result may live partly on other hosts.
  tokens = multihost_utils.process_allgather(_greedy(graphdef, params, buffer, len(prompt_ids), eos_id), tiled=True)
  tokens = tokens[0, len(prompt_ids):].tolist()
  return tokens[:tokens.index(eos_id)] if eos_id in tokens else tokens
