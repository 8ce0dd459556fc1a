"""Per-token metrics of the RL losses: a loss sums them over its tokens (so gradient accumulation keeps them exact,
as the step divides every metric by the same total weight), and the host turns the sums into per-token means."""

import numpy as np


def token_means(metrics: dict[str, float], prefix: str, names: tuple[str, ...]) -> dict[str, float] | None:
  """Pops `{prefix}/{name}_sum` of each name from a logged step's metrics and returns them divided by the "tokens"
  sum, plus "ratio_std" from the "ratio" and "ratio_sq" sums; None when the step logged none of them."""
  sums = {k: metrics.pop(f"{prefix}/{k}_sum") for k in names if f"{prefix}/{k}_sum" in metrics}
  if not sums:
    return None
  mean = {k: v / max(sums["tokens"], 1e-30) for k, v in sums.items()}
  mean["ratio_std"] = float(np.sqrt(max(mean["ratio_sq"] - mean["ratio"] ** 2, 0.0)))
  return mean
