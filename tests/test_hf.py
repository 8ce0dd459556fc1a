"""Hugging Face checkpoints: logits equal transformers' for every family, presets have the published
sizes, the loader names every problem, sharded loads equal replicated ones, exports round-trip."""

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from tunix_core import config as config_lib, export, models, train
from tunix_core.errors import UserError
from tunix_core.models import hf_config

PARITY = pathlib.Path("end_to_end/hf_parity")
CASES = ("llama3", "llama3_tied", "qwen2", "qwen3", "gemma", "gemma2", "gemma3")
_spec = importlib.util.spec_from_file_location("logit_checker", PARITY / "forward_pass_logit_checker.py")
checker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(checker)

# Published parameter counts (model cards / safetensors totals; tied heads counted once). Gemma 3 4B is its
# text tower: 4.3B total less the 0.42B SigLIP vision encoder and projector.
PUBLISHED = {
    "llama3.1-8b": 8_030_261_248, "llama3.2-1b": 1_235_814_400, "llama3.2-3b": 3_212_749_824,
    "qwen2.5-0.5b": 494_032_768, "qwen2.5-1.5b": 1_543_714_304, "qwen2.5-7b": 7_615_616_512,
    "qwen3-0.6b": 596_049_920, "qwen3-1.7b": 1_720_574_976, "qwen3-4b": 4_022_468_096, "qwen3-8b": 8_190_735_360,
    "gemma-2b": 2_506_172_416, "gemma-7b": 8_537_680_896, "gemma2-2b": 2_614_341_888, "gemma2-9b": 9_241_705_984,
    "gemma3-1b": 999_885_952, "gemma3-4b": 3_880_263_168,
}


@pytest.mark.parametrize("case", CASES)
def test_float32_logits_match_transformers(case):
  golden = np.load(PARITY / "goldens" / f"{case}.npz")
  max_diff, kl = checker.compare(golden["logits"], checker.our_logits(str(PARITY / "checkpoints" / case),
                                                                       golden["tokens"], "float32"))
  assert max_diff < 1e-4, max_diff
  assert kl < 1e-9, kl


# bfloat16 compute (float32 weights) stays within a mean per-token KL of 2e-3 nats of transformers' float32
# logits; measured 1e-4 to 3e-4 on these fixtures, whose logits reach |80|.
@pytest.mark.parametrize("case", ["llama3", "qwen2", "qwen3", "gemma", "gemma2", "gemma3"])
def test_bfloat16_kl_bound(case):
  golden = np.load(PARITY / "goldens" / f"{case}.npz")
  _, kl = checker.compare(golden["logits"], checker.our_logits(str(PARITY / "checkpoints" / case),
                                                               golden["tokens"], "bfloat16"))
  assert kl < 2e-3, kl


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts(name):
  cfg = config_lib.layer([f"model_name={name}"])
  config_lib.validate(cfg)
  _, abstract = models.abstract_model(models.ModelConfig.from_config(ml_collections.ConfigDict(cfg)))
  assert models.num_params(nnx.to_pure_dict(abstract)) == PUBLISHED[name]


def test_every_preset_is_tested():
  assert sorted(p.stem for p in pathlib.Path("configs/models").glob("*.yml")) == sorted(PUBLISHED)


def test_config_from_hf_directory():
  cfg = config_lib.layer([f"hf_path={PARITY}/checkpoints/gemma3"])
  assert cfg["decoder_block"] == "gemma3" and cfg["head_dim"] == 16 and cfg["query_pre_attn_scalar"] == 24
  assert cfg["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
  assert cfg["rope_type"] == "linear" and cfg["rope_factor"] == 8 and cfg["local_rope_max_timescale"] == 10000
  assert cfg["tokenizer_path"] == f"{PARITY}/checkpoints/gemma3"  # the checkpoint's tokenizer by default
  llama = config_lib.layer([f"hf_path={PARITY}/checkpoints/llama3", "tokenizer_path=assets/tokenizer.model"])
  assert llama["rope_type"] == "llama3" and llama["rope_original_max_position"] == 64
  assert llama["logits_via_embedding"] is False and llama["tokenizer_path"] == "assets/tokenizer.model"


def test_older_config_json_layout(tmp_path):
  """Hub checkpoints written by transformers 4 keep rope_theta/rope_scaling at the top level."""
  old = {"model_type": "gemma3_text", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 12, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
         "rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
         "sliding_window": 512, "sliding_window_pattern": 6, "query_pre_attn_scalar": 256,
         "hidden_activation": "gelu_pytorch_tanh"}
  (tmp_path / "config.json").write_text(json.dumps(old))
  keys = hf_config.config_keys(str(tmp_path))
  assert keys["layer_types"] == (["sliding_attention"] * 5 + ["full_attention"]) * 2
  assert keys["rope_max_timescale"] == 1e6 and keys["local_rope_max_timescale"] == 1e4 and keys["rope_factor"] == 8
  assert keys["logits_via_embedding"] is True and keys["mlp_activations"] == ["gelu_tanh", "linear"]
  legacy_gemma = {**old, "model_type": "gemma", "hidden_act": "gelu"}
  (tmp_path / "config.json").write_text(json.dumps(legacy_gemma))
  assert hf_config.config_keys(str(tmp_path))["mlp_activations"] == ["gelu_tanh", "linear"]


def _load(hf_path, *overrides):
  config = config_lib.load(["configs/base.yml", f"hf_path={hf_path}", "tokenizer_path=assets/tokenizer.model",
                            *overrides], initialize_distributed=False)
  setup = train.build(config)
  with setup.activate():
    return setup.initial_state(config, None, None)["params"], setup


def _mutated_copy(tmp_path, mutate) -> str:
  target = tmp_path / "ckpt"
  shutil.copytree(PARITY / "checkpoints" / "llama3_tied", target)
  tensors = load_file(target / "model.safetensors")
  mutate(tensors, target)
  return str(target)


@pytest.mark.parametrize("mutate, message", [
    (lambda t, d: save_file({k: v for k, v in t.items() if "layers.1.mlp.up_proj" not in k},
                            d / "model.safetensors"), r"missing model\.layers\.1\.mlp\.up_proj\.weight"),
    (lambda t, d: save_file({**t, "model.layers.0.extra.weight": np.zeros(3, np.float32)}, d / "model.safetensors"),
     r"unexpected model\.layers\.0\.extra\.weight"),
    (lambda t, d: save_file({**t, "model.norm.weight": np.zeros(65, np.float32)}, d / "model.safetensors"),
     r"model\.norm\.weight has shape \[65\], expected \[64\]"),
    (lambda t, d: save_file({**t, "model.norm.weight": np.zeros(64, np.int32)}, d / "model.safetensors"),
     r"model\.norm\.weight has dtype I32, expected a float type"),
    (lambda t, d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:50_000]),
     r"cannot read model\.safetensors"),
    (lambda t, d: (d / "model.safetensors").unlink(), r"no model\.safetensors"),
])
def test_loader_errors_name_the_problem(tmp_path, mutate, message):
  with pytest.raises(UserError, match=message):
    _load(_mutated_copy(tmp_path, mutate))


