"""The sampler every generation goes through: RL rollouts, evaluation, the end-of-run sample, the CLI.

`sample_arrays` is the compiled core: padded prompts -> batched prefill -> a lax.while_loop of decode steps
against a preallocated KV cache, each row stopping at an EOS id, a stop sequence or max_new_tokens, and the
loop ending as soon as every row is done. `Sampler` is the host-side front end: token-id prompts in,
`Completion`s out, with prompts batched, padded to length buckets (one compile per bucket and setting), and
n samples per prompt (each prompt prefilled once per batch, its cache copied to its n rows) or beam search.
"""

from collections.abc import Callable, Iterator, Sequence
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import spmd
from jax.experimental import multihost_utils

from tunix_core.generate import beam, engine
from tunix_core.generate.sampling import SamplingParams, choose, hits_stop, row_keys

FINISH_REASONS = ("length", "stop")  # index = the finish code the compiled loops return


@dataclasses.dataclass
class Completion:
  """One generated sequence. token_ids include the EOS / stop-sequence tokens that ended it; text leaves EOS out.
  logprobs are under the temperature-scaled distribution (beam search and greedy: the raw model), raw_logprobs
  under the raw model."""
  token_ids: list[int]
  text: str
  logprobs: list[float]
  raw_logprobs: list[float]
  finish_reason: str          # "stop" (EOS or a stop sequence) or "length" (max_new_tokens)
  length: int
  prompt_index: int
  sample_index: int


