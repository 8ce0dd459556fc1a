#!/usr/bin/env bash
# SFT (when OUT_DIR has none yet), then GRPO from it, on this machine's CPU; checks that eval/accuracy (greedy, all 500
# held-out problems, final answers checked by the math verifier) of the run's model, the moving average of its weights,
# rises by at least 15 points. The whole script takes about 6 minutes on 2 CPU cores (SFT 1, GRPO's 400 updates 5).
# Usage: end_to_end/cpu/grpo_default.sh OUT_DIR
set -euo pipefail
out=${1:?usage: $0 OUT_DIR}
cd "$(dirname "$0")/../.."
source end_to_end/cpu/after_sft.sh
after_sft configs/grpo_default.yml "$out" "GRPO"
"$python" - "$out/grpo_default/metrics.jsonl" <<'PY'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
accuracy = [(r["step"], r["eval/accuracy"]) for r in records if "eval/accuracy" in r]
train = [r for r in records if "reward/mean" in r]
early = sum(r["reward/mean"] for r in train[:5]) / 5
late = sum(r["reward/mean"] for r in train[-5:]) / 5
policy = [(r["step"], r["eval/policy_accuracy"]) for r in records if "eval/policy_accuracy" in r]
print("eval/accuracy by step: " + ", ".join(f"{s}: {a:.3f}" for s, a in accuracy))
if policy:
    print("the trained weights themselves (eval/policy_accuracy): " + ", ".join(f"{s}: {a:.3f}" for s, a in policy))
print(f"reward/mean, first five rollouts {early:.3f} -> last five {late:.3f}")
assert accuracy[0][0] == 0, "no eval/accuracy before the first update"
gain = accuracy[-1][1] - accuracy[0][1]
assert gain >= 0.15, f"eval/accuracy rose by {100 * gain:.1f} points, expected at least 15"
PY
echo "grpo default: ok ($out)"
