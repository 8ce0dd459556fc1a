"""The sampler against independent references: step-by-step argmax of full forward passes without a cache,
the trainer's log-probs of the same tokens, numpy logit filters; padding, seeds, frozen rows, beams."""

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jax_core

from tunix_core import losses, sharding
from tunix_core.generate import beam, engine, sampler
from tunix_core.generate.sampling import SamplingParams, categorical, filter_logits
from tunix_core.models.transformer import ModelConfig, Transformer

LLAMA = ModelConfig(vocab_size=64, emb_dim=32, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=64, num_layers=2,
                    init_std=0.3, attention="xla")
# Gemma-2-like: sliding window of 4 keys on alternate layers, soft-capped scores and logits.
GEMMA2 = dataclasses.replace(LLAMA, family="gemma2", layer_types=("sliding_attention", "full_attention"),
                             sliding_window=4, attn_logit_softcap=3.0, final_logit_softcap=8.0,
                             query_pre_attn_scalar=8.0)
PROMPTS = [[3, 9, 27, 17, 51], [8], [40, 2, 33]]
NEW = 10


@functools.cache
def split(cfg: ModelConfig):
  with nnx.use_eager_sharding(False):
    return nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))


@functools.cache
def _forward(cfg: ModelConfig):
  graphdef, weights = split(cfg)

  @jax.jit
  def forward(tokens):
    model = nnx.merge(graphdef, weights)
    length = tokens.shape[1]
    positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
    return model.hidden_states(tokens, positions, jnp.ones_like(tokens))
  return forward


def no_cache_greedy(cfg: ModelConfig, prompt: list[int], steps: int) -> list[int]:
  """Argmax of a full forward pass over everything so far, one token at a time (a fixed-size buffer: causal
  attention keeps the unwritten tail out)."""
  graphdef, weights = split(cfg)
  model = nnx.merge(graphdef, weights)
  buffer = np.zeros((1, len(prompt) + steps), np.int32)
  buffer[0, :len(prompt)] = prompt
  for i in range(len(prompt), len(prompt) + steps):
    hidden = _forward(cfg)(jnp.asarray(buffer))
    buffer[0, i] = int(jnp.argmax(model.logits(hidden[0, i - 1])))
  return buffer[0, len(prompt):].tolist()


@functools.cache
def _trainer(cfg: ModelConfig):
  graphdef, weights = split(cfg)

  @jax.jit
  def log_probs(ids, temperature):
    model = nnx.merge(graphdef, weights)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    hidden = model.hidden_states(ids, positions, jnp.ones_like(ids))
    return losses.token_log_probs(lambda h: model.logits(h) / temperature, hidden[:, :-1], ids[:, 1:], chunk_size=4)
  return log_probs


def trainer_log_probs(cfg: ModelConfig, prompt: list[int], completion: list[int], temperature: float = 1.0):
  """What the trainer computes for the completion tokens: losses.token_log_probs over a full forward (in a
  fixed-size buffer, one compile; causal attention keeps the tail out)."""
  ids = np.zeros((1, 8 + NEW), np.int32)
  ids[0, :len(prompt) + len(completion)] = prompt + completion
  lp = _trainer(cfg)(jnp.asarray(ids), jnp.float32(temperature))
  return np.asarray(lp[0, len(prompt) - 1:len(prompt) + len(completion) - 1])


def make_sampler(cfg: ModelConfig, **kwargs) -> sampler.Sampler:
  graphdef, weights = split(cfg)
  return sampler.Sampler(graphdef, weights, **{"batch_size": 4, "prefill_buckets": (8,), **kwargs})


def test_greedy_equals_no_cache_argmax():
  got = make_sampler(LLAMA).generate(PROMPTS, SamplingParams(max_new_tokens=NEW))
  for prompt, (completion,) in zip(PROMPTS, got):
    assert completion.token_ids == no_cache_greedy(LLAMA, prompt, NEW)
    assert completion.finish_reason == "length" and completion.length == NEW
    np.testing.assert_allclose(completion.raw_logprobs, trainer_log_probs(LLAMA, prompt, completion.token_ids),
                               atol=1e-5)


def test_unscanned_layers_decode_the_same_way():
  """scan_layers=false keeps one cache buffer per layer (the layout decode benchmarks use)."""
  cfg = dataclasses.replace(LLAMA, scan_layers=False)
  got = make_sampler(cfg).generate(PROMPTS, SamplingParams(max_new_tokens=NEW))
  assert [c[0].token_ids for c in got] == [no_cache_greedy(cfg, p, NEW) for p in PROMPTS]


