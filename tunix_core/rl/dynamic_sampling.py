"""DAPO's dynamic sampling (Yu et al. 2025, arXiv 2503.14476, sec. 3.2): groups whose rewards are all equal have
zero advantage and teach nothing, so they are dropped and more prompts are sampled until the batch is full."""

from collections.abc import Callable, Sequence
from typing import TypeVar

Group = TypeVar("Group")


def fill_groups(draw: Callable[[int], Sequence[Group]], needed: int, max_rounds: int,
                informative: Callable[[Group], bool]) -> tuple[list[Group], dict[str, float]]:
  """Calls draw(round) (each call: a fresh rollout of any number of groups) until `needed` informative groups are
  kept or max_rounds calls are made; returns the first `needed` kept groups, topped up with dropped ones when the
  rounds ran out (they carry zero advantage), and counts for the metrics."""
  kept, dropped, rounds = [], [], 0
  while rounds < max_rounds and len(kept) < needed:
    for group in draw(rounds):
      (kept if informative(group) else dropped).append(group)
    rounds += 1
  batch = kept[:needed]
  topped_up = needed - len(batch)
  batch += dropped[:topped_up]
  return batch, {"rollout/sampling_rounds": float(rounds), "rollout/groups_dropped": float(len(dropped)),
                 "rollout/groups_topped_up": float(topped_up),
                 "rollout/groups_surplus": float(max(len(kept) - needed, 0))}
