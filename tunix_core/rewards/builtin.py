"""Built-in reward functions: a math answer verifier, a check of the worked arithmetic, the two together, a regex
format check, a length penalty and DAPO's overlong shaping (lengths in tokens). Each `make_*` takes the config and returns a reward function."""

from collections.abc import Callable, Sequence
import math
import re
from typing import NamedTuple

RewardFn = Callable[..., list[float]]

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"
_FINAL_FORMS = (
    re.compile(r"####\s*(" + _NUMBER + r")"),                      # GSM8K
    re.compile(r"[Tt]he (?:final )?answer is:?\s*(" + _NUMBER + r")"),  # the bundled task, and common prose
)
_ANY_NUMBER = re.compile(_NUMBER)


def _boxed(text: str) -> str | None:
  """The content of the last \\boxed{...} (braces balanced), or None."""
  start = text.rfind("\\boxed{")
  if start < 0:
    return None
  depth, i = 1, start + len("\\boxed{")
  for j in range(i, len(text)):
    depth += {"{": 1, "}": -1}.get(text[j], 0)
    if depth == 0:
      return text[i:j].strip()
  return None


def extract_final_answer(text: str) -> str | None:
  """A completion's final answer: the last \\boxed{...}, else the last "#### N", else the last "The answer is N",
  else the last number in the text; None when there is none."""
  boxed = _boxed(text)
  if boxed is not None:
    return boxed
  for form in _FINAL_FORMS:
    found = form.findall(text)
    if found:
      return found[-1]
  numbers = _ANY_NUMBER.findall(text)
  return numbers[-1] if numbers else None


def _as_number(text: str) -> float | None:
  cleaned = text.strip().rstrip(".").replace(",", "").replace("$", "").replace(" ", "")
  try:
    return float(cleaned)
  except ValueError:
    return None


def answers_match(predicted: str | None, reference) -> bool:
  """Numerically equal when both read as numbers (so "1,000", "$1000" and 1000.0 match 1000), else equal as
  whitespace-stripped text."""
  if predicted is None or reference is None:
    return False
  a, b = _as_number(predicted), _as_number(str(reference))
  if a is not None and b is not None:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
  return predicted.strip() == str(reference).strip()


def make_math_answer(config) -> RewardFn:
  """1.0 when the completion's final answer (`extract_final_answer`) equals the record's `answer_field`, else 0.0."""
  field = config.answer_field

  def math_answer(prompts: Sequence, completions: Sequence[str], **columns) -> list[float]:
    if field not in columns:
      raise KeyError(f"the prompt records have no '{field}' field (answer_field)")
    return [float(answers_match(extract_final_answer(c), a)) for c, a in zip(completions, columns[field])]

  return math_answer


# One worked step "a op b = c" (integers or decimals; op one of + - * / x ×), e.g. "17 + 16 = 33".
_STEP = re.compile(r"(-?\d+(?:\.\d+)?)\s*([-+*/x×])\s*(-?\d+(?:\.\d+)?)\s*=\s*(-?\d+(?:\.\d+)?)")
_OPS: dict[str, Callable[[float, float], float | None]] = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "x": lambda a, b: a * b,
    "×": lambda a, b: a * b, "/": lambda a, b: a / b if b else None}


def _prompt_text(prompt) -> str:
  """A prompt as text: itself, or the contents of its chat messages."""
  return prompt if isinstance(prompt, str) else " ".join(str(m.get("content", "")) for m in prompt)


class StepCheck(NamedTuple):
  """One worked step "a op b = c": whether c is a op b, and whether both operands are numbers of the prompt or
  earlier results (True when no prompt was given)."""
  result_right: bool
  operands_known: bool


