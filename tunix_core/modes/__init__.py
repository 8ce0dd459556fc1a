"""Training algorithms. Each mode module provides `needs_reference(config) -> bool` and
`loss(model, batch, config, reference) -> LossOutput` (reference: the mode's frozen second model — DPO's reference,
distill's teacher — or None), and optionally `eval_loss` with the same signature for evaluation."""

from tunix_core.modes import distill, dpo, sft

MODES = {"sft": sft, "dpo": dpo, "orpo": dpo, "simpo": dpo, "distill": distill}
