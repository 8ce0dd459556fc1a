"""GRPO-family objectives, KL estimators, aggregations and advantages against float64 numpy references:
values and gradients on random inputs."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tunix_core import losses
from tunix_core.rl import advantages as advantages_lib, objectives

ROWS, LENGTH, HORIZON = 6, 9, 12


def _inputs(seed: int):
  rng = np.random.default_rng(seed)
  log_probs = rng.normal(-2.0, 1.0, (ROWS, LENGTH))
  old = log_probs + rng.normal(0.0, 0.3, (ROWS, LENGTH))  # ratios spread well past any clip range
  reference = log_probs + rng.normal(0.0, 0.5, (ROWS, LENGTH))
  advantages = rng.normal(0.0, 1.0, ROWS)
  lengths = rng.integers(1, LENGTH + 1, ROWS)
  mask = (np.arange(LENGTH)[None] < lengths[:, None]).astype(np.float64)
  return log_probs, old, reference, advantages, mask


def _np_kl(log_probs, reference, estimator):
  """(value, d value / d log_probs) per token."""
  d = reference - log_probs
  return {"k1": (-d, np.ones_like(d)), "k2": (0.5 * d * d, -d), "k3": (np.exp(d) - d - 1, 1 - np.exp(d))}[estimator]


def _np_aggregation_weights(mask, how):
  """Each token's weight in the aggregated loss (the loss is linear in the token losses)."""
  tokens = mask.sum(-1, keepdims=True)
  rows = float((tokens > 0).sum())
  return mask * {"token-mean": 1.0 / mask.sum(), "sequence-mean-token-mean": 1.0 / (np.maximum(tokens, 1) * rows),
                 "sequence-mean-token-sum": 1.0 / rows, "sequence-mean-token-sum-norm": 1.0 / (rows * HORIZON)}[how]


def _np_policy(log_probs, old, advantages, mask, algo, eps, eps_high, dual_c):
  """(token losses, d loss_t / d log_prob_t, ratio). Every token's loss depends on its own log-prob only (for
  gspo_token through the stop-gradient form)."""
  if algo == "gspo_token":
    sequence = np.exp(((log_probs - old) * mask).sum(-1, keepdims=True) / mask.sum(-1, keepdims=True))
    ratio = np.broadcast_to(sequence, log_probs.shape)
  else:
    ratio = np.exp(log_probs - old)
  d_ratio = ratio  # d ratio_t / d log_prob_t, in both forms
  a = advantages[:, None]
  unclipped, clipped = -a * ratio, -a * np.clip(ratio, 1 - eps, 1 + eps_high)
  loss = np.maximum(unclipped, clipped)
  grad = np.where(unclipped >= clipped, -a * d_ratio, 0.0)
  if dual_c:
    bounded = (a < 0) & (loss > -a * dual_c)
    loss = np.where(bounded, -a * dual_c, loss)
    grad = np.where(bounded, 0.0, grad)
  return loss, grad, ratio


# Every algo with every aggregation; the KL estimators take turns (each is also checked alone below).
CASES = [(algo, how, losses.KL_ESTIMATORS[i % 3])
         for i, (algo, how) in enumerate(itertools.product(objectives.LOSS_ALGOS, losses.AGGREGATIONS))]


@pytest.mark.parametrize("algo,aggregation,estimator", CASES)
def test_objective_value_and_gradient_match_numpy(algo, aggregation, estimator):
  seed = CASES.index((algo, aggregation, estimator))
  log_probs, old, reference, advantages, mask = _inputs(seed)
  eps, eps_high = (3e-4, 4e-4) if algo == "gspo_token" else (0.2, 0.28 if algo == "dapo" else 0.2)
  dual_c, beta = (3.0 if seed % 2 else 0.0), 0.04

  def total(lp):
    out = objectives.policy_loss(lp, jnp.asarray(old, jnp.float32), jnp.asarray(advantages, jnp.float32),
                                 jnp.asarray(mask), algo=algo, epsilon=eps, epsilon_high=eps_high, dual_clip_c=dual_c)
    token = out.token_losses + beta * losses.kl_penalty(lp, jnp.asarray(reference, jnp.float32), estimator)
    loss_sum, weight = losses.aggregate(token, jnp.asarray(mask), aggregation, HORIZON)
    return loss_sum / weight

  value, grad = jax.value_and_grad(total)(jnp.asarray(log_probs, jnp.float32))
  pg, pg_grad, _ = _np_policy(log_probs, old, advantages, mask, algo, eps, eps_high, dual_c)
  kl, kl_grad = _np_kl(log_probs, reference, estimator)
  weights = _np_aggregation_weights(mask, aggregation)
  np.testing.assert_allclose(float(value), np.sum((pg + beta * kl) * weights), rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), (pg_grad + beta * kl_grad) * weights, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("estimator", losses.KL_ESTIMATORS)
