"""Per-pair preference losses: DPO (sigmoid, ipo, hinge, robust), ORPO, SimPO and the reward model's Bradley-Terry.

Every function takes float arrays of shape [pairs] (computed in float32) and returns (losses, chosen_rewards,
rejected_rewards), each float32 [pairs]. Losses are per pair; the caller reduces them. Rewards are the implicit
rewards TRL logs, for metrics only: they carry no gradient.
"""

import math

import jax
import jax.numpy as jnp

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")

# log(1 - exp(x)) -> -inf as x -> 0-; log-probs are clamped to at most this, so the result stays finite
# (about -69) and its gradient (about -1/x) stays far below the float32 maximum.
_LOG1MEXP_MAX_X = -1e-30

Losses = tuple[jax.Array, jax.Array, jax.Array]


def _f32(x: jax.Array) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def dpo(policy_chosen: jax.Array, policy_rejected: jax.Array, reference_chosen: jax.Array,
        reference_rejected: jax.Array, *, loss_type: str, beta: float, label_smoothing: float,
        chosen_lengths: jax.Array | None = None, rejected_lengths: jax.Array | None = None) -> Losses:
  """DPO-family losses from SUMMED completion log-probs of the policy and the reference model.

  With per-side log-ratios rc = policy_chosen - reference_chosen, rr = policy_rejected - reference_rejected
  and h = rc - rr, eps = label_smoothing:
    sigmoid: -(1-eps) log s(beta h) - eps log s(-beta h)      DPO, Rafailov et al. 2023 (arXiv 2305.18290)
             eq. 7; eps > 0 is Mitchell's 2023 conservative DPO (TRL loss_type="sigmoid").
    ipo:     (h - 1/(2 beta))^2 with rc, rr each divided by its completion length      Azar et al. 2023
             (arXiv 2310.12036) eq. 17, beta = IPO's tau; TRL averages the log-probs over completion tokens for ipo.
    hinge:   relu(1 - beta h)      SLiC, Zhao et al. 2023 (arXiv 2305.10425); TRL loss_type="hinge".
    robust:  [-(1-eps) log s(beta h) + eps log s(-beta h)] / (1 - 2 eps)      rDPO, Chowdhury et al. 2024
             (arXiv 2403.00409): unbiased under labels flipped with probability eps; same signs as TRL "robust".
  eps only enters sigmoid and robust. Rewards are beta * rc and beta * rr (length-averaged for ipo, as TRL).
  """
  if loss_type not in DPO_LOSS_TYPES:
    raise ValueError(f"loss_type={loss_type!r}: expected one of {', '.join(DPO_LOSS_TYPES)}")
  chosen_ratio = _f32(policy_chosen) - _f32(reference_chosen)
  rejected_ratio = _f32(policy_rejected) - _f32(reference_rejected)
  if loss_type == "ipo":
    if chosen_lengths is None or rejected_lengths is None:
      raise ValueError("loss_type='ipo' needs chosen_lengths and rejected_lengths (completion tokens per sequence)")
    chosen_ratio = chosen_ratio / jnp.maximum(_f32(chosen_lengths), 1.0)
    rejected_ratio = rejected_ratio / jnp.maximum(_f32(rejected_lengths), 1.0)
  logits = beta * (chosen_ratio - rejected_ratio)
  if loss_type == "sigmoid":
    losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits) - label_smoothing * jax.nn.log_sigmoid(-logits)
  elif loss_type == "ipo":
    losses = jnp.square((chosen_ratio - rejected_ratio) - 1.0 / (2.0 * beta))
  elif loss_type == "hinge":
    losses = jax.nn.relu(1.0 - logits)
  else:
    if not label_smoothing < 0.5:
      raise ValueError(f"label_smoothing={label_smoothing}: robust DPO needs a flip probability below 0.5")
    losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits)
              + label_smoothing * jax.nn.log_sigmoid(-logits)) / (1.0 - 2.0 * label_smoothing)
  return losses, _reward(beta, chosen_ratio), _reward(beta, rejected_ratio)


