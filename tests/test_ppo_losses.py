"""PPO's numerics against float64 numpy references on random inputs: values, and gradients by central differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tunix_core import losses
from tunix_core.rl import ppo_losses

B, T = 4, 9


def _mask() -> np.ndarray:
  """Rows of prompt (0), completion (1) and padding (0): one full, one ended early, one with a gap, one empty."""
  mask = np.zeros((B, T), np.float32)
  mask[0, 2:] = 1
  mask[1, 3:6] = 1
  mask[2, 1:4] = 1
  mask[2, 5:8] = 1
  return mask


def _numeric_grad(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
  x = x.astype(np.float64)
  grad = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    up, down = x.copy(), x.copy()
    up[i] += h
    down[i] -= h
    grad[i] = (f(up) - f(down)) / (2 * h)
  return grad


def _gae_loop(rewards, values, mask, gamma, lam):
  """The plain loop: walk each row backwards over its masked tokens."""
  advantages = np.zeros((B, T))
  for b in range(B):
    next_value = next_advantage = 0.0
    for t in reversed(range(T)):
      if not mask[b, t]:
        continue
      delta = rewards[b, t] + gamma * next_value - values[b, t]
      next_advantage = delta + gamma * lam * next_advantage
      next_value = values[b, t]
      advantages[b, t] = next_advantage
  return advantages, (advantages + values) * mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0)])
def test_gae_matches_a_python_loop(gamma, lam):
  rng = np.random.default_rng(0)
  rewards, values = rng.normal(size=(2, B, T)).astype(np.float32)
  mask = _mask()
  advantages, returns = ppo_losses.gae(rewards, values, mask, gamma=gamma, lam=lam)
  want_advantages, want_returns = _gae_loop(rewards.astype(np.float64), values.astype(np.float64), mask, gamma, lam)
  np.testing.assert_allclose(advantages, want_advantages, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(returns, want_returns, rtol=1e-5, atol=1e-5)
  assert not np.any(np.asarray(advantages)[mask == 0])


def test_whiten_values_and_gradients():
  rng = np.random.default_rng(1)
  x, mask = rng.normal(size=(B, T)) * 3 + 1, _mask()
  weights = rng.normal(size=(B, T))

  def reference(v, shift_mean=True):
    n = mask.sum()
    mean = (v * mask).sum() / n
    var = (((v - mean) * mask) ** 2).sum() / (n - 1)
    out = (v - mean) / np.sqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask

  for shift_mean in (True, False):
    got = ppo_losses.whiten(jnp.asarray(x, jnp.float32), mask, shift_mean=shift_mean)
    np.testing.assert_allclose(got, reference(x, shift_mean), rtol=1e-5, atol=1e-5)
  grad = jax.grad(lambda v: jnp.sum(ppo_losses.whiten(v, mask) * weights))(jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(grad, _numeric_grad(lambda v: (reference(v) * weights).sum(), x), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("high", [None, 0.28])
def test_policy_loss_values_and_gradients(high):
  rng = np.random.default_rng(2)
  mask = _mask()
  old = rng.normal(size=(B, T)) - 2
  new = old + rng.normal(size=(B, T)) * 0.4  # ratios on both sides of the clip range
  advantages = rng.normal(size=(B, T))
  eps, eps_high = 0.2, (0.2 if high is None else high)

  def reference(log_probs):
    ratio = np.exp(log_probs - old)
    unclipped, clipped = -advantages * ratio, -advantages * np.clip(ratio, 1 - eps, 1 + eps_high)
    return np.maximum(unclipped, clipped) * mask, (clipped > unclipped) * mask

  def run(log_probs):
    return ppo_losses.policy_loss(log_probs, jnp.asarray(old, jnp.float32), jnp.asarray(advantages, jnp.float32),
                                  mask, clip_epsilon=eps, clip_epsilon_high=high)

  out = run(jnp.asarray(new, jnp.float32))
  want_loss, want_clipped = reference(new)
  np.testing.assert_allclose(out.loss, want_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out.clipped, want_clipped)
  assert 0 < want_clipped.sum() < mask.sum()
  np.testing.assert_allclose(out.approx_kl, 0.5 * (new - old) ** 2 * mask, rtol=1e-4, atol=1e-6)
  grad = jax.grad(lambda lp: jnp.sum(run(lp).loss))(jnp.asarray(new, jnp.float32))
  np.testing.assert_allclose(grad, _numeric_grad(lambda lp: reference(lp)[0].sum(), new), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("clip_range", [0.0, 0.2])
def test_value_loss_values_and_gradients(clip_range):
  rng = np.random.default_rng(3)
  mask = _mask()
  old, returns = rng.normal(size=(2, B, T))
  values = old + rng.normal(size=(B, T)) * 0.4

  def reference(v):
    unclipped = (v - returns) ** 2
    if not clip_range:
      return 0.5 * unclipped * mask, np.zeros_like(mask)
    clipped = (old + np.clip(v - old, -clip_range, clip_range) - returns) ** 2
    return 0.5 * np.maximum(unclipped, clipped) * mask, (clipped > unclipped) * mask

  def run(v):
    return ppo_losses.value_loss(v, jnp.asarray(old, jnp.float32), jnp.asarray(returns, jnp.float32), mask,
                                 clip_range=clip_range)

  out = run(jnp.asarray(values, jnp.float32))
  want_loss, want_clipped = reference(values)
  np.testing.assert_allclose(out.loss, want_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out.clipped, want_clipped)
  grad = jax.grad(lambda v: jnp.sum(run(v).loss))(jnp.asarray(values, jnp.float32))
  np.testing.assert_allclose(grad, _numeric_grad(lambda v: reference(v)[0].sum(), values), rtol=1e-3, atol=1e-5)


def _entropy_reference(hidden, kernel):
  logits = hidden @ kernel
  logits = logits - logits.max(-1, keepdims=True)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return -(np.exp(log_p) * log_p).sum(-1), log_p


@pytest.mark.parametrize("chunk_size", [0, 4, 7])
def test_entropy_values_and_gradients(chunk_size):
  rng = np.random.default_rng(4)
  hidden, kernel = rng.normal(size=(2, 7, 5)), rng.normal(size=(5, 11))
  targets = rng.integers(0, 11, (2, 7))
  weights = rng.normal(size=(2, 7))

  def run(h, k):
    return ppo_losses.token_entropy(lambda x: x @ k, h, chunk_size)

  h32, k32 = jnp.asarray(hidden, jnp.float32), jnp.asarray(kernel, jnp.float32)
  want, log_p = _entropy_reference(hidden, kernel)
  np.testing.assert_allclose(run(h32, k32), want, rtol=1e-5, atol=1e-5)
  log_probs, entropy = losses.token_log_probs_and_entropy(lambda x: x @ k32, h32, jnp.asarray(targets),
                                                              chunk_size)
  np.testing.assert_allclose(entropy, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(log_probs, np.take_along_axis(log_p, targets[..., None], -1)[..., 0], rtol=1e-5,
                             atol=1e-5)
  grads = jax.grad(lambda h, k: jnp.sum(run(h, k) * weights), argnums=(0, 1))(h32, k32)
  np.testing.assert_allclose(grads[0], _numeric_grad(lambda h: (_entropy_reference(h, kernel)[0] * weights).sum(),
                                                     hidden), rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(grads[1], _numeric_grad(lambda k: (_entropy_reference(hidden, k)[0] * weights).sum(),
                                                     kernel), rtol=1e-3, atol=1e-4)


def test_entropy_never_holds_all_logits():
  """As the chunked log-probs: the compiled gradient's largest temporaries are a chunk of logits, not all of them."""
  tokens, vocab, chunk = 4096, 2048, 256
  hidden = jax.ShapeDtypeStruct((tokens, 16), jnp.float32)
  kernel = jax.ShapeDtypeStruct((16, vocab), jnp.float32)
  compiled = jax.jit(jax.grad(lambda h, k: jnp.sum(ppo_losses.token_entropy(lambda x: x @ k, h, chunk)),
                              argnums=(0, 1))).lower(hidden, kernel).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < tokens * vocab * 4 / 4


def test_kl_shaped_rewards():
  rng = np.random.default_rng(5)
  mask = _mask()
  kl, scores = rng.normal(size=(B, T)), rng.normal(size=B)
  want = -0.1 * kl * mask
  for b in range(B):
    real = np.flatnonzero(mask[b])
    if len(real):
      want[b, real[-1]] += scores[b]
  got = ppo_losses.kl_shaped_rewards(scores, kl, mask, beta=0.1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(losses.last_index(mask), [T - 1, 5, 7, 0])
