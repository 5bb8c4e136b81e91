"""evon_jax.laplace (post-hoc EK-FAC linearised Laplace) against independent references.

References are built in NumPy float64 from the mathematics, never from the module's own
outputs: the dense GGN Σ_n J_nᵀ (diag(p_n) − p_n p_nᵀ) J_n from `jax.jacfwd` Jacobians (not the
module's vector–Jacobian pseudo-gradients), its Kronecker factors as partial traces of the
dense GGN block (L = tr_cols GGN / N, R = tr_rows GGN / N — true for any factorisation of the
output Hessian), NumPy eigenbases, and closed forms of Bayesian linear regression.

Tolerances. The module works in float32: pseudo-gradients and factor sums of O(1) numbers over
≤ 600 terms are accurate to ~1e-6 relative; eigenvectors of well-separated float32 factors to
~1e-5 (the tests assert the eigenvalue gaps they rely on), so Ĥ and covariances are compared at
1e-4 of their largest entry. Evidences are sums of ~40 float32 terms of size O(10): 2e-3 absolute.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from evon_jax import laplace, posterior, predictive
from evon_jax.kronecker import matrix_sides, per_leaf

RTOL = 1e-4
# Read-outs compiled once each (eager posterior calls dispatch many small ops).
covariance = jax.jit(posterior.covariance)


# ----------------------------------------------------------------------------------------------
# A tiny classifier and its dense float64 GGN


def _side(bases, side):
  """The 'left' or 'right' factor of a matrix leaf's per-axis tuple."""
  return matrix_sides(bases)[("left", "right").index(side)]


def mlp_apply(params, x):
  hidden = jnp.tanh(x @ params["w1"] + params["b1"][None])
  return hidden @ params["w2"] + params["b2"][None]


def make_classifier(seed=0, n=15, classes=3):
  rng = np.random.default_rng(seed)
  params = {"w1": rng.standard_normal((3, 4)), "b1": 0.3 * rng.standard_normal(4),
            "w2": rng.standard_normal((4, classes)), "b2": 0.3 * rng.standard_normal(classes)}
  params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
  x = rng.standard_normal((n, 3)).astype(np.float32)
  y = rng.integers(0, classes, n)
  return params, x, y


