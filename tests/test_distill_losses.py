"""Distillation numerics against float64 numpy references: values, and gradients by central finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tunix_core.modes import distill_losses as dl


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _kl(log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
  return (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)


def np_divergence(student: np.ndarray, teacher: np.ndarray, kind: str, temperature: float = 1.0, beta: float = 0.5,
                  top_k: int = 0) -> np.ndarray:
  student, teacher = student / temperature, teacher / temperature
  if 0 < top_k < teacher.shape[-1]:
    ids = np.argsort(-teacher, axis=-1, kind="stable")[..., :top_k]
    student, teacher = np.take_along_axis(student, ids, -1), np.take_along_axis(teacher, ids, -1)
  log_s, log_t = _log_softmax(student), _log_softmax(teacher)
  if kind == "forward":
    return _kl(log_t, log_s)
  if kind == "reverse":
    return _kl(log_s, log_t)
  m = beta * np.exp(log_t) + (1 - beta) * np.exp(log_s)
  return beta * _kl(log_t, np.log(m)) + (1 - beta) * _kl(log_s, np.log(m))


def numeric_grad(fn, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
  grad = np.zeros_like(x)
  for index in np.ndindex(x.shape):
    up, down = x.copy(), x.copy()
    up[index] += eps
    down[index] -= eps
    grad[index] = (fn(up) - fn(down)) / (2 * eps)
  return grad


RNG = np.random.default_rng(0)
STUDENT = RNG.normal(size=(3, 7)) * 2.0
TEACHER = RNG.normal(size=(3, 7)) * 2.0


@pytest.mark.parametrize("kind,temperature,beta", [("forward", 1.0, 0.5), ("forward", 2.5, 0.5), ("reverse", 1.0, 0.5),
                                                   ("reverse", 0.7, 0.5), ("jsd", 1.0, 0.5), ("jsd", 2.0, 0.1),
                                                   ("jsd", 1.5, 0.9)])
def test_divergence_values_and_gradients(kind, temperature, beta):
  kwargs = dict(kind=kind, temperature=temperature, beta=beta)
  got = dl.divergence(jnp.asarray(STUDENT, jnp.float32), jnp.asarray(TEACHER, jnp.float32), **kwargs)
  np.testing.assert_allclose(got, np_divergence(STUDENT, TEACHER, kind, temperature, beta), rtol=1e-5, atol=1e-6)
  grad = jax.grad(lambda s: jnp.sum(dl.divergence(s, jnp.asarray(TEACHER, jnp.float32), **kwargs)))(
      jnp.asarray(STUDENT, jnp.float32))
  expected = numeric_grad(lambda s: np_divergence(s, TEACHER, kind, temperature, beta).sum(), STUDENT)
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(got) >= 0)


def test_forward_kl_gradient_is_the_probability_difference_over_t():
  """d KL(p_t || p_s) / d z_s = (p_s - p_t) / T, the classic soft-target gradient."""
  t = 3.0
  grad = jax.grad(lambda s: jnp.sum(dl.divergence(s, jnp.asarray(TEACHER, jnp.float32), kind="forward",
                                                  temperature=t)))(jnp.asarray(STUDENT, jnp.float32))
  expected = (np.exp(_log_softmax(STUDENT / t)) - np.exp(_log_softmax(TEACHER / t))) / t
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", dl.DIVERGENCES)
def test_top_k(kind):
  student, teacher = jnp.asarray(STUDENT, jnp.float32), jnp.asarray(TEACHER, jnp.float32)
  full = dl.divergence(student, teacher, kind=kind, temperature=1.3)
  for k in (7, 100):  # the vocabulary size, and more
    np.testing.assert_allclose(dl.divergence(student, teacher, kind=kind, temperature=1.3, top_k=k), full, rtol=1e-6)
  top3 = dl.divergence(student, teacher, kind=kind, temperature=1.3, top_k=3)
  np.testing.assert_allclose(top3, np_divergence(STUDENT, TEACHER, kind, 1.3, top_k=3), rtol=1e-5, atol=1e-6)
  grad = jax.grad(lambda s: jnp.sum(dl.divergence(s, teacher, kind=kind, temperature=1.3, top_k=3)))(student)
  expected = numeric_grad(lambda s: np_divergence(s, TEACHER, kind, 1.3, top_k=3).sum(), STUDENT)
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [0, 4, 5])
def test_logit_terms_chunked_t_squared_and_cross_entropy(chunk_size):
  rng = np.random.default_rng(1)
  hs, ht = rng.normal(size=(2, 5, 4)), rng.normal(size=(2, 5, 6))
  ws, wt = rng.normal(size=(4, 9)), rng.normal(size=(6, 11))  # the teacher's two extra vocab rows are padding
  targets = rng.integers(0, 9, size=(2, 5))
  t = 2.0
  div, ce = dl.logit_terms(lambda h: h @ jnp.asarray(ws, jnp.float32), jnp.asarray(hs, jnp.float32),
                           lambda h: h @ jnp.asarray(wt, jnp.float32), jnp.asarray(ht, jnp.float32),
                           jnp.asarray(targets), kind="forward", temperature=t, chunk_size=chunk_size)
  student, teacher = hs @ ws, (ht @ wt)[..., :9]
  np.testing.assert_allclose(div, t * t * np_divergence(student, teacher, "forward", t), rtol=1e-5, atol=1e-6)
  expected_ce = -np.take_along_axis(_log_softmax(student), targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(ce, expected_ce, rtol=1e-5, atol=1e-6)


def test_logit_terms_give_the_teacher_no_gradient():
  rng = np.random.default_rng(2)
  hs, ht = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32), jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)

  def total(student_hidden, teacher_hidden):
    div, _ = dl.logit_terms(lambda h: h @ w, student_hidden, lambda h: h @ w, teacher_hidden, jnp.zeros(6, jnp.int32),
                            kind="jsd", temperature=1.0, chunk_size=4)
    return jnp.sum(div)

  grad_student, grad_teacher = jax.grad(total, argnums=(0, 1))(hs, ht)
  assert np.any(np.asarray(grad_student) != 0) and not np.any(np.asarray(grad_teacher))


def test_masked_positions_change_nothing():
  """A masked position's logits may be anything: the masked loss and the gradient elsewhere stay the same, and the
  masked positions get no gradient."""
  mask = jnp.asarray([[1, 1, 0], [0, 1, 0]], jnp.float32)
  rng = np.random.default_rng(3)
  student, teacher = (jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32) for _ in range(2))
  noise = jnp.asarray(rng.normal(size=(2, 3, 5)) * 50, jnp.float32) * (1 - mask)[..., None]

  def masked(s, t):
    return jnp.sum(dl.divergence(s, t, kind="reverse", temperature=2.0) * mask)

  base, base_grad = jax.value_and_grad(masked)(student, teacher)
  moved, moved_grad = jax.value_and_grad(masked)(student + noise, teacher - noise)
  np.testing.assert_allclose(moved, base, rtol=1e-6)
  np.testing.assert_allclose(moved_grad, base_grad, atol=1e-7)
  assert not np.any(np.asarray(base_grad) * (1 - np.asarray(mask))[..., None])


def test_default_layer_map():
  assert dl.default_layer_map(2, 4) == ((0, 1), (1, 3))
  assert dl.default_layer_map(3, 3) == ((0, 0), (1, 1), (2, 2))
  assert dl.default_layer_map(4, 12) == ((0, 2), (1, 5), (2, 8), (3, 11))
  assert dl.default_layer_map(6, 3) == ((1, 0), (3, 1), (5, 2))


def np_attention(student: np.ndarray, teacher: np.ndarray) -> np.ndarray:
  if student.shape[2] != teacher.shape[2]:
    student, teacher = student.mean(2, keepdims=True), teacher.mean(2, keepdims=True)
  return ((student - teacher) ** 2).sum(-1).mean(axis=(0, 2))


def _probs(rng, shape):
  return np.exp(_log_softmax(rng.normal(size=shape)))


@pytest.mark.parametrize("teacher_heads", [2, 4])
def test_attention_mse(teacher_heads):
  rng = np.random.default_rng(4)
  student, teacher = _probs(rng, (2, 2, 2, 3, 3)), _probs(rng, (2, 2, teacher_heads, 3, 3))
  got = dl.attention_mse(jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32))
  np.testing.assert_allclose(got, np_attention(student, teacher), rtol=1e-5, atol=1e-7)
  grad = jax.grad(lambda s: jnp.sum(dl.attention_mse(s, jnp.asarray(teacher, jnp.float32))))(
      jnp.asarray(student, jnp.float32))
  np.testing.assert_allclose(grad, numeric_grad(lambda s: np_attention(s, teacher).sum(), student), rtol=1e-4,
                             atol=1e-6)


def test_pooling_matrix_is_adaptive_average_pooling():
  np.testing.assert_allclose(np.arange(6.0) @ dl.pooling_matrix(6, 3), [0.5, 2.5, 4.5])
  np.testing.assert_allclose(np.arange(5.0) @ dl.pooling_matrix(5, 3), [0.5, 2.0, 3.5])  # bins [0,1] [1,2,3] [3,4]
  np.testing.assert_allclose(dl.pooling_matrix(4, 4), np.eye(4))


def np_pooled_cosine(student: np.ndarray, teacher: np.ndarray) -> np.ndarray:
  pooled = teacher @ dl.pooling_matrix(teacher.shape[-1], student.shape[-1]).astype(np.float64)
  cos = (student * pooled).sum(-1) / (np.linalg.norm(student, axis=-1) * np.linalg.norm(pooled, axis=-1))
  return (1 - cos).mean(0)


def np_projected_mse(student: np.ndarray, teacher: np.ndarray, w: np.ndarray) -> np.ndarray:
  return ((np.einsum("pbse,pef->pbsf", student, w) - teacher) ** 2).mean(axis=(0, -1))


def test_feature_losses():
  rng = np.random.default_rng(5)
  student, teacher, w = rng.normal(size=(2, 2, 3, 4)), rng.normal(size=(2, 2, 3, 10)), rng.normal(size=(2, 4, 10))
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # pylint: disable=unnecessary-lambda-assignment
  np.testing.assert_allclose(dl.pooled_cosine(f32(student), f32(teacher)), np_pooled_cosine(student, teacher),
                             rtol=1e-5, atol=1e-6)
  grad = jax.grad(lambda s: jnp.sum(dl.pooled_cosine(s, f32(teacher))))(f32(student))
  np.testing.assert_allclose(grad, numeric_grad(lambda s: np_pooled_cosine(s, teacher).sum(), student), rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(dl.projected_mse(f32(student), f32(teacher), f32(w)), np_projected_mse(student, teacher, w),
                             rtol=1e-5)
  grad_s, grad_w = jax.grad(lambda s, w_: jnp.sum(dl.projected_mse(s, f32(teacher), w_)), argnums=(0, 1))(
      f32(student), f32(w))
  np.testing.assert_allclose(grad_s, numeric_grad(lambda s: np_projected_mse(s, teacher, w).sum(), student),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(grad_w, numeric_grad(lambda w_: np_projected_mse(student, teacher, w_).sum(), w),
                             rtol=1e-4, atol=1e-5)
