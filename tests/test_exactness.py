"""EVON's exactness claims (docs/algorithm.md), measured as KL(q || q*) against exact posteriors.

* Sequential Bayesian linear regression with a structured prior (task 2's prior = task 1's
  posterior) against the closed-form joint posterior (section at the end).

* Bayesian logistic regression with a full basis (one 1-D weight, `precondition_1d`): the
  fixed point is the optimal full-covariance Gaussian q*, computed in float64 without Monte
  Carlo by tests/logistic_reference.py. Issue target: KL <= 0.05 nats within 40,000 gradient
  evaluations on the 21-dimensional synthetic problem; digits 3-vs-5 must beat 0.61 nats.
* A quadratic loss with a Kronecker-structured Hessian A ⊗ B: the exact Gaussian posterior is
  known in closed form and EVON with both bases recovers it.

Every run is full batch in drop-in mode; the gradient-evaluation budget counts every call,
including the first one (at the mean), so calls = 1 + steps * mc_samples <= 40,000.

Options ("remedies", docs/algorithm.md "Exactness, and the options that reach it"), tuned on these problems:
refresh_method='eigh', factor_gradient='regularized', factor_statistic='per_sample',
mc_samples=8, b2=0.999 (the Hessian EMA forgets hess_init within the budget), shampoo_b=0.9995
(factor EMA averaged over ~2,000 steps x 8 samples), and a learning rate that is constant for
the first half, then decays as 1 / (1/lr0 + s): with EVON's Newton-like step this averages the
mean's Monte-Carlo noise over the second half (variance ~ 1/(mc_samples * s) posterior
variances per direction, instead of ~lr/2 for a constant lr).

Measured (CPU, float32, keys 0-3), KL in nats, split as mean + basis + spectrum:
  synthetic, remedies:          0.0022-0.0028 (0.0003 + 0.0015 + 0.0004 at key 0)
  synthetic, reference options: best 0.28 over mc_samples {1, 8} x constant lr {0.003, 0.01,
                                0.03} x shampoo_b {0.999, 0.9995, 0.9999} (basis part 0.28-0.46:
                                the loss-gradient factor's rank-one bias, docs/algorithm.md cause 2)
  digits (delta=1e-2), remedies: 0.013-0.014 (basis part 0.012)
  digits, reference options:    best 0.042
  Kronecker quadratic (averaging lr): 0.0023-0.0038 (remedies), 0.0041-0.0092 (reference
                                factor options); with reference options and a constant lr
                                0.025 (lr 0.003) to 0.13 (lr 0.03), all of it the mean's jitter
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import evon_jax
from evon_jax import posterior
from evon_jax.kronecker import matrix_sides
import logistic_reference as ref

BUDGET = 40_000  # gradient evaluations, first call included
WEIGHT_DECAY = 1e-2

REMEDIES = dict(
    refresh_method="eigh", factor_gradient="regularized", factor_statistic="per_sample")
REFERENCE_FACTOR_OPTIONS = dict(
    refresh_method="power_qr", factor_gradient="loss", factor_statistic="mean_gradient")


def averaging_schedule(lr0: float, warm_steps: int) -> optax.Schedule:
  """lr0 for `warm_steps` real steps, then 1 / (1/lr0 + s): Robbins-Monro averaging."""
  return optax.join_schedules(
      [optax.constant_schedule(lr0), lambda s: 1.0 / (1.0 / lr0 + s)], [warm_steps])


def tuned_options(mc_samples: int = 8) -> dict:
  steps = (BUDGET - 1) // mc_samples
  return dict(
      learning_rate=averaging_schedule(0.1, steps // 2), mc_samples=mc_samples, b2=0.999,
      shampoo_b=0.9995, hess_init=0.01, precondition_frequency=10, **REMEDIES)


def scan_drop_in(tx, loss, init, calls):
  """`calls` drop-in calls of `tx` on the full-batch `loss` under one jitted scan; returns
  the final optimizer state."""
  grad = jax.grad(loss)

  @jax.jit
  def train(params):
    def call(carry, _):
      params, state = carry
      updates, state = tx.update(grad(params), state, params)
      return (optax.apply_updates(params, updates), state), None

    carry, _ = jax.lax.scan(call, (params, tx.init(params)), None, length=calls)
    return carry[1]

  return train(init)


def run_drop_in(loss, init, *, ess, options, key=0):
  """Drop-in EVON for the whole budget; returns the final optimizer state."""
  mc_samples = options.get("mc_samples", 1)
  steps = (BUDGET - 1) // mc_samples
  tx = evon_jax.evon(ess=ess, weight_decay=WEIGHT_DECAY, whiten=False, key=key, **options)
  return scan_drop_in(tx, loss, init, 1 + steps * mc_samples)


def logistic_kl(X, y, options, key=0):
  """Split KL(q || q*) of drop-in EVON on full-batch Bayesian logistic regression."""
  n, d = X.shape
  m_star, S_star = ref.optimal_gaussian(X, y, float(n), WEIGHT_DECAY)
  X32, y32 = jnp.asarray(X, jnp.float32), jnp.asarray(y, jnp.float32)

  def loss(w):
    logits = X32 @ w
    return jnp.mean(jax.nn.softplus(logits) - y32 * logits)

  state = run_drop_in(loss, jnp.zeros(d, jnp.float32), ess=float(n),
                      options=dict(precondition_1d=True, **options), key=key)
  m = np.asarray(posterior.mean(state), np.float64)
  S = np.asarray(posterior.covariance(state), np.float64)
  basis = np.asarray(matrix_sides(posterior.bases(state))[0], np.float64)
  return ref.split_kl(m, S, m_star, S_star, basis=basis)


def _describe(parts):
  return ", ".join(f"{k} {v:.4f}" for k, v in parts.items())


# ---------------------------------------------------------------------------------------------
# Logistic regression


def test_synthetic_logistic_reaches_optimal_gaussian():
  X, y = ref.synthetic_logistic_problem()
  parts = logistic_kl(X, y, tuned_options())
  assert parts["total"] <= 0.05, _describe(parts)  # the target
  # regression margin: measured 0.0022-0.0028 over keys 0-3
  assert parts["total"] <= 0.01, _describe(parts)


def test_remedies_beat_reference_options_on_synthetic_logistic():
  """Same budget; reference options with their best constant lr found (0.003 with mc 8)."""
  X, y = ref.synthetic_logistic_problem()
  reference = logistic_kl(X, y, dict(
      learning_rate=0.003, mc_samples=8, b2=0.999, shampoo_b=0.9995, hess_init=0.01,
      **REFERENCE_FACTOR_OPTIONS))
  remedies = logistic_kl(X, y, tuned_options())
  # measured: reference 0.28 (basis 0.28), remedies 0.0022
  assert remedies["total"] < 0.1 * reference["total"], (_describe(reference),
                                                        _describe(remedies))


def test_digits_3_vs_5_beats_reference_claim():
  X, y = ref.digits_3_vs_5()
  parts = logistic_kl(X, y, tuned_options())
  assert parts["total"] < 0.61, _describe(parts)
  # regression margin: measured 0.013-0.014 over keys 0-3
  assert parts["total"] < 0.05, _describe(parts)


# ---------------------------------------------------------------------------------------------
# Quadratic loss with a Kronecker-structured Hessian


def _random_spd(rng, eigenvalues):
  q, r = np.linalg.qr(rng.standard_normal((len(eigenvalues), len(eigenvalues))))
  q = q * np.sign(np.diag(r))
  return q @ np.diag(eigenvalues) @ q.T


@pytest.mark.parametrize("factor_options", [REMEDIES, REFERENCE_FACTOR_OPTIONS],
                         ids=["remedies", "reference"])
def test_kronecker_quadratic_recovers_exact_posterior(factor_options):
  """loss(W) = 1/2 tr(A (W - W0) B (W - W0)ᵀ), Hessian A ⊗ B (row-major vec).

  Exact posterior: precision ess (A ⊗ B + δ I), mean (A ⊗ B + δ I)^{-1} (A ⊗ B) vec W0.
  Its eigenbasis is U_A ⊗ U_B, the Price estimator is unbiased for a_i b_j there, and at the
  optimum the regularised gradient's outer products have exactly these eigenvectors.

  Tolerance KL 0.02: what is left is Monte-Carlo noise. H is an EMA (b2 = 0.999) of estimates with relative variance
  2 / mc_samples, so var(H)/H² ≈ (1 - b2)/(1 + b2) · 2/4 ≈ 2.5e-4 and the spectrum costs
  ≈ d/4 · 2.5e-4 ≈ 0.0015 nats (d = 24); the averaged mean costs ≈ d / (2 mc_samples s)
  ≈ 0.0006 (s = 5,000 averaging steps); the basis, an EMA of noisy outer products, costs
  0.001-0.008. Measured over keys 0-2: KL 0.0023-0.0038 (remedies), 0.0041-0.0092 (reference
  factor options); relative mean error <= 9e-4; relative Frobenius covariance error 1.4-3.9 %:
  it is dominated by the few widest directions (a_i b_j = 0.2), each carrying H's ~1.6 %
  relative noise, hence the 8 % bound.
  """
  rng = np.random.default_rng(0)
  rows, cols, ess = 6, 4, 100.0
  A = _random_spd(rng, np.linspace(0.5, 3.0, rows))
  B = _random_spd(rng, np.linspace(0.4, 2.5, cols))
  W0 = rng.standard_normal((rows, cols))
  hessian = np.kron(A, B)
  precision = hessian + WEIGHT_DECAY * np.eye(rows * cols)
  m_star = np.linalg.solve(precision, hessian @ W0.reshape(-1))
  S_star = np.linalg.inv(ess * precision)

  A32, B32, W032 = (jnp.asarray(x, jnp.float32) for x in (A, B, W0))

  def loss(W):
    return 0.5 * jnp.sum((A32 @ (W - W032) @ B32) * (W - W032))

  mc_samples = 4
  steps = (BUDGET - 1) // mc_samples
  options = dict(learning_rate=averaging_schedule(0.1, steps // 2), mc_samples=mc_samples,
                 b2=0.999, shampoo_b=0.999, hess_init=1.0, **factor_options)
  state = run_drop_in(loss, jnp.zeros((rows, cols), jnp.float32), ess=ess, options=options)
  m = np.asarray(posterior.mean(state), np.float64).reshape(-1)
  S = np.asarray(posterior.covariance(state), np.float64)
  q_left, q_right = posterior.bases(state)
  basis = np.kron(np.asarray(q_left, np.float64), np.asarray(q_right, np.float64))
  parts = ref.split_kl(m, S, m_star, S_star, basis=basis)

  assert parts["total"] < 0.02, _describe(parts)
  assert np.linalg.norm(m - m_star) < 2e-3 * np.linalg.norm(m_star)
  assert np.linalg.norm(S - S_star) < 8e-2 * np.linalg.norm(S_star)


# ---------------------------------------------------------------------------------------------
# A structured prior: sequential Bayesian linear regression equals the joint posterior


def _regression_problem(seed=0, n=400, d=8):
  """Correlated features (covariance eigenvalues 0.3 … 3 in a random basis), y = X w + ε."""
  rng = np.random.default_rng(seed)
  u = np.linalg.qr(rng.standard_normal((d, d)))[0]
  X = rng.standard_normal((n, d)) @ np.diag(np.sqrt(np.geomspace(0.3, 3.0, d))) @ u.T
  return X, X @ rng.standard_normal(d) + rng.standard_normal(n)


def _fit_regression(kind, X, y, *, weight_decay, prior=None, init=None, key=0):
  """Drop-in EVON (full basis on the weight vector, the remedies) or IVON on
  ½ mean (y - X w)², ess = n: the posterior precision is Xᵀ X + n δ (+ the prior's)."""
  n, d = X.shape
  X32, y32 = jnp.asarray(X, jnp.float32), jnp.asarray(y, jnp.float32)
  mc_samples = 8
  steps = (BUDGET - 1) // mc_samples
  common = dict(learning_rate=averaging_schedule(0.1, steps // 2), ess=float(n),
                weight_decay=weight_decay, prior=prior, mc_samples=mc_samples, b2=0.999,
                hess_init=1.0, key=key)
  if kind == "evon":
    tx = evon_jax.evon(precondition_1d=True, shampoo_b=0.9995, **REMEDIES, **common)
  else:
    tx = evon_jax.ivon(rescale_lr=False, **common)
  return scan_drop_in(tx, lambda w: 0.5 * jnp.mean((y32 - X32 @ w) ** 2),
                      jnp.zeros(d, jnp.float32) if init is None else init,
                      1 + steps * mc_samples)


def _sequential(kind, X, y, delta):
  """Task 1 on the first half with the prior N(0, 1/(n₁ δ)); task 2 on the second half with
  task 1's posterior as its whole prior (weight_decay 0)."""
  half = len(X) // 2
  first = _fit_regression(kind, X[:half], y[:half], weight_decay=delta)
  return _fit_regression(kind, X[half:], y[half:], weight_decay=0.0,
                         prior=posterior.bubble(first), init=posterior.mean(first), key=10)


def test_sequential_regression_with_structured_prior_equals_joint_posterior():
  """Bayes' rule in two steps: p(w | D₁, D₂) ∝ p(D₂ | w) p(w | D₁). EVON with a full basis
  represents the Gaussian p(w | D₁) exactly and applies it exactly (the prior's gradient
  P₀ (M − m₀)/ess; the precision diag(Qᵀ P₀ Q)/ess in a basis that diagonalises the whole
  posterior precision), so the sequential run reaches the joint posterior
  N((XᵀX + n₁δ)⁻¹ Xᵀy, (XᵀX + n₁δ)⁻¹). IVON's diagonal posterior of task 1 drops the
  correlations, so its sequential posterior is another Gaussian.

  Measured (budget 40k evaluations per task, problem seed 0): EVON sequential vs exact
  0.0011-0.0018 nats over keys 0-7 (bound 0.006); the same run with the prior's gradient
  replaced by its diagonal, diag(Qᵀ P₀ Q) (M° − Qᵀ m₀)/ess (exact only when Q = Q₀),
  reaches 0.018-0.020 (keys 0/1), so the bound tells the two apart. EVON sequential vs EVON
  on all the data: 0.013/0.014 (keys 0/1; bound 0.05). IVON sequential vs exact: 1.17/1.18
  (problem seeds 0-5: 1.11-3.2; bound 0.5). Other problem seeds, EVON sequential vs exact:
  0.0007-0.032 (seeds 1-4), 0.09 at seed 5, whose joint run is itself 0.065 away.
  """
  X, y = _regression_problem(0)
  delta, half = 0.05, 200
  precision = X.T @ X + half * delta * np.eye(X.shape[1])
  m_star = np.linalg.solve(precision, X.T @ y)
  S_star = np.linalg.inv(precision)

  def kl_to_exact(state):
    m = np.asarray(posterior.mean(state), np.float64)
    return ref.split_kl(m, np.asarray(posterior.covariance(state), np.float64), m_star,
                        S_star)

  evon_seq = _sequential("evon", X, y, delta)
  evon_joint = _fit_regression("evon", X, y, weight_decay=delta * half / len(X))
  ivon_seq = _sequential("ivon", X, y, delta)
  evon_parts, ivon_parts = kl_to_exact(evon_seq), kl_to_exact(ivon_seq)
  assert evon_parts["total"] < 0.006, _describe(evon_parts)
  assert float(posterior.kl(evon_seq, evon_joint)) < 0.05
  assert ivon_parts["total"] > 0.5, _describe(ivon_parts)
  assert ivon_parts["total"] > 10 * evon_parts["total"]
