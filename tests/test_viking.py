"""evon_jax.viking against dense float64 NumPy references and Bayesian linear regression."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from evon_jax import viking

# A tiny tanh MLP: 3 inputs, 8 hidden units, 3 outputs (P = 59), evaluated on 4 inputs, so J is
# 12 x 59 and its image has dimension 12 (8 with zero-sum outputs) out of 59.
D_IN, HIDDEN, CLASSES, N_TRAIN = 3, 8, 3, 4
# ravel_pytree flattens a dict in sorted-key order, each leaf row-major.
SHAPES = (("b1", (HIDDEN,)), ("b2", (CLASSES,)), ("w1", (D_IN, HIDDEN)),
          ("w2", (HIDDEN, CLASSES)))


def _mlp(params, x):
  hidden = jnp.tanh(x @ params["w1"] + params["b1"][None, :])
  return hidden @ params["w2"] + params["b2"][None, :]


def _np_mlp(flat, x):
  """The same MLP in float64 NumPy on a flat parameter vector (independent of JAX)."""
  leaves, start = {}, 0
  for name, shape in SHAPES:
    size = int(np.prod(shape))
    leaves[name] = flat[start:start + size].reshape(shape)
    start += size
  return np.tanh(x @ leaves["w1"] + leaves["b1"]) @ leaves["w2"] + leaves["b2"]


@functools.cache
def _mlp_problem():
  keys = jax.random.split(jax.random.key(0), 5)
  params = {
      "w1": jax.random.normal(keys[0], (D_IN, HIDDEN)) / np.sqrt(D_IN),
      "b1": 0.1 * jax.random.normal(keys[1], (HIDDEN,)),
      "w2": jax.random.normal(keys[2], (HIDDEN, CLASSES)) / np.sqrt(HIDDEN),
      "b2": 0.1 * jax.random.normal(keys[3], (CLASSES,)),
  }
  x = jax.random.normal(keys[4], (N_TRAIN, D_IN))
  return params, x


def _dense_jacobian(center_outputs=False):
  """(n·K) x P Jacobian by float64 central differences of the NumPy forward pass."""
  params, x = _mlp_problem()
  flat = np.asarray(ravel_pytree(params)[0], np.float64)
  x64 = np.asarray(x, np.float64)
  step = 1e-6
  columns = []
  for i in range(flat.size):
    e = np.zeros_like(flat)
    e[i] = step
    columns.append((_np_mlp(flat + e, x64) - _np_mlp(flat - e, x64)) / (2 * step))
  jac = np.stack(columns, axis=-1)  # (n, K, P)
  if center_outputs:
    jac = jac - jac.mean(axis=1, keepdims=True)
  return jac.reshape(N_TRAIN * CLASSES, flat.size)


def _random_vector(seed):
  params, _ = _mlp_problem()
  flat, unravel = ravel_pytree(params)
  return unravel(jax.random.normal(jax.random.key(seed), flat.shape))


def _flat(tree):
  return np.asarray(ravel_pytree(tree)[0], np.float64)


# (a) Projections.


@pytest.mark.parametrize("solver", ["cg", "lsqr"])
@pytest.mark.parametrize("center_outputs", [False, True])
def test_image_projection_matches_dense_pseudoinverse(solver, center_outputs):
  params, x = _mlp_problem()
  jac = _dense_jacobian(center_outputs)
  vector = _random_vector(1)
  expected = np.linalg.pinv(jac) @ jac @ _flat(vector)
  got = _flat(viking.image_projection(_mlp, params, x, vector, solver=solver,
                                      center_outputs=center_outputs))
  # float32 Krylov solve of a problem with cond(J) ≈ 10: errors ~1e-6 on entries of size ~1.
  np.testing.assert_allclose(got, expected, atol=2e-5)
  assert np.linalg.norm(expected) > 1.0  # a non-trivial image part


@pytest.mark.parametrize("solver", ["cg", "lsqr"])
def test_projection_is_idempotent_and_kernel_is_orthogonal_to_rows(solver):
  params, x = _mlp_problem()
  jac = _dense_jacobian()
  vector = _random_vector(2)
  image = viking.image_projection(_mlp, params, x, vector, solver=solver)
  twice = viking.image_projection(_mlp, params, x, image, solver=solver)
  np.testing.assert_allclose(_flat(twice), _flat(image), atol=2e-5)
  kernel = _flat(viking.kernel_projection(_mlp, params, x, vector, solver=solver))
  # J P_ker v = 0 up to float32 solver error, relative to the scale ‖J‖‖v‖ ≈ 30.
  scale = np.linalg.norm(jac, 2) * np.linalg.norm(_flat(vector))
  assert np.max(np.abs(jac @ kernel)) < 1e-5 * scale
  np.testing.assert_allclose(kernel + _flat(image), _flat(vector), atol=1e-6)


@pytest.mark.parametrize("solver", ["cg", "lsqr"])
def test_damping_gives_the_soft_projection(solver):
  params, x = _mlp_problem()
  jac = _dense_jacobian()
  vector = _random_vector(3)
  damping = 0.5
  gram = jac.T @ jac
  expected = np.linalg.solve(gram + damping * np.eye(gram.shape[0]), gram @ _flat(vector))
  got = _flat(viking.image_projection(_mlp, params, x, vector, solver=solver, damping=damping))
  np.testing.assert_allclose(got, expected, atol=2e-5)


# (b) Rank.


@pytest.mark.parametrize("center_outputs", [False, True])
def test_hutchinson_rank_within_four_standard_errors(center_outputs):
  params, x = _mlp_problem()
  jac = _dense_jacobian(center_outputs)
  rank = np.linalg.matrix_rank(jac)
  assert rank == (8 if center_outputs else 12)
  projector = np.linalg.pinv(jac) @ jac
  num_probes = 200
  # Rademacher Hutchinson variance: 2 (‖P‖_F² − Σ P_ii²) with ‖P‖_F² = rank.
  stderr = np.sqrt(2 * (rank - np.sum(np.diag(projector)**2)) / num_probes)
  estimate = viking.estimate_rank(jax.random.key(4), _mlp, params, x, num_probes=num_probes,
                                  center_outputs=center_outputs)
  assert abs(float(estimate) - rank) < 4 * stderr


# (c) KL.


def _dense_covariance(jac, sigma_ker, sigma_im):
  image = np.linalg.pinv(jac) @ jac
  return sigma_ker**2 * (np.eye(jac.shape[1]) - image) + sigma_im**2 * image


def test_kl_matches_dense_gaussian_kl():
  params, _ = _mlp_problem()
  jac = _dense_jacobian()
  sigma_ker, sigma_im, alpha = 0.7, 0.05, 3.0
  q = viking.init(params, sigma_ker=sigma_ker, sigma_im=sigma_im)
  cov = _dense_covariance(jac, sigma_ker, sigma_im)
  mean = _flat(params)
  dim = mean.size
  _, logdet = np.linalg.slogdet(alpha * cov)
  expected = 0.5 * (alpha * np.trace(cov) + alpha * mean @ mean - dim - logdet)
  got = viking.kl_divergence(q, np.linalg.matrix_rank(jac), alpha)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


# (d) Samples.


def test_sample_mean_and_covariance_match_dense_sigma():
  params, x = _mlp_problem()
  jac = _dense_jacobian()
  sigma_ker, sigma_im = 0.7, 0.2
  q = viking.init(params, sigma_ker=sigma_ker, sigma_im=sigma_im)
  num_samples = 20_000
  samples = viking.sample(jax.random.key(5), _mlp, q, x, num_samples)
  assert samples["w1"].shape == (num_samples, D_IN, HIDDEN)
  flat = np.asarray(jax.vmap(lambda tree: ravel_pytree(tree)[0])(samples), np.float64)
  cov = _dense_covariance(jac, sigma_ker, sigma_im)
  deviations = flat - _flat(params)[None, :]
  # 5 Monte Carlo standard errors per entry: Var(mean_i) = Σ_ii / S,
  # Var(Ĉ_ij) = (Σ_ii Σ_jj + Σ_ij²) / S for Gaussian samples.
  variances = np.diag(cov)
  assert np.all(np.abs(deviations.mean(axis=0)) < 5 * np.sqrt(variances / num_samples))
  sample_cov = deviations.T @ deviations / num_samples
  stderr = np.sqrt((np.outer(variances, variances) + cov**2) / num_samples)
  assert np.all(np.abs(sample_cov - cov) < 5 * stderr)


def _linear(params, x):
  return x @ params["w"] + params["b"][None, :]


def test_kernel_deviations_leave_linear_training_predictions_unchanged():
  keys = jax.random.split(jax.random.key(6), 4)
  params = {"w": jax.random.normal(keys[0], (5, 4)), "b": jax.random.normal(keys[1], (4,))}
  x_train = jax.random.normal(keys[2], (3, 5))  # J: 12 x 24, a 12-dimensional kernel
  x_test = jax.random.normal(keys[3], (6, 5))
  q = viking.init(params, sigma_ker=3.0, sigma_im=1e-4)
  samples = viking.sample(jax.random.key(7), _linear, q, x_train, 50)
  train_shift = (jax.vmap(lambda p: _linear(p, x_train))(samples)
                 - _linear(params, x_train)[None])
  test_shift = jax.vmap(lambda p: _linear(p, x_test))(samples) - _linear(params, x_test)[None]
  # Image noise moves training outputs by ~σ_im ‖x‖ ≈ 3e-4; kernel noise (σ_ker = 3) moves
  # test outputs by O(σ_ker ‖x‖) but training outputs only by float32 solver error.
  assert np.max(np.abs(train_shift)) < 3e-3
  assert np.std(np.asarray(test_shift)) > 1.0


def test_sample_predictive_pushes_the_same_samples_through_softmax():
  params, x = _mlp_problem()
  x_test = jnp.linspace(-2.0, 2.0, 15).reshape(5, D_IN)
  q = viking.init(params, sigma_ker=0.5, sigma_im=0.1)
  key = jax.random.key(8)
  probs = viking.sample_predictive(key, _mlp, q, x, x_test, 3, center_outputs=True)
  samples = viking.sample(key, _mlp, q, x, 3, center_outputs=True)
  assert probs.shape == (3, 5, CLASSES)
  for s in range(3):
    params_s = jax.tree.map(lambda leaf, s=s: leaf[s], samples)
    np.testing.assert_allclose(probs[s], jax.nn.softmax(_mlp(params_s, x_test)), rtol=1e-5,
                               atol=1e-6)


# (e) Bayesian linear regression: y = Xθ + N(0, σ²), prior N(0, α⁻¹ I), n < P.

NOISE_STD, PRIOR_PRECISION, N_REG, P_REG = 0.5, 2.0, 5, 12


@functools.cache
def _regression():
  keys = jax.random.split(jax.random.key(9), 3)
  x = np.asarray(jax.random.normal(keys[0], (N_REG, P_REG)), np.float64)
  theta = np.asarray(jax.random.normal(keys[1], (P_REG,)), np.float64)
  y = x @ theta + NOISE_STD * np.asarray(jax.random.normal(keys[2], (N_REG,)), np.float64)
  return x, y


def _regression_optimum():
  """Closed-form VIKING optimum (θ̂, σ_ker, σ_im) with k = rank(X) = n.

  Negative ELBO = ½σ⁻²‖y − Xθ̂‖² + ½σ⁻² σ_im² ‖X‖_F² + KL + const, because
  tr(X Σ Xᵀ) = σ_im² tr(X P_im Xᵀ) = σ_im² ‖X‖_F² (X P_ker = 0). Setting its derivatives to zero:
  θ̂ = (XᵀX/σ² + αI)⁻¹ Xᵀy/σ², σ_ker² = 1/α, σ_im² = k / (‖X‖_F²/σ² + αk).
  """
  x, y = _regression()
  k = N_REG
  precision = x.T @ x / NOISE_STD**2 + PRIOR_PRECISION * np.eye(P_REG)
  mean = np.linalg.solve(precision, x.T @ y / NOISE_STD**2)
  var_im = k / (np.sum(x**2) / NOISE_STD**2 + PRIOR_PRECISION * k)
  return mean, np.sqrt(1 / PRIOR_PRECISION), np.sqrt(var_im)


def _regression_negative_elbo(mean, sigma_ker, sigma_im):
  """Exact negative ELBO per datum (without the constant ½ log 2πσ²)."""
  x, y = _regression()
  k, dim, alpha = N_REG, P_REG, PRIOR_PRECISION
  expected_nll = 0.5 * (np.sum((y - x @ mean)**2) + sigma_im**2 * np.sum(x**2)) / NOISE_STD**2
  kl = 0.5 * (alpha * (sigma_ker**2 * (dim - k) + sigma_im**2 * k) + alpha * mean @ mean - dim
              - (dim - k) * np.log(alpha * sigma_ker**2) - k * np.log(alpha * sigma_im**2))
  return (expected_nll + kl) / N_REG


def _apply_regression(params, x):
  return x @ params["theta"]


def _gaussian_nll(outputs, targets):
  return 0.5 * jnp.mean((outputs - targets)**2) / NOISE_STD**2


def _regression_loss(key, q, num_samples, rank):
  x, y = _regression()
  batch = (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  return viking.elbo_loss(key, _gaussian_nll, _apply_regression, q, batch, num_data=N_REG,
                          prior_precision=PRIOR_PRECISION, num_samples=num_samples,
                          num_probes=4, rank=rank, solver="lsqr")


def _q(mean, sigma_ker, sigma_im):
  return viking.init({"theta": jnp.asarray(mean, jnp.float32)}, sigma_ker=sigma_ker,
                     sigma_im=sigma_im)


def test_regression_elbo_matches_closed_form_and_is_lowest_at_the_optimum():
  mean, sigma_ker, sigma_im = _regression_optimum()
  optimum = _regression_negative_elbo(mean, sigma_ker, sigma_im)
  # The derivation itself: the exact objective is stationary and minimal at the closed form.
  for point in [(mean + 0.05, sigma_ker, sigma_im), (mean, 1.3 * sigma_ker, sigma_im),
                (mean, sigma_ker, 0.7 * sigma_im)]:
    assert _regression_negative_elbo(*point) > optimum
  key = jax.random.key(10)  # common random numbers for every point
  loss = jax.jit(functools.partial(_regression_loss, key, num_samples=4000, rank=N_REG))
  at_optimum = float(loss(_q(mean, sigma_ker, sigma_im)))
  # Monte-Carlo error of the expected NLL: per sample it is ‖r − σ_im X ε‖² / (2σ² n) with
  # r = y − Xθ̂, whose variance is (4σ_im² ‖Xᵀr‖² + 2σ_im⁴ Σ s⁴) / (2σ² n)² (s: singular
  # values of X; X P_ker = 0, so only the image part of ε matters). Tolerance: 5 standard errors.
  x, y = _regression()
  residual = y - x @ mean
  singular = np.linalg.svd(x, compute_uv=False)
  per_sample_var = (4 * sigma_im**2 * np.sum((x.T @ residual)**2)
                    + 2 * sigma_im**4 * np.sum(singular**4)) / (2 * NOISE_STD**2 * N_REG)**2
  assert abs(at_optimum - optimum) < 5 * np.sqrt(per_sample_var / 4000)
  perturbed = [
      _q(mean + 0.05, sigma_ker, sigma_im),
      _q(mean, 1.3 * sigma_ker, sigma_im),
      _q(mean, 0.7 * sigma_ker, sigma_im),
      _q(mean, sigma_ker, 1.3 * sigma_im),
      _q(mean, sigma_ker, 0.7 * sigma_im),
  ]
  for q in perturbed:
    assert float(loss(q)) > at_optimum + 0.05  # the exact gaps are 0.08 to 0.14


@pytest.mark.parametrize("rank", [N_REG, None])
def test_regression_training_recovers_the_closed_form_optimum(rank):
  mean, sigma_ker, sigma_im = _regression_optimum()
  q = _q(np.zeros(P_REG), 0.1, 0.1)
  steps = 1500
  optimizer = optax.adam(optax.cosine_decay_schedule(0.05, steps, alpha=1e-3))
  opt_state = optimizer.init(q)

  @jax.jit
  def step(q, opt_state, key):
    grads = jax.grad(lambda q: _regression_loss(key, q, 8, rank))(q)
    updates, opt_state = optimizer.update(grads, opt_state, q)
    return optax.apply_updates(q, updates), opt_state

  for key in jax.random.split(jax.random.key(11), steps):
    q, opt_state = step(q, opt_state, key)
  # Tolerances: the Adam iterate at the end of a decayed schedule still jitters with the MC
  # gradient noise (8 samples, and 4 Hutchinson probes when the rank is estimated).
  np.testing.assert_allclose(np.asarray(q.mean["theta"]), mean, atol=0.03)
  np.testing.assert_allclose(float(jnp.exp(q.log_sigma_ker)), sigma_ker, rtol=0.03)
  np.testing.assert_allclose(float(jnp.exp(q.log_sigma_im)), sigma_im, rtol=0.05)


def test_elbo_gradient_reaches_every_variational_parameter():
  params, x = _mlp_problem()
  labels = jnp.array([0, 1, 2, 1])
  q = viking.init(params, sigma_ker=0.3, sigma_im=0.1)

  def nll(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  grads = jax.jit(jax.grad(lambda q: viking.elbo_loss(
      jax.random.key(12), nll, _mlp, q, (x, labels), num_data=100, prior_precision=1.0,
      num_samples=2, center_outputs=True)))(q)
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.isfinite(leaf))
  assert float(jnp.abs(grads.log_sigma_ker)) > 0
  assert float(jnp.abs(grads.log_sigma_im)) > 0
  assert float(jnp.linalg.norm(grads.mean["w1"])) > 0


# (f) Validation.


def test_bad_options_raise_value_errors():
  params, x = _mlp_problem()
  vector = _random_vector(13)
  with pytest.raises(ValueError, match="solver"):
    viking.image_projection(_mlp, params, x, vector, solver="qr")
  with pytest.raises(ValueError, match="damping"):
    viking.image_projection(_mlp, params, x, vector, damping=-1.0)
  with pytest.raises(ValueError, match="sigma_ker"):
    viking.init(params, sigma_ker=0.0)
  with pytest.raises(ValueError, match="sigma_im"):
    viking.init(params, sigma_im=-0.1)
  q = viking.init(params)
  with pytest.raises(ValueError, match="num_samples"):
    viking.sample(jax.random.key(0), _mlp, q, x, 0)
  with pytest.raises(ValueError, match="prior_precision"):
    viking.kl_divergence(q, 3, 0.0)
