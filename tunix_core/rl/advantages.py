"""Group-relative advantages (GRPO, Shao et al. 2024, arXiv 2402.03300, sec. 4.1.2), on the host in float64."""

import numpy as np

SCALE_REWARDS = ("group", "batch", "none")
STD_EPSILON = 1e-4  # TRL's: keeps a group of near-equal rewards from blowing up


def group_advantages(rewards: np.ndarray, group_size: int, scale: str) -> np.ndarray:
  """rewards [groups * group_size] (each group's samples contiguous) -> advantages, float32, same shape.

  Each reward minus its group's mean, divided by (std + STD_EPSILON) with the std (unbiased, as TRL and verl
  compute it) of its group (`group`), of the whole batch (`batch`, as TRL's scale_rewards="batch"), or not divided
  (`none`, Dr. GRPO: Liu et al. 2025, arXiv 2503.20783). A group whose rewards are all equal gets 0.
  """
  if scale not in SCALE_REWARDS:
    raise ValueError(f"scale_rewards={scale!r}: expected one of {', '.join(SCALE_REWARDS)}")
  grouped = np.asarray(rewards, np.float64).reshape(-1, group_size)
  centred = grouped - grouped.mean(axis=1, keepdims=True)
  if scale == "group":
    centred = centred / (grouped.std(axis=1, ddof=1, keepdims=True) + STD_EPSILON)
  elif scale == "batch":
    centred = centred / (grouped.std(ddof=1) + STD_EPSILON)
  return centred.reshape(-1).astype(np.float32)
