"""pack_groups: the packed layout by hand, grouped attention against a float64 numpy reference, the GRPO loss and its
gradients equal to those on one row per completion, a short run, and the config's checks."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tunix_core import config as config_lib, models, train
from tunix_core.errors import UserError
from tunix_core.models import attention
from tunix_core.modes import grpo
from tunix_core.rl import group_rows, rollout


def test_pack_lays_out_a_group_by_hand():
  # max_target_length 6, max_new_tokens 3: prompts of up to 4 tokens, slots of 2; 4 + 2 x 2 = 8 = 2 rows of 4.
  rows = group_rows.pack([[5, 6, 7]], [[8, 9, 2], [10, 2]], num_generations=2, max_target_length=6,
                         max_new_tokens=3)
  np.testing.assert_array_equal(rows["inputs"].reshape(-1), [5, 6, 7, 0, 8, 9, 10, 0])
  np.testing.assert_array_equal(rows["positions"].reshape(-1), [0, 1, 2, 0, 3, 4, 3, 0])
  np.testing.assert_array_equal(rows["segment_ids"].reshape(-1), [1, 1, 1, 0, 2, 2, 3, 0])
  np.testing.assert_array_equal(rows["targets"], [[8, 9, 2], [10, 2, 0]])
  np.testing.assert_array_equal(rows["loss_mask"], [[1, 1, 1], [1, 1, 0]])
  # Token 0 of both completions is predicted at the prompt's last entry (2); the rest inside their own slots.
  np.testing.assert_array_equal(rows["hidden_index"], [[2, 4, 5], [2, 6, 0]])
  assert rows["inputs"].shape == (2, group_rows.row_width(2, 6, 3)) == (2, 4)


def _reference_attention(q, k, v, scale, window, softcap):
  """Causal attention of one sequence in float64: q [S, H, D], k/v [S, K, D] -> [S, H, D]."""
  length, heads, _ = q.shape
  groups = heads // k.shape[1]
  out = np.zeros(q.shape)
  for h in range(heads):
    scores = q[:, h] @ k[:, h // groups].T * scale
    if softcap:
      scores = softcap * np.tanh(scores / softcap)
    offsets = np.arange(length)[:, None] - np.arange(length)[None, :]
    visible = (offsets >= 0) & ((window <= 0) | (offsets < window))
    scores = np.where(visible, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    out[:, h] = (probs / probs.sum(-1, keepdims=True)) @ v[:, h // groups]
  return out


@pytest.mark.parametrize("window,softcap", [(0, 0.0), (5, 0.0), (0, 20.0)])
def test_grouped_attention_matches_each_sequence_alone(window, softcap):
  """Every prompt and completion token's output equals causal attention over its own prompt + completion."""
  rng = np.random.default_rng(window + int(softcap))
  groups, slots, prompt_slot, width, heads, kv_heads, dim = 2, 3, 6, 4, 4, 2, 8
  prompt_lengths, completion_lengths = [6, 2], [[4, 1, 3], [0, 4, 2]]
  length = prompt_slot + slots * width
  q = rng.normal(size=(groups, length, heads, dim))
  k, v = rng.normal(size=(2, groups, length, kv_heads, dim))
  positions = np.zeros((groups, length), np.int32)
  segments = np.zeros((groups, length), np.int32)
  for g in range(groups):
    n = prompt_lengths[g]
    positions[g, :n], segments[g, :n] = np.arange(n), 1
    for s, m in enumerate(completion_lengths[g]):
      start = prompt_slot + s * width
      positions[g, start:start + m], segments[g, start:start + m] = np.arange(n, n + m), s + 2
  out = attention.grouped_attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), jnp.asarray(positions),
                                    jnp.asarray(segments), attention.GroupLayout(prompt_slot, slots), scale=0.3,
                                    window=window, logit_softcap=softcap)
  out = np.asarray(out, np.float64)
  for g in range(groups):
    n = prompt_lengths[g]
    for s, m in enumerate(completion_lengths[g]):
      entries = np.r_[np.arange(n), prompt_slot + s * width + np.arange(m)]
      expected = _reference_attention(q[g, entries], k[g, entries], v[g, entries], 0.3, window, softcap)
      np.testing.assert_allclose(out[g, entries], expected, rtol=1e-4, atol=1e-5)


QUICK = ["mode=grpo", "num_generations=4", "max_new_tokens=8", "max_target_length=64", "per_device_batch_size=4"]