def numpy_probs(params, x):
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  logits = np.tanh(x.astype(np.float64) @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
  logits -= logits.max(axis=1, keepdims=True)
  e = np.exp(logits)
  return e / e.sum(axis=1, keepdims=True)


def jacobians(params, x):
  """Per leaf (n, classes, leaf size) float64 Jacobians of the logits (forward mode)."""
  jac = jax.vmap(jax.jacfwd(lambda p, xi: mlp_apply(p, xi[None])[0]), in_axes=(None, 0))
  out = jac(params, jnp.asarray(x))
  return {k: np.asarray(v, np.float64).reshape(x.shape[0], v.shape[1], -1)
          for k, v in out.items()}


def dense_ggn(params, x):
  """Per leaf the dense GGN block Σ_n J_nᵀ (diag(p_n) − p_n p_nᵀ) J_n, float64."""
  probs = numpy_probs(params, x)
  hessians = np.stack([np.diag(p) - np.outer(p, p) for p in probs])
  return {k: np.einsum("nka,nkl,nlb->ab", j, hessians, j)
          for k, j in jacobians(params, x).items()}


def descending_eigenbasis(factor):
  values, vectors = np.linalg.eigh(factor)
  values = values[::-1]
  gaps = -np.diff(values)
  assert factor.shape[0] == 1 or gaps.min() > 1e-3 * values[0], "degenerate test factor"
  return vectors[:, ::-1]


def ekfac_reference(ggn, rows, cols, left, right, n):
  """(L, R, K, Ĥ) of one leaf: partial-trace factors, K = Q_L ⊗ Q_R, Ĥ = diag(Kᵀ GGN K)/N."""
  blocks = ggn.reshape(rows, cols, rows, cols)
  factor_l = np.einsum("ijkj->ik", blocks) / n
  factor_r = np.einsum("ijil->jl", blocks) / n
  q_l = descending_eigenbasis(factor_l) if left else np.eye(rows)
  q_r = descending_eigenbasis(factor_r) if right else np.eye(cols)
  rotation = np.kron(q_l, q_r)
  return factor_l, factor_r, rotation, np.diag(rotation.T @ ggn @ rotation) / n


def assert_close(actual, expected, scale_rtol=RTOL):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  np.testing.assert_allclose(actual, expected, rtol=scale_rtol,
                             atol=scale_rtol * np.abs(expected).max())


# Which sides get a basis (the layout rules of `evon`), per configuration.
SIDES = {
    (False, 10000): {"w1": (True, True), "b1": (False, False), "w2": (True, True),
                     "b2": (False, False)},
    (True, 3): {"w1": (True, False), "b1": (False, False), "w2": (False, True),
                "b2": (True, False)},
}


@pytest.mark.parametrize("precondition_1d, max_precond_dim", list(SIDES))
def test_classifier_matches_dense_ekfac(precondition_1d, max_precond_dim):
  params, x, y = make_classifier()
  n, prior_precision = x.shape[0], 0.7
  # batch_size 4 over 15 examples: the last chunk is padded and must be masked out.
  state = laplace.fit(mlp_apply, params, (x, y), likelihood="classification",
                      prior_precision=prior_precision, batch_size=4,
                      max_precond_dim=max_precond_dim, precondition_1d=precondition_1d)
  ggn = dense_ggn(params, x)
  covariances, factors, bases = covariance(state), per_leaf(state.factors, state.mean), \
      posterior.bases(state)
  for name, (left, right) in SIDES[(precondition_1d, max_precond_dim)].items():
    shape = params[name].shape
    rows, cols = (shape[0], shape[1]) if len(shape) == 2 else (shape[0], 1)
    factor_l, factor_r, rotation, hessian = ekfac_reference(ggn[name], rows, cols, left,
                                                            right, n)
    assert tuple(q is not None for q in matrix_sides(bases[name])) == (left, right)
    if left:
      assert_close(matrix_sides(factors[name])[0], factor_l)
    if right:
      assert_close(matrix_sides(factors[name])[1], factor_r)
    assert_close(np.ravel(state.hessian[name]), hessian)
    expected_cov = rotation @ np.diag(1.0 / (n * hessian + prior_precision)) @ rotation.T
    assert_close(covariances[name], expected_cov)
  means = posterior.mean(state)
  for name in params:
    np.testing.assert_allclose(means[name], params[name], atol=1e-5)
  assert float(state.ess) == n
  np.testing.assert_allclose(float(state.ess * state.weight_decay), prior_precision, rtol=1e-6)


def test_sampled_fisher_is_unbiased_and_empirical_matches_its_definition():
  """'sampled' draws one label per example: over 600 examples (15 distinct, each repeated
  40 times with its own draw) its factors and diagonal must lie within 5 Monte-Carlo standard
  errors (computed exactly from the model's probabilities) of the exact GGN's. 'empirical'
  must equal the observed-label Fisher, and differ from the GGN."""
  params, x, y = make_classifier(seed=1)
  repeats = 40
  big_x, big_y = np.tile(x, (repeats, 1)), np.tile(y, repeats)
  probs, jacs = numpy_probs(params, x), jacobians(params, x)
  classes = probs.shape[1]

  def outer_moments(name, rows, cols, label_weights):
    """Per example the (mean, variance) over labels ~ weights of the factor statistics."""
    residual = np.eye(classes)[None] - probs[:, None, :]          # (n, label, classes)
    grads = np.einsum("ncK,nKa->nca", residual, jacs[name]).reshape(-1, classes, rows, cols)
    stat = {"left": np.einsum("ncij,nckj->ncik", grads, grads),
            "right": np.einsum("ncji,ncjk->ncik", grads, grads),
            "diag": grads ** 2}
    w = label_weights[:, :, None, None]
    mean = {k: (w * v).sum(1) for k, v in stat.items()}
    var = {k: (w * (v - mean[k][:, None]) ** 2).sum(1) for k, v in stat.items()}
    return mean, var

  sampled = laplace.fit(mlp_apply, params, (big_x, big_y), likelihood="classification",
                        fisher="sampled", key=jax.random.key(3), batch_size=200)
  empirical = laplace.fit(mlp_apply, params, (x, y), likelihood="classification",
                          fisher="empirical")
  total = x.shape[0] * repeats
  for name, rows, cols, side in (("w1", 3, 4, "left"), ("w2", 4, 3, "right"),
                                 ("b2", 3, 1, "diag")):
    mean, var = outer_moments(name, rows, cols, probs)
    expected = mean[side].mean(0)  # the exact GGN's statistic, per example averaged
    standard_error = np.sqrt(repeats * var[side].sum(0)) / total
    got = (_side(per_leaf(sampled.factors, sampled.mean)[name], side) if side != "diag"
           else np.reshape(sampled.hessian[name], (rows, cols)))
    assert np.all(np.abs(np.asarray(got) - expected) <= 5 * standard_error + 1e-6), name
    observed, _ = outer_moments(name, rows, cols, np.eye(classes)[y])
    got_empirical = (_side(per_leaf(empirical.factors, empirical.mean)[name], side)
                     if side != "diag"
                     else np.reshape(empirical.hessian[name], (rows, cols)))
    assert_close(got_empirical, observed[side].mean(0))
    # Sanity: with labels not drawn from the model the empirical Fisher is another matrix.
    assert np.abs(observed[side].mean(0) - expected).max() > 0.05 * np.abs(expected).max()


# ----------------------------------------------------------------------------------------------
# Bayesian linear regression: EK-FAC Laplace is the exact posterior


SIGMA = 0.5


def make_regression(seed=0, n=40, dim=4):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, dim))
  w = rng.standard_normal((dim, 1)) / math.sqrt(2.0)
  y = x @ w + SIGMA * rng.standard_normal((n, 1))
  return x, y


