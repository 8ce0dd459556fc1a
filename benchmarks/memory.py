"""Device memory of one train step for full fine-tuning, LoRA and QLoRA of the same model, and for DPO with a
frozen reference copy against precomputed reference log-probs (precompute_reference=true).

  python3 benchmarks/memory.py [--model_name qwen3-0.6b] [key=value ...]

Compiles the train step for abstract inputs (nothing is allocated, so any preset fits on any machine)
and reports XLA's own accounting: the state and batch it takes (arguments), what it returns, and its
temporary buffers; the peak is arguments + temporaries (the state is donated, so outputs reuse it).
Also reports the bytes of the frozen base, whose QLoRA form should be about a quarter of bf16.
"""

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from tunix_core import config as config_lib, distributed, train


def bits(dtype) -> int:
  return (jnp.finfo(dtype) if jnp.issubdtype(dtype, jnp.floating) else jnp.iinfo(dtype)).bits


def bytes_of(tree) -> float:
  """Packed size: 4-bit values take half a byte, as XLA stores them."""
  return sum(int(np.prod(x.shape)) * bits(x.dtype) / 8 for x in jax.tree.leaves(tree))


def projection_bytes(base: dict) -> float:
  """The stacked attention and MLP weights (and their quantization scales): what QLoRA quantizes."""
  return bytes_of([x for x in jax.tree.leaves(base["layers"]) if len(x.shape) >= 3])


def measure(overrides: list[str]) -> dict[str, float]:
  config = config_lib.load(["configs/base.yml", *overrides])
  setup = train.build(config)
  with setup.activate():
    trainable = setup.lora.abstract_trainable if setup.lora else setup.abstract_params
    if setup.lora:
      frozen = {"base": setup.lora.abstract_frozen}
    else:
      frozen = {"reference": setup.abstract_params} if setup.needs_reference else {}
    state = jax.eval_shape(setup.new_state, trainable, frozen)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, setup.shardings)
    rows, length = config.micro_batch_size, config.max_target_length
    batch = {k: jax.ShapeDtypeStruct((config.gradient_accumulation_steps, rows, length),
                                     np.float32 if k == "loss_mask" else np.int32, sharding=setup.train_batch_sharding)
             for k in train.BATCH_KEYS}
    if config.precompute_reference:
      batch[train.REFERENCE_KEY] = jax.ShapeDtypeStruct(
          (config.gradient_accumulation_steps, rows), np.float32,
          sharding=distributed.row_sharding(setup.train_batch_sharding))
    analysis = setup.train_step.lower(state, batch).compile().memory_analysis()
  base = frozen["base"] if setup.lora else setup.abstract_params
  return {"trainable params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable)),
          "base weights GiB": bytes_of(base) / 2**30, "projections GiB": projection_bytes(base) / 2**30,
          "arguments GiB": analysis.argument_size_in_bytes / 2**30,
          "temporaries GiB": analysis.temp_size_in_bytes / 2**30,
          "peak GiB": (analysis.argument_size_in_bytes + analysis.temp_size_in_bytes) / 2**30}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model_name", default="qwen3-0.6b")
  args, overrides = parser.parse_known_args()
  common = [f"model_name={args.model_name}", "dtype=bfloat16", "weight_dtype=bfloat16", "per_device_batch_size=1",
            "max_target_length=1024", "remat_policy=full", *overrides]
  rows = {kind: measure([*common, f"peft={kind}"]) for kind in ("none", "lora", "qlora")}
  rows["dpo, frozen copy"] = measure([*common, "mode=dpo"])
  rows["dpo, precomputed"] = measure([*common, "mode=dpo", "precompute_reference=true"])
  keys = list(rows["none"])
  print(f"{'run':16s} | " + " | ".join(f"{k:>17s}" for k in keys))
  for kind, row in rows.items():
    print(f"{kind:16s} | " + " | ".join(f"{row[k]:>17,.3f}" if isinstance(row[k], float) else f"{row[k]:>17,}"
                                         for k in keys))
  print(f"qlora / bf16: projections {rows['qlora']['projections GiB'] / rows['none']['projections GiB']:.3f}, "
        f"whole base {rows['qlora']['base weights GiB'] / rows['none']['base weights GiB']:.3f} "
        f"(embeddings and norms stay bf16)")
  print(f"\ndevice: {jax.devices()[0].device_kind}; command: python3 benchmarks/memory.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
  main()
