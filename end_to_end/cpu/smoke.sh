#!/usr/bin/env bash
# The README's default run on this machine's CPU, then checks that it learned: loss falls and the run resumes.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=$(mktemp -d)
.venv/bin/python -m tunix_core.train configs/base.yml base_output_directory="$out"
.venv/bin/python - "$out/default/metrics.jsonl" <<'PY'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
losses = [r["loss"] for r in records if "loss" in r]
evals = [r["eval/loss"] for r in records if "eval/loss" in r]
print(f"train loss {losses[0]:.3f} -> {losses[-1]:.3f}; eval loss {evals[0]:.3f} -> {evals[-1]:.3f}")
assert losses[-1] < 0.5 * losses[0], "the default run did not learn"
PY
# Running the same command again finds the finished run and trains nothing more.
.venv/bin/python -m tunix_core.train configs/base.yml base_output_directory="$out" > "$out/rerun.log"
grep -q "from step 300" "$out/rerun.log"
echo "cpu smoke: ok ($out)"