def ridge_map(x, y, prior_precision):
  precision = x.T @ x / SIGMA ** 2 + prior_precision * np.eye(x.shape[1])
  return np.linalg.solve(precision, x.T @ y / SIGMA ** 2), precision


def exact_log_evidence(x, y, prior_precision):
  """log N(y; 0, σ² I + X Xᵀ / λ)."""
  cov = SIGMA ** 2 * np.eye(x.shape[0]) + x @ x.T / prior_precision
  _, logdet = np.linalg.slogdet(cov)
  return float(-0.5 * (y[:, 0] @ np.linalg.solve(cov, y[:, 0]) + logdet
                       + x.shape[0] * math.log(2 * math.pi)))


def linear_apply(params, x):
  return x @ params["w"]


def linear_apply_flat(params, x):  # outputs (batch,) instead of (batch, 1)
  return (x @ params["w"])[:, 0]


def fit_regression(x, y, w, prior_precision, flat=False):
  apply_fn, targets = (linear_apply_flat, y[:, 0]) if flat else (linear_apply, y)
  data = (x.astype(np.float32), targets.astype(np.float32))
  params = {"w": jnp.asarray(w, jnp.float32)}
  state = laplace.fit(apply_fn, params, data, likelihood="regression",
                      prior_precision=prior_precision, sigma_noise=SIGMA, batch_size=16)
  log_lik = laplace.log_likelihood(apply_fn, params, data, likelihood="regression",
                                   sigma_noise=SIGMA)
  return state, log_lik


