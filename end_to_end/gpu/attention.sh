#!/usr/bin/env bash
# One GPU call for the attention kernels: correctness of the compiled (non-interpreted) kernels against
# XLA on the device, then the TFLOP/s table of benchmarks/attention.py, then the train step with each
# attention implementation. Prepare here first: bash ../shared/device/wheels.sh  (carry [".whl"]).
set -euo pipefail
cd "$(dirname "$0")/../.."
source end_to_end/gpu/env.sh
python3 end_to_end/gpu/check_kernels.py
python3 benchmarks/attention.py
for impl in xla cudnn flash; do
  python3 benchmarks/train_step.py --measure_steps 10 configs/base.yml model_name=llama3.2-1b dtype=bfloat16 \
    weight_dtype=bfloat16 max_target_length=2048 per_device_batch_size=2 remat_policy=none attention=$impl \
    | grep -E "step ms \(median\)|tokens/s|MFU|command"
done
