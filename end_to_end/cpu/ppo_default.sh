#!/usr/bin/env bash
# SFT (when OUT_DIR has none yet), then PPO from it, on this machine's CPU; checks that reward/mean (math answer +
# format) of the last five rollout batches is above that of the first five.
# Usage: end_to_end/cpu/ppo_default.sh OUT_DIR
set -euo pipefail
out=${1:?usage: $0 OUT_DIR}
cd "$(dirname "$0")/../.."
source end_to_end/cpu/after_sft.sh
after_sft configs/ppo_default.yml "$out" "PPO"
"$python" - "$out/ppo_default/metrics.jsonl" <<'PY'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
accuracy = [(r["step"], r["eval/accuracy"]) for r in records if "eval/accuracy" in r]
train = [r for r in records if "reward/mean" in r]
early = sum(r["reward/mean"] for r in train[:5]) / 5
late = sum(r["reward/mean"] for r in train[-5:]) / 5
print("eval/accuracy by step: " + ", ".join(f"{s}: {a:.3f}" for s, a in accuracy))
print("critic/explained_variance by rollout: " + ", ".join(f"{r['critic/explained_variance']:.2f}" for r in train))
print(f"reward/mean, first five rollouts {early:.3f} -> last five {late:.3f}")
assert late > early, "reward/mean did not rise"
PY
echo "ppo default: ok ($out)"