def _primitive_counts(jaxpr, counts: collections.Counter) -> collections.Counter:
  for eqn in jaxpr.eqns:
    counts[eqn.primitive.name] += 1
    for sub in jax_core.jaxprs_in_params(eqn.params):
      _primitive_counts(sub, counts)
  return counts


def _decode_loop_primitives(cfg: ModelConfig) -> collections.Counter:
  """Primitive counts of the body of sample_arrays' decode while_loop."""
  graphdef, weights = split(cfg)
  tokens = np.ones((2, 8), np.int32)
  jaxpr = jax.make_jaxpr(lambda w: sampler.sample_arrays(
      graphdef, w, tokens, tokens, np.arange(2, dtype=np.int32), np.uint32(0),
      sampling=SamplingParams(max_new_tokens=4), cache_length=16, pad_id=0))(weights)
  pending = [jaxpr.jaxpr]
  while pending:
    for eqn in pending.pop().eqns:
      if eqn.primitive.name == "while":
        return _primitive_counts(eqn.params["body_jaxpr"].jaxpr, collections.Counter())
      pending.extend(jax_core.jaxprs_in_params(eqn.params))
  raise AssertionError("no decode loop")


def test_scanned_layers_decode_with_the_unscanned_loop():
  """A scanned stack is split into per-layer modules before the loop: slicing it inside the loop copied every
  layer's weights at each step (2.47x the memory floor on an H100, against 1.41x unscanned)."""
  scanned = _decode_loop_primitives(LLAMA)
  assert "scan" not in scanned
  assert scanned == _decode_loop_primitives(dataclasses.replace(LLAMA, scan_layers=False))


# One sampled setting for every test that samples: one compile.
SAMPLED = SamplingParams(max_new_tokens=NEW, temperature=0.7, top_k=20, top_p=0.9)


def test_sampled_log_probs_equal_the_trainers():
  sampling = dataclasses.replace(SAMPLED, num_samples=2)
  for prompt, completions in zip(PROMPTS, make_sampler(LLAMA).generate(PROMPTS, sampling, seed=1)):
    for c in completions:
      np.testing.assert_allclose(c.logprobs, trainer_log_probs(LLAMA, prompt, c.token_ids, 0.7), atol=1e-5)
      np.testing.assert_allclose(c.raw_logprobs, trainer_log_probs(LLAMA, prompt, c.token_ids), atol=1e-5)


def test_sliding_window_and_softcap_decode_past_the_window():
  """Generation runs well past the 4-key window; the Pallas decode kernel (interpreted) gives the same tokens."""
  expected = [no_cache_greedy(GEMMA2, p, NEW) for p in PROMPTS]
  for cfg in (GEMMA2, dataclasses.replace(GEMMA2, attention="flash")):
    got = make_sampler(cfg).generate(PROMPTS, SamplingParams(max_new_tokens=NEW))
    for prompt, want, (completion,) in zip(PROMPTS, expected, got):
      assert completion.token_ids == want
      np.testing.assert_allclose(completion.raw_logprobs, trainer_log_probs(GEMMA2, prompt, want), atol=1e-5)


def test_left_and_right_padding_and_batch_neighbours_do_not_change_a_row():
  graphdef, weights = split(LLAMA)
  prompts = PROMPTS + [[5, 6]]
  right = np.zeros((4, 8), np.int32)
  left = np.zeros((4, 8), np.int32)
  for i, p in enumerate(prompts):
    right[i, :len(p)] = p
    left[i, 8 - len(p):] = p
  run = functools.partial(sampler.sample_arrays, graphdef, weights, seed=np.uint32(5), sampling=SAMPLED,
                          cache_length=32, pad_id=0)
  rows = np.arange(4, dtype=np.int32)
  a, b = run(right, right > 0, rows), run(left, left > 0, rows)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  # The same rows in another order (so with other neighbours): each row's sample is its own.
  c = run(right[::-1], right[::-1] > 0, rows[::-1])
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y[::-1]), a, c)