@pytest.mark.parametrize("prior_precision", [0.1, 1.0, 10.0])
def test_linear_regression_is_exact_at_the_map(prior_precision):
  x, y = make_regression()
  w, precision = ridge_map(x, y, prior_precision)
  state, log_lik = fit_regression(x, y, w, prior_precision, flat=prior_precision > 1)
  residual = y - x @ w
  np.testing.assert_allclose(float(log_lik), float(np.sum(
      -0.5 * (residual / SIGMA) ** 2 - math.log(SIGMA) - 0.5 * math.log(2 * math.pi))),
      rtol=1e-5)
  assert_close(covariance(state)["w"], np.linalg.inv(precision))
  np.testing.assert_allclose(float(laplace.log_marginal_likelihood(state, log_lik)),
                             exact_log_evidence(x, y, prior_precision), atol=2e-3)


def test_evidence_away_from_the_map_and_with_prior_precision():
  """At a fixed θ̂ the log joint is quadratic, so the Laplace evidence at any λ is the exact
  one minus ½ (θ̂ − θ*_λ)ᵀ A_λ (θ̂ − θ*_λ)."""
  x, y = make_regression(seed=1)
  w, _ = ridge_map(x, y, 1.0)
  state, log_lik = fit_regression(x, y, w, 1.0)
  for prior_precision in (0.03, 3.0, 30.0):
    w_star, precision = ridge_map(x, y, prior_precision)
    gap = 0.5 * float(((w - w_star).T @ precision @ (w - w_star))[0, 0])
    expected = exact_log_evidence(x, y, prior_precision) - gap
    np.testing.assert_allclose(float(laplace.log_marginal_likelihood(
        state, log_lik, prior_precision=prior_precision)), expected, atol=2e-3)
    moved = laplace.with_prior_precision(state, prior_precision)
    np.testing.assert_allclose(float(laplace.log_marginal_likelihood(moved, log_lik)),
                               expected, atol=2e-3)
    assert_close(covariance(moved)["w"], np.linalg.inv(precision))


def test_marglik_tuning_finds_the_exact_evidence_maximum():
  x, y = make_regression(seed=2)
  best = scipy.optimize.minimize_scalar(
      lambda t: -exact_log_evidence(x, y, math.exp(t)), bounds=(-9, 9), method="bounded",
      options={"xatol": 1e-8})
  exact_best = math.exp(best.x)
  # At θ̂ = θ*_λ* the Laplace evidence touches the exact one at λ* and lies below elsewhere,
  # so its maximiser is λ* itself.
  state, log_lik = fit_regression(x, y, ridge_map(x, y, exact_best)[0], 1.0)
  grid = np.logspace(-4, 4, 41)
  _, coarse = laplace.tune_prior_precision(state, method="marglik", log_likelihood=log_lik,
                                           grid=grid, refine=False)
  assert abs(math.log10(float(coarse.prior_precision)) - math.log10(exact_best)) <= 0.2
  tuned, report = laplace.tune_prior_precision(state, method="marglik",
                                               log_likelihood=log_lik, grid=grid)
  np.testing.assert_allclose(float(report.prior_precision), exact_best, rtol=1e-3)
  np.testing.assert_allclose(float(tuned.ess * tuned.weight_decay), exact_best, rtol=1e-3)
  assert float(report.best_on_grid) == float(coarse.prior_precision)
  w_hat = ridge_map(x, y, exact_best)[0]
  evidences = []
  for lam in grid:
    w_star, precision = ridge_map(x, y, lam)
    gap = 0.5 * float(((w_hat - w_star).T @ precision @ (w_hat - w_star))[0, 0])
    evidences.append(exact_log_evidence(x, y, lam) - gap)
  # Up to λ = 1e4 the prior term reaches 1e4: float32 keeps it to ~1e-6 relative.
  np.testing.assert_allclose(report.objective, evidences, rtol=2e-6, atol=2e-3)


# ----------------------------------------------------------------------------------------------
# Validation-NLL tuning, frozen leaves, errors