def test_sharded_load_equals_replicated_load():
  hf_path = PARITY / "checkpoints" / "qwen2"
  replicated, _ = _load(hf_path, "ici_data_parallelism=8", "ici_fsdp_parallelism=1")
  fsdp, _ = _load(hf_path)
  mixed, setup = _load(hf_path, "ici_data_parallelism=2", "ici_fsdp_parallelism=2", "ici_tensor_parallelism=2")
  assert not mixed["layers"]["attention"]["query"].sharding.is_fully_replicated
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(replicated), jax.device_get(fsdp))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(replicated), jax.device_get(mixed))
  # And against the file itself, mapped by hand: HF q_proj [heads*head_dim, embed] -> ours [embed, heads, head_dim].
  q_proj = load_file(hf_path / "model.safetensors")["model.layers.1.self_attn.q_proj.weight"]
  np.testing.assert_array_equal(jax.device_get(mixed)["layers"]["attention"]["query"][1],
                                q_proj.T.reshape(64, 4, 16))


def test_export_round_trip(tmp_path):
  """Train from a checkpoint, export (sharded files), and read the export back bit-exactly."""
  run = train.run(["configs/base.yml", f"hf_path={PARITY}/checkpoints/llama3", "tokenizer_path=assets/tokenizer.model",
                   f"base_output_directory={tmp_path}", "steps=2", "per_device_batch_size=1", "max_target_length=64",
                   "eval_dataset_path=", "sample_max_new_tokens=0", "enable_tensorboard=false"])
  out = tmp_path / "hf"
  files = export.export(run["run_dir"], str(out), None, max_shard_bytes=200_000)
  assert {"config.json", "tokenizer.model"} <= set(files) and (out / "model.safetensors.index.json").is_file()
  written = json.loads((out / "config.json").read_text())
  source = json.loads((PARITY / "checkpoints" / "llama3" / "config.json").read_text())
  for key in ("model_type", "hidden_size", "num_key_value_heads", "head_dim", "rope_parameters", "tie_word_embeddings"):
    assert written[key] == source[key], key
  exported, _ = _load(out)
  trained = _checkpoint_params(run["run_dir"])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(exported), trained)
  original, _ = _load(PARITY / "checkpoints" / "llama3")
  assert not np.array_equal(trained["embedding"], jax.device_get(original)["embedding"])  # training moved it
  with pytest.raises(UserError, match="not empty"):
    export.export(run["run_dir"], str(out), None, max_shard_bytes=200_000)
  reference_python = os.environ.get("TUNIX_HF_REFERENCE_PYTHON")
  if reference_python:  # a Python with torch + transformers: the export must load there with our logits
    tokens = np.load(PARITY / "goldens" / "llama3.npz")["tokens"]
    np.savez(tmp_path / "ours.npz", tokens=tokens, logits=checker.our_logits(str(out), tokens, "float32"))
    subprocess.run([reference_python, str(PARITY / "hf_logits.py"), "--hf_path", str(out), "--golden",
                    str(tmp_path / "ours.npz")], check=True)


def _checkpoint_params(run_dir) -> dict:
  steps = sorted(int(p.name) for p in pathlib.Path(run_dir, "checkpoints").iterdir() if p.name.isdigit())
  return ocp.StandardCheckpointer().restore(pathlib.Path(run_dir, "checkpoints", str(steps[-1]), "params").absolute())
