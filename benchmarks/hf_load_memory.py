"""Peak host memory of loading a Hugging Face checkpoint with hf_path=, against the checkpoint's size.

  python3 benchmarks/hf_load_memory.py [--model_name qwen2.5-0.5b] [--dtype bfloat16] [--workdir /tmp/hf_mem]

Writes a randomly initialised checkpoint of the preset (with tunix_core's own exporter), then loads it
in a fresh process and reports the growth of that process's peak resident memory during the load. On a
CPU the loaded parameters themselves live in host memory, so 1.0x is the floor.
"""

import argparse
import json
import os
import subprocess
import sys

LOAD_SCRIPT = """
import json, sys, time
import jax

def high_water_mark():  # VmHWM: this process's peak resident memory (ru_maxrss would include the parent's)
  for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
      return int(line.split()[1]) * 1024

from tunix_core import config as config_lib, train
config = config_lib.load(["configs/base.yml", "hf_path=" + sys.argv[1], "weight_dtype=" + sys.argv[2],
                          "tokenizer_path=assets/tokenizer.model"])
setup = train.build(config)
before = high_water_mark()
start = time.perf_counter()
with setup.activate():
  from tunix_core.models import hf_weights
  params = hf_weights.load(config.hf_path, setup.model_config, setup.abstract_params, setup.param_shardings)
  jax.block_until_ready(params)
seconds = time.perf_counter() - start
peak = high_water_mark()
print(json.dumps({"rss_before": before, "rss_peak": peak, "seconds": seconds}))
"""


def make_checkpoint(model_name: str, dtype: str, directory: str) -> int:
  """Writes a random checkpoint of the preset; returns the bytes of its safetensors files."""
  from tunix_core import config as config_lib, export, train  # pylint: disable=import-outside-toplevel
  config = config_lib.load(["configs/base.yml", f"model_name={model_name}", f"weight_dtype={dtype}"])
  setup = train.build(config)
  with setup.activate():
    from tunix_core import models  # pylint: disable=import-outside-toplevel
    params = models.init_params(setup.model_config, 0, setup.param_shardings)
    export.write(config, setup.model_config, params, directory, dtype, max_shard_bytes=2**29)
  return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.endswith(".safetensors"))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model_name", default="qwen2.5-0.5b")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--workdir", default="/tmp/hf_load_memory")
  args = parser.parse_args()
  directory = os.path.join(args.workdir, f"{args.model_name}-{args.dtype}")
  if not os.path.isdir(directory):
    size = make_checkpoint(args.model_name, args.dtype, directory)
  else:
    size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.endswith(".safetensors"))
  result = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, directory, args.dtype], capture_output=True, text=True,
                          check=True, env={**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")})
  measured = json.loads(result.stdout.strip().splitlines()[-1])
  growth = measured["rss_peak"] - measured["rss_before"]
  rows = {"model": args.model_name, "checkpoint dtype": args.dtype, "checkpoint size MB": size / 1e6,
          "RSS before load MB": measured["rss_before"] / 1e6, "peak RSS during load MB": measured["rss_peak"] / 1e6,
          "peak growth / checkpoint size": growth / size, "load seconds": measured["seconds"]}
  for key, value in rows.items():
    print(f"{key:32s} | {value:,.3f}" if isinstance(value, float) else f"{key:32s} | {value}")
  print(f"\ncommand: python3 benchmarks/hf_load_memory.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
  main()
