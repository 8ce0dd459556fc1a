#!/usr/bin/env bash
# SFT (when OUT_DIR has none yet), then GRPO from it, on this machine's CPU; checks that eval/accuracy (greedy, 200
# held-out problems, answers checked by the math verifier) rises by at least 15 points.
# Usage: end_to_end/cpu/grpo_default.sh OUT_DIR
set -euo pipefail
out=${1:?usage: $0 OUT_DIR}
cd "$(dirname "$0")/../.."
start=$SECONDS
if [ ! -d "$out/sft/checkpoints" ]; then
  .venv/bin/python -m tunix_core.train configs/base.yml base_output_directory="$out" run_name=sft \
    sample_max_new_tokens=0
fi
sft_done=$SECONDS
.venv/bin/python -m tunix_core.train configs/grpo_default.yml base_output_directory="$out" \
  load_parameters_path="$out/sft"
echo "wall time: SFT $((sft_done - start)) s, GRPO $((SECONDS - sft_done)) s"
.venv/bin/python - "$out/grpo_default/metrics.jsonl" <<'PY'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
accuracy = [(r["step"], r["eval/accuracy"]) for r in records if "eval/accuracy" in r]
train = [r for r in records if "reward/mean" in r]
early = sum(r["reward/mean"] for r in train[:5]) / 5
late = sum(r["reward/mean"] for r in train[-5:]) / 5
print("eval/accuracy by step: " + ", ".join(f"{s}: {a:.3f}" for s, a in accuracy))
print(f"reward/mean, first five rollouts {early:.3f} -> last five {late:.3f}")
assert accuracy[0][0] == 0, "no eval/accuracy before the first update"
gain = accuracy[-1][1] - accuracy[0][1]
assert gain >= 0.15, f"eval/accuracy rose by {100 * gain:.1f} points, expected at least 15"
PY
echo "grpo default: ok ($out)"