_RESULTS = ("tokens", "logprobs", "raw_logprobs", "lengths", "done", "stopped")


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "cache_length", "pad_id", "halvings"))
def sample_arrays(graphdef: nnx.GraphDef, weights, tokens: jax.Array, mask: jax.Array, row_ids: jax.Array,
                  seed: jax.Array, *, sampling: SamplingParams, cache_length: int, pad_id: int,
                  prompt_rows: jax.Array | None = None, halvings: int = 0) -> dict[str, jax.Array]:
  """Generates B rows for padded prompts tokens/mask [U, P] (any padding side): row b continues prompt
  prompt_rows[b] (None: U = B, row b prompt b). row_ids [B] name each row's random stream together with seed.
  Returns tokens [B, N] (pad_id after the end), logprobs and raw_logprobs [B, N] (0 after the end), lengths [B]
  and finish [B] (an index into FINISH_REASONS).

  halvings: up to this many times, once no more than half the rows are still going, the decode loop carries on
  with those rows only (their caches gathered into a batch half the size). Each row's tokens are keyed by its
  row id, so the results are the same; each halving compiles the decode step once more."""
  model = engine.model_for_generation(graphdef, weights)
  tokens, lengths = engine.compact(tokens, mask)
  batch, steps = row_ids.shape[0], sampling.max_new_tokens

  def record(state, logits, step):
    new, scaled, raw = choose(logits, row_keys(seed, state["row_ids"], step), sampling)
    active = jnp.logical_not(state["done"])
    out = state["tokens"].at[:, step].set(jnp.where(active, new, pad_id))
    stopped = active & hits_stop(out, step, sampling)
    return {"tokens": out,
            "logprobs": state["logprobs"].at[:, step].set(jnp.where(active, scaled, 0.0)),
            "raw_logprobs": state["raw_logprobs"].at[:, step].set(jnp.where(active, raw, 0.0)),
            "lengths": state["lengths"] + active.astype(jnp.int32),
            "done": state["done"] | stopped, "stopped": state["stopped"] | stopped, "cache": state["cache"],
            "prompt_lengths": state["prompt_lengths"], "row_ids": state["row_ids"],
            "step": jnp.asarray(step + 1, jnp.int32)}

  logits, cache = engine.prefill(model, tokens, lengths, cache_length)
  if prompt_rows is not None:  # a prompt's rows share its prefill: GRPO's groups cost one prefill, not n
    logits, lengths, cache = logits[prompt_rows], lengths[prompt_rows], engine.reorder(cache, prompt_rows)
  zeros = jnp.zeros((batch, steps), jnp.float32)
  no = jnp.zeros((batch,), bool)
  state = record({"tokens": jnp.full((batch, steps), pad_id, jnp.int32), "logprobs": zeros, "raw_logprobs": zeros,
                  "lengths": jnp.zeros((batch,), jnp.int32), "done": no, "stopped": no, "cache": cache,
                  "prompt_lengths": lengths, "row_ids": row_ids}, logits, 0)

  def step(state):
    position = state["step"] - 1  # the last recorded token goes in next
    fed = state["tokens"][:, position]
    logits, cache = engine.decode(model, fed, state["prompt_lengths"] + position, state["cache"])
    return record({**state, "cache": cache}, logits, state["step"])

  def decode_rows(state, halvings: int):
    rows = state["done"].shape[0]

    def going(state):
      going = (state["step"] < steps) & jnp.logical_not(jnp.all(state["done"]))
      return going & (jnp.sum(jnp.logical_not(state["done"])) > rows // 2) if halvings else going

    state = jax.lax.while_loop(going, step, state)
    if not halvings:
      return state
    rest = jnp.argsort(state["done"], stable=True)[:rows // 2]  # every unfinished row, then finished ones
    half = decode_rows({k: v if k == "step" else jax.tree.map(lambda a: a[rest], v) for k, v in state.items()},
                       halvings - 1)
    return {**state, **{k: state[k].at[rest].set(half[k]) for k in _RESULTS}}

  state = decode_rows(state, halvings)
  return {"tokens": state["tokens"], "logprobs": state["logprobs"], "raw_logprobs": state["raw_logprobs"],
          "lengths": state["lengths"], "finish": state["stopped"].astype(jnp.int32)}


def eos_ids_of(tokenizer) -> tuple[int, ...]:
  """The tokenizer's EOS id, as the default set of ids that end a completion."""
  return () if tokenizer is None or tokenizer.eos_id is None else (int(tokenizer.eos_id),)


def eos_ids(config, tokenizer) -> tuple[int, ...]:
  """The tokenizer's EOS, plus a Hugging Face checkpoint's generation_config.json eos_token_id(s) (chat models
  end their turns with another token, e.g. Llama 3's <|eot_id|>)."""
  ids = list(eos_ids_of(tokenizer))
  path = os.path.join(config.hf_path, "generation_config.json") if config.hf_path else ""
  if path and os.path.isfile(path):
    with open(path) as f:
      extra = json.load(f).get("eos_token_id")
    ids += [extra] if isinstance(extra, int) else list(extra or [])
  return tuple(dict.fromkeys(int(i) for i in ids))


def _distinct_prompts(batch_size: int, num_samples: int, shards: int) -> int:
  """The most prompts a batch of prompt-major rows (num_samples per prompt) can hold, rounded up to whole shards.
  Batches start at multiples of batch_size, so when num_samples divides it no batch starts mid-prompt."""
  most = batch_size // num_samples if batch_size % num_samples == 0 else -(-(batch_size - 1) // num_samples) + 1
  return min(batch_size, -(-most // shards) * shards)


def _fetch(tree):
  # With several processes the rows may live partly on other hosts.
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


class Sampler:
  """Token-id prompts in, Completions out. Call it under the mesh and logical rules the weights live in.

  Rows (prompts x num_samples; for beam search prompts) go in batches of `batch_size` (rounded up to a multiple
  of the mesh's batch shards), the last one filled up with copies; each batch's prompts are padded to the first
  of `prefill_buckets` that fits them. decode_halvings: sample_arrays' `halvings`, as far as the batch halves
  into whole shards. threads: batches decoded at once, each dispatched from its own thread under the caller's mesh
  and rules. A CPU runs the executions that one thread dispatches one after another, and a decode batch keeps about
  one core busy; on 2 cores two 128-row batches at once took 0.093 s a batch instead of 0.156 s
  (benchmarks/RESULTS.md). Each batch's tokens depend only on its rows and the seed, so they are the same.
  """

  def __init__(self, graphdef: nnx.GraphDef, weights, tokenizer=None, *, batch_size: int = 16,
               prefill_buckets: Sequence[int] = engine.DEFAULT_BUCKETS, pad_id: int | None = None,
               decode_halvings: int = 0, threads: int = 1):
    self.graphdef, self.weights, self.tokenizer = graphdef, weights, tokenizer
    self.batch_size, self.decode_halvings, self.threads = batch_size, decode_halvings, threads
    self.prefill_buckets = tuple(prefill_buckets)
    self.pad_id = pad_id if pad_id is not None else int(getattr(tokenizer, "pad_id", 0) or 0)

  def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, seed: int = 0
               ) -> list[list[Completion]]:
    """sampling.num_samples completions per prompt (each a non-empty list of token ids), in prompt order.
    The same seed gives the same completions, whatever the batch size."""
    if any(len(p) == 0 for p in prompts):
      raise ValueError("every prompt needs at least one token")
    searching = sampling.beam_width > 1
    rows = [(p, 0 if searching else s) for p in range(len(prompts))
            for s in range(1 if searching else sampling.num_samples)]
    results: list[list[Completion]] = [[] for _ in prompts]
    # The compiled loops never read num_samples: one compile serves every group size.
    compiled_sampling = dataclasses.replace(sampling, num_samples=1)
    shards = engine.batch_shards()
    batch_size = -(-self.batch_size // shards) * shards
    shared = not searching and sampling.num_samples > 1
    prefills = _distinct_prompts(batch_size, sampling.num_samples, shards) if shared else batch_size
    halvings = 0
    while halvings < self.decode_halvings and (batch_size >> halvings) % (2 * shards) == 0:
      halvings += 1
    launches = []
    for start in range(0, len(rows), batch_size):
      chunk = rows[start:start + batch_size]
      padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
      sources = list(dict.fromkeys(p for p, _ in padded)) if shared else [p for p, _ in padded]
      sources += [sources[-1]] * (prefills - len(sources))
      longest = max(len(prompts[p]) for p in sources)
      width = engine.bucket(longest, self.prefill_buckets)
      tokens = np.full((prefills, width), self.pad_id, np.int32)
      mask = np.zeros((prefills, width), bool)
      for i, p in enumerate(sources):
        tokens[i, :len(prompts[p])] = prompts[p]
        mask[i, :len(prompts[p])] = True
      length = engine.cache_length(width, sampling.max_new_tokens)
      if searching:
        launches.append(functools.partial(beam.beam_arrays, self.graphdef, self.weights, tokens, mask,
                                          sampling=compiled_sampling, cache_length=length, pad_id=self.pad_id))
      else:
        row_ids = np.asarray([p * sampling.num_samples + s for p, s in padded], np.int32)
        prompt_rows = np.asarray([sources.index(p) for p, _ in padded], np.int32) if shared else None
        launches.append(functools.partial(sample_arrays, self.graphdef, self.weights, tokens, mask, row_ids,
                                          np.uint32(seed), sampling=compiled_sampling, cache_length=length,
                                          pad_id=self.pad_id, prompt_rows=prompt_rows, halvings=halvings))
    for start, out in zip(range(0, len(rows), batch_size), self._run(launches)):
      for i, (p, s) in enumerate(rows[start:start + batch_size]):
        if searching:
          for beam_index in range(sampling.num_samples):
            results[p].append(self._completion(out, (i, beam_index), p, beam_index, sampling.eos_ids,
                                               scaled="raw_logprobs"))
        else:
          results[p].append(self._completion(out, i, p, s, sampling.eos_ids))
    return results

  def _run(self, launches: list[Callable[[], dict]]) -> Iterator[dict]:
    """Each launch's fetched arrays, in order; up to `threads` launches run at once (in a one-process run)."""
    if self.threads <= 1 or len(launches) <= 1 or jax.process_count() > 1:  # hosts must fetch in one order
      yield from (_fetch(launch()) for launch in launches)
      return
    mesh, rules = jax.sharding.get_mesh(), spmd.get_logical_axis_rules()

    def run(launch):
      with jax.set_mesh(mesh) if not mesh.empty else contextlib.nullcontext(), nnx.logical_axis_rules(rules):
        return _fetch(launch())

    with concurrent.futures.ThreadPoolExecutor(self.threads) as pool:
      yield from pool.map(run, launches)

  def _completion(self, out: dict, index, prompt_index: int, sample_index: int, eos_ids: tuple[int, ...],
                  scaled: str = "logprobs") -> Completion:
    n = int(out["lengths"][index])
    ids = [int(t) for t in out["tokens"][index][:n]]
    text_ids = [t for t in ids if t not in eos_ids]
    return Completion(
        token_ids=ids, text=self.tokenizer.decode(text_ids) if self.tokenizer is not None else "",
        logprobs=[float(x) for x in out[scaled][index][:n]],
        raw_logprobs=[float(x) for x in out["raw_logprobs"][index][:n]],
        finish_reason=FINISH_REASONS[int(out["finish"][index])], length=n, prompt_index=prompt_index,
        sample_index=sample_index)
