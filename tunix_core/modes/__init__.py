"""Training algorithms. Each mode module provides `WEIGHT_NAME`, `needs_reference(config) -> bool` and
`loss(model, batch, config, reference) -> LossOutput` (reference: the mode's frozen second model — DPO's reference,
distill's teacher — or None), and optionally `eval_loss` with the same signature for evaluation.

RL modes also provide `prepare(context, state, step) -> (rows, metrics)` (prompts -> a rollout batch, see
tunix_core/rl/trainer.py), `reward_functions(config)`, `batch_keys(config) -> (per-token keys, per-row keys)` that
`prepare` adds to the token arrays, and `host_metrics(metrics) -> metrics` applied to each logged step's metrics.
A mode with REFERENCE_IN_LOSS = False (ppo) keeps its frozen reference for `prepare` only; its `loss` gets None."""

from tunix_core.modes import distill, dpo, grpo, ppo, rm, sft

MODES = {"sft": sft, "dpo": dpo, "orpo": dpo, "simpo": dpo, "rm": rm, "grpo": grpo, "ppo": ppo, "distill": distill}
