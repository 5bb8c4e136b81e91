"""evon_jax.laplace against dense float64 NumPy references (a second, independently written set;
see also test_laplace.py) and Bayesian linear regression.

The references never read the library's curvature: per-example pseudo-gradients come from
`jax.jacfwd` of the logits times the rows of a square root of the softmax Hessian
(``s_c = √p_c (e_c − p)``, so ``Σ_c s_c s_cᵀ = diag(p) − p pᵀ``); everything after that
(dense GGN blocks, Kronecker factors, their eigenbases, covariances, evidences, Monte-Carlo
variances) is float64 NumPy / SciPy written here.

Tolerances. The library works in float32 (matmuls at HIGHEST precision, eigh in float32): the
Kronecker factors and rotated squares are sums of a few dozen O(1) products, so entries carry a
relative error of ~1e-6; eigenvectors move by ~eps·‖L‖/gap, and the tests assert eigengaps
≳ 2e-2·‖L‖, so rotated quantities are good to ~1e-5 relative (compared at 5e-5 of the largest
entry; observed ≤ 7e-7). Evidences are sums of ~40 float32 log densities of size O(1): ~1e-4
absolute (compared at 2e-3). Monte-Carlo checks use 5 analytic standard errors.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.stats

from evon_jax import laplace, metrics, posterior, predictive
from evon_jax.kronecker import matrix_sides

D_IN, HIDDEN, CLASSES, N_TRAIN = 3, 4, 3, 12
PRIOR_PRECISION = 1.0
ROTATED_RTOL = 5e-5  # eigenvector error ~eps·‖L‖/gap with gaps ≳ 2e-2‖L‖ (module docstring)


# ----------------------------------------------------------------------------------------------
# A tiny tanh MLP classifier (3-4-3, biases) and its float64 NumPy reference curvature


def _mlp(params, x):
  hidden = jnp.tanh(x @ params["w1"] + params["b1"][None, :])
  return hidden @ params["w2"] + params["b2"][None, :]


def _np_logits(params, x):
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  return np.tanh(np.asarray(x, np.float64) @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


@functools.cache
def _mlp_problem():
  keys = jax.random.split(jax.random.key(0), 6)
  params = {
      "w1": jax.random.normal(keys[0], (D_IN, HIDDEN)),
      "b1": 0.5 * jax.random.normal(keys[1], (HIDDEN,)),
      "w2": jax.random.normal(keys[2], (HIDDEN, CLASSES)),
      "b2": 0.5 * jax.random.normal(keys[3], (CLASSES,)),
  }
  x = jax.random.normal(keys[4], (N_TRAIN, D_IN))
  y = jax.random.randint(keys[5], (N_TRAIN,), 0, CLASSES)
  return params, x, y


def _softmax64(logits):
  z = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return z / z.sum(axis=-1, keepdims=True)


def _jacobians(params, x):
  """Per leaf, float64 Jacobians of the logits (n, C, *leaf_shape), one example at a time."""
  jac = jax.vmap(lambda xi: jax.jacfwd(lambda p: _mlp(p, xi[None])[0])(params))(x)
  return {name: np.asarray(j, np.float64) for name, j in jac.items()}


def _label_gradients(params, x):
  """Per leaf, ∇_θ log softmax(f)_y = Jᵀ (e_y − p) for every class y: (n, C, *leaf_shape)."""
  residuals = np.eye(CLASSES)[None] - _softmax64(_np_logits(params, x))[:, None, :]
  return {name: np.einsum("nyc,nc...->ny...", residuals, jac)
          for name, jac in _jacobians(params, x).items()}


def _reference_pseudo_gradients(params, x):
  """Per leaf, (n, C, *shape) pseudo-gradients √p_c ∇ log softmax_c: Σ_c vec G vec Gᵀ = GGN_n."""
  probs = _softmax64(_np_logits(params, x))
  return {name: np.sqrt(probs).reshape(probs.shape + (1,) * (g.ndim - 2)) * g
          for name, g in _label_gradients(params, x).items()}


def _as_matrices(grads):
  """(n, S, *shape) -> (n·S, rows, cols): the library's matrix view (a 1-D leaf: a column)."""
  shape = grads.shape[2:]
  cols = shape[-1] if len(shape) >= 2 else 1
  return grads.reshape(grads.shape[0] * grads.shape[1], -1, cols)