@pytest.fixture(scope="module")
def nll_problem():
  params, x, y = make_classifier(seed=4, n=20)
  state = laplace.fit(mlp_apply, params, (x[:14], y[:14]), likelihood="classification")
  return state, x, y


@pytest.mark.parametrize("kind", ["linearized", "sampled"])
def test_nll_tuning_picks_the_brute_force_minimiser(kind, nll_problem):
  state, x, y = nll_problem
  grid = np.logspace(-2, 2, 5)
  key = jax.random.key(7)
  validation = (x[14:], y[14:])
  _, report = laplace.tune_prior_precision(
      state, method="nll", apply_fn=mlp_apply, validation=validation, grid=grid, key=key,
      num_samples=16, predictive_kind=kind)
  average = (predictive.linearized_predictive if kind == "linearized"
             else predictive.bayesian_model_average)
  average = jax.jit(functools.partial(average, key=key, apply_fn=mlp_apply,
                                      inputs=validation[0], num_samples=16))
  brute = []
  for lam in grid:
    candidate = state._replace(weight_decay=jnp.asarray(lam / float(state.ess), jnp.float32))
    probs = np.asarray(average(opt_state=candidate), np.float64)
    brute.append(-np.mean(np.log(probs[np.arange(len(validation[1])), validation[1]])))
  np.testing.assert_allclose(report.objective, brute, rtol=1e-4)
  assert float(report.prior_precision) == pytest.approx(grid[int(np.argmin(brute))])


def test_nll_tuning_regression_matches_the_gaussian_predictive():
  """For a linear model the linearised predictive is exactly N(xᵀθ̂, xᵀΣx + σ²); the tuned
  objective is its Monte-Carlo mixture estimate (4000 samples: standard deviation 3e-3
  over keys, measured; checked at 1.5e-2, 5 standard deviations)."""
  x, y = make_regression(seed=3, n=50)
  w, _ = ridge_map(x[:40], y[:40], 1.0)
  state, _ = fit_regression(x[:40], y[:40], w, 1.0)
  grid = np.array([0.1, 10.0, 1000.0])
  validation = (x[40:].astype(np.float32), y[40:].astype(np.float32))
  _, report = laplace.tune_prior_precision(
      state, method="nll", apply_fn=linear_apply, validation=validation, grid=grid,
      likelihood="regression", sigma_noise=SIGMA, key=jax.random.key(0), num_samples=4000)
  expected = []
  for lam in grid:
    cov = np.linalg.inv(x[:40].T @ x[:40] / SIGMA ** 2 + lam * np.eye(4))
    var = np.einsum("ni,ij,nj->n", x[40:], cov, x[40:]) + SIGMA ** 2
    resid = y[40:, 0] - x[40:] @ w[:, 0]
    expected.append(np.mean(0.5 * resid ** 2 / var + 0.5 * np.log(2 * math.pi * var)))
  np.testing.assert_allclose(report.objective, expected, atol=1.5e-2)


@pytest.fixture(scope="module")
def frozen_fit():
  """The classifier with an int leaf the model ignores (e.g. a step counter)."""
  params, x, y = make_classifier(seed=5, n=12)
  params = dict(params, step=jnp.asarray(7, jnp.int32))
  state = laplace.fit(mlp_apply, params, (x, y), likelihood="classification",
                      precondition_1d=True)
  return params, x, y, state


@pytest.fixture(scope="module")
def plain_fit():
  params, x, y = make_classifier(seed=5, n=12)
  return params, x, y, laplace.fit(mlp_apply, params, (x, y), likelihood="classification")