def _loss_and_grads(config, model, batch):
  def loss(params):
    return grpo.loss(nnx.merge(graphdef, params), batch, config).loss_sum
  graphdef, params = nnx.split(model)
  return jax.jit(jax.value_and_grad(loss))(params)


def test_packed_loss_and_gradients_equal_one_row_per_completion():
  """The same rollouts, packed and not: log-probs, the loss (off-policy rows, clipping, KL) and every parameter's
  gradient agree."""
  settings = [*QUICK, "beta=0.1", "epsilon=0.05"]
  plain = config_lib.load(["configs/base.yml", *settings], initialize_distributed=False)
  packed = config_lib.load(["configs/base.yml", *settings, "pack_groups=true"], initialize_distributed=False)
  model_config = models.ModelConfig.from_config(plain)
  graphdef, _ = models.abstract_model(model_config)
  with nnx.use_eager_sharding(False):
    model = nnx.merge(graphdef, models.init_params(model_config, 0, None))
  rng = np.random.default_rng(1)
  prompts = [list(rng.integers(3, 500, n)) for n in (17, 5)]
  completions = [list(rng.integers(3, 500, n)) for n in (8, 1, 3, 8, 2, 7, 5, 4)]
  one_per_row = rollout.token_rows([p for p in prompts for _ in range(4)], completions, 64)
  grouped = group_rows.pack(prompts, completions, 4, 64, 8)
  # Per-completion values, written once in the packed layout [completions, max_new_tokens] and once shifted to
  # where each row's completion starts.
  old = rng.normal(-2.0, 0.5, size=(8, 8)).astype(np.float32)
  ref = rng.normal(-2.0, 0.5, size=(8, 8)).astype(np.float32)
  shifted = {"old_logps": np.zeros((8, 64), np.float32), "ref_logps": np.zeros((8, 64), np.float32)}
  for row, completion in enumerate(completions):
    start = len(prompts[row // 4]) - 1
    shifted["old_logps"][row, start:start + len(completion)] = old[row, :len(completion)]
    shifted["ref_logps"][row, start:start + len(completion)] = ref[row, :len(completion)]
  per_row = {"advantages": rng.normal(size=8).astype(np.float32), "on_policy": np.zeros(8, np.float32)}
  one_per_row.update(shifted, **per_row)
  grouped.update(old_logps=old, ref_logps=ref, **per_row)
  log_probs = [np.asarray(rollout.scaled_log_probs(model, jax.tree.map(jnp.asarray, b), c)) for c, b in
               ((plain, one_per_row), (packed, grouped))]
  for row, completion in enumerate(completions):
    start = len(prompts[row // 4]) - 1
    np.testing.assert_allclose(log_probs[1][row, :len(completion)],
                               log_probs[0][row, start:start + len(completion)], rtol=1e-5, atol=1e-5)
  (loss_a, grads_a), (loss_b, grads_b) = (_loss_and_grads(c, model, jax.tree.map(jnp.asarray, b)) for c, b in
                                          ((plain, one_per_row), (packed, grouped)))
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5)
  assert float(jnp.abs(loss_a)) > 1e-3
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5)  # float32 sums in another order


def test_short_packed_grpo_run_end_to_end(tmp_path):
  """Two rollout batches of one update, two passes each, with the reference's KL: both log-prob passes and the
  update run on packed rows."""
  train.run(["configs/base.yml", *QUICK, "pack_groups=true", f"base_output_directory={tmp_path}", "run_name=grpo",
             "steps=4", "rollout_batch_size=8", "num_iterations=2", "beta=0.04", "learning_rate=1e-2",
             "log_period=1", "enable_tensorboard=false", "sample_max_new_tokens=0", "eval_num_prompts=8",
             "eval_interval=0", "generate_batch_size=32"])
  records = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
  steps = {r["step"]: r for r in records if "loss" in r}
  assert sorted(steps) == [1, 2, 3, 4]
  assert steps[1]["ratio/mean"] == 1.0 and steps[1]["kl"] == pytest.approx(0.0, abs=1e-6)
  assert steps[2]["ratio/std"] > 0 and steps[4]["kl"] > 0


@pytest.mark.parametrize("overrides,message", [
    (["mode=ppo", "num_generations=4"], "mode=ppo has none"),
    (["mode=sft"], "mode=sft has none"),
    (["per_device_batch_size=2"], "whole groups of num_generations=4"),
    (["max_new_tokens=1"], "max_new_tokens >= 2"),
])
def test_config_errors(overrides, message):
  with pytest.raises(UserError, match=message):
    config_lib.load(["configs/base.yml", *QUICK, "pack_groups=true", *overrides], initialize_distributed=False)
