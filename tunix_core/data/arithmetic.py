"""The bundled verifiable task: small arithmetic word problems with a parseable final answer.

Every completion shows its working and ends in "The answer is N." so that rewards and correct-vs-wrong
preference pairs can be checked with `extract_answer`. Numbers stay small (results below 100) so that a
tiny model can learn the format within a short run.
"""

import random
import re

_PEOPLE = (
  ("Anna", "She"), ("Ben", "He"), ("Carla", "She"), ("David", "He"), ("Emma", "She"), ("Frank", "He"),
  ("Grace", "She"), ("Hugo", "He"), ("Ivy", "She"), ("Jack", "He"), ("Lena", "She"), ("Max", "He"),
)
_OBJECTS = ("apples", "pears", "books", "coins", "stamps", "marbles", "pencils", "cookies", "shells", "cards")

# The only accepted final form; the period must end the sentence so "4.5." is not read as 4.
_ANSWER = re.compile(r"The answer is (-?\d+)\.(?=\s|$)")


def _add(rng: random.Random, name: str, pronoun: str, other: str, obj: str) -> tuple[str, str, int]:
  a, b = rng.randint(1, 20), rng.randint(1, 20)
  c = a + b
  prompt = f"{name} has {a} {obj}. {pronoun} gets {b} more. How many {obj} does {name} have now?"
  return prompt, f"{a} + {b} = {c}.", c


def _subtract(rng: random.Random, name: str, pronoun: str, other: str, obj: str) -> tuple[str, str, int]:
  a = rng.randint(2, 30)
  b = rng.randint(1, a - 1)
  c = a - b
  prompt = f"{name} has {a} {obj} and gives {b} to {other}. How many {obj} does {name} have left?"
  return prompt, f"{a} - {b} = {c}.", c


def _multiply(rng: random.Random, name: str, pronoun: str, other: str, obj: str) -> tuple[str, str, int]:
  a, b = rng.randint(2, 9), rng.randint(2, 9)
  c = a * b
  prompt = f"{name} has {a} bags with {b} {obj} in each bag. How many {obj} does {name} have?"
  return prompt, f"{a} * {b} = {c}.", c


def _two_step(rng: random.Random, name: str, pronoun: str, other: str, obj: str) -> tuple[str, str, int]:
  a, b = rng.randint(1, 20), rng.randint(1, 20)
  c = rng.randint(1, a + b - 1)
  d = a + b
  e = d - c
  prompt = (f"{name} has {a} {obj}. {pronoun} gets {b} more and then gives {c} to {other}. "
            f"How many {obj} does {name} have now?")
  return prompt, f"{a} + {b} = {d}. {d} - {c} = {e}.", e


_TEMPLATES = (_add, _subtract, _multiply, _two_step)


def make_example(rng: random.Random) -> dict:
  """One problem: {"prompt": question + newline, "completion": working + "The answer is N.", "answer": N}."""
  template = rng.choice(_TEMPLATES)
  (name, pronoun), (other, _) = rng.sample(_PEOPLE, 2)
  prompt, working, answer = template(rng, name, pronoun, other, rng.choice(_OBJECTS))
  return {"prompt": prompt + "\n", "completion": f"{working} The answer is {answer}.", "answer": answer}


def problem_kind(prompt: str) -> str:
  """Which template wrote `prompt`: "a + b", "a - b", "a * b" or "a + b - c" (per-kind results tell a model's
  missing arithmetic facts from a failure to chain two steps)."""
  if "and then gives" in prompt:
    return "a + b - c"
  if " bags with " in prompt:
    return "a * b"
  if " and gives " in prompt:
    return "a - b"
  if " more. How many " in prompt:
    return "a + b"
  raise ValueError(f"not a bundled arithmetic problem: {prompt!r}")


def extract_answer(text: str) -> int | None:
  """The N of "The answer is N." in `text`; None when absent or when the text states different answers."""
  answers = {int(m) for m in _ANSWER.findall(text)}
  return answers.pop() if len(answers) == 1 else None