def test_seeds_reproduce_and_n_samples_per_prompt():
  sampling = dataclasses.replace(SAMPLED, num_samples=3)
  first = make_sampler(LLAMA).generate(PROMPTS, sampling, seed=7)
  again = make_sampler(LLAMA).generate(PROMPTS, sampling, seed=7)
  other = make_sampler(LLAMA).generate(PROMPTS, sampling, seed=8)
  ids = lambda result: [[c.token_ids for c in group] for group in result]
  assert ids(first) == ids(again) and ids(first) != ids(other)
  for p, group in enumerate(first):
    assert [(c.prompt_index, c.sample_index) for c in group] == [(p, 0), (p, 1), (p, 2)]
    assert len({tuple(c.token_ids) for c in group}) == 3


@pytest.mark.parametrize("batch_size", [4, 6])
def test_samples_of_a_prompt_share_its_prefill_and_match_rows_prefilled_alone(batch_size, monkeypatch):
  """3 samples per prompt in batches of 6 (aligned with the groups) and of 4 (a batch starts mid-group): each
  prompt is prefilled once per batch, and every row equals that row generated from its own prefill."""
  n = 3
  prefilled = []

  def recording(graphdef, weights, tokens, mask, row_ids, seed, **kwargs):
    prefilled.append([tuple(t[m]) for t, m in zip(tokens, mask)])
    return sample_arrays(graphdef, weights, tokens, mask, row_ids, seed, **kwargs)

  sample_arrays = sampler.sample_arrays
  monkeypatch.setattr(sampler, "sample_arrays", recording)
  got = make_sampler(LLAMA, batch_size=batch_size).generate(PROMPTS, dataclasses.replace(SAMPLED, num_samples=n),
                                                             seed=11)
  monkeypatch.undo()
  # Batches of 6 hold prompts {0, 1} and {2}; of 4: {0, 1}, {1, 2}, {2}. Two prefill rows each, the last repeated.
  expected = [[0, 1], [2, 2]] if batch_size == 6 else [[0, 1], [1, 2], [2, 2]]
  assert prefilled == [[tuple(PROMPTS[p]) for p in batch] for batch in expected]
  graphdef, weights = split(LLAMA)
  rows = [(p, s) for p in range(len(PROMPTS)) for s in range(n)]
  tokens = np.zeros((len(rows), 8), np.int32)
  for i, (p, _) in enumerate(rows):
    tokens[i, :len(PROMPTS[p])] = PROMPTS[p]
  alone = sampler.sample_arrays(graphdef, weights, tokens, tokens > 0, np.asarray([p * n + s for p, s in rows]),
                                np.uint32(11), sampling=SAMPLED, cache_length=32, pad_id=0)
  for i, (p, s) in enumerate(rows):
    completion = got[p][s]
    assert completion.token_ids == alone["tokens"][i, :completion.length].tolist()
    np.testing.assert_allclose(completion.logprobs, alone["logprobs"][i, :completion.length], atol=1e-5)