def test_frozen_int_leaf_and_bias_with_sampled_predictive(frozen_fit):
  params, x, y, state = frozen_fit
  means = posterior.mean(state)
  assert means["step"].dtype == jnp.int32 and int(means["step"]) == 7
  assert matrix_sides(posterior.bases(state)["b1"])[0] is not None  # 1-D leaf rotated (precondition_1d)
  for name in ("w1", "b1", "w2", "b2"):
    np.testing.assert_allclose(means[name], params[name], atol=1e-5)
  probs = jax.jit(lambda s: predictive.bayesian_model_average(
      jax.random.key(0), mlp_apply, s, x, 8))(state)
  assert probs.shape == (12, 3)
  np.testing.assert_allclose(np.sum(probs, axis=1), 1.0, rtol=1e-5)
  # P counts the trainable entries only (the int leaf is not a parameter of the posterior).
  log_lik = laplace.log_likelihood(mlp_apply, params, (x, y), likelihood="classification")
  lam, n_h = 0.7, np.concatenate([np.ravel(state.ess * state.hessian[k])
                                  for k in ("w1", "b1", "w2", "b2")])
  sq = sum(float(np.sum(np.square(params[k]))) for k in ("w1", "b1", "w2", "b2"))
  expected = (float(log_lik) - 0.5 * lam * sq + 0.5 * n_h.size * math.log(lam)
              - 0.5 * np.sum(np.log(n_h.astype(np.float64) + lam)))
  np.testing.assert_allclose(float(laplace.log_marginal_likelihood(
      state, log_lik, prior_precision=lam)), expected, rtol=1e-5)


def test_linearized_predictive_without_frozen_leaves(plain_fit):
  _, x, _, state = plain_fit
  probs = jax.jit(lambda s: predictive.linearized_predictive(
      jax.random.key(0), mlp_apply, s, x, 8))(state)
  assert probs.shape == (12, 3)
  np.testing.assert_allclose(np.sum(probs, axis=1), 1.0, rtol=1e-5)


def test_linearized_predictive_with_frozen_int_leaf(frozen_fit):
  # Integer leaves have no tangent space: linearized_logits must keep them constant (it
  # raised a ValueError from jax.linearize before it did).
  _, x, _, state = frozen_fit
  probs = jax.jit(lambda s: predictive.linearized_predictive(
      jax.random.key(0), mlp_apply, s, x, 8))(state)
  assert probs.shape[0] == x.shape[0] and np.all(np.isfinite(probs))
  np.testing.assert_allclose(np.sum(probs, axis=1), 1.0, rtol=1e-5)


def test_stacked_dims_equal_separate_leaves():
  """A (2, 3, 3) leaf with stacked_dims=1 must give each matrix the posterior that two
  separate (3, 3) leaves get (block-diagonal covariance)."""
  rng = np.random.default_rng(6)
  stack = jnp.asarray(rng.standard_normal((2, 3, 3)), jnp.float32)
  x = rng.standard_normal((10, 3)).astype(np.float32)
  y = rng.integers(0, 3, 10)
  stacked = laplace.fit(lambda p, v: jnp.tanh(v @ p["s"][0]) @ p["s"][1], {"s": stack},
                        (x, y), likelihood="classification", stacked_dims=1)
  separate = laplace.fit(lambda p, v: jnp.tanh(v @ p["a"]) @ p["b"],
                         {"a": stack[0], "b": stack[1]}, (x, y), likelihood="classification")
  cov_stacked, cov_separate = covariance(stacked), covariance(separate)
  assert_close(cov_stacked["s"][:9, :9], cov_separate["a"])
  assert_close(cov_stacked["s"][9:, 9:], cov_separate["b"])
  assert np.all(np.asarray(cov_stacked["s"][:9, 9:]) == 0)