def _eigenvectors(a):
  return np.linalg.eigh(a)[1]


def _reference_ekfac(grads, n, *, left, right):
  """(Ĥ as rows x cols, K = Q_L ⊗ Q_R, dense GGN block Σ vec G vec Gᵀ) in float64 for a leaf.

  vec is row-major, matching `posterior.covariance` (kron(Q_L, Q_R) maps row-major vec E to
  row-major vec W)."""
  g = _as_matrices(grads)
  rows, cols = g.shape[1:]
  flat = g.reshape(len(g), -1)
  ggn = flat.T @ flat
  q_left = _eigenvectors(np.einsum("sij,skj->ik", g, g) / n) if left else np.eye(rows)
  q_right = _eigenvectors(np.einsum("sji,sjk->ik", g, g) / n) if right else np.eye(cols)
  k = np.kron(q_left, q_right)
  return np.diag(k.T @ ggn @ k).reshape(rows, cols) / n, k, ggn


def _reference_covariance(hessian, k, num_data, prior_precision):
  """K diag(1 / (N Ĥ + λ)) Kᵀ."""
  return (k * (1.0 / (num_data * hessian.ravel() + prior_precision))[None, :]) @ k.T


def _assert_covariance(actual, expected, name):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=0,
                             atol=ROTATED_RTOL * np.abs(expected).max(), err_msg=name)


# ----------------------------------------------------------------------------------------------
# (a) EK-FAC curvature and covariance of the MLP classifier


@functools.cache
def _mlp_state(precondition_1d=False):
  params, x, y = _mlp_problem()
  return laplace.fit(_mlp, params, (x, y), likelihood="classification",
                     prior_precision=PRIOR_PRECISION, precondition_1d=precondition_1d)


def _min_relative_gap(a):
  values = np.sort(np.linalg.eigvalsh(a))
  return np.min(np.diff(values)) / values[-1] if len(values) > 1 else np.inf


@pytest.mark.parametrize("precondition_1d", [False, True])
def test_mlp_hessian_and_covariance_match_dense_reference(precondition_1d):
  params, x, _ = _mlp_problem()
  state = _mlp_state(precondition_1d)
  grads = _reference_pseudo_gradients(params, x)
  covariances = posterior.covariance(state)
  assert float(state.ess) == N_TRAIN
  np.testing.assert_allclose(float(state.weight_decay), PRIOR_PRECISION / N_TRAIN, rtol=1e-6)
  for name in params:
    matrix_leaf = name.startswith("w")
    left = matrix_leaf or precondition_1d
    g = _as_matrices(grads[name])
    # The comparisons below need well separated eigenvalues (tolerance: module docstring).
    if left:
      assert _min_relative_gap(np.einsum("sij,skj->ik", g, g)) > 2e-2, name
    if matrix_leaf:
      assert _min_relative_gap(np.einsum("sji,sjk->ik", g, g)) > 2e-2, name
    hessian, k, ggn = _reference_ekfac(grads[name], N_TRAIN, left=left, right=matrix_leaf)
    got = np.asarray(state.hessian[name], np.float64).reshape(hessian.shape)
    # Sorted: independent of the order and signs of the eigenvectors.
    np.testing.assert_allclose(np.sort(got.ravel()), np.sort(hessian.ravel()),
                               rtol=ROTATED_RTOL, atol=1e-6 * hessian.max(), err_msg=name)
    expected = _reference_covariance(hessian, k, N_TRAIN, PRIOR_PRECISION)
    _assert_covariance(covariances[name], expected, name)
    if not left:  # a 1-D leaf without a basis: Ĥ is the GGN's diagonal / N, in place
      np.testing.assert_allclose(got.ravel(), np.diag(ggn) / N_TRAIN, rtol=1e-5, err_msg=name)
    if not matrix_leaf and precondition_1d:  # a full basis on a vector: the exact posterior
      _assert_covariance(covariances[name],
                         np.linalg.inv(ggn + PRIOR_PRECISION * np.eye(len(ggn))), name)
  mean = posterior.mean(state)
  for name in params:
    np.testing.assert_allclose(mean[name], params[name], rtol=1e-5, atol=1e-6)


