#!/usr/bin/env bash
# SFT (when OUT_DIR has none yet), then DPO from it, on this machine's CPU; checks the DPO run's numbers.
# Usage: end_to_end/cpu/dpo_default.sh OUT_DIR
set -euo pipefail
out=${1:?usage: $0 OUT_DIR}
cd "$(dirname "$0")/../.."
source end_to_end/cpu/after_sft.sh
after_sft configs/dpo_default.yml "$out" "DPO"
"$python" - "$out/dpo_default/metrics.jsonl" <<'PY'
import json, math, sys
records = [json.loads(line) for line in open(sys.argv[1])]
train = [r for r in records if "loss" in r]
evals = [r["eval/loss"] for r in records if "eval/loss" in r]
first, late = train[0], train[-4:]  # each logged step sees 16 pairs: average the last four
accuracy = sum(r["rewards/accuracy"] for r in late) / len(late)
margin = sum(r["rewards/margin"] for r in late) / len(late)
print(f"DPO step {first['step']}: loss {first['loss']:.6f} (ln 2 = {math.log(2):.6f}); last {len(late)} logged "
      f"steps: rewards/accuracy {accuracy:.3f}, rewards/margin {margin:.3f}; eval loss {' -> '.join(f'{e:.4f}' for e in evals)}")
assert first["step"] == 1 and abs(first["loss"] - math.log(2)) < 1e-6, "policy and reference differ at step 1"
assert accuracy > 0.65, "rewards/accuracy did not climb well above 0.5"
assert evals[-1] < math.log(2), "the eval loss did not fall below ln 2"
PY
echo "dpo default: ok ($out)"