def test_prompts_per_batch_cover_every_group_alignment():
  for batch_size, n, shards, expected in [(128, 8, 1, 16), (4, 3, 1, 2), (6, 3, 1, 2), (5, 2, 1, 3), (4, 3, 8, 4),
                                          (128, 8, 8, 16), (3, 8, 1, 2)]:
    assert sampler._distinct_prompts(batch_size, n, shards) == expected
    for start in range(0, 3 * batch_size * n, batch_size):  # every batch a prompt-major row list can cut
      assert len({row // n for row in range(start, start + batch_size)}) <= expected


def test_finished_rows_never_change_again():
  free = make_sampler(LLAMA).generate(PROMPTS, SamplingParams(max_new_tokens=NEW))
  eos = free[0][0].token_ids[3]  # row 0 now ends at its 4th token
  stop = (free[2][0].token_ids[1], free[2][0].token_ids[2])
  graphdef, weights = split(LLAMA)
  tokens = np.zeros((3, 8), np.int32)
  for i, p in enumerate(PROMPTS):
    tokens[i, :len(p)] = p
  out = sampler.sample_arrays(graphdef, weights, tokens, tokens > 0, np.arange(3), np.uint32(0),
                              sampling=SamplingParams(max_new_tokens=NEW, eos_ids=(eos,), stop_sequences=(stop,)),
                              cache_length=32, pad_id=0)
  for row, result in enumerate(free):
    ids = result[0].token_ids
    ends = [i + 1 for i in range(NEW) if ids[i] == eos or (i >= 1 and (ids[i - 1], ids[i]) == stop)]
    end = ends[0] if ends else NEW
    assert int(out["lengths"][row]) == end
    assert out["tokens"][row].tolist() == ids[:end] + [0] * (NEW - end)
    assert not np.any(out["logprobs"][row, end:]) and not np.any(out["raw_logprobs"][row, end:])
    assert int(out["finish"][row]) == int(end < NEW)
  assert int(out["lengths"][0]) <= 4 and int(out["lengths"][2]) <= 3


def test_beam_width_one_is_greedy_and_wider_beams_score_consistently():
  greedy = make_sampler(LLAMA).generate(PROMPTS, SamplingParams(max_new_tokens=NEW))
  one = make_sampler(LLAMA).generate(PROMPTS, SamplingParams(max_new_tokens=NEW, beam_width=1, num_samples=1))
  assert [g[0].token_ids for g in greedy] == [o[0].token_ids for o in one]

  graphdef, weights = split(LLAMA)
  tokens = np.zeros((3, 8), np.int32)
  for i, p in enumerate(PROMPTS):
    tokens[i, :len(p)] = p
  eos = greedy[1][0].token_ids[2]
  out = beam.beam_arrays(graphdef, weights, tokens, tokens > 0, cache_length=32, pad_id=0,
                         sampling=SamplingParams(max_new_tokens=NEW, beam_width=3, length_penalty=0.5, eos_ids=(eos,)))
  for b, prompt in enumerate(PROMPTS):
    assert np.all(np.diff(out["scores"][b]) <= 0)  # best first
    for w in range(3):
      n = int(out["lengths"][b, w])
      ids = out["tokens"][b, w, :n].tolist()
      assert (ids[-1] == eos) == bool(out["finish"][b, w]) and eos not in ids[:-1]
      lp = trainer_log_probs(LLAMA, prompt, ids)
      np.testing.assert_allclose(out["raw_logprobs"][b, w, :n], lp, atol=1e-5)
      np.testing.assert_allclose(out["scores"][b, w], lp.sum() / n ** 0.5, rtol=1e-5)
    # The search keeps the greedy path's score as a lower bound for its best hypothesis.
    g = greedy[b][0].token_ids
    g = g[:g.index(eos) + 1] if eos in g else g
    assert out["scores"][b, 0] >= trainer_log_probs(LLAMA, prompt, g).sum() / len(g) ** 0.5 - 1e-5


def _numpy_filter(logits: np.ndarray, top_k: int, top_p: float, min_p: float) -> np.ndarray:
  """Hugging Face's warpers written out row by row in float64: top-k, then top-p, then min-p."""
  out = logits.astype(np.float64).copy()
  for row in out:
    if top_k:
      row[row < np.sort(row)[::-1][top_k - 1]] = -np.inf
    if top_p < 1.0:
      probs = np.exp(row - row.max())
      probs /= probs.sum()
      total, keep = 0.0, []
      for i in np.argsort(-row, kind="stable"):
        if total >= top_p:
          break
        keep.append(i)
        total += probs[i]
      row[row < min(row[keep])] = -np.inf
    if min_p:
      probs = np.exp(row - row.max())
      probs /= probs.sum()
      row[probs < min_p * probs.max()] = -np.inf
  return out


@pytest.mark.parametrize("top_k,top_p,min_p", [(3, 1.0, 0.0), (0, 0.6, 0.0), (0, 1.0, 0.2), (5, 0.8, 0.1),
                                               (0, 0.999, 0.0)])
def test_filters_match_numpy(top_k, top_p, min_p):
  logits = np.random.default_rng(0).normal(size=(4, 12)).astype(np.float32) * 2
  got = np.asarray(filter_logits(jnp.asarray(logits), top_k, top_p, min_p))
  want = _numpy_filter(logits, top_k, top_p, min_p)
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
  np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)
  # Sampling draws only kept tokens.
  keys = jax.random.split(jax.random.key(0), 256)
  draws = categorical(keys, jnp.broadcast_to(jnp.asarray(got[0]), (256, got.shape[1])))
  assert np.all(np.isfinite(got[0][np.asarray(draws)]))


def test_categorical_draws_follow_the_softmax():
  """Frequencies of 40,000 draws against softmax(logits) from numpy, within 5 standard errors; -inf tokens (the
  first and the last among them) are never drawn, nor is anything but the one token a row allows."""
  logits = np.random.default_rng(1).normal(size=12).astype(np.float32) * 1.5
  logits[[0, 5, 11]] = -np.inf
  probs = np.exp(logits - logits[np.isfinite(logits)].max())
  probs /= probs.sum()
  draws = 40_000
  keys = jax.random.split(jax.random.key(7), draws)
  tokens = np.asarray(categorical(keys, jnp.broadcast_to(jnp.asarray(logits), (draws, 12))))
  frequency = np.bincount(tokens, minlength=12) / draws
  assert np.all(frequency[[0, 5, 11]] == 0)
  assert np.all(np.abs(frequency - probs) <= 5 * np.sqrt(probs * (1 - probs) / draws) + 1e-12)
  only_last = np.full((3, 12), -np.inf, np.float32)
  only_last[:, 10] = 0.0
  only_last[1, 0] = -30.0  # a first token of probability ~1e-13: row 1 too draws token 10
  assert np.asarray(categorical(jax.random.split(jax.random.key(8), 3), jnp.asarray(only_last))).tolist() == [10] * 3


def test_decoding_the_unfinished_half_gives_the_same_rows():
  """halvings=2: 16 rows go on as 8, then 4, once enough have stopped; every row is what the full batch gives."""
  graphdef, weights = split(LLAMA)
  rng = np.random.default_rng(3)
  tokens = rng.integers(1, 64, (16, 8)).astype(np.int32)
  sampling = dataclasses.replace(SAMPLED, max_new_tokens=12, eos_ids=tuple(range(0, 64, 6)))
  run = functools.partial(sampler.sample_arrays, graphdef, weights, tokens, tokens > 0, np.arange(16, dtype=np.int32),
                          np.uint32(2), sampling=sampling, cache_length=24, pad_id=0)
  full, halved = run(halvings=0), run(halvings=2)
  lengths = np.sort(np.asarray(full["lengths"]))
  assert lengths[11] < lengths[-1] == 12  # 12 rows stop early and some run on: both halvings happen
  for key in ("tokens", "lengths", "finish"):
    np.testing.assert_array_equal(halved[key], full[key])
  np.testing.assert_allclose(halved["logprobs"], full["logprobs"], atol=1e-5)


def test_sharded_generation_matches_one_device():
  """data x fsdp x tensor = 2 x 2 x 2: the cache is split over rows and kv heads; the tokens do not change."""
  expected = make_sampler(LLAMA).generate(PROMPTS, SamplingParams(max_new_tokens=NEW))
  mesh = jax.make_mesh((2, 2, 2, 1), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)
  rules = (("activation_batch", ("data", "fsdp")), ("activation_kv_heads", "tensor"), ("activation_heads", "tensor"),
           ("activation_length", None), ("activation_embed", None), ("activation_mlp", "tensor"))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    got = make_sampler(LLAMA).generate(PROMPTS, SamplingParams(max_new_tokens=NEW))
  assert [g[0].token_ids for g in got] == [e[0].token_ids for e in expected]


def test_threads_give_the_same_completions_under_the_callers_mesh():
  """threads=3 decodes a call's 3 batches at once: the same completions as one at a time, sampled and beam search,
  and no compile more (each thread runs under the caller's mesh and rules, so the jit cache hits)."""
  mesh = jax.make_mesh((2, 2, 2, 1), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)
  rules = (("activation_batch", ("data", "fsdp")), ("activation_kv_heads", "tensor"), ("activation_heads", "tensor"),
           ("activation_length", None), ("activation_embed", None), ("activation_mlp", "tensor"))
  sampled = dataclasses.replace(SAMPLED, num_samples=4)
  searched = SamplingParams(max_new_tokens=NEW, beam_width=2, num_samples=2)
  compiles = []
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    cases = ((PROMPTS, sampled), (PROMPTS * 3, searched))  # 12 rows, 9 beams: 3 batches of 4 each
    one = [make_sampler(LLAMA).generate(prompts, s, seed=5) for prompts, s in cases]
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kwargs: event.endswith("backend_compile_duration") and compiles.append(event))
    try:
      three = [make_sampler(LLAMA, threads=3).generate(prompts, s, seed=5) for prompts, s in cases]
    finally:
      jax.monitoring.clear_event_listeners()
  assert not compiles
  for expected, got in zip(one, three):
    assert [[c.token_ids for c in g] for g in got] == [[c.token_ids for c in g] for g in expected]
    assert [[c.logprobs for c in g] for g in got] == [[c.logprobs for c in g] for g in expected]


def test_buckets():
  assert engine.bucket(5, (8, 16)) == 8 and engine.bucket(16, (8, 16)) == 16 and engine.bucket(17, (8, 16)) == 32
  assert engine.cache_length(8, 10) == 32
