"""evon_jax.meanfield: mean-field Gaussian VI against closed forms, quadrature and SciPy."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.integrate
import scipy.stats

from evon_jax import meanfield


def _as64(x):
  return np.asarray(x, np.float64)


def _small_q():
  """A q over a two-leaf tree with a spread of means and standard deviations."""
  mean = {"w": jnp.array([[0.5, -1.0, 0.0], [2.0, 0.1, -0.3]]), "b": jnp.array([0.2, -0.7])}
  q = meanfield.init(mean, init_std=0.3)
  rho = {"w": q.rho["w"] + jnp.array([[0.0, 1.0, -1.0], [0.5, -0.5, 2.0]]),
         "b": q.rho["b"] + jnp.array([-2.0, 0.3])}
  return meanfield.MeanField(q.mean, rho)


def _flat(tree):
  return np.concatenate([_as64(leaf).ravel() for leaf in jax.tree.leaves(tree)])


# ---------------------------------------------------------------------------------------------
# Parametrisation, sampling, densities.


@pytest.mark.parametrize("init_std", [1e-8, 1e-3, 1.0, 50.0])
def test_init_gives_requested_stddev(init_std):
  params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3, jnp.bfloat16)}
  q = meanfield.init(params, init_std=init_std)
  np.testing.assert_allclose(_as64(meanfield.stddev(q)["w"]), init_std, rtol=1e-6)
  np.testing.assert_array_equal(q.mean["w"], params["w"])
  assert q.rho["b"].dtype == jnp.bfloat16 and q.rho["w"].shape == (2, 3)


@pytest.mark.parametrize("init_std", [0.0, -1.0, math.inf])
def test_init_rejects_non_positive_stddev(init_std):
  with pytest.raises(ValueError, match="init_std"):
    meanfield.init(jnp.zeros(2), init_std=init_std)


def test_sample_shapes_and_determinism():
  q = _small_q()
  one = meanfield.sample(jax.random.key(0), q)
  many = meanfield.sample(jax.random.key(0), q, num_samples=5)
  assert jax.tree.map(jnp.shape, one) == {"w": (2, 3), "b": (2,)}
  assert jax.tree.map(jnp.shape, many) == {"w": (5, 2, 3), "b": (5, 2)}
  again = meanfield.sample(jax.random.key(0), q, num_samples=5)
  jax.tree.map(np.testing.assert_array_equal, many, again)
  other = meanfield.sample(jax.random.key(1), q, num_samples=5)
  assert not np.allclose(many["w"], other["w"])
  # Leaves of the same shape and the same q get different noise (one key per leaf).
  twins = meanfield.init({"x": jnp.zeros(4), "y": jnp.zeros(4)}, init_std=1.0)
  draw = meanfield.sample(jax.random.key(2), twins)
  assert not np.allclose(draw["x"], draw["y"])
  with pytest.raises(ValueError, match="num_samples"):
    meanfield.sample(jax.random.key(0), q, num_samples=0)


def test_sample_moments_match_q():
  # 20000 draws: mean within 5 standard errors σ/√N, std within 5 SEs ≈ σ/√(2N) each.
  q = _small_q()
  draws = meanfield.sample(jax.random.key(3), q, num_samples=20_000)
  count = 20_000
  mu, sigma = _flat(q.mean), _flat(meanfield.stddev(q))
  flat = np.concatenate([_as64(draws[k]).reshape(count, -1) for k in ("b", "w")], axis=1)
  assert np.all(np.abs(flat.mean(0) - mu) < 5 * sigma / np.sqrt(count))
  assert np.all(np.abs(flat.std(0) - sigma) < 5 * sigma / np.sqrt(2 * count))


def test_log_density_matches_scipy():
  q = _small_q()
  point = meanfield.sample(jax.random.key(4), q)
  expected = scipy.stats.norm.logpdf(_flat(point), _flat(q.mean),
                                     _flat(meanfield.stddev(q))).sum()
  np.testing.assert_allclose(float(meanfield.log_density(q, point)), expected, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Priors and KL.


def _mixture_logpdf64(x, prior):
  return np.log(prior.mix * scipy.stats.norm.pdf(x, 0.0, prior.stddev_wide)
                + (1 - prior.mix) * scipy.stats.norm.pdf(x, 0.0, prior.stddev_narrow))


def test_scale_mixture_log_prior_matches_float64_and_is_stable_in_the_tails():
  prior = meanfield.ScaleMixturePrior()
  # Out to |x| = 30, where both component densities underflow in float32 (e^{-450}).
  grid = np.array([-30.0, -3.0, -0.5, -0.01, 0.0, 0.003, 0.2, 1.0, 5.0, 30.0])
  per_entry = jax.vmap(lambda x: meanfield.log_prior(prior, x))(jnp.asarray(grid, jnp.float32))
  assert np.all(np.isfinite(per_entry))
  np.testing.assert_allclose(_as64(per_entry), _mixture_logpdf64(grid, prior), rtol=1e-5)
  tree = {"a": jnp.asarray(grid[:4], jnp.float32), "b": jnp.asarray(grid[4:], jnp.float32)}
  np.testing.assert_allclose(float(meanfield.log_prior(prior, tree)),
                             _mixture_logpdf64(grid, prior).sum(), rtol=1e-5)


def test_scale_mixture_density_integrates_to_one():
  prior = meanfield.ScaleMixturePrior(mix=0.25, stddev_wide=1.5, stddev_narrow=math.exp(-6))
  log_pdf = jax.jit(lambda x: meanfield.log_prior(prior, x))
  density = lambda x: float(jnp.exp(log_pdf(jnp.float32(x))))
  # Split at the narrow spike (σ = e⁻⁶ ≈ 0.0025) so quad resolves it; float32 density: 1e-5.
  total = sum(scipy.integrate.quad(density, lo, hi, limit=200)[0]
              for lo, hi in [(-np.inf, -0.05), (-0.05, 0.0), (0.0, 0.05), (0.05, np.inf)])
  np.testing.assert_allclose(total, 1.0, atol=1e-5)


def test_gaussian_prior_log_prior_matches_scipy():
  x = np.array([-2.0, 0.1, 3.0])
  np.testing.assert_allclose(
      float(meanfield.log_prior(meanfield.GaussianPrior(0.7), jnp.asarray(x, jnp.float32))),
      scipy.stats.norm.logpdf(x, 0.0, 0.7).sum(), rtol=1e-6)


def test_gaussian_kl_closed_form_matches_float64_monte_carlo():
  # Independent reference: log q - log p at NumPy float64 draws from q, with SciPy densities;
  # tolerance 5 Monte Carlo standard errors.
  q, prior_std = _small_q(), 0.8
  closed = float(meanfield.kl_divergence(q, meanfield.GaussianPrior(prior_std)))
  mu, sigma = _flat(q.mean), _flat(meanfield.stddev(q))
  draws = mu + sigma * np.random.default_rng(0).standard_normal((200_000, mu.size))
  per_draw = (scipy.stats.norm.logpdf(draws, mu, sigma)
              - scipy.stats.norm.logpdf(draws, 0.0, prior_std)).sum(axis=1)
  standard_error = per_draw.std(ddof=1) / np.sqrt(per_draw.size)
  assert abs(closed - per_draw.mean()) < 5 * standard_error, (closed, per_draw.mean())


def test_scale_mixture_kl_estimate_is_unbiased_against_quadrature():
  prior = meanfield.ScaleMixturePrior()
  q = meanfield.MeanField(jnp.array([0.0, 0.3, -1.2]),
                          meanfield.init(jnp.zeros(3), 0.05).rho + jnp.array([0.0, 2.0, 4.0]))
  mu, sigma = _flat(q.mean), _flat(meanfield.stddev(q))

  def kl_entry(m, s):
    integrand = lambda x: scipy.stats.norm.pdf(x, m, s) * (
        scipy.stats.norm.logpdf(x, m, s) - _mixture_logpdf64(x, prior))
    return scipy.integrate.quad(integrand, m - 12 * s, m + 12 * s, points=[0.0], limit=200)[0]

  reference = sum(kl_entry(m, s) for m, s in zip(mu, sigma))
  keys = jax.random.split(jax.random.key(5), 4000)
  estimates = _as64(jax.vmap(lambda k: meanfield.kl_divergence(q, prior, k))(keys))
  standard_error = estimates.std(ddof=1) / np.sqrt(estimates.size)
  assert abs(estimates.mean() - reference) < 5 * standard_error, (estimates.mean(), reference)
  # More samples per call average the same estimator.
  assert np.isfinite(float(meanfield.kl_divergence(q, prior, keys[0], num_samples=7)))


def test_scale_mixture_kl_needs_a_key_and_priors_are_validated():
  q = _small_q()
  with pytest.raises(ValueError, match="key"):
    meanfield.kl_divergence(q, meanfield.ScaleMixturePrior())
  with pytest.raises(ValueError, match="mix"):
    meanfield.log_prior(meanfield.ScaleMixturePrior(mix=1.5), q.mean)
  with pytest.raises(ValueError, match="stddev"):
    meanfield.kl_divergence(q, meanfield.GaussianPrior(0.0))
  with pytest.raises(ValueError, match="prior"):
    meanfield.log_prior("laplace", q.mean)


# ---------------------------------------------------------------------------------------------
# ELBO on Bayesian linear regression (everything has a closed form).

_NOISE, _PRIOR_STD = 0.5, 1.0


def _regression():
  """40 correlated 3-D inputs: the mean-field optimum differs from the exact marginals."""
  rng = np.random.default_rng(0)
  correlation = np.array([[1.0, 0.8, 0.3], [0.8, 1.0, 0.5], [0.3, 0.5, 1.0]])
  x = rng.multivariate_normal(np.zeros(3), correlation, 40)
  y = x @ np.array([1.0, -0.5, 0.3]) + _NOISE * rng.standard_normal(40)
  return x, y


def _gaussian_nll(w, batch):
  x, y = batch
  return jnp.mean(0.5 * jnp.square(y - x @ w) / _NOISE ** 2
                  + 0.5 * math.log(2 * math.pi * _NOISE ** 2))


def test_elbo_loss_matches_closed_form_expectation():
  # E_q[mean NLL] = mean_i [((y_i - x_i·μ)² + Σ_j x_ij² σ_j²) / (2 s²)] + ½ log(2π s²), and
  # the β-weighted Gaussian KL is exact; 4000 one-sample losses: 5 Monte Carlo SEs.
  x, y = _regression()
  batch = (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  q = meanfield.MeanField(jnp.array([0.7, -0.2, 0.1]), jnp.array([-2.0, -1.0, -3.0]))
  mu, sigma = _flat(q.mean), _flat(meanfield.stddev(q))
  expected_nll = np.mean(((y - x @ mu) ** 2 + (x ** 2) @ sigma ** 2) / (2 * _NOISE ** 2)
                         + 0.5 * np.log(2 * np.pi * _NOISE ** 2))
  kl = np.sum(np.log(_PRIOR_STD / sigma) + (sigma ** 2 + mu ** 2) / (2 * _PRIOR_STD ** 2) - 0.5)
  beta, num_data = 0.5, 40
  loss = jax.jit(jax.vmap(lambda k: meanfield.elbo_loss(
      k, _gaussian_nll, q, batch, num_data=num_data, prior=meanfield.GaussianPrior(_PRIOR_STD),
      beta=beta)))
  losses = _as64(loss(jax.random.split(jax.random.key(6), 4000)))
  expected = expected_nll + beta * kl / num_data
  standard_error = losses.std(ddof=1) / np.sqrt(losses.size)
  assert abs(losses.mean() - expected) < 5 * standard_error, (losses.mean(), expected)


@pytest.mark.parametrize("prior", [meanfield.GaussianPrior(1.0), meanfield.ScaleMixturePrior()])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_gradient_reaches_mean_and_rho(prior, beta):
  x, y = _regression()
  batch = (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  q = meanfield.init(jnp.array([0.5, 0.5, 0.5]), init_std=0.1)
  grads = jax.grad(meanfield.elbo_loss, argnums=2)(
      jax.random.key(0), _gaussian_nll, q, batch, num_data=40, prior=prior, beta=beta,
      num_samples=4)
  assert isinstance(grads, meanfield.MeanField)
  for leaf in (grads.mean, grads.rho):
    assert np.all(np.isfinite(leaf)) and np.all(np.abs(_as64(leaf)) > 0)


def test_mean_field_vi_recovers_the_optimal_mean_field_gaussian():
  # Bayesian linear regression: posterior precision P = XᵀX/s² + I/s_p², exact mean
  # P⁻¹Xᵀy/s². The KL(q‖p)-optimal fully factorised q has that mean and variances
  # 1/diag(P) (not diag(P⁻¹), which is 1.3-2x wider here). Adam, 4000 steps of 64 samples,
  # cosine-decayed lr: over 4 seeds the errors were ≤ 0.0012 on means (posterior stds
  # ≈ 0.08) and ≤ 1% on stds, so the tolerances 0.1 posterior std and 3% leave room for
  # another seed while still telling the mean-field answer from the exact marginals.
  x, y = _regression()
  precision = x.T @ x / _NOISE ** 2 + np.eye(3) / _PRIOR_STD ** 2
  exact_mean = np.linalg.solve(precision, x.T @ y / _NOISE ** 2)
  mean_field_std = 1.0 / np.sqrt(np.diag(precision))
  marginal_std = np.sqrt(np.diag(np.linalg.inv(precision)))
  assert np.all(marginal_std > 1.3 * mean_field_std)

  batch = (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  steps = 4000
  tx = optax.adam(optax.cosine_decay_schedule(0.05, steps))

  @jax.jit
  def train(q, key):
    def step(carry, step_key):
      q, opt_state = carry
      grads = jax.grad(meanfield.elbo_loss, argnums=2)(
          step_key, _gaussian_nll, q, batch, num_data=40,
          prior=meanfield.GaussianPrior(_PRIOR_STD), num_samples=64)
      updates, opt_state = tx.update(grads, opt_state, q)
      return (optax.apply_updates(q, updates), opt_state), None

    (q, _), _ = jax.lax.scan(step, (q, tx.init(q)), jax.random.split(key, steps))
    return q

  q = train(meanfield.init(jnp.zeros(3), init_std=0.1), jax.random.key(0))
  np.testing.assert_allclose(_as64(q.mean), exact_mean, rtol=0, atol=0.1 * mean_field_std.min())
  np.testing.assert_allclose(_as64(meanfield.stddev(q)), mean_field_std, rtol=0.03)


def test_sample_predictive_uses_the_samples_of_the_same_key():
  q = meanfield.init({"w": jnp.ones((4, 3)) * 0.1, "b": jnp.zeros(3)}, init_std=0.5)
  apply_fn = lambda p, x: x @ p["w"] + p["b"][None, :]
  x = jax.random.normal(jax.random.key(8), (6, 4))
  probs = meanfield.sample_predictive(jax.random.key(9), apply_fn, q, x, 5)
  assert probs.shape == (5, 6, 3)
  np.testing.assert_allclose(_as64(probs).sum(-1), 1.0, rtol=1e-6)
  weights = meanfield.sample(jax.random.key(9), q, 5)
  for s in range(5):
    w_s = jax.tree.map(lambda leaf, s=s: leaf[s], weights)
    np.testing.assert_allclose(probs[s], jax.nn.softmax(apply_fn(w_s, x)), rtol=1e-5,
                               atol=1e-7)
