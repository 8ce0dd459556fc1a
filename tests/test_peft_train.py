"""LoRA/QLoRA through the one train step: only adapters train, the reference is the base, exports merge."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from tunix_core import config as config_lib, export, peft, train
from tunix_core.models import hf_weights
from tunix_core.data import pipeline, tokenizer as tokenizer_lib

QUICK = ["max_target_length=64", "per_device_batch_size=1", "log_period=1", "sample_max_new_tokens=0",
         "enable_tensorboard=false", "eval_dataset_path=", "learning_rate=1e-2"]


def _setup(*overrides):
  config = config_lib.load(["configs/base.yml", *QUICK, *overrides], initialize_distributed=False)
  return config, train.build(config)


def test_lora_trains_only_adapters_and_exports_merged(tmp_path):
  config, setup = _setup("peft=lora", "lora_rank=4")
  batch = next(pipeline.make_train_iterator(config, tokenizer_lib.load_tokenizer(config.tokenizer_path)))
  with setup.activate():
    state = setup.initial_state(config, None, None)
    base_before = jax.device_get(state["frozen"]["base"])
    for _ in range(2):
      state, _ = setup.train_step(state, train.to_device_batch(batch, config, setup.train_batch_sharding, True))
    adapters = setup.lora.abstract_trainable
    float_leaves = [x for x in jax.tree.leaves(state["opt_state"]) if jnp.issubdtype(x.dtype, jnp.floating)]
    # AdamW keeps two moments per trainable parameter, and only the adapters are trainable.
    assert sum(x.size for x in float_leaves) == 2 * peft.num_adapter_params(setup.lora)
    assert set(state["params"]) == {"layers"}  # adapters live in the layers; embeddings and norms stay frozen
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["frozen"]["base"]), base_before)
    assert jax.tree.structure(state["params"]) == jax.tree.structure(adapters)

    out = tmp_path / "merged"
    export.write(config, setup.model_config, setup.plain_params(state), str(out))
    tokens = jnp.asarray(batch["inputs"])
    positions, segments = jnp.asarray(batch["positions"]), jnp.asarray(batch["segment_ids"])
    lora_logits = peft.model(setup.lora, state["frozen"]["base"], state["params"])(tokens, positions, segments)
  exported_config, exported = _setup(f"hf_path={out}", "tokenizer_path=assets/tokenizer.model")
  with exported.activate():
    merged = nnx.merge(exported.graphdef, exported.starting_params(exported_config))
    merged_logits = merged(tokens, positions, segments)
  np.testing.assert_allclose(merged_logits, lora_logits, atol=2e-5 * float(jnp.max(jnp.abs(lora_logits))))


@pytest.mark.parametrize("peft_kind", ["lora", "qlora"])
def test_dpo_reference_is_the_base_with_adapters_off(tmp_path, peft_kind):
  train.run(["configs/base.yml", "mode=dpo", f"peft={peft_kind}", "dataset_path=assets/arithmetic/preference_train.jsonl",
             f"base_output_directory={tmp_path}", "steps=2", *QUICK])
  records = [json.loads(line) for line in (tmp_path / "default" / "metrics.jsonl").read_text().splitlines()]
  assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # adapters start at zero: policy == base
  config, setup = _setup("mode=dpo", f"peft={peft_kind}")
  assert set(setup.shardings["frozen"]) == {"base"}  # no second copy of the weights for the reference


def test_adapters_only_export_is_the_merge_in_peft_layout(tmp_path):
  """base + alpha/r * lora_B @ lora_A, per HF tensor, equals the merged export of the same checkpoint."""
  run = train.run(["configs/base.yml", "peft=lora", "lora_rank=4", f"base_output_directory={tmp_path}", "steps=2",
                   *QUICK])
  export.export(run["run_dir"], str(tmp_path / "merged"), None, 2**30)
  files = export.export(run["run_dir"], str(tmp_path / "adapters"), None, 2**30, adapters_only=True)
  assert sorted(files) == ["adapter_config.json", "adapter_model.safetensors"]
  adapter_config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
  assert adapter_config["r"] == 4 and set(adapter_config["target_modules"]) == {
      "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
  adapters = load_file(tmp_path / "adapters" / "adapter_model.safetensors")
  merged = load_file(tmp_path / "merged" / "model.safetensors")
  config, setup = _setup("peft=lora", "lora_rank=4")
  with setup.activate():
    base = jax.device_get(setup.starting_params(config))
  scale = adapter_config["lora_alpha"] / adapter_config["r"]
  checked = 0
  for name, tensor_map in ((m.hf_name, m) for m in hf_weights.layer_maps(setup.model_config)):
    for layer in range(config.base_num_decoder_layers):
      prefix = "base_model.model." + name.format(i=layer).removesuffix(".weight")
      if f"{prefix}.lora_A.weight" not in adapters:
        continue
      ours = base["layers"]
      for key in tensor_map.ours:
        ours = ours[key]
      expected = tensor_map.to_hf(ours[layer]) + scale * (adapters[f"{prefix}.lora_B.weight"] @
                                                          adapters[f"{prefix}.lora_A.weight"])
      np.testing.assert_allclose(merged[name.format(i=layer)], expected, rtol=1e-5, atol=1e-6)
      checked += 1
  assert checked == 7 * config.base_num_decoder_layers
