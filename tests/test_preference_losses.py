"""Preference losses against float64 numpy references written from the papers' formulas.

Gradients: jax.grad of the mean loss, run in float32 as in training, against numpy central finite differences
of the float64 reference. Each pair's loss depends only on that pair's inputs, so one perturbation of a whole
input array gives every pair's partial derivative at once. The step is 1e-3 * min(1, |x|), so log-probs near 0
(where log(1 - e^x) is steep) get a step far smaller than their distance to 0.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tunix_core.modes import preference_losses as pl

PAIRS = 24
LN2 = np.log(2.0)


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _np_dpo(pc, pr, rc, rr, loss_type, beta, eps, lc=None, lr=None):
  """Per-pair float64 DPO-family losses (Rafailov 2023; Azar 2023; SLiC; Chowdhury 2024)."""
  if loss_type == "ipo":
    margin = (pc - rc) / lc - (pr - rr) / lr
    return (margin - 1.0 / (2.0 * beta)) ** 2
  margin = (pc - pr) - (rc - rr)
  clean, flipped = -_log_sigmoid(beta * margin), -_log_sigmoid(-beta * margin)
  if loss_type == "sigmoid":
    return (1.0 - eps) * clean + eps * flipped
  if loss_type == "hinge":
    return np.maximum(0.0, 1.0 - beta * margin)
  return ((1.0 - eps) * clean - eps * flipped) / (1.0 - 2.0 * eps)


def _np_orpo(c, r, nll, lam):
  """Hong et al. 2024: odds(y) = P / (1 - P), P = exp(mean log-prob); loss = NLL - lam log s(log odds ratio).

  Straight from the definition: in float64, 1 - exp(c) keeps ~9 significant digits even at c = -1e-7.
  """
  log_odds_c = np.log(np.exp(c) / (1.0 - np.exp(c)))
  log_odds_r = np.log(np.exp(r) / (1.0 - np.exp(r)))
  return nll - lam * _log_sigmoid(log_odds_c - log_odds_r)


def _np_simpo(c, r, beta, gamma):
  """Meng et al. 2024: -log s(beta c - beta r - gamma) over length-averaged log-probs."""
  return -_log_sigmoid(beta * c - beta * r - gamma)


def _f32(*arrays):
  """float32 copies, and the float64 values of exactly those float32 numbers."""
  f32 = [np.asarray(a, np.float32) for a in arrays]
  return f32, [a.astype(np.float64) for a in f32]


def _fd_grad_of_mean(per_pair, args, index):
  """d mean(per_pair(*args)) / d args[index], by central differences (per_pair is separable over pairs)."""
  x = args[index]
  step = 1e-3 * np.minimum(1.0, np.abs(x))
  plus = list(args)
  minus = list(args)
  plus[index], minus[index] = x + step, x - step
  return (per_pair(*plus) - per_pair(*minus)) / (2.0 * step) / x.shape[0]


def _evaluate(fn, *args):
  """fn's outputs and the gradients of mean(losses) w.r.t. every argument, in one compiled float32 program."""
  def mean_loss(*xs):
    outputs = fn(*xs)
    return jnp.mean(outputs[0]), outputs

  grads, outputs = jax.jit(jax.grad(mean_loss, argnums=tuple(range(len(args))), has_aux=True))(*args)
  assert all(o.dtype == jnp.float32 and o.shape == np.shape(args[0]) for o in outputs)
  return outputs, grads


def _check(jax_fn, np_fn, args32, args64):
  """Values and gradients (w.r.t. every argument) of jax_fn against np_fn; returns jax_fn's outputs."""
  outputs, grads = _evaluate(jax_fn, *args32)
  np.testing.assert_allclose(np.asarray(outputs[0]), np_fn(*args64), rtol=1e-5, atol=1e-5)
  for i, g in enumerate(grads):
    np.testing.assert_allclose(np.asarray(g), _fd_grad_of_mean(np_fn, args64, i), rtol=1e-4, atol=1e-6,
                               err_msg=f"gradient w.r.t. argument {i}")
  return outputs


