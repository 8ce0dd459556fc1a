"""mode=dpo/orpo/simpo through the one train step: reference handling, metrics, the ln 2 start."""

import json
import math
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from tunix_core import checkpoint, config as config_lib, train
from tunix_core.data import preference, tokenizer as tokenizer_lib
from tunix_core.errors import UserError
from tunix_core.modes import dpo, preference_losses

QUICK = ["dataset_path=assets/arithmetic/preference_train.jsonl", "eval_dataset_path=", "max_target_length=64",
         "per_device_batch_size=1", "log_period=1", "sample_max_new_tokens=0", "enable_tensorboard=false"]
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen",
           "logps/rejected", "pairs")


def _records(run_dir) -> list[dict]:
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_dpo_starts_at_ln2_and_keeps_its_reference(tmp_path):
  train.run(["configs/base.yml", "mode=dpo", f"base_output_directory={tmp_path}", "steps=3", *QUICK])
  records = _records(tmp_path / "default")
  assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
  assert set(METRICS) <= set(records[0]) and records[0]["pairs"] == 4  # 8 rows = 4 pairs
  assert records[-1]["loss"] != pytest.approx(math.log(2), abs=1e-4)

  # Resuming rebuilds the reference from the starting weights, not from the trained policy.
  config = config_lib.load(["configs/base.yml", "mode=dpo", f"base_output_directory={tmp_path}", *QUICK],
                           initialize_distributed=False)
  setup = train.build(config)
  with setup.activate():
    iterator = preference.make_preference_iterator(config, tokenizer_lib.load_tokenizer(config.tokenizer_path))
    state = setup.initial_state(config, checkpoint.Checkpointer(config), iterator)
    start = setup.starting_params(config)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["frozen"]["reference"]), jax.device_get(start))
  assert not np.array_equal(jax.device_get(state["params"]["embedding"]), jax.device_get(start["embedding"]))


@pytest.mark.parametrize("mode", ["orpo", "simpo"])
def test_reference_free_modes_train(tmp_path, mode):
  train.run(["configs/base.yml", f"mode={mode}", f"base_output_directory={tmp_path}", "steps=2", *QUICK])
  records = _records(tmp_path / "default")
  assert all(np.isfinite(r["loss"]) for r in records) and set(METRICS) <= set(records[0])
  config = config_lib.load(["configs/base.yml", f"mode={mode}", *QUICK], initialize_distributed=False)
  assert train.build(config).shardings["frozen"] == {}  # no reference weights kept


def test_dpo_loss_of_a_batch_equals_the_pairwise_formula():
  """The mode's loss on interleaved rows equals preference_losses.dpo on the sequence log-probs by hand."""
  config = config_lib.load(["configs/base.yml", "mode=dpo", "dpo_loss=ipo", *QUICK], initialize_distributed=False)
  batch = next(preference.make_preference_iterator(config, tokenizer_lib.load_tokenizer(config.tokenizer_path)))
  setup = train.build(config)
  with setup.activate():
    params = setup.starting_params(config)
    policy = nnx.merge(setup.graphdef, params)
    reference = nnx.merge(setup.graphdef, jax.tree.map(lambda x: x * 0.9, params))
    out = dpo.loss(policy, batch, config, reference)
    logps, lengths = dpo.sequence_log_probs(policy, batch, config)
    ref_logps, _ = dpo.sequence_log_probs(reference, batch, config)
  losses, _, _ = preference_losses.dpo(logps[0::2], logps[1::2], ref_logps[0::2], ref_logps[1::2], loss_type="ipo",
                                       beta=config.dpo_beta, label_smoothing=0.0, chosen_lengths=lengths[0::2],
                                       rejected_lengths=lengths[1::2])
  np.testing.assert_allclose(float(out.loss_sum) / float(out.weight), float(np.mean(losses)), rtol=1e-5)


def test_precomputed_reference_trains_like_the_frozen_copy(tmp_path):
  """precompute_reference=true: the same losses, rewards and eval loss as DPO with a frozen reference copy, and no
  reference weights in the train state."""
  # The precomputing pass covers every pair of both files: small files keep it short.
  subsets = {}
  for split, pairs in (("train", 64), ("eval", 16)):
    lines = pathlib.Path(f"assets/arithmetic/preference_{split}.jsonl").read_text().splitlines()[:pairs]
    subsets[split] = tmp_path / f"{split}.jsonl"
    subsets[split].write_text("\n".join(lines) + "\n")
  common = ["configs/base.yml", "mode=dpo", "steps=3", "eval_interval=3", "eval_steps=2",
            f"dataset_path={subsets['train']}", f"eval_dataset_path={subsets['eval']}", *QUICK[2:]]
  train.run([*common, f"base_output_directory={tmp_path / 'copy'}"])
  train.run([*common, f"base_output_directory={tmp_path / 'precomputed'}", "precompute_reference=true"])
  frozen_copy, precomputed = (_records(tmp_path / name / "default") for name in ("copy", "precomputed"))
  assert precomputed[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
  assert [r["step"] for r in precomputed] == [r["step"] for r in frozen_copy]
  for a, b in zip(frozen_copy, precomputed):
    for key in ("loss", "eval/loss", *METRICS):
      if key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
  config = config_lib.load([*common, "precompute_reference=true"], initialize_distributed=False)
  assert train.build(config).shardings["frozen"] == {}


def test_precompute_reference_needs_full_fine_tuning_dpo():
  for override in ("mode=simpo", "peft=lora"):
    with pytest.raises(UserError, match=r"precompute_reference=true replaces DPO's frozen reference"):
      config_lib.load(["configs/base.yml", "mode=dpo", override, "precompute_reference=true"],
                      initialize_distributed=False)
