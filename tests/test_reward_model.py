"""The value model (decoder + scalar head) and mode=rm: numerics, training through the one step, eval metrics,
reloading for scoring, Hugging Face export and starting from a critic checkpoint."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from tunix_core import config as config_lib, train
from tunix_core.data import preference, tokenizer as tokenizer_lib
from tunix_core.errors import UserError
from tunix_core.models import ModelConfig, value_head
from tunix_core.rl import reward_model

QUICK = ["mode=rm", "dataset_path=assets/arithmetic/preference_train.jsonl",
         "eval_dataset_path=assets/arithmetic/preference_eval.jsonl", "max_target_length=64", "per_device_batch_size=1",
         "log_period=1", "eval_steps=1", "enable_tensorboard=false"]


def test_value_model_reads_its_head_at_each_rows_last_token():
  cfg = ModelConfig(vocab_size=32, emb_dim=16, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32, num_layers=2,
                    scan_layers=False)  # eager construction: a Python loop of layers builds fastest
  with nnx.use_eager_sharding(False):
    model = value_head.ValueModel(cfg, rngs=nnx.Rngs(0))
  assert not np.any(np.asarray(model.value_head[...]))  # a fresh head scores everything 0
  head = np.random.default_rng(0).normal(size=16).astype(np.float32)
  model.value_head.set_value(jnp.asarray(head))
  lengths = np.array([5, 8])
  segment_ids = (np.arange(8)[None] < lengths[:, None]).astype(np.int32)
  tokens = np.random.default_rng(1).integers(1, 32, (2, 8)) * segment_ids
  positions = np.where(segment_ids, np.arange(8), 0)
  hidden, values, rewards = nnx.jit(lambda m, *args: (m.decoder.hidden_states(*args), m.values(*args),
                                                       m.sequence_values(*args)))(model, tokens, positions, segment_ids)
  np.testing.assert_allclose(values, np.asarray(hidden, np.float64) @ head, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(rewards, np.asarray(values)[[0, 1], lengths - 1], rtol=1e-6)


def test_rm_rows_hold_the_whole_sequence():
  """A reward model reads the last token (EOS) from the inputs; DPO's rows shift it into the targets."""
  overrides = ["dataset_path=assets/arithmetic/preference_train.jsonl", "max_target_length=64"]
  rm_config, dpo_config = (config_lib.load(["configs/base.yml", f"mode={m}", *overrides], initialize_distributed=False)
                           for m in ("rm", "dpo"))
  tokenizer = tokenizer_lib.load_tokenizer(rm_config.tokenizer_path)
  rm_rows, dpo_rows = (preference.sequence_rows(c, tokenizer, ["Ann has 2 pens.\n"], ["The answer is 2."])
                       for c in (rm_config, dpo_config))
  n = int(dpo_rows["segment_ids"].sum())
  assert int(rm_rows["segment_ids"].sum()) == n + 1 and rm_rows["inputs"][0, n] == tokenizer.eos_id
  np.testing.assert_array_equal(rm_rows["inputs"][0, :n], dpo_rows["inputs"][0, :n])


def test_rm_trains_reloads_scores_and_exports(tmp_path):
  export_dir = tmp_path / "hf"
  summary = train.run(["configs/base.yml", *QUICK, f"base_output_directory={tmp_path}", "steps=3",
                       f"export_hf_path={export_dir}"])
  records = [json.loads(line) for line in (tmp_path / "default" / "metrics.jsonl").read_text().splitlines()]
  assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the zero head scores every sequence 0
  assert {"rm/accuracy", "rm/margin", "rewards/chosen", "rewards/rejected", "pairs"} <= set(records[0])
  assert [r["loss"] for r in records if "loss" in r][-1] != pytest.approx(math.log(2), abs=1e-4)
  assert summary["sample"] is None  # nothing to sample from a reward model
  evaluation = records[-1]

  # The reloaded model scores the eval pairs (eval_steps=1: the first 4) as the run's eval did.
  model = reward_model.load(str(tmp_path / "default"))
  pairs = [json.loads(line) for line in open("assets/arithmetic/preference_eval.jsonl")][:4]
  prompts = [p["prompt"] for p in pairs]
  chosen, rejected = model.score(prompts, [p["chosen"] for p in pairs]), model.score(prompts, [p["rejected"] for p in pairs])
  assert evaluation["eval/rewards/chosen"] == pytest.approx(chosen.mean(), rel=1e-5, abs=1e-6)
  assert evaluation["eval/rewards/rejected"] == pytest.approx(rejected.mean(), rel=1e-5, abs=1e-6)
  assert evaluation["eval/rm/accuracy"] == pytest.approx(np.mean(chosen > rejected))

  # Token rows padded on the left score as the same rows padded on the right.
  rows = preference.sequence_rows(model.config, model.tokenizer, prompts, [p["chosen"] for p in pairs])
  lengths = rows["segment_ids"].sum(-1)
  left_tokens = np.stack([np.roll(t, len(t) - n) for t, n in zip(rows["inputs"], lengths)])
  left_segments = np.stack([np.roll(s, len(s) - n) for s, n in zip(rows["segment_ids"], lengths)])
  np.testing.assert_allclose(model.score_tokens(jnp.asarray(left_tokens), jnp.asarray(left_segments)), chosen,
                             rtol=1e-5, atol=1e-6)

  # Hugging Face: the decoder as for a causal LM, the head as *ForSequenceClassification's score.weight.
  hf_config = json.loads((export_dir / "config.json").read_text())
  assert hf_config["architectures"] == ["LlamaForSequenceClassification"] and hf_config["id2label"] == {"0": "LABEL_0"}
  tensors = load_file(str(export_dir / "model.safetensors"))
  head = np.asarray(jax.device_get(model.params["value_head"]))
  np.testing.assert_array_equal(tensors["score.weight"], head[None])
  np.testing.assert_array_equal(tensors["model.embed_tokens.weight"],
                                np.asarray(jax.device_get(model.params["decoder"]["embedding"])))
  assert "lm_head.weight" not in tensors

  # critic_load_parameters_path starts a value model from the checkpoint, head included.
  config = config_lib.load(["configs/base.yml", *QUICK, f"critic_load_parameters_path={tmp_path / 'default'}"],
                           initialize_distributed=False)
  setup = train.build(config)
  with setup.activate():
    start = setup.starting_params(config)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(start), jax.device_get(model.params))


def test_rm_config_errors():
  with pytest.raises(UserError, match="mode=rm trains the whole reward model"):
    config_lib.load(["configs/base.yml", "mode=rm", "peft=lora"], initialize_distributed=False)
  with pytest.raises(UserError, match="critic_load_parameters_path starts a value model"):
    config_lib.load(["configs/base.yml", "critic_load_parameters_path=/x"], initialize_distributed=False)
