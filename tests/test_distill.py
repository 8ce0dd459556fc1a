"""mode=distill through the one train step: teacher plumbing, frozen teacher, masking, layer maps, short runs."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from tunix_core import config as config_lib, on_policy, train
from tunix_core.data import pipeline, tokenizer as tokenizer_lib
from tunix_core.errors import UserError
from tunix_core.modes import distill

QUICK = ["per_device_batch_size=1", "max_target_length=48", "log_period=1", "sample_max_new_tokens=0",
         "enable_tensorboard=false", "eval_steps=1"]
# A 2-layer, 64-wide student under the 4-layer, 128-wide default model as teacher.
STUDENT = ["base_num_decoder_layers=2", "base_emb_dim=64", "base_mlp_dim=128", "head_dim=16"]
ALL = "distill_strategy=[logit, [attention_transfer, 2.0], feature_pooling, [feature_projection, 0.5]]"


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("teacher")
  train.run(["configs/base.yml", f"base_output_directory={out}", "run_name=teacher", "steps=1", *QUICK,
             "eval_dataset_path="])
  return out / "teacher"


def _config(teacher_run, *overrides):
  return config_lib.load(["configs/base.yml", "mode=distill", f"teacher_load_parameters_path={teacher_run}",
                          "teacher_dtype=float32", *QUICK, *STUDENT, *overrides], initialize_distributed=False)


def test_teacher_architecture_and_layer_map(teacher_run):
  config = _config(teacher_run, ALL)
  assert config.teacher_architecture["base_num_decoder_layers"] == 4
  assert config.teacher_architecture["base_emb_dim"] == 128
  assert distill.layer_map(config) == ((0, 1), (1, 3))  # unequal depths: evenly spaced, last with last
  assert distill.layer_map(_config(teacher_run, "distill_layer_map=[[0, 0], [1, 2]]")) == ((0, 0), (1, 2))
  for bad, match in (("distill_layer_map=[[2, 0]]", "distill_layer_map"),
                     ("distill_strategy=[logits]", "distill_strategy"),
                     ("distill_jsd_beta=1.0", "distill_jsd_beta"),
                     ("distill_on_policy=true", "packing=false")):
    with pytest.raises(UserError, match=match):
      _config(teacher_run, bad)
  with pytest.raises(UserError, match="teacher"):
    config_lib.load(["configs/base.yml", "mode=distill"], initialize_distributed=False)


def _batch(config):
  return next(pipeline.make_train_iterator(config, tokenizer_lib.load_tokenizer(config.tokenizer_path)))


def test_one_step_teacher_frozen_projection_trained_padding_ignored(teacher_run):
  """One step: the teacher receives no gradient and has no optimizer state; its weights stay bit for bit; the
  student and the projection move; every strategy's metric is logged. The same step on the batch with different
  tokens after each row's end (segment 0, no loss mask) gives the same loss, metrics and update."""
  config = _config(teacher_run, ALL, "warmup_steps_fraction=0")
  setup = train.build(config)
  local = _batch(config)
  padding = local["segment_ids"] == 0
  assert np.any(padding)
  noisy = {**local, "inputs": np.where(padding, (local["inputs"] * 7 + 3) % 300, local["inputs"]),
           "targets": np.where(padding, (local["targets"] * 5 + 1) % 300, local["targets"])}
  with setup.activate():
    state = setup.initial_state(config, None, None)
    before = jax.device_get(state)
    assert jax.tree.leaves(before["frozen"]["teacher"])[0].dtype == np.float32
    results = []
    for batch in (local, noisy):
      copy = jax.tree.map(jnp.copy, state)  # the step donates its state
      results.append(jax.device_get(setup.train_step(
          copy, train.to_device_batch(batch, config, setup.train_batch_sharding, accumulate=True))))
    plain = setup.plain_params(state)
  (after, metrics), (noisy_after, noisy_metrics) = results
  jax.tree.map(np.testing.assert_array_equal, after["frozen"]["teacher"], before["frozen"]["teacher"])
  mu = [x for x in jax.tree.leaves(after["opt_state"]) if np.ndim(x)]
  assert len(mu) == 2 * len(jax.tree.leaves(before["params"]))  # Adam's moments: student and projection only
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), after["params"], before["params"])
  assert moved[distill.PROJECTION_KEY]["kernel"] and moved["embedding"]
  assert {"loss", "distill/ce", "distill/kl", "distill/attention", "distill/feature",
          "distill/feature_projection"} <= set(metrics)
  assert all(np.isfinite(float(v)) and float(v) > 0 for v in metrics.values())
  assert distill.PROJECTION_KEY not in plain
  for key in metrics:
    np.testing.assert_allclose(noisy_metrics[key], metrics[key], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), noisy_after["params"],
               after["params"])


def _records(run_dir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_on_policy_rows():
  local = {"inputs": np.array([[1, 5, 6, 7, 2, 0], [0] * 6]), "loss_mask": np.array([[0, 0, 1, 1, 1, 0], [0] * 6])}
  assert on_policy.prompts_of(local) == [[1, 5, 6], None]  # inputs[2] predicts the first loss token
  row = on_policy.row([1, 5], [9, 8, 2], 6)
  np.testing.assert_array_equal(row["inputs"], [1, 5, 9, 8, 0, 0])
  np.testing.assert_array_equal(row["targets"], [5, 9, 8, 2, 0, 0])
  np.testing.assert_array_equal(row["loss_mask"], [0, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 1, 0, 0])


def test_short_on_policy_run_of_every_strategy_then_export_and_reload(teacher_run, tmp_path):
  """All four strategies (jsd over the teacher's top 16 logits) end to end on completions the student samples,
  with eval and a checkpoint; the exported model and a later load_parameters_path leave the projection out."""
  summary = train.run(["configs/base.yml", "mode=distill", f"teacher_load_parameters_path={teacher_run}",
                       f"base_output_directory={tmp_path}", "run_name=student", "steps=2", *QUICK, *STUDENT, ALL,
                       "distill_divergence=jsd", "distill_top_k=16", "packing=false", "distill_on_policy=true",
                       "max_new_tokens=12", f"export_hf_path={tmp_path}/hf"])
  records = _records(tmp_path / "student")
  train_records = [r for r in records if "loss" in r]
  assert [r["step"] for r in train_records] == [1, 2] and "distill/jsd" in train_records[0]
  assert all(0 < r["loss_tokens"] <= 8 * 12 for r in train_records)  # sampled completions: at most 12 tokens each
  evals = [r for r in records if "eval/loss" in r][-1]
  assert {"eval/accuracy", "eval/teacher_loss", "eval/teacher_accuracy"} <= set(evals)
  assert summary["eval_loss"] == evals["eval/loss"]
  saved = yaml.safe_load((tmp_path / "student" / "config.yml").read_text())
  assert saved["teacher_architecture"]["base_num_decoder_layers"] == 4
  assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_hidden_layers"] == 2
  config = config_lib.load(["configs/base.yml", f"load_parameters_path={tmp_path}/student", *QUICK, *STUDENT],
                           initialize_distributed=False)
  setup = train.build(config)
  with setup.activate():
    params = setup.starting_params(config)
  assert distill.PROJECTION_KEY not in params