def _dpo_inputs(seed):
  """Summed log-probs: policy in [-60, -5], reference within ~8 nats of it; lengths 3..40 per side."""
  rng = np.random.default_rng(seed)
  pc, pr = -rng.uniform(5, 60, PAIRS), -rng.uniform(5, 60, PAIRS)
  rc, rr = pc + rng.normal(0, 8, PAIRS), pr + rng.normal(0, 8, PAIRS)
  lengths = rng.integers(3, 41, (2, PAIRS)).astype(np.float32)
  return _f32(pc, pr, rc, rr), lengths


def _mean_inputs(seed):
  """Length-averaged log-probs in [-3, -0.05] for chosen and rejected."""
  rng = np.random.default_rng(seed)
  return -rng.uniform(0.05, 3.0, PAIRS), -rng.uniform(0.05, 3.0, PAIRS)


@pytest.mark.parametrize("loss_type,beta,eps,seed", [
    ("sigmoid", 0.1, 0.0, 10), ("sigmoid", 0.5, 0.2, 11), ("ipo", 0.1, 0.0, 12), ("ipo", 0.5, 0.0, 13),
    ("hinge", 0.3, 0.0, 14), ("robust", 0.1, 0.1, 15), ("robust", 0.5, 0.3, 16)])
def test_dpo_matches_numpy(loss_type, beta, eps, seed):
  (args32, args64), lengths = _dpo_inputs(seed)
  lc, lr = lengths
  if loss_type == "hinge":  # finite differences must not straddle the kink
    pc, pr, rc, rr = args64
    assert np.min(np.abs(1.0 - beta * ((pc - pr) - (rc - rr)))) > 1e-2
    assert 0 < np.sum(beta * ((pc - pr) - (rc - rr)) > 1) < PAIRS  # both sides of the margin
  lengths_kw = dict(chosen_lengths=jnp.asarray(lc), rejected_lengths=jnp.asarray(lr))

  def jax_fn(*xs):
    return pl.dpo(*xs, loss_type=loss_type, beta=beta, label_smoothing=eps, **lengths_kw)

  def np_fn(*xs):
    return _np_dpo(*xs, loss_type, beta, eps, lc.astype(np.float64), lr.astype(np.float64))

  _, chosen_rewards, rejected_rewards = _check(jax_fn, np_fn, args32, args64)
  pc, pr, rc, rr = args64
  scale_c, scale_r = (lc, lr) if loss_type == "ipo" else (1.0, 1.0)
  np.testing.assert_allclose(np.asarray(chosen_rewards), beta * (pc - rc) / scale_c, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(rejected_rewards), beta * (pr - rr) / scale_r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lam", [0.1, 2.0])
def test_orpo_matches_numpy(lam):
  c, r = _mean_inputs(seed=1)
  nll = -c + np.random.default_rng(2).normal(0, 0.1, PAIRS)
  args32, args64 = _f32(c, r, nll)
  _, chosen_rewards, rejected_rewards = _check(lambda *xs: pl.orpo(*xs, lam=lam), lambda *xs: _np_orpo(*xs, lam),
                                              args32, args64)
  np.testing.assert_allclose(np.asarray(chosen_rewards), lam * args64[0], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(rejected_rewards), lam * args64[1], rtol=1e-6)


@pytest.mark.parametrize("beta,gamma", [(2.0, 0.5), (10.0, 3.0)])
def test_simpo_matches_numpy(beta, gamma):
  args32, args64 = _f32(*_mean_inputs(seed=3))
  _, chosen_rewards, rejected_rewards = _check(lambda *xs: pl.simpo(*xs, beta=beta, gamma=gamma),
                                              lambda *xs: _np_simpo(*xs, beta, gamma), args32, args64)
  np.testing.assert_allclose(np.asarray(chosen_rewards), beta * args64[0], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(rejected_rewards), beta * args64[1], rtol=1e-6)


def test_policy_equal_to_reference_gives_ln2():
  """h = 0: log s(0) = -ln 2 in both terms, so label smoothing and robust's correction leave ln 2."""
  (args32, _), _ = _dpo_inputs(seed=4)

  def all_cases(pc, pr):
    return jnp.stack([pl.dpo(pc, pr, pc, pr, loss_type=loss_type, beta=0.1, label_smoothing=eps)[0]
                      for loss_type in ("sigmoid", "robust") for eps in (0.0, 0.1, 0.4)])

  losses = np.asarray(jax.jit(all_cases)(*args32[:2]))
  np.testing.assert_allclose(losses, LN2, rtol=1e-6)


def test_hinge_zero_beyond_margin():
  beta, zeros = 0.1, np.zeros(4, np.float32)
  policy_chosen = np.array([10.0, 25.0, 9.0, 0.0], np.float32)  # beta * h = 1, 2.5, 0.9, 0
  (losses, _, _), grads = _evaluate(
      lambda *xs: pl.dpo(*xs, loss_type="hinge", beta=beta, label_smoothing=0.0), policy_chosen, zeros, zeros, zeros)
  np.testing.assert_allclose(np.asarray(losses), [0.0, 0.0, 0.1, 1.0], atol=1e-6)
  np.testing.assert_allclose(np.asarray(grads[0])[1:] * 4, [0.0, -beta, -beta], atol=1e-7)


def test_robust_with_zero_eps_is_sigmoid():
  (args32, _), _ = _dpo_inputs(seed=5)
  robust, robust_grads = _evaluate(
      lambda *xs: pl.dpo(*xs, loss_type="robust", beta=0.2, label_smoothing=0.0), *args32)
  sigmoid, sigmoid_grads = _evaluate(
      lambda *xs: pl.dpo(*xs, loss_type="sigmoid", beta=0.2, label_smoothing=0.0), *args32)
  for a, b in zip(robust + robust_grads, sigmoid + sigmoid_grads):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)


