"""Reward functions: the built-ins, user "module:function", weights, and errors / time-outs (never a silent 0)."""

import time
import types

import numpy as np
import pytest

from tunix_core.errors import UserError
from tunix_core.rewards import builtin, runner

CONFIG = types.SimpleNamespace(answer_field="answer", format_regex=r"The answer is -?\d+\.$", max_new_tokens=10,
                               overlong_buffer_tokens=4, reward_functions=[], reward_weights=[])


def _config(**changes):
  return types.SimpleNamespace(**{**vars(CONFIG), **changes})


@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{\\frac{1}{2}} and then \\boxed{42}", "42"),
    ("x = \\boxed{{3}}", "{3}"),
    ("work...\n#### 1,234", "1,234"),
    ("3 + 4 = 7. The answer is 7.", "7"),
    ("The answer is -5. Hmm, the answer is 6.", "6"),
    ("I think 12 or maybe 13", "13"),
    ("no number at all", None),
])
def test_extract_final_answer(text, expected):
  assert builtin.extract_final_answer(text) == expected


def test_math_answer_format_length_and_overlong():
  completions = ["2 + 3 = 5. The answer is 5.", "#### $1,000", "\\boxed{0.5}", "The answer is 4", "nothing"]
  answers = [5, 1000, "1/2", 4, 0]
  ids = [[1] * n for n in (3, 6, 7, 10, 12)]
  math_answer = builtin.make_math_answer(CONFIG)(["p"] * 5, completions, answer=answers, completion_ids=ids)
  assert math_answer == [1.0, 1.0, 0.0, 1.0, 0.0]
  assert builtin.make_format(CONFIG)([], completions, completion_ids=ids) == [1.0, 0.0, 0.0, 0.0, 0.0]
  assert builtin.make_length(CONFIG)([], completions, completion_ids=ids) == [-0.3, -0.6, -0.7, -1.0, -1.2]
  # buffer 4 of 10: free up to 6 tokens, then -1/4 per token, -1 from 10 on
  assert builtin.make_overlong(CONFIG)([], completions, completion_ids=ids) == [0.0, 0.0, -0.25, -1.0, -1.0]
  with pytest.raises(KeyError, match="answer_field"):
    builtin.make_math_answer(CONFIG)([], completions, completion_ids=ids)


@pytest.mark.parametrize("text,expected", [
    ("17 + 16 = 33. 33 - 26 = 7. The answer is 7.", 1.0),   # the bundled task's form, both steps right
    ("7 + 4 = 11. 11 - 8 = 9. The answer is 9.", 0.5),      # 11 - 8 is 3
    ("3 * 7 = 22. The answer is 22.", 0.0),
    ("5 - 9 = -4, then -4 x 3 = -12 and 2.5 / 0.5 = 5", 1.0),  # negatives, decimals, x for times
    ("9 / 0 = 0 and 1 + 1 = 2", 0.5),                          # division by zero is never right
    ("The answer is 7.", 0.0),                                 # no working earns nothing
])
def test_arithmetic_steps_without_prompt(text, expected):
  assert builtin.arithmetic_steps_score(text) == expected


PROBLEM = "Hugo has 7 pencils. He gets 4 more and then gives 8 to Lena. How many pencils does Hugo have now?\n"


@pytest.mark.parametrize("text,expected", [
    ("7 + 4 = 11. 11 - 8 = 3. The answer is 3.", 1.0),
    ("7 + 5 = 12. 12 - 8 = 4. The answer is 4.", 0.5),  # 5 is not in the problem; 12 is an earlier result
    ("7 + 4 = 12. 12 - 8 = 4. The answer is 4.", 0.5),  # a wrong result carried on is not counted twice
    ("1 + 1 = 2. The answer is 2.", 0.0),               # right arithmetic on numbers from nowhere
    ("7 + 4 = 11. 11 - 8 = 9. The answer is 9.", 0.5),
])
def test_arithmetic_steps_against_the_prompt(text, expected):
  assert builtin.arithmetic_steps_score(text, PROBLEM) == expected
  reward = runner.resolve_one(CONFIG, "arithmetic_steps").fn  # registered as a built-in
  assert reward([PROBLEM], [text], answer=[3]) == [expected]
  assert reward([[{"role": "user", "content": PROBLEM}]], [text], answer=[3]) == [expected]  # a chat prompt


