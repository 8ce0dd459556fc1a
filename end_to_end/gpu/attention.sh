#!/usr/bin/env bash
# One GPU call for the attention kernels, each step time-boxed so that one failure or hang costs only its own
# step: correctness of the compiled (non-interpreted) kernels against XLA on the device, the TFLOP/s table of
# benchmarks/attention.py, the train step with each attention implementation (with peak device memory), our
# kernel's tile-size sweep, then the compiled memory of full / LoRA / QLoRA training.
# Prepare here first: bash ../shared/device/wheels.sh  (carry [".whl"]). The whole log goes to $OUT/attention.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
source end_to_end/gpu/env.sh
log=${OUT:-/tmp}/attention.log
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__, jax.devices())'
  step 100 python3 end_to_end/gpu/check_kernels.py
  step 140 python3 benchmarks/attention.py --impls xla,cudnn,flash
  for impl in xla cudnn flash; do
    step 65 python3 benchmarks/train_step.py --measure_steps 10 --warmup_steps 2 configs/base.yml \
      model_name=llama3.2-1b dtype=bfloat16 weight_dtype=bfloat16 max_target_length=2048 per_device_batch_size=2 \
      remat_policy=none attention=$impl
  done
  step 90 python3 benchmarks/attention.py --block_sweep
  step 45 python3 benchmarks/memory.py
} 2>&1 | tee "$log" | grep -v -E "^(WARNING|I0000|E0000|W0000)"
