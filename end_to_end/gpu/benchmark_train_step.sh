#!/usr/bin/env bash
# One GPU call that times the train step: the default model, then a Llama-3.2-1B-shaped model in bf16 at
# google-tunix's measured setting (batch 2 x 2048, no remat: 20.2k tokens/s, 16% MFU on one H100; see
# ../shared/STACK-NOTES.md), then the same with whole-layer remat at batch 4 x 2048. Each step is time-boxed; the
# whole log goes to $OUT/train_step.log.
# Prepare here first:  bash ../shared/device/wheels.sh   (fills .whl/, carried to the device)
# Run on the device:   bash end_to_end/gpu/benchmark_train_step.sh   (with carry [".whl"])
set -uo pipefail
cd "$(dirname "$0")/../.."
source end_to_end/gpu/env.sh
log=${OUT:-/tmp}/train_step.log
LLAMA_1B=(model_name=llama3.2-1b dtype=bfloat16 weight_dtype=bfloat16 max_target_length=2048)
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  step 30 python3 benchmarks/train_step.py configs/base.yml
  step 55 python3 benchmarks/train_step.py --measure_steps 10 configs/base.yml "${LLAMA_1B[@]}" per_device_batch_size=2 \
    remat_policy=none
  step 55 python3 benchmarks/train_step.py --measure_steps 10 configs/base.yml "${LLAMA_1B[@]}" per_device_batch_size=4 \
    remat_policy=full
} 2>&1 | tee "$log" | grep -v -E "^(WARNING|I0000|E0000|W0000)"
