"""Writes the bundled arithmetic data set: assets/arithmetic/{train,eval}.jsonl.

Deterministic (fixed seeds). The eval prompts are generated first and excluded from train, so the two files
are disjoint by construction. Run from the repo root: `.venv/bin/python assets/make_arithmetic.py`.
"""

import json
import pathlib
import random

from tunix_core.data import arithmetic

NUM_TRAIN = 20000
NUM_EVAL = 500
OUT_DIR = pathlib.Path(__file__).resolve().parent / "arithmetic"


def _write(path: pathlib.Path, examples: list[dict]) -> None:
  with open(path, "w") as f:
    for example in examples:
      f.write(json.dumps(example) + "\n")


def main() -> None:
  eval_rng, train_rng = random.Random(1), random.Random(0)
  eval_examples, eval_prompts = [], set()
  while len(eval_examples) < NUM_EVAL:
    example = arithmetic.make_example(eval_rng)
    if example["prompt"] not in eval_prompts:
      eval_prompts.add(example["prompt"])
      eval_examples.append(example)
  train_examples = []
  while len(train_examples) < NUM_TRAIN:
    example = arithmetic.make_example(train_rng)
    if example["prompt"] not in eval_prompts:
      train_examples.append(example)
  OUT_DIR.mkdir(exist_ok=True)
  _write(OUT_DIR / "train.jsonl", train_examples)
  _write(OUT_DIR / "eval.jsonl", eval_examples)
  print(f"wrote {len(train_examples)} train and {len(eval_examples)} eval examples to {OUT_DIR}")


if __name__ == "__main__":
  main()
