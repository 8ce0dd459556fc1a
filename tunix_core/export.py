"""Writes a trained model as a Hugging Face directory: config.json, safetensors, tokenizer files.

  python3 -m tunix_core.export <run_dir | run_dir/checkpoints/<step>> <out_dir> [--dtype D] [--max_shard_size GB]

The result loads with transformers' AutoModelForCausalLM, and with hf_path=<out_dir> here (bit-exactly).
A LoRA/QLoRA run is exported merged: its adapters folded into the (dequantized) base it started from.
Training writes the same at its end when export_hf_path= is set.
"""

import argparse
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import yaml

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
      json.dump(hf_config.to_config_json(config, token_ids), f, indent=2)
    written += ["config.json", *copy_tokenizer(config.tokenizer_path, out_dir)]
  return written


def _run_config(path: str) -> tuple[str, str]:
  """(run directory, params item) for a run directory or one checkpoint step directory."""
  path = os.path.abspath(path)
  if os.path.isfile(os.path.join(path, "config.yml")):
    return path, checkpoint.resolve_parameters_path(path)
  run_dir = os.path.dirname(os.path.dirname(path))
  if os.path.isfile(os.path.join(run_dir, "config.yml")):
    return run_dir, checkpoint.resolve_parameters_path(path)
  raise UserError(f"{path}: not a run directory (no config.yml) nor a checkpoint step inside one")


def export(source: str, out_dir: str, dtype: str | None, max_shard_bytes: int) -> list[str]:
  from tunix_core import train  # pylint: disable=import-outside-toplevel
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise UserError(f"{out_dir} exists and is not empty; choose a new output directory")
  run_dir, params_item = _run_config(source)
  with open(os.path.join(run_dir, "config.yml")) as f:
    saved = yaml.safe_load(f)
  config = config_lib.load_saved(saved)
  setup = train.build(config)
  with setup.activate():
    if setup.lora is None:
      params = checkpoint.load_parameters(
          params_item, checkpoint.abstract_with_shardings(setup.abstract_params, setup.param_shardings))
    else:  # the checkpoint holds the adapters; the base comes from where the run started, as in training
      adapters = checkpoint.load_parameters(
          params_item, checkpoint.abstract_with_shardings(setup.lora.abstract_trainable, setup.lora.trainable_shardings))
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
  args = parser.parse_args()
  try:
    files = export(args.source, args.out_dir, args.dtype, int(args.max_shard_size * 2**30))
  except UserError as e:
    print(f"tunix_core.export: error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.out_dir}: {', '.join(files)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
