"""Independent checks of the float64 logistic-regression reference (tests/logistic_reference.py).

The reference is what the exactness tests measure the optimizer against, so it is validated
here without Gauss-Hermite where possible: adaptive quadrature (scipy.integrate.quad) plus
Nelder-Mead on the 1-D ELBO, Monte Carlo for expectations and KL divergences.
"""

import numpy as np
import pytest
import scipy.integrate
import scipy.optimize
import scipy.special
from scipy.stats import multivariate_normal

import logistic_reference as ref


def _one_feature_problem(n=40, seed=1):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(n)
  y = (rng.uniform(size=n) < scipy.special.expit(1.5 * x)).astype(np.float64)
  return x, y


def _quad_expectation(f, m, s):
  """E[f(w)], w ~ N(m, s^2), by adaptive quadrature over m +- 14 s."""
  density = lambda w: np.exp(-0.5 * ((w - m) / s) ** 2) / (np.sqrt(2 * np.pi) * s)
  value, _ = scipy.integrate.quad(lambda w: density(w) * f(w), m - 14 * s, m + 14 * s,
                                  epsabs=0.0, epsrel=1e-13, limit=200)
  return value


# (i) one feature: the quadrature optimum against an independent optimisation of the ELBO.
# Small ess (wide, visibly non-Gaussian likelihood) makes the comparison sharp.
ESS_1D, DELTA_1D = 10.0, 0.1


def _one_feature_reference():
  x, y = _one_feature_problem()
  m, S = ref.optimal_gaussian(x[:, None], y, ESS_1D, DELTA_1D)
  return x, y, m[0], np.sqrt(S[0, 0])


def test_one_feature_matches_brute_force_elbo_minimum():
  x, y, m_star, s_star = _one_feature_reference()
  loss = lambda w: np.mean(np.logaddexp(0.0, x * w) - y * x * w)

  def negative_elbo(params):
    m, log_s = params
    s = np.exp(log_s)
    return (_quad_expectation(loss, m, s) + 0.5 * DELTA_1D * (m * m + s * s)
            - log_s / ESS_1D)

  result = scipy.optimize.minimize(
      negative_elbo, x0=[0.0, np.log(0.5)], method="Nelder-Mead",
      options={"xatol": 1e-10, "fatol": 1e-15, "maxiter": 4000})
  m_brute, s_brute = result.x[0], np.exp(result.x[1])
  # Nelder-Mead resolves a minimum to ~sqrt(quad error / curvature): ~1e-7 here.
  np.testing.assert_allclose([m_brute, s_brute], [m_star, s_star], rtol=1e-6, atol=1e-6)
  # and the reference's own objective agrees with the quad one at the optimum
  neg_elbo_gh = ref.negative_elbo(x[:, None], y, np.array([m_star]), np.array([[s_star ** 2]]),
                                  ESS_1D, DELTA_1D)
  const = 0.5 * np.log(2 * np.pi * np.e) / ESS_1D  # entropy constant dropped above
  np.testing.assert_allclose(neg_elbo_gh, negative_elbo([m_star, np.log(s_star)]) - const,
                             rtol=1e-12)


def test_one_feature_matches_adaptive_quadrature_stationary_point():
  x, y, m_star, s_star = _one_feature_reference()
  dloss = lambda w: np.mean(x * (scipy.special.expit(x * w) - y))

  def gradient(params):  # d/dm and d/ds of the negative ELBO
    m, s = params
    return [_quad_expectation(dloss, m, s) + DELTA_1D * m,
            _quad_expectation(lambda w: dloss(w) * (w - m) / s, m, s) + DELTA_1D * s
            - 1.0 / (ESS_1D * s)]

  solution = scipy.optimize.root(gradient, x0=[m_star * 0.9, s_star * 1.1], tol=1e-12)
  assert np.max(np.abs(gradient(solution.x))) < 1e-12
  np.testing.assert_allclose(solution.x, [m_star, s_star], rtol=1e-10)


# (ii) stationarity and optimality in many dimensions.

@pytest.fixture(scope="module", params=["synthetic", "digits"])
def problem(request):
  X, y = (ref.synthetic_logistic_problem() if request.param == "synthetic"
          else ref.digits_3_vs_5())
  ess, delta = float(X.shape[0]), 1e-2
  m, S = ref.optimal_gaussian(X, y, ess, delta)
  return X, y, ess, delta, m, S


def test_datasets_shapes():
  X, y = ref.synthetic_logistic_problem()
  assert X.shape == (500, 21) and np.all(X[:, -1] == 1.0) and set(np.unique(y)) == {0.0, 1.0}
  X, y = ref.digits_3_vs_5()
  assert X.shape[0] == 365 and np.all(X[:, -1] == 1.0) and set(np.unique(y)) == {0.0, 1.0}
  assert X.min() >= 0.0 and X.max() <= 1.0 and np.all(X[:, :-1].std(axis=0) > 0)


def test_stationarity_with_other_node_count(problem):
  X, y, ess, delta, m, S = problem
  res_mean, res_cov = ref.stationarity_residuals(X, y, m, S, ess, delta, num_nodes=300)
  assert res_mean < 1e-12 and res_cov < 1e-12