def test_mlp_bases_diagonalise_the_kronecker_factors():
  """The stored Q_L, Q_R are orthonormal eigenbases of L = Σ G Gᵀ / N and R = Σ Gᵀ G / N,
  and Ĥ is the GGN's diagonal in exactly those stored bases (no sorting)."""
  params, x, _ = _mlp_problem()
  state = _mlp_state()
  grads = _reference_pseudo_gradients(params, x)
  bases = posterior.bases(state)
  for name in ("w1", "w2"):
    g = _as_matrices(grads[name])
    q_left = np.asarray(matrix_sides(bases[name])[0], np.float64)
    q_right = np.asarray(matrix_sides(bases[name])[1], np.float64)
    for q, factor in ((q_left, np.einsum("sij,skj->ik", g, g) / N_TRAIN),
                      (q_right, np.einsum("sji,sjk->ik", g, g) / N_TRAIN)):
      rotated = q.T @ factor @ q
      assert np.abs(rotated - np.diag(np.diag(rotated))).max() < 1e-5 * np.abs(factor).max()
      np.testing.assert_allclose(q.T @ q, np.eye(len(q)), atol=1e-5)
    k = np.kron(q_left, q_right)
    flat = g.reshape(len(g), -1)
    expected = np.diag(k.T @ flat.T @ flat @ k).reshape(g.shape[1:]) / N_TRAIN
    np.testing.assert_allclose(state.hessian[name], expected, rtol=1e-4,
                               atol=1e-6 * expected.max(), err_msg=name)
  assert matrix_sides(bases["b1"]) == (None, None)


# ----------------------------------------------------------------------------------------------
# (b) Bayesian linear regression: the EK-FAC Laplace is the exact posterior


SIGMA = 0.5
N_REG, D_REG = 40, 3


def _linear(params, x):
  return (x @ params["w"])[:, 0]


@functools.cache
def _regression_data():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((N_REG, D_REG))
  y = x @ np.array([1.0, -0.7, 0.4]) + SIGMA * rng.standard_normal(N_REG)
  return x, y


def _ridge_map(x, y, prior_precision):
  """(θ̂, posterior precision XᵀX/σ² + λ I) in float64."""
  precision = x.T @ x / SIGMA ** 2 + prior_precision * np.eye(D_REG)
  return np.linalg.solve(precision, x.T @ y / SIGMA ** 2), precision