def test_robust_is_unbiased_under_label_flips():
  """Chowdhury et al. 2024: averaged over a flip of probability eps, rDPO's loss is the clean DPO loss."""
  (args32, _), _ = _dpo_inputs(seed=6)

  def flip_average_minus_clean(pc, pr, rc, rr):
    clean = pl.dpo(pc, pr, rc, rr, loss_type="sigmoid", beta=0.1, label_smoothing=0.0)[0]
    differences = []
    for eps in (0.1, 0.3):
      kept = pl.dpo(pc, pr, rc, rr, loss_type="robust", beta=0.1, label_smoothing=eps)[0]
      flipped = pl.dpo(pr, pc, rr, rc, loss_type="robust", beta=0.1, label_smoothing=eps)[0]
      differences.append((1 - eps) * kept + eps * flipped - clean)
    return jnp.stack(differences)

  np.testing.assert_allclose(np.asarray(jax.jit(flip_average_minus_clean)(*args32)), 0.0, atol=2e-5)


def test_ipo_needs_lengths_and_bad_arguments_raise():
  x = jnp.zeros(3)
  with pytest.raises(ValueError, match="ipo"):
    pl.dpo(x, x, x, x, loss_type="ipo", beta=0.1, label_smoothing=0.0)
  with pytest.raises(ValueError, match="ipo"):
    pl.dpo(x, x, x, x, loss_type="ipo", beta=0.1, label_smoothing=0.0, chosen_lengths=jnp.ones(3))
  with pytest.raises(ValueError, match="loss_type"):
    pl.dpo(x, x, x, x, loss_type="kto", beta=0.1, label_smoothing=0.0)
  with pytest.raises(ValueError, match="0.5"):
    pl.dpo(x, x, x, x, loss_type="robust", beta=0.1, label_smoothing=0.5)