def check_steps(text: str, prompt: str | None = None) -> list[StepCheck]:
  """Each "a op b = c" statement of the completion, in order, checked (an earlier result counts as known)."""
  known = None if prompt is None else {float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", prompt)}
  checks = []
  for a, op, b, c in _STEP.findall(text):
    value = _OPS[op](float(a), float(b))
    result_right = value is not None and math.isclose(value, float(c), rel_tol=1e-9, abs_tol=1e-9)
    operands_known = known is None or (float(a) in known and float(b) in known)
    if known is not None:
      known.add(float(c))
    checks.append(StepCheck(result_right, operands_known))
  return checks


def arithmetic_steps_score(text: str, prompt: str | None = None) -> float:
  """The fraction of the completion's "a op b = c" statements that are right: c is a op b and, when the prompt is
  given, each operand is a number of the prompt or an earlier statement's result (so "1 + 1 = 2" padding, or a
  number miscopied from the problem, does not count). 0.0 when it has none, so skipping the working earns nothing."""
  checks = check_steps(text, prompt)
  return sum(c.result_right and c.operands_known for c in checks) / len(checks) if checks else 0.0


def make_arithmetic_steps(config) -> RewardFn:
  """`arithmetic_steps_score` of each completion against its prompt: a per-step signal for chain-of-thought
  arithmetic, where the final answer alone (math_answer) rewards nothing until every step is right."""

  def arithmetic_steps(prompts: Sequence, completions: Sequence[str], **columns) -> list[float]:
    return [arithmetic_steps_score(c, _prompt_text(p)) for p, c in zip(prompts, completions)]

  return arithmetic_steps


def make_faithful_answer(config) -> RewardFn:
  """1.0 when the final answer is right (math_answer) and so is every worked step (arithmetic_steps_score 1.0: each
  "a op b = c" right, its operands numbers of the prompt or earlier results), else 0.0. The final answer alone
  also pays for a right answer after wrong working, and GRPO on it learns to write such working (RESULTS.md)."""
  math_answer = make_math_answer(config)

  def faithful_answer(prompts: Sequence, completions: Sequence[str], **columns) -> list[float]:
    answers = math_answer(prompts, completions, **columns)
    return [float(right == 1.0 and arithmetic_steps_score(c, _prompt_text(p)) == 1.0)
            for right, p, c in zip(answers, prompts, completions)]

  return faithful_answer


def make_format(config) -> RewardFn:
  """1.0 when `format_regex` matches somewhere in the completion (re.search; anchor it to demand more)."""
  pattern = re.compile(config.format_regex, re.DOTALL)

  def format_reward(prompts: Sequence, completions: Sequence[str], **columns) -> list[float]:
    return [float(pattern.search(c) is not None) for c in completions]

  return format_reward


def make_length(config) -> RewardFn:
  """-(completion tokens / max_new_tokens), in [-1, 0]: shorter is better; scale it with its weight."""
  limit = config.max_new_tokens

  def length(prompts: Sequence, completions: Sequence[str], completion_ids: Sequence[Sequence[int]],
             **columns) -> list[float]:
    return [-len(ids) / limit for ids in completion_ids]

  return length


def overlong_penalty(num_tokens: int, max_tokens: int, buffer: int) -> float:
  """DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, eq. 13): 0 up to max_tokens - buffer,
  then falling linearly to -1 at max_tokens, -1 beyond."""
  start = max_tokens - buffer
  if num_tokens <= start:
    return 0.0
  if num_tokens <= max_tokens:
    return (start - num_tokens) / buffer
  return -1.0


def make_overlong(config) -> RewardFn:
  """`overlong_penalty` of each completion with max_tokens = max_new_tokens and buffer = overlong_buffer_tokens."""
  limit, buffer = config.max_new_tokens, config.overlong_buffer_tokens

  def overlong(prompts: Sequence, completions: Sequence[str], completion_ids: Sequence[Sequence[int]],
               **columns) -> list[float]:
    return [overlong_penalty(len(ids), limit, buffer) for ids in completion_ids]

  return overlong


BUILTINS: dict[str, Callable[..., RewardFn]] = {
    "math_answer": make_math_answer, "arithmetic_steps": make_arithmetic_steps,
    "faithful_answer": make_faithful_answer, "format": make_format,
    "length": make_length, "overlong": make_overlong}