def _fit_regression(w, prior_precision, **kwargs):
  x, y = _regression_data()
  params = {"w": jnp.asarray(np.reshape(w, (D_REG, 1)), jnp.float32)}
  data = (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  state = laplace.fit(_linear, params, data, likelihood="regression",
                      prior_precision=prior_precision, sigma_noise=SIGMA, **kwargs)
  log_lik = laplace.log_likelihood(_linear, params, data, likelihood="regression",
                                   sigma_noise=SIGMA)
  return state, log_lik, np.asarray(params["w"], np.float64)[:, 0]


@pytest.mark.parametrize("prior_precision", [0.1, 1.0, 10.0])
def test_linear_regression_laplace_is_exact_posterior_and_evidence(prior_precision):
  """θ̂ is refitted per λ (the ridge MAP depends on λ): then Laplace is exact."""
  x, y = _regression_data()
  w_map, precision = _ridge_map(x, y, prior_precision)
  state, log_lik, w = _fit_regression(w_map, prior_precision)
  np.testing.assert_allclose(np.asarray(posterior.covariance(state)["w"], np.float64),
                             np.linalg.inv(precision), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(float(log_lik), scipy.stats.norm.logpdf(y, x @ w, SIGMA).sum(),
                             rtol=1e-5, atol=1e-4)
  exact = scipy.stats.multivariate_normal.logpdf(
      y, np.zeros(N_REG), SIGMA ** 2 * np.eye(N_REG) + x @ x.T / prior_precision)
  evidence = laplace.log_marginal_likelihood(state, log_lik)
  print(f"λ={prior_precision}: Laplace {float(evidence):.5f}, exact {exact:.5f}")
  np.testing.assert_allclose(float(evidence), exact, rtol=0, atol=2e-3)


def _np_laplace_evidence(prior_precision, *, log_lik, w_hat, ggn):
  """log p(D | θ̂) − ½ λ ‖θ̂‖² + (P/2) log λ − ½ log det(GGN + λ I), float64."""
  p = len(w_hat)
  return (log_lik - 0.5 * prior_precision * w_hat @ w_hat + 0.5 * p * np.log(prior_precision)
          - 0.5 * np.linalg.slogdet(ggn + prior_precision * np.eye(p))[1])


def test_marglik_tuning_finds_the_numpy_maximiser():
  """θ̂ fixed at the MAP for λ0 = 1; the evidence as a function of λ at that fixed θ̂."""
  x, y = _regression_data()
  state, log_lik, w_hat = _fit_regression(_ridge_map(x, y, 1.0)[0], 1.0)
  evidence = functools.partial(
      _np_laplace_evidence, log_lik=scipy.stats.norm.logpdf(y, x @ w_hat, SIGMA).sum(),
      w_hat=w_hat, ggn=x.T @ x / SIGMA ** 2)
  best_log = scipy.optimize.minimize_scalar(
      lambda t: -evidence(np.exp(t)), bounds=(np.log(1e-4), np.log(1e4)), method="bounded",
      options={"xatol": 1e-10}).x
  best = float(np.exp(best_log))
  assert 1e-3 < best < 1e3  # an interior maximum, so the refinement is exercised
  tuned, search = laplace.tune_prior_precision(state, method="marglik", log_likelihood=log_lik)
  print(f"marglik: tuned λ {float(search.prior_precision):.6f}, NumPy maximiser {best:.6f}")
  np.testing.assert_allclose(float(search.prior_precision), best, rtol=1e-2)
  np.testing.assert_allclose(float(tuned.ess * tuned.weight_decay), best, rtol=1e-2)
  grid = np.asarray(search.grid, np.float64)
  objective = np.array([evidence(value) for value in grid])
  np.testing.assert_allclose(np.asarray(search.objective, np.float64), objective, atol=2e-3)
  assert float(search.best_on_grid) == pytest.approx(grid[np.argmax(objective)], rel=1e-5)
  _, coarse = laplace.tune_prior_precision(state, method="marglik", log_likelihood=log_lik,
                                           refine=False)
  # Without refinement: the nearest grid point, at most half a grid step (0.2 decades) away.
  assert abs(np.log10(float(coarse.prior_precision)) - best_log / np.log(10)) <= 0.1 + 1e-6


# ----------------------------------------------------------------------------------------------
# (c) sampled and empirical Fisher


REPLICAS = 32


def test_sampled_fisher_is_unbiased_and_empirical_fisher_is_not():
  """Without bases (max_precond_dim=1) Ĥ is the GGN's diagonal / N, linear in per-example
  outer products, so the sampled Fisher is unbiased for it. The data are tiled REPLICAS times:
  every copy draws its own label from its own key, i.e. one fit averages 32 independent draws
  per example (32 keys' worth, one compilation)."""
  params, x, _ = _mlp_problem()
  # Labels the model finds least likely: a badly fitted model, where the empirical Fisher
  # (gradients at the observed labels) is far from the GGN.
  labels = jnp.argmin(_mlp(params, x), axis=-1).astype(jnp.int32)
  probs = _softmax64(_np_logits(params, x))
  flat = lambda tree: np.concatenate([np.asarray(tree[k], np.float64).ravel() for k in params])
  squares = {k: (g ** 2).reshape(N_TRAIN, CLASSES, -1)
             for k, g in _label_gradients(params, x).items()}
  # Per example, the sampled term is g_y² with y ~ p: mean Σ_y p_y g_y², variance from g⁴.
  exact = flat({k: np.einsum("ny,nyk->k", probs, s) / N_TRAIN for k, s in squares.items()})
  variance = flat({k: (np.einsum("ny,nyk->nk", probs, s ** 2)
                       - np.einsum("ny,nyk->nk", probs, s) ** 2).sum(0) / N_TRAIN ** 2
                   for k, s in squares.items()})
  standard_error = np.sqrt(variance / REPLICAS)

  tiled = (jnp.tile(x, (REPLICAS, 1)), jnp.tile(labels, REPLICAS))
  sampled = flat(laplace.fit(_mlp, params, tiled, likelihood="classification",
                             fisher="sampled", key=jax.random.key(1), max_precond_dim=1).hessian)
  z = (sampled - exact) / standard_error
  print(f"sampled Fisher z-scores: max |z| {np.abs(z).max():.2f} over {z.size} entries")
  # 5 standard errors per entry: a false alarm over 31 entries has probability ~2e-5.
  assert np.all(np.abs(z) <= 5)
  tolerance = 5 * np.linalg.norm(standard_error) / np.linalg.norm(exact)
  sampled_error = np.linalg.norm(sampled - exact) / np.linalg.norm(exact)

  empirical = flat(laplace.fit(_mlp, params, (x, labels), likelihood="classification",
                               fisher="empirical", max_precond_dim=1).hessian)
  at_labels = flat({k: s[np.arange(N_TRAIN), np.asarray(labels)].sum(0) / N_TRAIN
                    for k, s in squares.items()})
  np.testing.assert_allclose(empirical, at_labels, rtol=1e-5, atol=1e-7 * at_labels.max())
  empirical_error = np.linalg.norm(empirical - exact) / np.linalg.norm(exact)
  print(f"relative error: sampled {sampled_error:.3g}, empirical {empirical_error:.3g}, "
        f"Monte-Carlo tolerance {tolerance:.3g}")
  assert sampled_error <= tolerance
  assert empirical_error > 3 * tolerance


def test_regression_sampled_and_empirical_fisher():
  """Regression away from the MAP. Empirical: cotangent (y − f)/σ², so L = Σ r² x xᵀ/(N σ⁴)
  and Ĥ is its spectrum. Sampled: cotangent z/σ, z ~ N(0, 1); the trace of Ĥ (basis
  independent) estimates Σ ‖x‖²/(N σ²) with variance 2 Σ ‖x‖⁴ / (N σ²)² / REPLICAS."""
  x, y = _regression_data()
  w = np.array([0.3, 0.2, -0.1])
  empirical, _, _ = _fit_regression(w, 1.0, fisher="empirical")
  residual = y - x @ w
  expected = np.einsum("n,ni,nj->ij", residual ** 2, x, x) / (N_REG * SIGMA ** 4)
  np.testing.assert_allclose(np.sort(np.asarray(empirical.hessian["w"], np.float64).ravel()),
                             np.sort(np.linalg.eigvalsh(expected)), rtol=1e-4)
  params = {"w": jnp.asarray(w[:, None], jnp.float32)}
  tiled = (jnp.asarray(np.tile(x, (REPLICAS, 1)), jnp.float32),
           jnp.asarray(np.tile(y, REPLICAS), jnp.float32))
  sampled = laplace.fit(_linear, params, tiled, likelihood="regression", sigma_noise=SIGMA,
                        fisher="sampled", key=jax.random.key(2))
  squared_norms = np.sum(x ** 2, axis=1)
  exact_trace = squared_norms.sum() / (N_REG * SIGMA ** 2)
  standard_error = np.sqrt(2 * np.sum(squared_norms ** 2) / REPLICAS) / (N_REG * SIGMA ** 2)
  assert abs(float(jnp.sum(sampled.hessian["w"])) - exact_trace) <= 5 * standard_error


# ----------------------------------------------------------------------------------------------
# (d) prior precision by validation NLL


def test_nll_tuning_matches_brute_force_linearized_predictive():
  params, _, _ = _mlp_problem()
  state = _mlp_state()
  rng = np.random.default_rng(3)
  x_val = jnp.asarray(rng.standard_normal((10, D_IN)), jnp.float32)
  # Two of ten labels the mean model gets wrong: the NLL then has an interior minimum in λ.
  logits = _mlp(params, x_val)
  y_val = jnp.where(jnp.arange(10) % 5 == 0, jnp.argmin(logits, -1),
                    jnp.argmax(logits, -1)).astype(jnp.int32)
  grid = np.logspace(-2, 3, 6)
  key = jax.random.key(7)
  tuned, search = laplace.tune_prior_precision(
      state, method="nll", apply_fn=_mlp, validation=(x_val, y_val), grid=grid, key=key,
      num_samples=16, predictive_kind="linearized")

  @jax.jit
  def validation_nll(weight_decay):  # weight_decay = λ / N, set by hand on the state
    probs = predictive.linearized_predictive(
        key, _mlp, state._replace(weight_decay=weight_decay), x_val, 16)
    return metrics.nll(probs, y_val)

  brute = np.array([float(validation_nll(jnp.float32(value / N_TRAIN))) for value in grid])
  print("validation NLL per grid λ:", np.round(brute, 4))
  np.testing.assert_allclose(np.asarray(search.objective), brute, rtol=1e-4)
  assert 0 < np.argmin(brute) < len(grid) - 1 and np.ptp(brute) > 1e-2  # a real choice
  assert float(search.prior_precision) == pytest.approx(grid[np.argmin(brute)], rel=1e-6)
  assert float(tuned.ess * tuned.weight_decay) == pytest.approx(grid[np.argmin(brute)], rel=1e-5)


# ----------------------------------------------------------------------------------------------
# (e) input validation


def test_fit_rejects_bad_arguments():
  params, x, y = _mlp_problem()
  data = (x, y)
  fit = functools.partial(laplace.fit, _mlp, params)
  cases = [
      (dict(data=data, likelihood="poisson"), "likelihood must be one of"),
      (dict(data=data, likelihood="classification", fisher="observed"), "fisher must be one of"),
      (dict(data=data, likelihood="classification", fisher="sampled"), "PRNG key"),
      (dict(data=(x, y[:-1]), likelihood="classification"), "leading example axis"),
      (dict(data=x, likelihood="classification"), "tuple"),
      (dict(data=(x, y.astype(jnp.float32)), likelihood="classification"),
       "integer class labels"),
      (dict(data=(x, jax.nn.one_hot(y, CLASSES).astype(jnp.int32)),
            likelihood="classification"), "integer class labels"),
      (dict(data=(x, y + CLASSES), likelihood="classification"), r"lie in \[0, 3\)"),
      (dict(data=data, likelihood="classification", prior_precision=0.0), "prior_precision"),
      (dict(data=data, likelihood="classification", num_data=-1.0), "num_data"),
      (dict(data=data, likelihood="regression", sigma_noise=0.0), "sigma_noise"),
      (dict(data=data, likelihood="classification", batch_size=0), "batch_size"),
      (dict(data=(x, jnp.zeros((N_TRAIN, 2))), likelihood="regression"), "do not match"),
      (dict(data=(x[:0], y[:0]), likelihood="classification"), "no examples"),
  ]
  for kwargs, match in cases:
    with pytest.raises(ValueError, match=match):
      fit(**kwargs)
  with pytest.raises(ValueError, match="logits of shape"):
    laplace.fit(lambda p, v: _mlp(p, v)[:, 0], params, data, likelihood="classification")
  with pytest.raises(ValueError, match="likelihood must be one of"):
    laplace.log_likelihood(_mlp, params, data, likelihood="bernoulli")


def test_tuning_rejects_bad_arguments():
  state = _mlp_state()
  params, x, y = _mlp_problem()
  tune = functools.partial(laplace.tune_prior_precision, state)
  cases = [
      (dict(method="cv"), "method must be one of"),
      (dict(method="marglik"), "log_likelihood"),
      (dict(method="marglik", log_likelihood=0.0, grid=[1.0, -1.0]), "grid"),
      (dict(method="marglik", log_likelihood=0.0, grid=[]), "grid"),
      (dict(method="nll", apply_fn=_mlp, validation=(x, y)), "key"),
      (dict(method="nll", apply_fn=_mlp, validation=(x, y), key=jax.random.key(0),
            predictive_kind="mean"), "predictive_kind"),
  ]
  for kwargs, match in cases:
    with pytest.raises(ValueError, match=match):
      tune(**kwargs)
  with pytest.raises(ValueError, match="SoapBubble"):
    laplace.tune_prior_precision(params, method="marglik", log_likelihood=0.0)
  with pytest.raises(ValueError, match="SoapBubble"):
    laplace.with_prior_precision(params, 1.0)
  with pytest.raises(ValueError, match="prior_precision"):
    laplace.with_prior_precision(state, -1.0)
  with pytest.raises(ValueError, match="prior_precision"):
    laplace.log_marginal_likelihood(state, 0.0, prior_precision=0.0)


# ----------------------------------------------------------------------------------------------
# (f) frozen leaves, predictives, num_data scaling


def _mlp_with_frozen(params, x):
  # The integer leaf is used by the model (a fixed multiplier) and must pass through.
  hidden = jnp.tanh(x @ params["w1"] + params["b1"][None, :]) * params["scale"]
  return hidden @ params["w2"] + params["b2"][None, :]


@functools.cache
def _frozen_state():
  params, x, y = _mlp_problem()
  params = dict(params, scale=jnp.asarray(1, jnp.int32))
  return laplace.fit(_mlp_with_frozen, params, (x, y), likelihood="classification")


def _assert_probabilities(probs):
  probs = np.asarray(probs, np.float64)
  assert probs.shape == (N_TRAIN, CLASSES)
  assert np.all(np.isfinite(probs)) and np.all(probs >= 0)
  np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-5)


def test_frozen_int_leaf_passes_through():
  state, reference = _frozen_state(), _mlp_state()
  covariance, reference_covariance = posterior.covariance(state), posterior.covariance(reference)
  for name in ("w1", "b1", "w2", "b2"):  # the int leaf changes nothing for the others
    np.testing.assert_allclose(covariance[name], reference_covariance[name], rtol=1e-5,
                               atol=1e-7, err_msg=name)
  mean = posterior.mean(state)
  assert mean["scale"].dtype == jnp.int32 and int(mean["scale"]) == 1
  _, x, _ = _mlp_problem()
  _assert_probabilities(
      predictive.bayesian_model_average(jax.random.key(0), _mlp_with_frozen, state, x, 8))


def test_predictives_on_the_laplace_state():
  _, x, _ = _mlp_problem()
  for average in (predictive.linearized_predictive, predictive.bayesian_model_average):
    _assert_probabilities(average(jax.random.key(0), _mlp, _mlp_state(), x, 8))


def test_num_data_scales_ess_and_variances():
  params, x, y = _mlp_problem()
  subset = N_TRAIN // 2
  data = (x[:subset], y[:subset])
  grads = _reference_pseudo_gradients(params, x[:subset])
  scaled = laplace.fit(_mlp, params, data, likelihood="classification", num_data=2 * subset,
                       prior_precision=2 * PRIOR_PRECISION)
  plain = laplace.fit(_mlp, params, data, likelihood="classification",
                      prior_precision=PRIOR_PRECISION)
  assert float(scaled.ess) == 2 * float(plain.ess) == 2 * subset
  np.testing.assert_allclose(float(scaled.weight_decay), PRIOR_PRECISION / subset, rtol=1e-6)
  scaled_covariance, plain_covariance = posterior.covariance(scaled), posterior.covariance(plain)
  for name in params:
    matrix_leaf = name.startswith("w")
    # Ĥ is a mean over the subset: the formula with N = 2n, from the subset's factors.
    hessian, k, _ = _reference_ekfac(grads[name], subset, left=matrix_leaf, right=matrix_leaf)
    _assert_covariance(scaled_covariance[name],
                       _reference_covariance(hessian, k, 2 * subset, 2 * PRIOR_PRECISION), name)
    # Doubling N and λ together halves the whole covariance.
    np.testing.assert_allclose(scaled_covariance[name], 0.5 * plain_covariance[name],
                               rtol=1e-5, atol=1e-7, err_msg=name)
