"""Training algorithms. Each mode module provides `loss(model, batch, config) -> LossOutput`."""

from tunix_core.modes import sft

MODES = {"sft": sft}
