#!/usr/bin/env bash
# One GPU call that times the sampler (benchmarks/sampler.py) for the llama3.2-1b preset in bf16 with random
# weights at batch 1, 16, 64 and 256 (prompt 128 tokens, 128 new): prefill tokens/s, decode tokens/s and the
# decode step against its memory floor (parameters + KV cache read per step / the measured copy bandwidth).
# The issue's target: a decode step within 1.5x of the floor at batch 1. Runs the default layout (layers scanned
# for training; generation splits the stack into one module per layer before decoding), then unscanned, then
# with attention=xla, which decodes without the Pallas decode kernel.
# Prepare here first:  bash ../shared/device/wheels.sh   (fills .whl/, carried to the device)
# Run on the device:   bash end_to_end/gpu/sampler.sh   (with carry [".whl"])
set -euo pipefail
cd "$(dirname "$0")/../.."
source end_to_end/gpu/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
LLAMA_1B="model_name=llama3.2-1b dtype=bfloat16 weight_dtype=bfloat16 remat_policy=none"
# shellcheck disable=SC2086
python3 benchmarks/sampler.py --batch_sizes 1,16,64,256 configs/base.yml $LLAMA_1B scan_layers=true
# shellcheck disable=SC2086
python3 benchmarks/sampler.py --batch_sizes 1,16,64,256 configs/base.yml $LLAMA_1B scan_layers=false
# shellcheck disable=SC2086
python3 benchmarks/sampler.py --batch_sizes 1,16,64,256 configs/base.yml $LLAMA_1B scan_layers=false attention=xla
