"""mode=grpo: a short run end to end, the first update's exact ratio at any temperature, dynamic sampling's refill,
and the config's checks."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tunix_core import config as config_lib, models, train
from tunix_core.errors import UserError
from tunix_core.modes import grpo
from tunix_core.rewards import runner as rewards_lib
from tunix_core.rl import dynamic_sampling, rollout

QUICK = ["mode=grpo", "per_device_batch_size=1", "num_generations=4", "max_new_tokens=8", "max_target_length=64",
         "log_period=1", "enable_tensorboard=false", "sample_max_new_tokens=0", "eval_num_prompts=8",
         "generate_batch_size=16"]


def test_short_grpo_run_end_to_end(tmp_path):
  """16 completions per rollout (4 prompts x 4), 2 updates of 8 each, 2 passes: the first update is on-policy
  (ratio exactly 1, nothing clipped), the rest are not; the KL term has its reference copy; evals of the weights'
  moving average and of the weights."""
  train.run(["configs/base.yml", *QUICK, f"base_output_directory={tmp_path}", "run_name=grpo", "steps=4",
             "rollout_batch_size=4", "num_iterations=2", "beta=0.04", "temperature=0.7", "learning_rate=1e-2",
             "eval_interval=2", "checkpoint_period=4", "reward_functions=[math_answer, format, length]",
             "reward_weights=[1.0, 0.5, 0.1]", "ema_decay=0.5"])
  records = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
  steps = {r["step"]: r for r in records if "loss" in r}
  evals = {r["step"]: r for r in records if "eval/accuracy" in r}
  assert sorted(evals) == [0, 2, 4]
  # eval/accuracy is the moving average's (ema_decay), eval/policy_accuracy the trained weights': one at the start.
  assert all("eval/policy_accuracy" in r for r in evals.values())
  assert evals[0]["eval/accuracy"] == evals[0]["eval/policy_accuracy"]
  assert sorted(steps) == [1, 2, 3, 4]
  first = steps[1]
  assert first["ratio/mean"] == 1.0 and first["ratio/std"] == 0.0
  assert first["clip_fraction/low"] == first["clip_fraction/high"] == first["clip_fraction/dual"] == 0.0
  assert first["kl"] == pytest.approx(0.0, abs=1e-6)  # policy = reference before any update
  assert all(steps[s]["ratio/std"] > 0 for s in (2, 3, 4)) and steps[4]["kl"] > 0
  for key in ("reward/mean", "reward/std", "reward/math_answer/mean", "reward/format/mean", "reward/length/mean",
              "reward/math_answer/errors", "entropy", "completions/mean_length", "completions/max_length",
              "time/rollout_s", "time/sample_s", "rollout/tokens_per_sec", "tokens_per_sec"):
    assert key in first, key
  assert "reward/mean" not in steps[2]  # rollout metrics come with the rollout batch's first update
  assert (tmp_path / "grpo" / "checkpoints" / "4").is_dir()


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_first_update_ratio_is_exactly_one_at_any_temperature(temperature):
  config = config_lib.load(["configs/base.yml", *QUICK, f"temperature={temperature}"], initialize_distributed=False)
  model_config = models.ModelConfig.from_config(config)
  graphdef, state = models.abstract_model(model_config)
  with nnx.use_eager_sharding(False):
    model = nnx.merge(graphdef, models.init_params(model_config, 0, None))
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(1, 500, 10)) for _ in range(4)]
  completions = [list(rng.integers(1, 500, n)) for n in (3, 8, 5, 1)]
  batch = rollout.token_rows(prompts, completions, 64)
  batch.update(advantages=rng.normal(size=4).astype(np.float32), on_policy=np.ones(4, np.float32),
               old_logps=rng.normal(size=(4, 64)).astype(np.float32))  # ignored for on-policy rows
  out = grpo.loss(model, jax.tree.map(jnp.asarray, batch), config)
  metrics = grpo.host_metrics({k: float(v) for k, v in out.metrics.items()})
  assert metrics["ratio/mean"] == 1.0 and metrics["ratio/std"] == 0.0
  assert metrics["clip_fraction/low"] == metrics["clip_fraction/high"] == 0.0
  assert out.weight == 4  # sequence-mean-token-mean: one weight per completion


def test_token_rows_mask_the_completion_targets():
  rows = rollout.token_rows([[1, 2, 3]], [[7, 8]], 6)
  np.testing.assert_array_equal(rows["inputs"][0], [1, 2, 3, 7, 0, 0])
  np.testing.assert_array_equal(rows["targets"][0], [2, 3, 7, 8, 0, 0])
  np.testing.assert_array_equal(rows["loss_mask"][0], [0, 0, 1, 1, 0, 0])
  np.testing.assert_array_equal(rows["segment_ids"][0], [1, 1, 1, 1, 0, 0])


def test_fill_groups_refills_and_tops_up():
  rounds = [[1, 0, 0, 2], [0, 3, 4, 0], [5, 6, 7, 8]]  # 0 = a group whose rewards are all equal
  batch, stats = dynamic_sampling.fill_groups(lambda r: rounds[r], 4, 5, lambda g: g != 0)
  assert batch == [1, 2, 3, 4] and stats["rollout/sampling_rounds"] == 2 and stats["rollout/groups_topped_up"] == 0
  batch, stats = dynamic_sampling.fill_groups(lambda r: rounds[r], 4, 1, lambda g: g != 0)
  assert batch == [1, 2, 0, 0] and stats["rollout/groups_topped_up"] == 2


class _FakeContext:
  """A RolloutContext without a model: completion i of a prompt answers prompt.columns["answers"][i]."""

  def __init__(self, config, answers_per_round):
    self.config, self._rounds, self.drawn = config, iter(answers_per_round), 0
    self.reward_functions = grpo.reward_functions(config)

  def next_prompts(self, n):
    answers = next(self._rounds)
    self.drawn += n
    return [types.SimpleNamespace(prompt="q", ids=[1, 2], columns={"answer": 1, "answers": a}) for a in answers]

  def sample(self, state, prompts, num_samples, seed):
    return [types.SimpleNamespace(text=f"The answer is {a}.", token_ids=[5, 6], length=2, finish_reason="stop")
            for p in prompts for a in p.columns["answers"]]

  def score(self, prompts, completions):
    columns = {"answer": [p.columns["answer"] for p in prompts]}
    return rewards_lib.score(self.reward_functions, [p.prompt for p in prompts], [c.text for c in completions],
                             columns, [c.token_ids for c in completions], timeout_s=0, error_default=None)

  def rows(self, prompts, completions):
    return rollout.token_rows([p.ids for p in prompts], [c.token_ids for c in completions], 8)

  def log_probs(self, state, rows, *, policy, reference):
    return {}


def test_dapo_prepare_drops_equal_groups_and_refills_the_batch():
  config = config_lib.load(["configs/base.yml", *QUICK, "loss_algo=dapo", "rollout_batch_size=2", "overlong_buffer_tokens=4",
                            "num_generations=4"], initialize_distributed=False)
  assert config.dynamic_sampling == "on" and config.epsilon_high == 0.28 and config.loss_aggregation == "token-mean"
  # round 1: one all-right group (dropped) and one mixed; round 2: one all-wrong (dropped), one mixed
  answers = [[[1, 1, 1, 1], [1, 0, 0, 1]], [[0, 0, 0, 0], [0, 1, 0, 0]]]
  context = _FakeContext(config, answers)
  rows, metrics = grpo.prepare(context, None, 1)
  assert context.drawn == 4 and metrics["rollout/sampling_rounds"] == 2 and metrics["rollout/groups_dropped"] == 2
  assert len(rows["advantages"]) == 8 and np.all(np.abs(rows["advantages"]) > 0.1)  # only informative groups
  assert metrics["reward/math_answer/mean"] == pytest.approx(7 / 16)  # over everything drawn
  assert "reward/overlong/mean" in metrics  # dapo's overlong shaping joins the reward functions


def test_dynamic_sampling_prompts_sizes_the_rounds_and_drops_the_surplus():
  config = config_lib.load(["configs/base.yml", *QUICK, "rollout_batch_size=2", "num_generations=4",
                            "dynamic_sampling=on", "dynamic_sampling_prompts=4"], initialize_distributed=False)
  # one round of 4 prompts: an all-right group (dropped), then three mixed ones, of which the batch takes two
  answers = [[[1, 1, 1, 1], [1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 0, 1]]]
  context = _FakeContext(config, answers)
  rows, metrics = grpo.prepare(context, None, 1)
  assert context.drawn == 4 and metrics["rollout/sampling_rounds"] == 1
  assert metrics["rollout/groups_dropped"] == 1 and metrics["rollout/groups_surplus"] == 1
  rewards = np.asarray(rows["advantages"]).reshape(2, 4) > 0  # the first two mixed groups, in order
  np.testing.assert_array_equal(rewards, [[True, False, False, True], [False, True, False, False]])


@pytest.mark.parametrize("overrides,message", [
    (["num_generations=1"], "at least 2 completions"),
    (["loss_algo=dapo", "beta=0.1", "overlong_buffer_tokens=4"], "uses no KL"),
    (["rollout_batch_size=3"], "not a whole number of update batches"),
    (["dual_clip_c=0.5"], "must be above 1"),
    (["temperature=0"], "set temperature > 0"),
    (["reward_weights=[1, 2]"], "one per reward function"),
    (["reward_error_default=abc"], "a number or null"),
    (["dynamic_sampling_prompts=8"], "dynamic sampling is off"),
])
def test_config_errors(overrides, message):
  with pytest.raises(UserError, match=message):
    config_lib.load(["configs/base.yml", *QUICK, *overrides], initialize_distributed=False)


def test_reward_error_default_accepts_numbers_and_null():
  assert config_lib.load(["configs/base.yml", *QUICK, "reward_error_default=-1"],
                         initialize_distributed=False).reward_error_default == -1.0
  assert config_lib.load(["configs/base.yml", *QUICK, "reward_error_default=null"],
                         initialize_distributed=False).reward_error_default is None