def orpo(chosen_mean_logps: jax.Array, rejected_mean_logps: jax.Array, chosen_nll: jax.Array, *,
         lam: float) -> Losses:
  """ORPO (Hong et al. 2024, arXiv 2403.07691, eqs. 4, 6, 7; TRL ORPOTrainer): chosen_nll - lam * log s(log_odds).

  log_odds = log[odds(c) / odds(r)] with odds(p) = p / (1 - p) and p = exp(mean log-prob), i.e.
  (c - r) - (log(1 - e^c) - log(1 - e^r)). Inputs are LENGTH-AVERAGED log-probs (< 0); chosen_nll is the
  chosen sequence's SFT loss (normally -chosen_mean_logps). Rewards are lam * mean log-probs, as TRL.
  """
  chosen, rejected = _f32(chosen_mean_logps), _f32(rejected_mean_logps)
  log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
  losses = _f32(chosen_nll) - lam * jax.nn.log_sigmoid(log_odds)
  return losses, _reward(lam, chosen), _reward(lam, rejected)


def simpo(chosen_mean_logps: jax.Array, rejected_mean_logps: jax.Array, *, beta: float, gamma: float) -> Losses:
  """SimPO (Meng et al. 2024, arXiv 2405.14734; TRL CPOTrainer loss_type="simpo"): -log s(beta (c - r) - gamma).

  Inputs are LENGTH-AVERAGED log-probs; no reference model. gamma is the target reward margin. Rewards are
  beta * mean log-probs (the paper's implicit reward).
  """
  chosen, rejected = _f32(chosen_mean_logps), _f32(rejected_mean_logps)
  losses = -jax.nn.log_sigmoid(beta * (chosen - rejected) - gamma)
  return losses, _reward(beta, chosen), _reward(beta, rejected)


def bradley_terry(chosen_rewards: jax.Array, rejected_rewards: jax.Array, *, margin: float = 0.0,
                  center_coefficient: float = 0.0) -> Losses:
  """Reward-model loss on a pair's scalar rewards (Ouyang et al. 2022, arXiv 2203.02155, eq. 1; TRL RewardTrainer):
  -log s(r_c - r_r - margin) + center_coefficient (r_c + r_r)^2.

  margin > 0 asks for a gap of at least that much (Llama 2's margin, one value for every pair here); the centering
  term (Eisenstein et al. 2023, TRL center_rewards_coefficient) keeps the rewards' mean near 0, since the
  Bradley-Terry term only sees differences. Returns the rewards themselves, without gradient, for metrics.
  """
  chosen, rejected = _f32(chosen_rewards), _f32(rejected_rewards)
  losses = -jax.nn.log_sigmoid(chosen - rejected - margin) + center_coefficient * jnp.square(chosen + rejected)
  return losses, _reward(1.0, chosen), _reward(1.0, rejected)


def _reward(scale: float, log_ratio: jax.Array) -> jax.Array:
  return jax.lax.stop_gradient(scale * log_ratio)


def _log1mexp(x: jax.Array) -> jax.Array:
  """log(1 - exp(x)) for x < 0, accurate everywhere (Maechler 2012, "Accurately computing log(1 - exp(-|a|))").

  log(-expm1(x)) above -ln 2, log1p(-exp(x)) below. The second branch only sees x <= -ln 2: near 0 it would
  be log1p(-1) = -inf, and its gradient, though unselected, would turn into nan. x is first clamped to at most
  _LOG1MEXP_MAX_X.
  """
  x = jnp.minimum(x, _LOG1MEXP_MAX_X)
  cut = -math.log(2.0)
  near_zero = jnp.log(-jnp.expm1(x))
  far = jnp.log1p(-jnp.exp(jnp.minimum(x, cut)))
  return jnp.where(x > cut, near_zero, far)
