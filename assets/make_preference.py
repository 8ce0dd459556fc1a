"""Writes the bundled preference data set: assets/arithmetic/preference_{train,eval}.jsonl.

Each line is {"prompt", "chosen", "rejected", "answer"}: an arithmetic problem, its correct completion, and the
same working with a plausible wrong final answer (off by 1 to 3, never negative), in the last equation and in
"The answer is N." alike, so a preference for `chosen` is a preference for the right answer.

Deterministic (fixed seeds). Eval prompts are generated first and left out of train, as are the SFT eval set's
(assets/arithmetic/eval.jsonl), so answer accuracy measured there stays clean. Run from the repo root:
`.venv/bin/python assets/make_preference.py`.
"""

import json
import pathlib
import random

from tunix_core.data import arithmetic

NUM_TRAIN = 5000
NUM_EVAL = 200
OUT_DIR = pathlib.Path(__file__).resolve().parent / "arithmetic"


def make_pair(rng: random.Random) -> dict:
  example = arithmetic.make_example(rng)
  answer, completion = example["answer"], example["completion"]
  wrong = answer + rng.choice([d for d in (-3, -2, -1, 1, 2, 3) if answer + d >= 0])
  ending = f"= {answer}. The answer is {answer}."
  assert completion.endswith(ending), completion
  rejected = completion[:-len(ending)] + f"= {wrong}. The answer is {wrong}."
  assert arithmetic.extract_answer(completion) == answer != arithmetic.extract_answer(rejected) is not None
  return {"prompt": example["prompt"], "chosen": completion, "rejected": rejected, "answer": answer}


def _write(path: pathlib.Path, pairs: list[dict]) -> None:
  with open(path, "w") as f:
    for pair in pairs:
      f.write(json.dumps(pair) + "\n")


def main() -> None:
  eval_rng, train_rng = random.Random(11), random.Random(10)
  eval_pairs, eval_prompts = [], set()
  while len(eval_pairs) < NUM_EVAL:
    pair = make_pair(eval_rng)
    if pair["prompt"] not in eval_prompts:
      eval_prompts.add(pair["prompt"])
      eval_pairs.append(pair)
  with open(OUT_DIR / "eval.jsonl") as f:
    held_out = eval_prompts | {json.loads(line)["prompt"] for line in f}
  train_pairs = []
  while len(train_pairs) < NUM_TRAIN:
    pair = make_pair(train_rng)
    if pair["prompt"] not in held_out:
      train_pairs.append(pair)
  _write(OUT_DIR / "preference_train.jsonl", train_pairs)
  _write(OUT_DIR / "preference_eval.jsonl", eval_pairs)
  print(f"wrote {len(train_pairs)} train and {len(eval_pairs)} eval pairs to {OUT_DIR}")


if __name__ == "__main__":
  main()