def test_orpo_stable_near_zero_and_very_negative():
  """log(1 - e^x) near x = 0 (probability ~1) and far below it: accurate values and gradients."""
  c = np.array([-1e-7, -3e-6, -1e-4, -0.01, -0.69, -0.7, -30.0, -80.0, -1e-7, -200.0])
  r = np.array([-2.0, -1e-7, -80.0, -1e-3, -0.7, -0.69, -1e-6, -0.5, -1e-7, -300.0])
  args32, args64 = _f32(c, r, -c)
  _check(lambda *xs: pl.orpo(*xs, lam=0.5), lambda *xs: _np_orpo(*xs, 0.5), args32, args64)


def test_orpo_zero_log_prob_stays_finite():
  """A mean log-prob that rounds to 0 (probability 1) is clamped: finite loss and gradients, not inf/nan."""
  c, r = np.array([0.0, -0.5, 0.0], np.float32), np.array([-1.0, 0.0, 0.0], np.float32)
  (losses, _, _), grads = _evaluate(lambda a, b: pl.orpo(a, b, -a, lam=0.1), c, r)
  assert np.all(np.isfinite(np.asarray(losses)))
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_simpo_gamma_shifts_the_margin():
  """gamma is a target margin: loss(c, r; gamma) = loss(c - gamma / beta, r; 0), ln 2 where beta (c - r) = gamma."""
  beta, gamma = 2.0, 0.5
  c, r = _f32(*_mean_inputs(seed=7))[0]

  def cases(c, r):
    return (pl.simpo(c, r, beta=beta, gamma=gamma)[0], pl.simpo(c - gamma / beta, r, beta=beta, gamma=0.0)[0],
            pl.simpo(c, r, beta=beta, gamma=0.0)[0], pl.simpo(r + gamma / beta, r, beta=beta, gamma=gamma)[0])

  shifted, moved, unshifted, at_margin = map(np.asarray, jax.jit(cases)(c, r))
  np.testing.assert_allclose(shifted, moved, rtol=1e-5, atol=1e-6)
  assert np.all(shifted > unshifted)
  np.testing.assert_allclose(at_margin, LN2, rtol=1e-5)


def test_rewards_carry_no_gradient_and_bfloat16_inputs_give_float32():
  (args32, _), (lc, lr) = _dpo_inputs(seed=8)
  calls = (
      lambda *xs: pl.dpo(*xs, loss_type="ipo", beta=0.1, label_smoothing=0.0, chosen_lengths=lc,
                         rejected_lengths=lr),
      lambda a, b, c, d: pl.orpo(a / 20, b / 20, -a / 20, lam=0.1),
      lambda a, b, c, d: pl.simpo(a / 20, b / 20, beta=2.0, gamma=0.5),
  )

  def reward_grads(*xs):
    return [jax.grad(lambda *ys: jnp.sum(call(*ys)[1] + call(*ys)[2]), argnums=(0, 1, 2, 3))(*xs) for call in calls]

  assert not any(np.any(np.asarray(g)) for g in jax.tree.leaves(jax.jit(reward_grads)(*args32)))
  bf16 = [jnp.asarray(a, jnp.bfloat16) for a in args32]
  outputs = jax.jit(lambda *xs: [call(*xs) for call in calls])(*bf16)
  assert all(o.dtype == jnp.float32 and o.shape == (PAIRS,) for o in jax.tree.leaves(outputs))


@pytest.mark.parametrize("margin,center", [(0.0, 0.0), (0.5, 0.01)])
def test_bradley_terry(margin, center):
  """Reward-model loss: -log s(r_c - r_r - margin) + center (r_c + r_r)^2 on scalar rewards."""
  rng = np.random.default_rng(11)
  args32, args64 = _f32(rng.normal(0, 2, PAIRS), rng.normal(0, 2, PAIRS))
  _check(lambda c, r: pl.bradley_terry(c, r, margin=margin, center_coefficient=center),
         lambda c, r: -_log_sigmoid(c - r - margin) + center * (c + r) ** 2, args32, args64)
