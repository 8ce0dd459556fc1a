"""mode=ppo: a short run end to end (the first update exact, the critic trained), one scored by a reward model made
in the test, and the config's checks."""

import json

import jax
import numpy as np
import pytest

from tunix_core import checkpoint, config as config_lib, train
from tunix_core.errors import UserError

QUICK = ["mode=ppo", "per_device_batch_size=1", "num_generations=1", "max_new_tokens=8", "max_target_length=64",
         "log_period=1", "enable_tensorboard=false", "sample_max_new_tokens=0", "eval_num_prompts=8",
         "generate_batch_size=16", "base_num_decoder_layers=2", "eval_verifier="]


def _records(run_dir) -> list[dict]:
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _critic_head(run_dir, step: int) -> np.ndarray:
  config = config_lib.load(["configs/base.yml", *QUICK], initialize_distributed=False)
  setup = train.build(config)
  with setup.activate():
    params = checkpoint.load_parameters(str(run_dir / "checkpoints" / str(step)), checkpoint.abstract_with_shardings(
        setup.abstract_trainable, setup.shardings["params"]))
  return np.asarray(jax.device_get(params["critic"]["value_head"]))


def test_short_ppo_run_end_to_end(tmp_path):
  """8 completions per rollout, one update of 8, 2 passes, KL in the rewards: the first update is on-policy (ratio
  exactly 1, nothing clipped), the second is not, the second rollout's policy has left the reference, the critic's
  zero head moves, a checkpoint is written."""
  train.run(["configs/base.yml", *QUICK, f"base_output_directory={tmp_path}", "run_name=ppo", "steps=4",
             "rollout_batch_size=8", "num_iterations=2", "beta=0.05", "kl_estimator=k1", "temperature=0.7",
             "learning_rate=1e-2", "entropy_coef=0.01", "checkpoint_period=4",
             "reward_functions=[math_answer, format]"])
  records = _records(tmp_path / "ppo")
  steps = {r["step"]: r for r in records if "loss" in r}
  assert sorted(steps) == [1, 2, 3, 4]
  first = steps[1]
  assert first["ratio/mean"] == 1.0 and first["ratio/std"] == 0.0
  assert first["clip_fraction"] == 0.0 and first["clip_fraction/value"] == 0.0
  assert first["kl"] == pytest.approx(0.0, abs=1e-6)  # policy = reference before any update
  assert first["values/mean"] == 0.0  # the critic's head starts at zero
  for key in ("reward/mean", "reward/math_answer/mean", "reward/format/mean", "entropy", "loss/value", "loss/policy",
              "critic/explained_variance", "returns/mean", "completions/mean_length", "time/rollout_s"):
    assert key in first, key
  assert all(np.isfinite(v) for r in steps.values() for v in r.values() if isinstance(v, float))
  assert steps[2]["ratio/std"] > 0 and "kl" not in steps[2] and steps[3]["kl"] > 0
  assert (tmp_path / "ppo" / "checkpoints" / "4").is_dir()
  assert np.abs(_critic_head(tmp_path / "ppo", 4)).max() > 0


def test_ppo_with_a_reward_model(tmp_path):
  """A reward model trained for two steps in the test scores the rollouts (no reward functions at all)."""
  train.run(["configs/base.yml", "mode=rm", "per_device_batch_size=2", "max_target_length=64", "steps=2",
             "base_num_decoder_layers=2", "enable_tensorboard=false", "sample_max_new_tokens=0", "eval_steps=1",
             "dataset_path=assets/arithmetic/preference_train.jsonl",
             "eval_dataset_path=assets/arithmetic/preference_eval.jsonl", f"base_output_directory={tmp_path}",
             "run_name=rm"])
  train.run(["configs/base.yml", *QUICK, f"base_output_directory={tmp_path}", "run_name=ppo_rm", "steps=1",
             "reward_functions=[]", f"reward_model_path={tmp_path / 'rm'}", "enable_checkpointing=false"])
  first = next(r for r in _records(tmp_path / "ppo_rm") if "loss" in r)
  assert first["reward/mean"] == pytest.approx(first["reward/reward_model/mean"])
  assert first["reward/std"] > 0 and np.isfinite(first["loss"])


@pytest.mark.parametrize("overrides,message", [
    (["reward_functions=[]"], "needs reward_functions"),
    (["loss_algo=dr_grpo"], "mode=ppo has its own objective"),
    (["peft=lora"], "mode=ppo trains the whole policy"),
    (["mode=grpo", "num_generations=4", "reward_model_path=x"], "reward_model_path scores mode=ppo"),
])
def test_config_errors(overrides, message):
  with pytest.raises(UserError, match=message):
    config_lib.load(["configs/base.yml", *QUICK, *overrides], initialize_distributed=False)


def test_ppo_defaults_resolve():
  config = config_lib.load(["configs/base.yml", *QUICK], initialize_distributed=False)
  assert config.loss_aggregation == "token-mean" and config.rollout_batch_size == 8
  config_lib.load(["configs/base.yml", *QUICK, "critic_load_parameters_path=somewhere"], initialize_distributed=False)
