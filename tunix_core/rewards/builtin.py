"""Built-in reward functions: a math answer verifier, a regex format check, a length penalty and DAPO's overlong
shaping (lengths in tokens). Each `make_*` takes the config and returns a reward function."""

from collections.abc import Callable, Sequence
import math
import re

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
    "math_answer": make_math_answer, "format": make_format, "length": make_length, "overlong": make_overlong}
