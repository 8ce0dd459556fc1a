"""Where a model fails on the bundled arithmetic task: per problem kind, the accuracy of its completions, pass@n,
and how often a right answer comes with wrong working. Reads what `tunix_core.generate` writes for the eval prompts:

  python3 -m tunix_core.generate configs/base.yml load_parameters_path=RUN prompts_file=assets/arithmetic/eval.jsonl \\
      max_new_tokens=32 temperature=0 > greedy.jsonl          # or temperature=1 num_samples=8 > samples.jsonl
  python3 benchmarks/arithmetic_breakdown.py greedy.jsonl [--eval assets/arithmetic/eval.jsonl]

Columns: accuracy = the mean over completions of the math verifier (the greedy one is eval/accuracy of the RL
modes); pass@n = the share of prompts with at least one right completion (n = completions per prompt); lucky = the
share of right answers whose "a op b = c" working has a wrong result or an operand that is not a number of the
problem or an earlier result; miscopied = the share of completions with an operand that is neither a number of the
problem nor an earlier result.
"""

import argparse
import collections
import json
import sys

from tunix_core.data.arithmetic import extract_answer, problem_kind
from tunix_core.rewards.builtin import check_steps


def breakdown(completions: list[dict], problems: list[dict]) -> dict[str, dict[str, float]]:
  """{kind (and "all"): {"prompts", "accuracy", "pass", "lucky", "miscopied"}} over completions grouped by
  prompt_index."""
  by_prompt = collections.defaultdict(list)
  for c in completions:
    by_prompt[c["prompt_index"]].append(c["text"])
  counts = collections.defaultdict(collections.Counter)
  for index, texts in by_prompt.items():
    problem = problems[index]
    right = [extract_answer(t) == problem["answer"] for t in texts]
    for kind in (problem_kind(problem["prompt"]), "all"):
      tally = counts[kind]
      tally["prompts"] += 1
      tally["completions"] += len(texts)
      tally["right"] += sum(right)
      tally["solved"] += any(right)
      for text, ok in zip(texts, right):
        checks = check_steps(text, problem["prompt"])
        # As faithful_answer: no working at all is not faithful working.
        tally["lucky"] += ok and not (checks and all(c.result_right and c.operands_known for c in checks))
        tally["miscopied"] += not all(c.operands_known for c in checks)
  return {kind: {"prompts": t["prompts"], "accuracy": t["right"] / t["completions"], "pass": t["solved"] / t["prompts"],
                 "lucky": t["lucky"] / max(t["right"], 1), "miscopied": t["miscopied"] / t["completions"]}
          for kind, t in counts.items()}


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("completions", help="JSONL written by python3 -m tunix_core.generate ... prompts_file=EVAL")
  parser.add_argument("--eval", default="assets/arithmetic/eval.jsonl", help="the prompts file they answer")
  args = parser.parse_args()
  try:
    with open(args.eval) as f:
      problems = [json.loads(line) for line in f if line.strip()]
    with open(args.completions) as f:
      completions = [json.loads(line) for line in f if line.strip()]
    if not completions or max(c["prompt_index"] for c in completions) >= len(problems):
      raise ValueError(f"no completions, or prompt indices past the {len(problems)} prompts of {args.eval}")
    rows = breakdown(completions, problems)
  except (OSError, ValueError, KeyError) as e:
    print(f"arithmetic_breakdown: error: {e}; give the JSONL that python3 -m tunix_core.generate wrote for "
          f"prompts_file={args.eval}", file=sys.stderr)
    return 2
  per_prompt = len(completions) // len({c["prompt_index"] for c in completions})
  print(f"| kind | prompts | accuracy | pass@{per_prompt} | lucky | miscopied |\n| --- | --- | --- | --- | --- | --- |")
  for kind in sorted(rows, key=lambda k: (k == "all", k)):
    r = rows[kind]
    print(f"| {kind} | {r['prompts']} | {r['accuracy']:.3f} | {r['pass']:.3f} | {r['lucky']:.3f} | {r['miscopied']:.3f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
