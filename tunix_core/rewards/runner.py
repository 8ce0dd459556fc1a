"""Resolving `reward_functions` and scoring completions with them: weights, time-outs, errors, metrics.

A function that raises, times out (reward_timeout_s) or returns something other than one finite number per
completion stops the run with an error naming it; with reward_error_default set, that call's completions get the
default instead, counted as reward/<name>/errors. Never a silent zero.
"""

from collections.abc import Callable, Sequence
import dataclasses
import importlib
import math
import threading

import numpy as np

from tunix_core.errors import UserError
from tunix_core.rewards.builtin import BUILTINS


@dataclasses.dataclass(frozen=True)
class RewardFunction:
  name: str       # as written in reward_functions
  fn: Callable
  weight: float


def _import(spec: str) -> Callable:
  module_name, sep, attr = spec.partition(":")
  if not sep or not module_name or not attr:
    raise UserError(f"reward_functions: {spec!r} is neither a built-in ({', '.join(BUILTINS)}) nor "
                    "\"module:function\"")
  try:
    module = importlib.import_module(module_name)
  except Exception as e:  # any import failure is the user's module's to fix
    raise UserError(f"reward_functions: cannot import module {module_name!r} for {spec!r}: "
                    f"{type(e).__name__}: {e}") from e
  fn = getattr(module, attr, None)
  if not callable(fn):
    raise UserError(f"reward_functions: {module_name!r} has no function {attr!r}")
  return fn


def resolve(config) -> list[RewardFunction]:
  """The configured reward functions with their weights (reward_weights, or 1 each when empty)."""
  names = list(config.reward_functions)
  weights = list(config.reward_weights) or [1.0] * len(names)
  return [RewardFunction(name, resolve_one(config, name).fn, float(weight)) for name, weight in zip(names, weights)]


def resolve_one(config, name: str) -> RewardFunction:
  """One reward function by name (eval_verifier), weight 1."""
  return RewardFunction(name, BUILTINS[name](config) if name in BUILTINS else _import(name), 1.0)


@dataclasses.dataclass
class Scores:
  """total [n]: the weighted sum per completion; per_function: each function's rewards [n]; errors: how many
  completions got reward_error_default, per function."""
  total: np.ndarray
  per_function: dict[str, np.ndarray]
  errors: dict[str, int]

  def slice(self, start: int, stop: int) -> "Scores":
    return Scores(self.total[start:stop], {k: v[start:stop] for k, v in self.per_function.items()},
                  {k: (stop - start) if v else 0 for k, v in self.errors.items()})  # a failed call covers every row

  @staticmethod
  def concatenate(parts: Sequence["Scores"]) -> "Scores":
    names = parts[0].per_function
    return Scores(np.concatenate([p.total for p in parts]),
                  {k: np.concatenate([p.per_function[k] for p in parts]) for k in names},
                  {k: sum(p.errors[k] for p in parts) for k in names})

  def metrics(self) -> dict[str, float]:
    out = {"reward/mean": float(self.total.mean()), "reward/std": float(self.total.std())}
    for name, values in self.per_function.items():
      out[f"reward/{name}/mean"] = float(values.mean())
      out[f"reward/{name}/std"] = float(values.std())
      out[f"reward/{name}/errors"] = float(self.errors[name])
    return out


class RewardFailure(Exception):
  """A reward function failed; `reason` says how."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


def _call_with_timeout(fn: Callable, timeout_s: float, args: tuple, kwargs: dict):
  # A daemon thread, since a hung function cannot be killed: the run goes on (or stops) without waiting for it.
  outcome: dict = {}

  def target():
    try:
      outcome["value"] = fn(*args, **kwargs)
    except BaseException as e:  # pylint: disable=broad-except  (reported to the caller with its type)
      outcome["error"] = e

  thread = threading.Thread(target=target, daemon=True)
  thread.start()
  thread.join(timeout_s if timeout_s > 0 else None)
  if thread.is_alive():
    raise RewardFailure(f"timed out after {timeout_s:g} s (reward_timeout_s)")
  if "error" in outcome:
    error = outcome["error"]
    raise RewardFailure(f"raised {type(error).__name__}: {error}")
  return outcome["value"]


def _checked(values, n: int) -> np.ndarray:
  try:
    array = np.asarray([float(v) for v in values], np.float64)
  except (TypeError, ValueError):
    raise RewardFailure(f"returned {type(values).__name__} {str(values)[:80]!r}; expected a list of {n} "
                        "floats") from None
  if len(array) != n:
    raise RewardFailure(f"returned {len(array)} values for {n} completions")
  if not np.all(np.isfinite(array)):
    raise RewardFailure("returned a value that is not a finite number")
  return array


def score(functions: Sequence[RewardFunction], prompts: Sequence, completions: Sequence[str],
          columns: dict[str, list], completion_ids: Sequence[Sequence[int]], *, timeout_s: float,
          error_default: float | None) -> Scores:
  """Every function over the whole batch; see the module doc for failures."""
  n = len(completions)
  per_function, errors = {}, {}
  total = np.zeros(n, np.float64)
  for function in functions:
    try:
      values = _checked(_call_with_timeout(function.fn, timeout_s, (list(prompts), list(completions)),
                                           {**columns, "completion_ids": [list(c) for c in completion_ids]}), n)
      errors[function.name] = 0
    except RewardFailure as failure:
      if error_default is None or not math.isfinite(error_default):
        raise UserError(f"reward function {function.name!r} {failure.reason}; fix it, or set "
                        "reward_error_default=<value> to give its completions that reward instead") from None
      values, errors[function.name] = np.full(n, error_default, np.float64), n
    per_function[function.name] = values
    total += function.weight * values
  return Scores(total, per_function, errors)
