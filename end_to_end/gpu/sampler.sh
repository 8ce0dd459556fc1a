#!/usr/bin/env bash
# One GPU call for generation: the decode kernel's tests compiled for the GPU (tests/test_decode_attention.py
# with JAX_PLATFORMS=cuda), then the sampler's speed (benchmarks/sampler.py) for the llama3.2-1b preset in bf16
# with random weights at batch 1 and 256 (each batch size compiles the unrolled layers anew: ~50 s on an H200),
# prompt 128 tokens, 128 new: prefill tokens/s, decode tokens/s and the decode step against
# its memory floor (parameters + KV cache read per step / the measured copy bandwidth). The issue's target: a
# decode step within 1.5x of the floor at batch 1. Times one buffer per layer (scan_layers=false) with
# attention=auto (the Pallas decode kernel), the same in BASELINE_DIR when given (another revision's tree, e.g.
# `git archive <rev> | tar -x -C .baseline`, carried: a same-device before/after), then the default scanned
# layout. Each step is time-boxed; the whole log goes to $OUT/sampler.log.
# Prepare here first:  bash ../shared/device/wheels.sh   (fills .whl/, carried to the device)
# Run on the device:   [BASELINE_DIR=.baseline] bash end_to_end/gpu/sampler.sh   (carry [".whl"] [+ ".baseline"])
set -uo pipefail
cd "$(dirname "$0")/../.."
source end_to_end/gpu/env.sh
log=${OUT:-/tmp}/sampler.log
LLAMA_1B=(model_name=llama3.2-1b dtype=bfloat16 weight_dtype=bfloat16 remat_policy=none)
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  step 60 env JAX_PLATFORMS=cuda python3 -m pytest -q -p no:cacheprovider tests/test_decode_attention.py
  step 130 python3 benchmarks/sampler.py --batch_sizes 1,256 configs/base.yml "${LLAMA_1B[@]}" scan_layers=false
  if [ -n "${BASELINE_DIR:-}" ]; then
    (cd "$BASELINE_DIR" && PYTHONPATH=/tmp/site:$PWD step 130 python3 benchmarks/sampler.py \
      --batch_sizes 1,256 configs/base.yml "${LLAMA_1B[@]}" scan_layers=false)
  fi
  step 130 python3 benchmarks/sampler.py --batch_sizes 1,256 configs/base.yml "${LLAMA_1B[@]}" scan_layers=true
} 2>&1 | tee "$log" | grep -v -E "^(WARNING|I0000|E0000|W0000)"