def test_gauss_hermite_expectations_match_monte_carlo(problem):
  X, y, _, _, m, S = problem
  grad_gh, hess_gh = ref.expected_gradient_hessian(X, y, m, S)
  w = np.random.default_rng(0).multivariate_normal(m, S, size=20_000)
  p = scipy.special.expit(w @ X.T)  # (samples, n)
  grads = (p - y) @ X / X.shape[0]  # per-sample mean-loss gradient
  se = grads.std(axis=0) / np.sqrt(len(w))
  assert np.all(np.abs(grads.mean(axis=0) - grad_gh) < 5 * se + 1e-12)
  hess_mc = (X.T * (p * (1 - p)).mean(axis=0)) @ X / X.shape[0]
  np.testing.assert_allclose(hess_mc, hess_gh, atol=3e-3 * np.abs(hess_gh).max())


def test_optimum_minimises_negative_elbo(problem):
  X, y, ess, delta, m, S = problem
  d = m.shape[0]
  f_star = ref.negative_elbo(X, y, m, S, ess, delta)
  rng = np.random.default_rng(0)
  L = np.linalg.cholesky(S)
  for _ in range(5):
    dm = L @ rng.standard_normal(d) * 1e-2
    a = rng.standard_normal((d, d)) * 1e-2 / np.sqrt(d)
    S_pert = (L + L @ a) @ (L + L @ a).T
    assert ref.negative_elbo(X, y, m + dm, S, ess, delta) > f_star
    assert ref.negative_elbo(X, y, m, S_pert, ess, delta) > f_star
    # first order: along a tiny step the slope is negligible next to the curvature
    t = dm * 1e-2
    up = ref.negative_elbo(X, y, m + t, S, ess, delta)
    down = ref.negative_elbo(X, y, m - t, S, ess, delta)
    assert abs(up - down) < 1e-3 * (up + down - 2 * f_star)


def test_weak_prior_converges():
  # delta = 1e-3 on digits: posterior variances up to 2.7 (0.27 at delta = 1e-2)
  X, y = ref.digits_3_vs_5()
  m, S = ref.optimal_gaussian(X, y, float(X.shape[0]), 1e-3)
  res_mean, res_cov = ref.stationarity_residuals(X, y, m, S, float(X.shape[0]), 1e-3,
                                                 num_nodes=300)
  assert res_mean < 1e-12 and res_cov < 1e-12


def test_optimal_gaussian_raises_when_not_converged():
  X, y = ref.synthetic_logistic_problem()
  with pytest.raises(RuntimeError):
    ref.optimal_gaussian(X, y, 500.0, 1e-2, max_iter=1)


# (iii) KL divergences.

def _random_gaussian(rng, d):
  a = rng.standard_normal((d, d))
  return rng.standard_normal(d), a @ a.T / d + 0.1 * np.eye(d)


def test_gaussian_kl_one_dimensional_closed_form():
  m0, s0, m1, s1 = 0.3, 0.7, -1.1, 1.9
  expected = np.log(s1 / s0) + (s0 ** 2 + (m0 - m1) ** 2) / (2 * s1 ** 2) - 0.5
  got = ref.gaussian_kl([m0], [[s0 ** 2]], [m1], [[s1 ** 2]])
  np.testing.assert_allclose(got, expected, rtol=1e-14)


def test_gaussian_kl_matches_monte_carlo():
  rng = np.random.default_rng(0)
  m0, S0 = _random_gaussian(rng, 5)
  m1, S1 = _random_gaussian(rng, 5)
  samples = rng.multivariate_normal(m0, S0, size=200_000)
  log_ratio = (multivariate_normal(m0, S0).logpdf(samples)
               - multivariate_normal(m1, S1).logpdf(samples))
  se = log_ratio.std() / np.sqrt(len(samples))
  kl = ref.gaussian_kl(m0, S0, m1, S1)
  assert abs(log_ratio.mean() - kl) < 4 * se  # 4 standard errors, fixed seed
  assert ref.gaussian_kl(m0, S0, m0, S0) == pytest.approx(0.0, abs=1e-12)


def test_split_kl_parts():
  rng = np.random.default_rng(1)
  m, S = _random_gaussian(rng, 6)
  m_star, S_star = _random_gaussian(rng, 6)
  parts = ref.split_kl(m, S, m_star, S_star)
  assert min(parts["mean"], parts["basis"], parts["spectrum"]) >= 0.0
  np.testing.assert_allclose(parts["total"], ref.gaussian_kl(m, S, m_star, S_star), rtol=1e-12)
  np.testing.assert_allclose(parts["mean"] + parts["basis"] + parts["spectrum"],
                             parts["total"], rtol=1e-12)
  # S* itself (exact basis and spectrum), moved mean: only the mean part is left
  parts = ref.split_kl(m, S_star, m_star, S_star)
  assert abs(parts["basis"]) < 1e-12 and abs(parts["spectrum"]) < 1e-12
  # exact basis, wrong spectrum: no basis part
  eigval, eigvec = np.linalg.eigh(S_star)
  parts = ref.split_kl(m_star, eigvec * (2.0 * eigval) @ eigvec.T, m_star, S_star)
  assert abs(parts["basis"]) < 1e-12 and parts["spectrum"] > 0.1
