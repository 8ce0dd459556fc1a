"""Knowledge-distillation numerics: divergences between teacher and student, and the per-token losses of each
distillation strategy. Pure functions, computed in float32; every per-token loss is left unmasked for the caller.

Divergences compare the temperature-softened distributions p_t = softmax(teacher / T), p_s = softmax(student / T):
  forward  KL(p_t || p_s)                                   (Hinton et al. 2015, "Distilling the Knowledge ...")
  reverse  KL(p_s || p_t)                                   (mode-seeking; MiniLLM, Gu et al. 2023)
  jsd      beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s
           (the generalized JSD of GKD, Agarwal et al. 2024, arXiv 2306.13649; TRL's generalized_jsd_loss)
With top_k = K > 0 both distributions are restricted to the teacher's K largest logits at each position and
renormalised there (a distribution with no mass outside them is what reverse KL and the JSD need to stay
finite); K >= vocab is the full distribution.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tunix_core import losses

DIVERGENCES = ("forward", "reverse", "jsd")
METRIC_NAMES = {"forward": "distill/kl", "reverse": "distill/reverse_kl", "jsd": "distill/jsd"}


def _kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """KL(p || q) over the last axis, from log-probabilities."""
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def divergence(student_logits: jax.Array, teacher_logits: jax.Array, *, kind: str, temperature: float = 1.0,
               beta: float = 0.5, top_k: int = 0) -> jax.Array:
  """The divergence between teacher and student at each position: logits [..., V] -> float32 [...]."""
  if kind not in DIVERGENCES:
    raise ValueError(f"kind={kind!r}: expected one of {', '.join(DIVERGENCES)}")
  student = student_logits.astype(jnp.float32) / temperature
  teacher = teacher_logits.astype(jnp.float32) / temperature
  if 0 < top_k < teacher.shape[-1]:
    teacher, ids = jax.lax.top_k(teacher, top_k)
    student = jnp.take_along_axis(student, ids, axis=-1)
  log_s, log_t = jax.nn.log_softmax(student, axis=-1), jax.nn.log_softmax(teacher, axis=-1)
  if kind == "forward":
    return _kl(log_t, log_s)
  if kind == "reverse":
    return _kl(log_s, log_t)
  log_m = jnp.logaddexp(log_t + jnp.log(beta), log_s + jnp.log1p(-beta))
  return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)


def logit_terms(student_logits_fn: Callable[[jax.Array], jax.Array], student_hidden: jax.Array,
                teacher_logits_fn: Callable[[jax.Array], jax.Array], teacher_hidden: jax.Array, targets: jax.Array,
                *, kind: str, temperature: float, beta: float = 0.5, top_k: int = 0, chunk_size: int = 0
                ) -> tuple[jax.Array, jax.Array]:
  """(T^2 * divergence, hard-label cross-entropy), each float32 [...] for hidden states [..., E] and targets [...].

  Both heads run in chunks of `chunk_size` tokens (see losses.map_token_chunks): neither model's
  [batch, length, vocab] float32 logits exist whole. T^2 keeps the soft targets' gradient scale independent of T
  (Hinton et al. 2015). When the two vocabularies differ in size (padding rows), the shared leading ids are compared.
  """
  def chunk(h_s: jax.Array, h_t: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    student, teacher = student_logits_fn(h_s).astype(jnp.float32), teacher_logits_fn(h_t).astype(jnp.float32)
    vocab = min(student.shape[-1], teacher.shape[-1])
    div = divergence(student[:, :vocab], teacher[:, :vocab], kind=kind, temperature=temperature, beta=beta,
                     top_k=top_k)
    ce = jax.nn.logsumexp(student, axis=-1) - jnp.take_along_axis(student, t[:, None], axis=-1)[:, 0]
    return temperature ** 2 * div, ce

  teacher_hidden = jax.lax.stop_gradient(teacher_hidden)
  div, ce = losses.map_token_chunks(chunk, chunk_size, student_hidden.reshape(-1, student_hidden.shape[-1]),
                                    teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), targets.reshape(-1))
  return div.reshape(targets.shape), ce.reshape(targets.shape)


def default_layer_map(student_layers: int, teacher_layers: int) -> tuple[tuple[int, int], ...]:
  """(student layer, teacher layer) pairs spaced evenly over both depths, the last layers always paired:
  min(depths) pairs; equal depths pair each layer with itself."""
  n = min(student_layers, teacher_layers)
  return tuple(((k + 1) * student_layers // n - 1, (k + 1) * teacher_layers // n - 1) for k in range(n))


def attention_mse(student_probs: jax.Array, teacher_probs: jax.Array) -> jax.Array:
  """Attention-transfer loss per query position: probs [pairs, B, H, S, S] -> float32 [B, S].

  The squared difference is summed over keys (each row is a distribution) and averaged over heads and layer
  pairs. When the head counts differ, each model's heads are averaged first.
  """
  student, teacher = student_probs.astype(jnp.float32), jax.lax.stop_gradient(teacher_probs).astype(jnp.float32)
  if student.shape[2] != teacher.shape[2]:
    student, teacher = student.mean(axis=2, keepdims=True), teacher.mean(axis=2, keepdims=True)
  return jnp.mean(jnp.sum(jnp.square(student - teacher), axis=-1), axis=(0, 2))


def pooling_matrix(source_width: int, target_width: int) -> np.ndarray:
  """[source, target] averaging matrix of adaptive average pooling (PyTorch's adaptive_avg_pool1d bins):
  output i is the mean of inputs floor(i * source / target) .. ceil((i + 1) * source / target) - 1."""
  matrix = np.zeros((source_width, target_width), np.float32)
  for i in range(target_width):
    start, end = (i * source_width) // target_width, -(-((i + 1) * source_width) // target_width)
    matrix[start:end, i] = 1.0 / (end - start)
  return matrix


def pooled_cosine(student_hidden: jax.Array, teacher_hidden: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Feature-pooling loss per position: 1 - cos(student, teacher average-pooled to the student's width),
  hidden [pairs, B, S, E] -> float32 [B, S], averaged over layer pairs."""
  student = student_hidden.astype(jnp.float32)
  teacher = jax.lax.stop_gradient(teacher_hidden).astype(jnp.float32)
  pooled = teacher @ jnp.asarray(pooling_matrix(teacher.shape[-1], student.shape[-1]))
  dot = jnp.sum(student * pooled, axis=-1)
  norms = jnp.linalg.norm(student, axis=-1) * jnp.linalg.norm(pooled, axis=-1)
  return jnp.mean(1.0 - dot / jnp.maximum(norms, eps), axis=0)


def projected_mse(student_hidden: jax.Array, teacher_hidden: jax.Array, projection: jax.Array) -> jax.Array:
  """Feature-projection loss per position: mean over the teacher's width of (student @ W - teacher)^2, averaged
  over layer pairs. hidden [pairs, B, S, E_s] and [pairs, B, S, E_t], projection [pairs, E_s, E_t] -> [B, S]."""
  projected = jnp.einsum("pbse,pef->pbsf", student_hidden.astype(jnp.float32), projection.astype(jnp.float32))
  teacher = jax.lax.stop_gradient(teacher_hidden).astype(jnp.float32)
  return jnp.mean(jnp.square(projected - teacher), axis=(0, -1))
