"""Writes a trained model as a Hugging Face directory: config.json, safetensors, tokenizer files.

  python3 -m tunix_core.export <run_dir | run_dir/checkpoints/<step>> <out_dir> [--dtype D] [--max_shard_size GB]
      [--adapters_only]

The result loads with transformers' AutoModelForCausalLM, and with hf_path=<out_dir> here (bit-exactly).
A reward model (mode=rm) is written as *ForSequenceClassification (the decoder, and its head as score.weight).
A LoRA/QLoRA run is exported merged (its adapters folded into the dequantized base it started from), or with
--adapters_only as a Hugging Face PEFT adapter directory.
Training writes the same at its end when export_hf_path= is set.
"""

import argparse
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from safetensors.numpy import save_file

from tunix_core import checkpoint, config as config_lib, peft
from tunix_core.data import tokenizer as tokenizer_lib
from tunix_core.errors import UserError
from tunix_core.models import hf_config, hf_weights

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


def copy_tokenizer(tokenizer_path: str, out_dir: str) -> list[str]:
  """Copies the run's tokenizer files (a tokenizer file, or those found in a tokenizer directory)."""
  if os.path.isdir(tokenizer_path):
    sources = [os.path.join(tokenizer_path, name) for name in TOKENIZER_FILES
               if os.path.isfile(os.path.join(tokenizer_path, name))]
  else:
    sources = [tokenizer_path]
  for source in sources:
    shutil.copy(source, out_dir)
  return [os.path.basename(s) for s in sources]


def write(config, model_config, params: dict, out_dir: str, dtype: str | None = None,
          max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """Writes params (a pure dict of possibly sharded arrays) as a Hugging Face model directory."""
  tokenizer = tokenizer_lib.load_tokenizer(config.tokenizer_path)
  os.makedirs(out_dir, exist_ok=True)
  written = hf_weights.save(model_config, params, out_dir, jnp.dtype(dtype or config.weight_dtype), max_shard_bytes)
  if jax.process_index() == 0:
    token_ids = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
      json.dump(hf_config.to_config_json(config, token_ids, sequence_classification="value_head" in params), f,
                indent=2)
    written += ["config.json", *copy_tokenizer(config.tokenizer_path, out_dir)]
  return written


def write_adapters(config, lora: peft.LoraModel, adapters: dict, out_dir: str) -> list[str]:
  """LoRA adapters alone, in Hugging Face PEFT's layout (adapter_config.json + adapter_model.safetensors).

  Per layer and projection, lora_A is [rank, in] and lora_B [out, rank] with HF's fused dimensions: ours keep
  heads apart, with the input dims before the rank in lora_a and the output dims after it in lora_b, in HF's
  order, so flattening them gives HF's layout.
  """
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  maps = {m.ours: m for m in hf_weights.layer_maps(lora.model_config)}
  rank, tensors = lora.peft.rank, {}
  for target in lora.targets:
    layers = range(lora.model_config.num_layers) if target.stacked else [target.path[1]]
    tensor_map = maps[target.path[1:] if target.stacked else target.path[2:]]
    a_all, b_all = (np.asarray(multihost_utils.process_allgather(hf_weights.get_path(adapters, p), tiled=True), np.float32)
                    for p in (target.lora_a, target.lora_b))
    for index, layer in enumerate(layers):
      a, b = (a_all[index], b_all[index]) if target.stacked else (a_all, b_all)
      prefix = "base_model.model." + tensor_map.hf_name.format(i=layer).removesuffix(".weight")
      tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, rank).T)
      tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b.reshape(rank, -1).T)
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    modules = sorted({name.split(".")[-3] for name in tensors})
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
      json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": lora.peft.alpha,
                 "target_modules": modules, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
                 "base_model_name_or_path": config.hf_path or None}, f, indent=2)
  return ["adapter_model.safetensors", "adapter_config.json"]


def find_run(path: str) -> tuple[str, str]:
  """(run directory, params item) for a run directory or one checkpoint step directory."""
  path = os.path.abspath(path)
  if os.path.isfile(os.path.join(path, "config.yml")):
    return path, checkpoint.resolve_parameters_path(path)
  run_dir = os.path.dirname(os.path.dirname(path))
  if os.path.isfile(os.path.join(run_dir, "config.yml")):
    return run_dir, checkpoint.resolve_parameters_path(path)
  raise UserError(f"{path}: not a run directory (no config.yml) nor a checkpoint step inside one")


def export(source: str, out_dir: str, dtype: str | None, max_shard_bytes: int, adapters_only: bool = False
           ) -> list[str]:
  from tunix_core import train  # pylint: disable=import-outside-toplevel
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise UserError(f"{out_dir} exists and is not empty; choose a new output directory")
  run_dir, params_item = find_run(source)
  with open(os.path.join(run_dir, "config.yml")) as f:
    saved = yaml.safe_load(f)
  config = config_lib.load_saved(saved)
  setup = train.build(config)
  if adapters_only and setup.lora is None:
    raise UserError(f"--adapters_only: the run in {run_dir} trained all weights (peft=none); export it whole")
  with setup.activate():
    if setup.lora is None:
      params = checkpoint.load_parameters(
          params_item, checkpoint.abstract_with_shardings(setup.abstract_params, setup.param_shardings))
    else:  # the checkpoint holds the adapters; the base comes from where the run started, as in training
      adapters = checkpoint.load_parameters(
          params_item, checkpoint.abstract_with_shardings(setup.lora.abstract_trainable, setup.lora.trainable_shardings))
      if adapters_only:
        return write_adapters(config, setup.lora, adapters, out_dir)
      base = peft.frozen_from_params(setup.lora, setup.starting_params(config), donate=True)
      params = peft.merge(setup.lora, base, adapters)
    return write(config, setup.model_config, params, out_dir, dtype, max_shard_bytes)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("source", help="a run directory, or one of its checkpoints/<step> directories")
  parser.add_argument("out_dir")
  parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                      help="tensor dtype in the files (default: the run's weight_dtype)")
  parser.add_argument("--max_shard_size", type=float, default=5.0, help="GiB per safetensors file")
  parser.add_argument("--adapters_only", action="store_true",
                      help="LoRA/QLoRA runs: write the adapters alone (Hugging Face PEFT layout), not the merged model")
  args = parser.parse_args()
  try:
    files = export(args.source, args.out_dir, args.dtype, int(args.max_shard_size * 2**30), args.adapters_only)
  except UserError as e:
    print(f"tunix_core.export: error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.out_dir}: {', '.join(files)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
