"""Knowledge distillation: mode=distill. A frozen teacher (its own architecture, dtype and shardings; the train step
passes it as the mode's second model) teaches the student on the loss-masked tokens.

Per loss token: (1 - distill_alpha) * CE + distill_alpha * sum over distill_strategy of weight * strategy loss:
  logit               T^2 * divergence(teacher, student) of the temperature-softened distributions (forward KL,
                      reverse KL or generalized JSD; optionally over the teacher's top-K), chunked over the sequence
  attention_transfer  MSE between mapped layers' attention probabilities (distill_losses.attention_mse)
  feature_pooling     cosine distance to the teacher's mapped-layer outputs average-pooled to the student's width
  feature_projection  MSE between the student's mapped-layer outputs through a learned [E_s, E_t] map per layer
                      pair (trained with the student, checkpointed with it, never exported) and the teacher's
Layers pair by distill_layer_map, or evenly (distill_losses.default_layer_map). Padding and prompt tokens carry no
loss mask, so they never count. The eval loss is the student's cross-entropy alone, as SFT's.
"""

import jax
import jax.numpy as jnp

from tunix_core import config as config_lib, losses
from tunix_core.modes import distill_losses
from tunix_core.modes.base import LossOutput

WEIGHT_NAME = "loss_tokens"  # what LossOutput.weight counts (tokens in the loss), as logged
PROJECTION_KEY = "distill_projection"  # the feature_projection maps, a trainable entry next to the student's params
PROBABILITY_STRATEGIES = ("attention_transfer",)
FEATURE_STRATEGIES = ("feature_pooling", "feature_projection")


def needs_reference(config) -> bool:  # pylint: disable=unused-argument
  return False  # the teacher is not a copy of the starting weights: train.py builds it from the teacher keys


def strategies(config) -> dict[str, float]:
  return config_lib.distill_strategies(config.distill_strategy)


def needs_attention_probs(config) -> bool:
  return any(name in strategies(config) for name in PROBABILITY_STRATEGIES)


def layer_map(config) -> tuple[tuple[int, int], ...]:
  """(student layer, teacher layer) pairs for the attention and feature strategies."""
  if config.distill_layer_map:
    return tuple((int(s), int(t)) for s, t in config.distill_layer_map)
  return distill_losses.default_layer_map(config.base_num_decoder_layers,
                                          config.teacher_architecture["base_num_decoder_layers"])


def _intermediates(config) -> tuple[str, ...]:
  chosen = strategies(config)
  names = ("attention_probs",) if any(s in chosen for s in PROBABILITY_STRATEGIES) else ()
  return names + (("layer_outputs",) if any(s in chosen for s in FEATURE_STRATEGIES) else ())


def _forward(model, batch: dict[str, jax.Array], intermediates: tuple[str, ...]):
  out = model.hidden_states(batch["inputs"], batch["positions"], batch["segment_ids"], intermediates=intermediates)
  return out if intermediates else (out, {})


def loss(model, batch: dict[str, jax.Array], config, reference=None, distill_projection=None) -> LossOutput:
  """Summed per-token distillation loss of the student `model` against the teacher `reference`; weight = loss
  tokens. distill_projection: {"kernel": [pairs, E_s, E_t]} with feature_projection."""
  chosen, alpha = strategies(config), config.distill_alpha
  names = _intermediates(config)
  hidden, student = _forward(model, batch, names)
  teacher_hidden, teacher = _forward(reference, batch, names)
  targets, mask = batch["targets"], batch["loss_mask"]
  terms = {}
  if "logit" in chosen:
    terms["logit"], ce = distill_losses.logit_terms(
        model.logits, hidden, reference.logits, teacher_hidden, targets, kind=config.distill_divergence,
        temperature=config.distill_temperature, beta=config.distill_jsd_beta, top_k=config.distill_top_k,
        chunk_size=config.loss_chunk_size)
  else:
    ce = -losses.token_log_probs(model.logits, hidden, targets, config.loss_chunk_size)
  pairs = layer_map(config)
  student_layers, teacher_layers = (jnp.asarray([p[i] for p in pairs]) for i in (0, 1))
  if "attention_transfer" in chosen:
    terms["attention_transfer"] = distill_losses.attention_mse(
        student["attention_probs"][student_layers], teacher["attention_probs"][teacher_layers])
  if "feature_pooling" in chosen:
    terms["feature_pooling"] = distill_losses.pooled_cosine(
        student["layer_outputs"][student_layers], teacher["layer_outputs"][teacher_layers])
  if "feature_projection" in chosen:
    terms["feature_projection"] = distill_losses.projected_mse(
        student["layer_outputs"][student_layers], teacher["layer_outputs"][teacher_layers],
        distill_projection["kernel"])
  per_token = (1.0 - alpha) * ce + alpha * sum(chosen[name] * term for name, term in terms.items())
  metrics = {"distill/ce": losses.masked_sum(ce, mask)}
  names_of = {"logit": distill_losses.METRIC_NAMES[config.distill_divergence],
              "attention_transfer": "distill/attention", "feature_pooling": "distill/feature",
              "feature_projection": "distill/feature_projection"}
  for name, term in terms.items():
    metrics[names_of[name]] = losses.masked_sum(term, mask)
  return LossOutput(loss_sum=losses.masked_sum(per_token, mask), weight=jnp.sum(mask.astype(jnp.float32)),
                    metrics=metrics)


def _cross_entropy_and_hits(model, batch: dict[str, jax.Array], config) -> tuple[jax.Array, jax.Array]:
  """Per-token cross-entropy and whether the argmax is the target, chunked like the training loss."""
  hidden = model.hidden_states(batch["inputs"], batch["positions"], batch["segment_ids"])

  def chunk(h: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = model.logits(h).astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit, jnp.argmax(logits, axis=-1) == t

  ce, hits = losses.map_token_chunks(chunk, config.loss_chunk_size, hidden.reshape(-1, hidden.shape[-1]),
                                     batch["targets"].reshape(-1))
  return ce.reshape(batch["targets"].shape), hits.reshape(batch["targets"].shape)


def eval_loss(model, batch: dict[str, jax.Array], config, reference=None, distill_projection=None) -> LossOutput:  # pylint: disable=unused-argument
  """The student's summed cross-entropy (what SFT's eval loss is), with the student's and the teacher's next-token
  accuracy and the teacher's cross-entropy as metrics."""
  mask = batch["loss_mask"]
  ce, hits = _cross_entropy_and_hits(model, batch, config)
  teacher_ce, teacher_hits = _cross_entropy_and_hits(reference, batch, config)
  return LossOutput(loss_sum=losses.masked_sum(ce, mask), weight=jnp.sum(mask.astype(jnp.float32)), metrics={
      "accuracy": losses.masked_sum(hits, mask), "teacher_loss": losses.masked_sum(teacher_ce, mask),
      "teacher_accuracy": losses.masked_sum(teacher_hits, mask)})
