"""On-policy distillation (distill_on_policy=true, GKD: Agarwal et al. 2024, arXiv 2306.13649): before each step the
student, with its current weights, samples a completion for every prompt of the batch, and the rows are rebuilt as
prompt + sampled completion, the loss mask on the completion; the teacher then scores them in the train step.

Rows hold one example each (packing=false): a row's prompt is what precedes its first loss token. Sampling uses the
generation keys (temperature, top_k, top_p, min_p, max_new_tokens capped at max_target_length) and is seeded by
seed and the step, so a resumed run draws the same completions.
"""

import numpy as np

from tunix_core.generate import sampler
from tunix_core.generate.sampling import SamplingParams


def prompts_of(local: dict[str, np.ndarray]) -> list[list[int] | None]:
  """Each row's prompt token ids (the inputs up to and including the position that predicts the first loss token);
  None for a row without loss tokens."""
  prompts = []
  for inputs, mask in zip(local["inputs"], local["loss_mask"]):
    first = np.flatnonzero(mask > 0)
    prompts.append([int(t) for t in inputs[:first[0] + 1]] if first.size else None)
  return prompts


def row(prompt: list[int], completion: list[int], length: int) -> dict[str, np.ndarray]:
  """One unpacked training row of prompt + completion (truncated to length + 1 ids), loss on the completion."""
  ids = np.asarray((prompt + completion)[:length + 1], np.int32)
  mask = np.asarray(([0] * len(prompt) + [1] * len(completion))[1:length + 1], np.float32)
  n = len(ids) - 1
  out = {"inputs": np.zeros(length, np.int32), "targets": np.zeros(length, np.int32),
         "loss_mask": np.zeros(length, np.float32)}
  out["inputs"][:n], out["targets"][:n], out["loss_mask"][:n] = ids[:-1], ids[1:], mask
  out["segment_ids"] = (np.arange(length) < n).astype(np.int32)
  out["positions"] = np.where(out["segment_ids"] == 1, np.arange(length), 0).astype(np.int32)
  return out


def resample(config, graphdef, params, tokenizer, local: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
  """The batch with each row's completion replaced by one the student (graphdef, params) samples; rows without a
  prompt stay as they are (padding). Call it under the run's mesh and rules."""
  prompts = prompts_of(local)
  real = [i for i, p in enumerate(prompts) if p is not None]
  if not real:
    return local
  sampling = SamplingParams(
      max_new_tokens=min(config.max_new_tokens, config.max_target_length), temperature=config.temperature,
      top_k=config.top_k, top_p=config.top_p, min_p=config.min_p, eos_ids=sampler.eos_ids_of(tokenizer))
  generator = sampler.Sampler(graphdef, params, tokenizer, batch_size=len(prompts),
                              prefill_buckets=config.prefill_length_buckets,
                              decode_halvings=config.decode_halvings)
  completions = generator.generate([prompts[i] for i in real], sampling, seed=config.seed * 1_000_003 + step)
  out = {key: local[key].copy() for key in row([0], [0], config.max_target_length)}
  for i, group in zip(real, completions):
    for key, value in row(prompts[i], group[0].token_ids, config.max_target_length).items():
      out[key][i] = value
  return {**local, **out}
