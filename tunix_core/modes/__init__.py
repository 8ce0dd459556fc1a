"""Training algorithms. Each mode module provides `needs_reference(config) -> bool` and
`loss(model, batch, config, reference) -> LossOutput` (reference: the frozen reference model, or None)."""

from tunix_core.modes import dpo, rm, sft

MODES = {"sft": sft, "dpo": dpo, "orpo": dpo, "simpo": dpo, "rm": rm}