def test_check_steps_separates_wrong_results_from_miscopied_operands():
  checks = builtin.check_steps("7 + 5 = 12. 12 - 8 = 3. 3 * 2 = 6.", PROBLEM)
  assert checks == [(True, False), (False, True), (True, False)]  # 5 and 2 are not in the problem; 12 - 8 is 4
  assert builtin.check_steps("7 + 5 = 12.") == [(True, True)]    # without a prompt every operand counts as known


@pytest.mark.parametrize("text,expected", [
    ("7 + 4 = 11. 11 - 8 = 3. The answer is 3.", 1.0),
    ("7 + 5 = 12. 12 - 9 = 3. The answer is 3.", 0.0),  # the right answer from numbers not in the problem
    ("7 + 4 = 12. 12 - 8 = 3. The answer is 3.", 0.0),  # the right answer after wrong steps
    ("7 + 4 = 11. 11 - 8 = 3. The answer is 4.", 0.0),  # right working, wrong answer
    ("The answer is 3.", 0.0),                          # no working
])
def test_faithful_answer_needs_the_answer_and_every_step(text, expected):
  reward = runner.resolve_one(CONFIG, "faithful_answer").fn  # registered as a built-in
  assert reward([PROBLEM], [text], answer=[3]) == [expected]
  assert reward([[{"role": "user", "content": PROBLEM}]], [text], answer=[3]) == [expected]
  with pytest.raises(KeyError, match="answer_field"):
    reward([PROBLEM], [text])


def _user_module(tmp_path, monkeypatch, source: str) -> str:
  name = f"my_rewards_{tmp_path.name}"  # one module name per test: imports are cached
  (tmp_path / f"{name}.py").write_text(source)
  monkeypatch.syspath_prepend(str(tmp_path))
  return name


def _score(functions, error_default=None, timeout_s=5.0, n=4):
  return runner.score(functions, ["p"] * n, [f"c{i}" for i in range(n)], {"answer": list(range(n))},
                      [[i] for i in range(n)], timeout_s=timeout_s, error_default=error_default)


def test_user_functions_weights_and_metrics(tmp_path, monkeypatch):
  module = _user_module(tmp_path, monkeypatch, """
def by_answer(prompts, completions, answer, completion_ids, **columns):
  return [float(a) for a in answer]
""")
  functions = runner.resolve(_config(reward_functions=[f"{module}:by_answer", "length"], reward_weights=[2.0, 10.0]))
  scores = _score(functions)
  np.testing.assert_allclose(scores.total, 2.0 * np.arange(4) + 10.0 * -0.1)
  metrics = scores.metrics()
  assert metrics[f"reward/{module}:by_answer/mean"] == 1.5 and metrics["reward/length/mean"] == pytest.approx(-0.1)
  assert metrics[f"reward/{module}:by_answer/errors"] == 0.0
  assert metrics["reward/mean"] == pytest.approx(2.0)
  for bad, message in (("nomodule_xyz:f", "cannot import module"), (f"{module}:missing", "has no function"),
                       ("not_a_builtin", "neither a built-in")):
    with pytest.raises(UserError, match=message):
      runner.resolve(_config(reward_functions=[bad]))


def test_failures_stop_the_run_naming_the_function_or_give_the_default(tmp_path, monkeypatch):
  module = _user_module(tmp_path, monkeypatch, """
import time
def boom(prompts, completions, **columns):
  raise ValueError("bad input")
def slow(prompts, completions, **columns):
  time.sleep(5)
  return [1.0] * len(completions)
def short(prompts, completions, **columns):
  return [1.0]
def nan(prompts, completions, **columns):
  return [float("nan")] * len(completions)
""")
  cases = {"boom": "raised ValueError: bad input", "slow": "timed out after 0.2 s", "short": "returned 1 values",
           "nan": "returned a value that is not a finite number"}
  for name, message in cases.items():
    functions = runner.resolve(_config(reward_functions=[f"{module}:{name}", "length"]))
    start = time.perf_counter()
    with pytest.raises(UserError, match=f"reward function '{module}:{name}' {message}"):
      _score(functions, timeout_s=0.2)
    assert time.perf_counter() - start < 2.0  # a hung function is not waited for
    scores = _score(functions, error_default=-1.0, timeout_s=0.2)
    np.testing.assert_array_equal(scores.per_function[f"{module}:{name}"], -1.0)
    assert scores.metrics()[f"reward/{module}:{name}/errors"] == 4.0
    assert scores.metrics()["reward/length/errors"] == 0.0