def test_kl_estimators_match_numpy(estimator):
  log_probs, _, reference, _, _ = _inputs(7)
  got = losses.kl_penalty(jnp.asarray(log_probs, jnp.float32), jnp.asarray(reference, jnp.float32), estimator)
  np.testing.assert_allclose(np.asarray(got), _np_kl(log_probs, reference, estimator)[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("algo", objectives.LOSS_ALGOS)
def test_clip_indicators_and_ratio_match_numpy(algo):
  log_probs, old, _, advantages, mask = _inputs(11)
  eps, eps_high, dual_c = 0.1, 0.15, 1.5
  out = objectives.policy_loss(jnp.asarray(log_probs, jnp.float32), jnp.asarray(old, jnp.float32),
                               jnp.asarray(advantages, jnp.float32), jnp.asarray(mask), algo=algo, epsilon=eps,
                               epsilon_high=eps_high, dual_clip_c=dual_c)
  _, _, ratio = _np_policy(log_probs, old, advantages, mask, algo, eps, eps_high, dual_c)
  a = np.broadcast_to(advantages[:, None], ratio.shape)
  np.testing.assert_allclose(np.asarray(out.ratio), ratio, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(out.clipped_low), ((a < 0) & (ratio < 1 - eps)).astype(np.float32))
  np.testing.assert_array_equal(np.asarray(out.clipped_high), ((a > 0) & (ratio > 1 + eps_high)).astype(np.float32))
  unclipped = np.maximum(-a * ratio, -a * np.clip(ratio, 1 - eps, 1 + eps_high))
  np.testing.assert_array_equal(np.asarray(out.clipped_dual), ((a < 0) & (unclipped > -a * dual_c)).astype(np.float32))
  if algo != "gspo_token":  # six sequence ratios need not reach both sides
    assert np.asarray(out.clipped_low).any() and np.asarray(out.clipped_high).any()


def test_gspo_token_value_is_the_sequence_ratio():
  """Every token of a row carries the row's sequence ratio exp(mean log-ratio), and its loss is -A s_i inside
  the clip range, whatever the individual token ratios are."""
  log_probs, old, _, advantages, mask = _inputs(3)
  out = objectives.policy_loss(jnp.asarray(log_probs, jnp.float32), jnp.asarray(old, jnp.float32),
                               jnp.asarray(advantages, jnp.float32), jnp.asarray(mask), algo="gspo_token",
                               epsilon=10.0, epsilon_high=10.0)
  sequence = np.exp(((log_probs - old) * mask).sum(-1) / mask.sum(-1))
  for row in range(ROWS):
    real = mask[row] > 0
    np.testing.assert_allclose(np.asarray(out.ratio)[row][real], sequence[row], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out.token_losses)[row][real], -advantages[row] * sequence[row], rtol=1e-5)


def test_ratio_is_exactly_one_against_the_stopped_gradient():
  """The first update of a rollout batch uses old = stop_gradient(current): ratio exactly 1, nothing clipped,
  gradient -A per token (the plain policy gradient)."""
  log_probs, _, _, advantages, mask = _inputs(5)
  for algo in objectives.LOSS_ALGOS:
    def total(lp):
      out = objectives.policy_loss(lp, jax.lax.stop_gradient(lp), jnp.asarray(advantages, jnp.float32),
                                   jnp.asarray(mask), algo=algo, epsilon=1e-6, epsilon_high=1e-6, dual_clip_c=1.01)
      return jnp.sum(out.token_losses * mask), out
    grad, out = jax.grad(total, has_aux=True)(jnp.asarray(log_probs, jnp.float32))
    assert np.all(np.asarray(out.ratio) == 1.0)
    assert not np.asarray(out.clipped_low).any() and not np.asarray(out.clipped_high).any()
    assert not np.asarray(out.clipped_dual).any()
    np.testing.assert_allclose(np.asarray(grad), -advantages[:, None] * mask, rtol=1e-6)


@pytest.mark.parametrize("scale", advantages_lib.SCALE_REWARDS)
def test_group_advantages_match_numpy(scale):
  rng = np.random.default_rng(1)
  groups, size = 5, 4
  rewards = rng.normal(size=groups * size)
  rewards[4:8] = 1.0  # a group of equal rewards
  got = advantages_lib.group_advantages(rewards, size, scale)
  expected = np.empty_like(rewards)
  for g in range(groups):
    block = rewards[g * size:(g + 1) * size]
    centred = block - block.mean()
    std = {"group": np.std(block, ddof=1), "batch": np.std(rewards, ddof=1), "none": None}[scale]
    expected[g * size:(g + 1) * size] = centred if std is None else centred / (std + advantages_lib.STD_EPSILON)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(got[4:8], 0.0)


def test_token_log_probs_and_entropy_match_numpy():
  rng = np.random.default_rng(0)
  hidden, kernel = rng.normal(size=(21, 8)).astype(np.float32), rng.normal(size=(8, 30)).astype(np.float32)
  targets = rng.integers(0, 30, 21).astype(np.int32)
  logits = hidden.astype(np.float64) @ kernel
  log_softmax = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  for chunk in (0, 8):
    log_probs, entropy = losses.token_log_probs_and_entropy(lambda h: h @ kernel, jnp.asarray(hidden),
                                                            jnp.asarray(targets), chunk)
    np.testing.assert_allclose(np.asarray(log_probs), log_softmax[np.arange(21), targets], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(entropy), -(np.exp(log_softmax) * log_softmax).sum(-1), rtol=1e-5)
