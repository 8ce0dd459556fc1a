"""What a mode gives the train step."""

from typing import NamedTuple

import jax


class LossOutput(NamedTuple):
  """A micro-batch's contribution: the step's loss is sum(loss_sum) / sum(weight) over all micro-batches.

  For token losses weight is the number of loss tokens, so gradient accumulation over micro-batches
  gives the same update as one large batch. `metrics` are summed over micro-batches and divided by
  the total weight too.
  """
  loss_sum: jax.Array
  weight: jax.Array
  metrics: dict[str, jax.Array]
