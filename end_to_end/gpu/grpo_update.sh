#!/usr/bin/env bash
# One GPU call that times GRPO's update with one row per completion (through the attention kernels) against
# pack_groups (grouped XLA attention): the bundled task's shapes on the default model, then a Llama-3.2-1B-shaped
# model in bf16 with prompts of up to 513 and completions of up to 512 tokens, 2 groups of 8 an update. Each step is
# time-boxed; the whole log goes to $OUT/grpo_update.log.
# Prepare here first:  bash ../shared/device/wheels.sh   (fills .whl/, carried to the device)
# Run on the device:   bash end_to_end/gpu/grpo_update.sh   (with carry [".whl"])
set -uo pipefail
cd "$(dirname "$0")/../.."
source end_to_end/gpu/env.sh
log=${OUT:-/tmp}/grpo_update.log
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  step 60 python3 benchmarks/grpo_update.py configs/grpo_default.yml
  step 150 python3 benchmarks/grpo_update.py --measure_steps 5 configs/grpo_default.yml model_name=llama3.2-1b \
    dtype=bfloat16 weight_dtype=bfloat16 max_target_length=1024 max_new_tokens=512 per_device_batch_size=16
} 2>&1 | tee "$log" | grep -v -E "^(WARNING|I0000|E0000|W0000)"
