"""Chunked token log-probs against a float64 numpy log-softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tunix_core import losses


def _problem(tokens=37, embed=8, vocab=50, seed=0):
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(tokens, embed)).astype(np.float32)
  kernel = rng.normal(size=(embed, vocab)).astype(np.float32)
  targets = rng.integers(0, vocab, tokens).astype(np.int32)
  return hidden, kernel, targets


def _reference(hidden, kernel, targets):
  logits = hidden.astype(np.float64) @ kernel.astype(np.float64)
  logits -= logits.max(-1, keepdims=True)
  log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return log_softmax[np.arange(len(targets)), targets]


@pytest.mark.parametrize("chunk_size", [0, 1, 8, 37, 64])
def test_token_log_probs_match_numpy(chunk_size):
  hidden, kernel, targets = _problem()
  got = losses.token_log_probs(lambda h: h @ kernel, jnp.asarray(hidden), jnp.asarray(targets), chunk_size)
  np.testing.assert_allclose(np.asarray(got), _reference(hidden, kernel, targets), rtol=1e-5, atol=1e-5)


def test_chunked_gradients_equal_unchunked():
  hidden, kernel, targets = _problem()
  hidden = hidden.reshape(1, 37, 8)
  targets = targets.reshape(1, 37)

  def total(h, k, chunk):
    return jnp.sum(losses.token_log_probs(lambda x: x @ k, h, targets, chunk))

  whole = jax.grad(total, argnums=(0, 1))(hidden, kernel, 0)
  chunked = jax.grad(total, argnums=(0, 1))(hidden, kernel, 8)
  for a, b in zip(whole, chunked):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_loss_never_holds_all_logits():
  """The compiled program's largest float32 buffer is a chunk of logits, not tokens x vocab."""
  tokens, vocab, chunk = 4096, 2048, 256
  hidden = jax.ShapeDtypeStruct((tokens, 16), jnp.float32)
  kernel = jax.ShapeDtypeStruct((16, vocab), jnp.float32)
  targets = jax.ShapeDtypeStruct((tokens,), jnp.int32)

  def loss(h, k, t):
    return jnp.sum(losses.token_log_probs(lambda x: x @ k, h, t, chunk))

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(hidden, kernel, targets).compile()
  temp_bytes = compiled.memory_analysis().temp_size_in_bytes
  assert temp_bytes < tokens * vocab * 4 / 4, temp_bytes


def test_masked_mean():
  values = jnp.array([1.0, 2.0, 3.0, 4.0])
  np.testing.assert_allclose(losses.masked_mean(values, jnp.array([1, 0, 1, 0])), 2.0)
  assert float(losses.masked_mean(values, jnp.zeros(4))) == 0.0
