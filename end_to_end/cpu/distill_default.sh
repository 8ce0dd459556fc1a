#!/usr/bin/env bash
# Distillation on this machine's CPU: the default model trained by SFT (the teacher, when OUT_DIR has none yet),
# then a smaller student distilled from it, and the same student trained by SFT alone for the same steps.
# Writes OUT_DIR/{teacher,student_distill,student_sft}; checks that distillation ends with the lower eval loss.
# Usage: end_to_end/cpu/distill_default.sh OUT_DIR
set -euo pipefail
out=${1:?usage: $0 OUT_DIR}
cd "$(dirname "$0")/../.."
python=${PYTHON:-.venv/bin/python}
timed() {  # run NAME: trains and records its wall time
  local name=$1; shift
  local start=$SECONDS
  "$python" -m tunix_core.train "$@" base_output_directory="$out" run_name="$name"
  echo "$((SECONDS - start))" > "$out/$name/wall_seconds"
}
if [ ! -d "$out/teacher/checkpoints" ]; then
  timed teacher configs/base.yml sample_max_new_tokens=0
fi
timed student_distill configs/distill_default.yml teacher_load_parameters_path="$out/teacher"
timed student_sft configs/distill_default.yml mode=sft
"$python" - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]

def last_eval(run):
  records = [json.loads(line) for line in open(os.path.join(out, run, "metrics.jsonl"))]
  return [r for r in records if "eval/loss" in r][-1]

def wall(run):
  path = os.path.join(out, run, "wall_seconds")
  return f"{int(open(path).read())} s" if os.path.exists(path) else "(earlier run)"

runs = {run: last_eval(run) for run in ("teacher", "student_distill", "student_sft")}
for run, record in runs.items():
  print(f"{run:16s} step {record['step']:4d}  eval/loss {record['eval/loss']:.4f}  wall {wall(run)}")
distilled, sft = runs["student_distill"]["eval/loss"], runs["student_sft"]["eval/loss"]
assert distilled < sft, f"the distilled student's eval loss {distilled:.4f} is not below the SFT student's {sft:.4f}"
PY
echo "distill default: ok ($out)"
