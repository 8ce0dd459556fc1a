"""Beam search in one jit: `beam_width` live beams per prompt, scored by the raw model's summed log-probs.

Each step takes the 2W best continuations of a prompt's beams. Those among the top W that end (an EOS id or a
stop sequence) become finished hypotheses, scored sum / length ** length_penalty (length in generated tokens,
the final one included); the W best that do not end live on, and the cache rows follow them. A prompt is done
when it holds W finished hypotheses and none is worse than its best live beam's score at the current length
(Hugging Face's early_stopping=False rule); at max_new_tokens the live beams join the finished ones
(finish "length"). Width 1 is greedy decoding exactly.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from tunix_core.generate import engine
from tunix_core.generate.sampling import SamplingParams, hits_stop



def _take(array: jax.Array, index: jax.Array) -> jax.Array:
  """array [B, M, ...] rows picked per prompt by index [B, W]."""
  return jnp.take_along_axis(array, index.reshape(index.shape + (1,) * (array.ndim - 2)), axis=1)


def _best(pools: list[dict], width: int) -> dict:
  """The `width` best-scored entries per prompt of several pools of hypotheses (dicts of tokens, logprobs, lengths, score, finish)."""
  joined = {k: jnp.concatenate([p[k] for p in pools], axis=1) for k in pools[0]}
  _, index = jax.lax.top_k(joined["score"], width)
  return {k: _take(v, index) for k, v in joined.items()}


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "cache_length", "pad_id"))
def beam_arrays(graphdef: nnx.GraphDef, weights, tokens: jax.Array, mask: jax.Array, *, sampling: SamplingParams,
                cache_length: int, pad_id: int) -> dict[str, jax.Array]:
  """Beam search for padded prompts tokens/mask [B, P]. Returns per prompt its W hypotheses, best first:
  tokens [B, W, N], raw_logprobs [B, W, N], lengths [B, W], scores [B, W], finish [B, W] (1 = stop, 0 = length)."""
  model = engine.model_for_generation(graphdef, weights)
  tokens, prompt_lengths = engine.compact(tokens, mask)
  batch, width, steps = tokens.shape[0], sampling.beam_width, sampling.max_new_tokens
  neg = -jnp.inf
  penalty = lambda length: jnp.asarray(length, jnp.float32) ** sampling.length_penalty

  def advance(state, log_probs, step):
    """One step: log_probs [B, W, V] of each live beam's next token."""
    vocab = log_probs.shape[-1]
    candidates = (state["sum"][..., None] + log_probs).reshape(batch, width * vocab)
    values, index = jax.lax.top_k(candidates, 2 * width)
    origin, token = index // vocab, (index % vocab).astype(jnp.int32)
    history = _take(state["tokens"], origin).at[:, :, step].set(token)
    token_lp = jnp.take_along_axis(_take(log_probs, origin), token[..., None], axis=-1)[..., 0]
    history_lp = _take(state["logprobs"], origin).at[:, :, step].set(token_lp)
    ends = hits_stop(history.reshape(batch * 2 * width, steps), step, sampling).reshape(batch, 2 * width)
    ranked = jnp.arange(2 * width)[None] < width
    length = step + 1
    new_finished = {"tokens": history, "logprobs": history_lp,
                    "lengths": jnp.full((batch, 2 * width), length, jnp.int32),
                    "score": jnp.where(ends & ranked & jnp.isfinite(values), values / penalty(length), neg),
                    "finish": jnp.ones((batch, 2 * width), jnp.int32)}
    finished = _best([state["finished"], new_finished], width)
    live_values, survivors = jax.lax.top_k(jnp.where(ends, neg, values), width)
    worst = jnp.min(finished["score"], axis=1)
    best_live = jnp.max(live_values, axis=1) / penalty(length)
    done_now = jnp.all(jnp.isfinite(finished["score"]), axis=1) & (worst >= best_live)
    updated = {"tokens": _take(history, survivors), "logprobs": _take(history_lp, survivors), "sum": live_values,
               "finished": finished}
    keep = state["done"]  # a done prompt never changes again
    frozen = jax.tree.map(lambda old, new: jnp.where(keep.reshape((batch,) + (1,) * (new.ndim - 1)), old, new),
                          {k: state[k] for k in updated}, updated)
    feed = jnp.where(keep[:, None], pad_id, _take(token, survivors)).reshape(-1)
    rows = jnp.where(keep[:, None], jnp.arange(width)[None], _take(origin, survivors))
    rows = (rows + width * jnp.arange(batch)[:, None]).reshape(-1)
    return {**frozen, "done": keep | done_now, "step": jnp.asarray(length, jnp.int32)}, feed, rows

  logits, cache = engine.prefill(model, tokens, prompt_lengths, cache_length)
  cache = engine.reorder(cache, jnp.arange(batch * width) // width)
  log_probs = jnp.repeat(jax.nn.log_softmax(logits, axis=-1)[:, None], width, axis=1)
  empty = {"tokens": jnp.full((batch, width, steps), pad_id, jnp.int32),
           "logprobs": jnp.zeros((batch, width, steps), jnp.float32),
           "lengths": jnp.zeros((batch, width), jnp.int32), "score": jnp.full((batch, width), neg),
           "finish": jnp.zeros((batch, width), jnp.int32)}
  start = {"tokens": empty["tokens"], "logprobs": empty["logprobs"],
           "sum": jnp.full((batch, width), neg).at[:, 0].set(0.0),  # one beam until the first step fans out
           "finished": empty, "done": jnp.zeros((batch,), bool)}
  state, feed, rows = advance(start, log_probs, 0)
  state["cache"], state["feed"] = engine.reorder(cache, rows), feed
  row_lengths = jnp.repeat(prompt_lengths, width)

  def not_finished(state):
    return (state["step"] < steps) & jnp.logical_not(jnp.all(state["done"]))

  def body(state):
    logits, cache = engine.decode(model, state["feed"], row_lengths + state["step"] - 1, state["cache"])
    log_probs = jax.nn.log_softmax(logits, axis=-1).reshape(batch, width, -1)
    carry = {k: v for k, v in state.items() if k not in ("cache", "feed")}
    new, feed, rows = advance(carry, log_probs, state["step"])
    return {**new, "cache": engine.reorder(cache, rows), "feed": feed}

  state = jax.lax.while_loop(not_finished, body, state)
  # Prompts still searching at max_new_tokens: their live beams compete as they are.
  length = state["step"]
  live = {"tokens": state["tokens"], "logprobs": state["logprobs"],
          "lengths": jnp.full((batch, width), length, jnp.int32),
          "score": jnp.where(state["done"][:, None], neg, state["sum"] / penalty(length)),
          "finish": jnp.zeros((batch, width), jnp.int32)}
  best = _best([state["finished"], live], width)
  return {"tokens": best["tokens"], "raw_logprobs": best["logprobs"], "lengths": best["lengths"],
          "scores": best["score"], "finish": best["finish"]}