def test_fit_on_a_stream_of_batches_equals_the_fit_on_arrays():
  """A list of uneven batches and a function returning fresh iterators (a DataLoader-style
  stream, read twice) give the in-memory fit; a one-shot iterator is refused."""
  params, x, y = make_classifier()
  options = dict(likelihood="classification", prior_precision=0.7, batch_size=4)
  want = laplace.fit(mlp_apply, params, (x, y), **options)
  cuts = [0, 5, 6, 13, len(y)]
  batches = [(x[a:b], y[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
  for data in (batches, lambda: iter(batches)):
    got = laplace.fit(mlp_apply, params, data, **options)
    assert float(got.ess) == len(y)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
  with pytest.raises(ValueError, match="one-shot iterator"):
    laplace.fit(mlp_apply, params, iter(batches), **options)


@pytest.mark.parametrize("kwargs, data, match", [
    (dict(likelihood="poisson"), None, "likelihood"),
    (dict(likelihood="classification", fisher="kfac"), None, "fisher"),
    (dict(likelihood="classification", fisher="sampled"), None, "key"),
    (dict(likelihood="classification", prior_precision=0.0), None, "prior_precision"),
    (dict(likelihood="classification"), "not a tuple", "tuple"),
    (dict(likelihood="classification"), "mismatched", "leading"),
    (dict(likelihood="classification"), "float labels", "integer class labels"),
    (dict(likelihood="classification"), "label range", r"\[0, 3\)"),
    (dict(likelihood="regression"), "regression shape", "do not match"),
])
def test_fit_errors(kwargs, data, match):
  params, x, y = make_classifier()
  cases = {None: (x, y), "not a tuple": x, "mismatched": (x, y[:-1]),
           "float labels": (x, y.astype(np.float32)), "label range": (x, y + 1),
           "regression shape": (x, y.astype(np.float32))}
  with pytest.raises(ValueError, match=match):
    laplace.fit(mlp_apply, params, cases[data], **kwargs)


def test_model_output_and_tuning_errors(plain_fit):
  params, x, y, state = plain_fit
  with pytest.raises(ValueError, match="logits of shape"):
    laplace.fit(lambda p, v: mlp_apply(p, v)[:, 0], params, (x, y),
                likelihood="classification")
  with pytest.raises(ValueError, match="non-finite"):
    laplace.fit(mlp_apply, dict(params, b2=jnp.full(3, jnp.nan)), (x, y),
                likelihood="classification", max_precond_dim=0)
  with pytest.raises(ValueError, match="method"):
    laplace.tune_prior_precision(state, method="cv")
  with pytest.raises(ValueError, match="log_likelihood"):
    laplace.tune_prior_precision(state, method="marglik")
  with pytest.raises(ValueError, match="key"):
    laplace.tune_prior_precision(state, method="nll", apply_fn=mlp_apply, validation=(x, y))
  with pytest.raises(ValueError, match="grid"):
    laplace.tune_prior_precision(state, method="marglik", log_likelihood=0.0, grid=[0.0, 1.0])
  with pytest.raises(ValueError, match="prior_precision"):
    laplace.with_prior_precision(state, -1.0)


def test_long_fits_report_progress_and_the_search_plots(caplog, plain_fit):
  """Not interactive (pytest captures stderr): INFO records on the 'evon_jax' logger."""
  import logging
  from matplotlib.figure import Figure
  from evon_jax import plots

  params, x, y = make_classifier()
  with caplog.at_level(logging.INFO, logger="evon_jax"):
    laplace.fit(mlp_apply, params, (x, y), likelihood="classification", batch_size=4)
  messages = [r.getMessage() for r in caplog.records if r.name == "evon_jax"]
  # 15 examples in chunks of 4: both passes report their 4 chunks.
  assert any("laplace.fit: GGN diagonal: finished 4 steps" in m for m in messages), messages
  assert any("laplace.fit: Kronecker factors: started (4 steps)" in m for m in messages)
  fit_params, fit_x, fit_y, state = plain_fit
  _, search = laplace.tune_prior_precision(
      state, method="nll", apply_fn=mlp_apply, validation=(fit_x, fit_y), key=0,
      num_samples=4, grid=[0.1, 1.0, 10.0])
  ax = Figure().add_subplot()
  line = plots.prior_precision_search(ax, search)
  np.testing.assert_allclose(line.get_xdata(), [0.1, 1.0, 10.0])
  np.testing.assert_allclose(line.get_ydata(), np.asarray(search.objective))
