"""evon_jax.posterior against independent NumPy float64 formulas.

Every check reads the raw ingredients out of an optimizer state — the mean M° in eigen
coordinates (`state.mean`), the eigenbasis Hessian H (`state.hessian`), the bases
per-axis tuples (Q_L, Q_R) (`None` = identity), `state.ess` and `state.weight_decay` — and
rebuilds the posterior W = Q_L (M° + E) Q_Rᵀ, E_ij ~ N(0, V_ij), V = 1 / (ess (H + δ)) in
NumPy float64, never from the library's own posterior outputs.

Tolerances. The library works in float32: the rotations are products of <= 6 terms of O(1)
numbers, so their relative error is a few float32 ulp (~1e-6 with margin); entropy and KL are
sums of ~30 logarithms, accurate to ~1e-5 relative. Monte-Carlo checks use 5 standard errors
(see `test_sample_moments`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import evon_jax
from evon_jax import posterior

FLOAT32_RTOL = 1e-5
NAMES = ("w", "k", "v", "s")  # trainable leaves; "n" is an int leaf that passes through
# The NumPy reference below rebuilds each leaf's matrix view: the (2, 2, 3) leaf keeps it.
EVON_HYPER = dict(ess=30.0, hess_init=0.2, b1=0.9, b2=0.8, shampoo_b=0.9, weight_decay=1e-2,
                  precondition_frequency=4, precondition_1d=True,
                  dimension_numbers=evon_jax.matrix_view)
IVON_HYPER = dict(ess=30.0, hess_init=0.2, b1=0.9, b2=0.8, weight_decay=1e-2)


# ----------------------------------------------------------------------------------------------
# Problem, training loop and NumPy reference of the posterior


def _spd(rng, n, floor):
  a = rng.standard_normal((n, n))
  return a @ a.T / n + floor * np.eye(n)


def make_problem(seed=0):
  """Quadratics with Kronecker Hessians on a (5, 4) matrix and a (2, 2, 3) leaf (a (4, 3)
  matrix view), a logistic regression on a (6,) vector, a scalar coupled to the vector and an
  integer leaf the loss ignores."""
  rng = np.random.default_rng(seed)
  a, b = _spd(rng, 5, 0.2), _spd(rng, 4, 0.2)
  w_star = rng.standard_normal((5, 4))
  c, d, k_star = _spd(rng, 4, 0.2), _spd(rng, 3, 0.2), rng.standard_normal((2, 2, 3))
  x = rng.standard_normal((40, 6))
  y = np.sign(x @ rng.standard_normal(6) + 0.3 * rng.standard_normal(40))
  a, b, w_star, c, d, k_star, x, y = (
      jnp.asarray(t, jnp.float32) for t in (a, b, w_star, c, d, k_star, x, y))

  def loss(p):
    dw = p["w"] - w_star
    value = 0.5 * jnp.sum((a @ dw @ b) * dw)
    dk = jnp.reshape(p["k"] - k_star, (4, 3))
    value += 0.5 * jnp.sum((c @ dk @ d) * dk)
    value += jnp.mean(jax.nn.softplus(-y * (x @ p["v"]) * (1.0 + p["s"] ** 2)))
    return value + 0.5 * (p["s"] - 0.5) ** 2

  params = {"w": jnp.asarray(0.3 * rng.standard_normal((5, 4)), jnp.float32),
            "k": jnp.asarray(0.3 * rng.standard_normal((2, 2, 3)), jnp.float32),
            "v": jnp.asarray(0.3 * rng.standard_normal(6), jnp.float32),
            "s": jnp.asarray(0.1, jnp.float32),
            "n": jnp.asarray(7, jnp.int32)}
  return loss, params


def train(tx, loss, params, steps=30):
  """The drop-in loop (params hold the current sample); returns the final optimizer state."""
  def grad_fn(params):
    # Integer leaves get integer zeros (not float0, which optax.clip cannot take).
    grads = jax.grad(loss, allow_int=True)(params)
    return jax.tree.map(
        lambda g, p: jnp.zeros_like(p) if g.dtype == jax.dtypes.float0 else g, grads, params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(grad_fn(params), state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return state


def _f64(x):
  return np.asarray(x, np.float64)


def _sides(basis):
  """(Q_L, Q_R) of a matrix view from the per-axis tuple (a vector has only Q_L)."""
  basis = tuple(basis) + (None, None)
  return basis[0], basis[1]


def _matrix_shape(shape):
  """(rows, cols) of a leaf's matrix view: last dim as columns; vectors are columns."""
  if len(shape) >= 2:
    return math.prod(shape[:-1]), shape[-1]
  return (shape[0] if shape else 1), 1


class Leaf:
  """One leaf's posterior rebuilt in float64 from the raw state."""

  def __init__(self, state, name):
    self.shape = tuple(state.mean[name].shape)
    rows, cols = _matrix_shape(self.shape)
    basis = posterior.bases(state)[name]
    left, right = _sides(basis)
    self.q_left = np.eye(rows) if left is None else _f64(left)
    self.q_right = np.eye(cols) if right is None else _f64(right)
    self.mean_eigen = _f64(state.mean[name]).reshape(rows, cols)
    hessian = _f64(state.hessian[name]).reshape(rows, cols)
    self.variance = 1.0 / (float(state.ess) * (hessian + float(state.weight_decay)))

  @property
  def mean(self):
    """Parameter-space mean Q_L M° Q_Rᵀ, as a (rows, cols) matrix."""
    return self.q_left @ self.mean_eigen @ self.q_right.T

  @property
  def rotation(self):
    """The linear map vec_row(E) -> vec_row(Q_L E Q_Rᵀ), built column by column."""
    rows, cols = self.mean_eigen.shape
    columns = []
    for k in range(rows * cols):
      unit = np.zeros(rows * cols)
      unit[k] = 1.0
      columns.append((self.q_left @ unit.reshape(rows, cols) @ self.q_right.T).ravel())
    return np.stack(columns, axis=1)

  @property
  def covariance(self):
    t = self.rotation
    return t @ np.diag(self.variance.ravel()) @ t.T


def dense_posterior(state):
  """(mean vector, covariance) of all trainable leaves, concatenated in NAMES order."""
  leaves = [Leaf(state, name) for name in NAMES]
  mean = np.concatenate([leaf.mean.ravel() for leaf in leaves])
  size = mean.size
  cov = np.zeros((size, size))
  start = 0
  for leaf in leaves:
    block = leaf.covariance
    stop = start + block.shape[0]
    cov[start:stop, start:stop] = block
    start = stop
  return mean, cov


@pytest.fixture(scope="module")
def problem():
  return make_problem()


@pytest.fixture(scope="module")
def evon_state(problem):
  loss, params = problem
  state = train(evon_jax.evon(0.05, key=1, **EVON_HYPER), loss, params)
  # Guard: the test is only meaningful when the posterior is far from isotropic.
  for name in ("w", "k", "v"):
    basis = posterior.bases(state)[name]
    assert _sides(basis)[0] is not None
    assert not np.allclose(_f64(_sides(basis)[0]), np.eye(_sides(basis)[0].shape[0]), atol=0.1)
  h = _f64(state.hessian["w"])
  assert h.max() / h.min() > 1.5, h
  return state


@pytest.fixture(scope="module")
def ivon_state(problem):
  loss, params = problem
  return train(evon_jax.ivon(0.05, key=2, **IVON_HYPER), loss, params)


# ----------------------------------------------------------------------------------------------
# Mean, bases, variances


def test_mean_is_rotated_eigen_mean(evon_state, problem):
  mean = posterior.mean(evon_state)
  for name in NAMES:
    leaf = Leaf(evon_state, name)
    assert mean[name].shape == leaf.shape
    assert mean[name].dtype == jnp.float32
    np.testing.assert_allclose(_f64(mean[name]), leaf.mean.reshape(leaf.shape),
                               rtol=FLOAT32_RTOL, atol=1e-6, err_msg=name)
  # The integer leaf passes through untouched.
  assert mean["n"].dtype == jnp.int32
  assert int(mean["n"]) == int(problem[1]["n"])


def test_bases_are_orthonormal_and_returned(evon_state):
  bases = posterior.bases(evon_state)
  assert _sides(bases["w"])[0].shape == (5, 5) and _sides(bases["w"])[1].shape == (4, 4)
  assert _sides(bases["k"])[0].shape == (4, 4) and _sides(bases["k"])[1].shape == (3, 3)
  assert _sides(bases["v"])[0].shape == (6, 6) and _sides(bases["v"])[1] is None
  assert bases["s"] == ()
  for name in ("w", "k", "v"):
    for q in bases[name]:
      if q is None:
        continue
      q = _f64(q)
      np.testing.assert_allclose(q.T @ q, np.eye(q.shape[0]), atol=1e-5, err_msg=name)
      np.testing.assert_allclose(q @ q.T, np.eye(q.shape[0]), atol=1e-5, err_msg=name)


def test_variance_eigen(evon_state):
  variance = posterior.variance_eigen(evon_state)
  for name in NAMES:
    leaf = Leaf(evon_state, name)
    np.testing.assert_allclose(_f64(variance[name]), leaf.variance.reshape(leaf.shape),
                               rtol=FLOAT32_RTOL, err_msg=name)


# ----------------------------------------------------------------------------------------------
# Covariance and marginals


def test_covariance_matches_kronecker_formula(evon_state):
  covariance = posterior.covariance(evon_state)
  for name in NAMES:
    leaf = Leaf(evon_state, name)
    size = math.prod(leaf.shape)
    # Two independent constructions: explicit kron (row-major vec(Q_L E Q_Rᵀ) =
    # (Q_L ⊗ Q_R) vec(E)) and the column-by-column linear map; they must agree.
    kron = np.kron(leaf.q_left, leaf.q_right)
    expected = kron @ np.diag(leaf.variance.ravel()) @ kron.T
    np.testing.assert_allclose(expected, leaf.covariance, atol=1e-12)
    actual = _f64(covariance[name])
    assert actual.shape == (size, size)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(actual, expected, rtol=0, atol=FLOAT32_RTOL * scale,
                               err_msg=name)
    np.testing.assert_allclose(actual, actual.T, rtol=0, atol=FLOAT32_RTOL * scale)
    eigenvalues = np.linalg.eigvalsh(0.5 * (actual + actual.T))
    assert eigenvalues.min() > 0, (name, eigenvalues)
    # Its spectrum is V itself (Q_L ⊗ Q_R is orthogonal).
    np.testing.assert_allclose(np.sort(eigenvalues), np.sort(leaf.variance.ravel()),
                               rtol=1e-4, err_msg=name)
  # The matrix leaf is genuinely non-diagonal.
  off_diagonal = _f64(covariance["w"]) - np.diag(np.diag(_f64(covariance["w"])))
  assert np.abs(off_diagonal).max() > 0.05 * np.abs(np.diag(_f64(covariance["w"]))).max()


def test_covariance_of_integer_leaf_is_zero(evon_state):
  cov = posterior.covariance(evon_state)["n"]
  assert np.all(_f64(cov) == 0)


def test_marginal_stddev_is_covariance_diagonal(evon_state):
  stddev = posterior.marginal_stddev(evon_state)
  for name in NAMES:
    leaf = Leaf(evon_state, name)
    expected = np.sqrt(np.diag(leaf.covariance)).reshape(leaf.shape)
    assert stddev[name].shape == leaf.shape
    np.testing.assert_allclose(_f64(stddev[name]), expected, rtol=FLOAT32_RTOL, err_msg=name)
  assert np.all(_f64(stddev["n"]) == 0)
  # And with the library's own dense covariance (consistency of the two closed forms).
  covariance = posterior.covariance(evon_state)
  for name in NAMES:
    np.testing.assert_allclose(_f64(stddev[name]).ravel() ** 2,
                               np.diag(_f64(covariance[name])), rtol=1e-5)


def test_one_sided_basis_state():
  """A (5, 4) leaf with max_precond_dim=4 keeps Q_L = identity (None) and rotates columns;
  the state is filled by hand (random Q_R, H, M°), no training needed."""
  rng = np.random.default_rng(11)
  params = {"w": jnp.zeros((5, 4)), "b": jnp.zeros((3,))}
  state = evon_jax.evon(0.1, ess=7.0, hess_init=1.0, weight_decay=0.05,
                        max_precond_dim=4).init(params)
  bases = posterior.bases(state)
  assert _sides(bases["w"])[0] is None and _sides(bases["w"])[1].shape == (4, 4)
  q_right, _ = np.linalg.qr(rng.standard_normal((4, 4)))
  state = posterior.bubble(state)._replace(
      bases=(state.bases[0],
             {"w": jnp.asarray(q_right, jnp.float32), "b": state.bases[1]["b"]}),
      hessian={"w": jnp.asarray(rng.uniform(0.1, 3.0, (5, 4)), jnp.float32),
               "b": jnp.asarray(rng.uniform(0.1, 3.0, 3), jnp.float32)},
      mean={"w": jnp.asarray(rng.standard_normal((5, 4)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal(3), jnp.float32)})
  leaves = {name: Leaf(state, name) for name in ("w", "b")}
  np.testing.assert_allclose(_f64(posterior.mean(state)["w"]), leaves["w"].mean,
                             rtol=FLOAT32_RTOL, atol=1e-6)
  for name, leaf in leaves.items():
    np.testing.assert_allclose(_f64(posterior.covariance(state)[name]), leaf.covariance,
                               rtol=FLOAT32_RTOL, atol=1e-7)
    np.testing.assert_allclose(_f64(posterior.marginal_stddev(state)[name]).ravel(),
                               np.sqrt(np.diag(leaf.covariance)), rtol=FLOAT32_RTOL)
  cov = _block_diagonal([leaves["w"].covariance, leaves["b"].covariance])
  np.testing.assert_allclose(float(posterior.entropy(state)), _gaussian_entropy(cov),
                             rtol=FLOAT32_RTOL, atol=1e-4)


def test_covariance_max_size(evon_state):
  with pytest.raises(ValueError, match="max_size"):
    posterior.covariance(evon_state, max_size=19)  # w has 20 entries
  assert posterior.covariance(evon_state, max_size=20)["w"].shape == (20, 20)


# ----------------------------------------------------------------------------------------------
# Sampling


def _flatten_samples(samples):
  return np.concatenate(
      [_f64(samples[name]).reshape(samples[name].shape[0], -1) for name in NAMES], axis=1)


def test_sample_moments(evon_state):
  """Sample mean and covariance of 20000 draws against the closed forms.

  Tolerance: 5 Monte-Carlo standard errors per entry. With N draws the sample mean of
  coordinate i has SE sqrt(Σ_ii / N); for a Gaussian the sample covariance entry (i, j) has
  SE sqrt((Σ_ii Σ_jj + Σ_ij²) / N). A |z| > 5 deviation has probability 5.7e-7 per entry, so
  over the ~1900 entries checked (43 coordinates, 43² covariances) a correct implementation
  fails with probability ~1e-3 for a random seed (the seed here is fixed, so the test is
  deterministic); a wrong rotation, a transposed Kronecker order or a wrong variance scale
  moves entries by many SE. Float32 errors (~1e-7 relative) are far below one SE (~0.7% of σ).
  """
  n = 20000
  samples = posterior.sample(jax.random.key(0), evon_state, num_samples=n)
  for name in NAMES:
    assert samples[name].shape == (n,) + evon_state.mean[name].shape
  assert samples["n"].shape == (n,) and np.all(np.asarray(samples["n"]) == 7)

  mean, cov = dense_posterior(evon_state)
  flat = _flatten_samples(samples)
  sample_mean = flat.mean(axis=0)
  sd = np.sqrt(np.diag(cov))
  np.testing.assert_array_less(np.abs(sample_mean - mean), 5 * sd / np.sqrt(n))

  sample_cov = np.cov(flat, rowvar=False)
  se = np.sqrt((np.outer(sd ** 2, sd ** 2) + cov ** 2) / n)
  # Includes the cross-leaf blocks: leaves are independent, so those must be ~0.
  np.testing.assert_array_less(np.abs(sample_cov - cov), 5 * se)


def test_sample_without_num_samples_has_no_axis(evon_state):
  one = posterior.sample(jax.random.key(3), evon_state)
  for name in NAMES:
    assert one[name].shape == evon_state.mean[name].shape
  assert one["n"].shape == () and int(one["n"]) == 7


def test_sample_keys(evon_state):
  a = posterior.sample(jax.random.key(3), evon_state, num_samples=2)
  b = posterior.sample(jax.random.key(4), evon_state, num_samples=2)
  again = posterior.sample(jax.random.key(3), evon_state, num_samples=2)
  for name in NAMES:
    assert not np.allclose(_f64(a[name]), _f64(b[name])), name
    assert not np.allclose(_f64(a[name][0]), _f64(a[name][1])), name
    np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(again[name]))
  # Old-style uint32 keys work as well.
  legacy = posterior.sample(jax.random.PRNGKey(3), evon_state, num_samples=2)
  assert legacy["w"].shape == (2, 5, 4)


# ----------------------------------------------------------------------------------------------
# Entropy and KL


def _gaussian_entropy(cov):
  sign, logdet = np.linalg.slogdet(2 * np.pi * np.e * cov)
  assert sign > 0
  return 0.5 * logdet


def _gaussian_kl(mean, cov, prior_variance):
  """KL(N(mean, cov) ‖ N(0, prior_variance I)), dense."""
  k = mean.size
  sign, logdet = np.linalg.slogdet(cov)
  assert sign > 0
  return 0.5 * (np.trace(cov) / prior_variance + mean @ mean / prior_variance - k
                + k * np.log(prior_variance) - logdet)


def test_entropy_is_dense_gaussian_entropy(evon_state):
  _, cov = dense_posterior(evon_state)
  expected = _gaussian_entropy(cov)
  np.testing.assert_allclose(float(posterior.entropy(evon_state)), expected,
                             rtol=FLOAT32_RTOL, atol=1e-4)


def test_kl_to_prior_is_dense_gaussian_kl(evon_state):
  mean, cov = dense_posterior(evon_state)
  prior_variance = 1.0 / (float(evon_state.ess) * float(evon_state.weight_decay))
  expected = _gaussian_kl(mean, cov, prior_variance)
  assert expected > 1.0  # a non-trivial value
  np.testing.assert_allclose(float(posterior.kl_to_prior(evon_state)), expected,
                             rtol=FLOAT32_RTOL, atol=1e-4)


def test_posterior_functions_under_jit(evon_state):
  def everything(key, state):
    return (posterior.mean(state), posterior.marginal_stddev(state), posterior.entropy(state),
            posterior.kl_to_prior(state), posterior.sample(key, state, 3))

  eager = everything(jax.random.key(0), evon_state)
  jitted = jax.jit(everything)(jax.random.key(0), evon_state)
  for x, y in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_allclose(_f64(y), _f64(x), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# IVON: identity bases, a diagonal Gaussian


def test_ivon_posterior_is_diagonal(ivon_state):
  assert all(b == ()
             for b in jax.tree.leaves(posterior.bases(ivon_state),
                                      is_leaf=lambda x: isinstance(x, tuple)))
  ess, wd = float(ivon_state.ess), float(ivon_state.weight_decay)
  stddev = posterior.marginal_stddev(ivon_state)
  mean = posterior.mean(ivon_state)
  covariance = posterior.covariance(ivon_state)
  for name in NAMES:
    variance = 1.0 / (ess * (_f64(ivon_state.hessian[name]) + wd))
    assert variance.std() > 0 or name == "s"
    np.testing.assert_allclose(_f64(stddev[name]), np.sqrt(variance), rtol=FLOAT32_RTOL)
    np.testing.assert_allclose(_f64(mean[name]), _f64(ivon_state.mean[name]), rtol=0, atol=0)
    np.testing.assert_allclose(_f64(covariance[name]), np.diag(variance.ravel()),
                               rtol=FLOAT32_RTOL, atol=0)
  _, cov = dense_posterior(ivon_state)
  np.testing.assert_allclose(float(posterior.entropy(ivon_state)), _gaussian_entropy(cov),
                             rtol=FLOAT32_RTOL, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Wrappers


def _matrix_labels(params):
  return jax.tree.map(lambda p: "evon" if jnp.ndim(p) >= 2 else "other", params)


def _check_all_functions(state, inner, names):
  """Every posterior function of a wrapped `state` against NumPy built from `inner`."""
  mean = posterior.mean(state)
  stddev = posterior.marginal_stddev(state)
  covariance = posterior.covariance(state)
  leaves = [Leaf(inner, name) for name in names]
  for name, leaf in zip(names, leaves):
    np.testing.assert_allclose(_f64(mean[name]), leaf.mean.reshape(leaf.shape),
                               rtol=FLOAT32_RTOL, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(_f64(stddev[name]).ravel(), np.sqrt(np.diag(leaf.covariance)),
                               rtol=FLOAT32_RTOL, err_msg=name)
    np.testing.assert_allclose(_f64(covariance[name]), leaf.covariance, rtol=0,
                               atol=FLOAT32_RTOL * np.abs(leaf.covariance).max())
  cov = _block_diagonal([leaf.covariance for leaf in leaves])
  mean_vec = np.concatenate([leaf.mean.ravel() for leaf in leaves])
  prior_variance = 1.0 / (float(inner.ess) * float(inner.weight_decay))
  np.testing.assert_allclose(float(posterior.entropy(state)), _gaussian_entropy(cov),
                             rtol=FLOAT32_RTOL, atol=1e-4)
  np.testing.assert_allclose(float(posterior.kl_to_prior(state)),
                             _gaussian_kl(mean_vec, cov, prior_variance),
                             rtol=FLOAT32_RTOL, atol=1e-4)
  samples = posterior.sample(jax.random.key(0), state, num_samples=4)
  assert samples["w"].shape == (4, 5, 4)
  assert _sides(posterior.bases(state)["w"])[0].shape == (5, 5)


# Each wrapper, with the path to its inner state (to swap in the trained EVON state: this
# tests the search without compiling one training loop per wrapper).
def _inject_evon():
  return optax.inject_hyperparams(evon_jax.evon, static_args=evon_jax.STATIC_ARGS)(
      0.05, **EVON_HYPER)


def _partition(evon_tx):
  return optax.partition({"evon": evon_tx, "other": optax.adam(1e-2)}, _matrix_labels)


WRAPPERS = {
    "chain": (lambda: optax.chain(optax.clip(1.0), evon_jax.evon(0.05, **EVON_HYPER)),
              lambda s, inner: (s[0], inner)),
    "inject_hyperparams": (_inject_evon, lambda s, inner: s._replace(inner_state=inner)),
    "multi_steps": (
        lambda: optax.MultiSteps(evon_jax.evon(0.05, **EVON_HYPER), every_k_schedule=2),
        lambda s, inner: s._replace(inner_opt_state=inner)),
    "partition": (
        lambda: _partition(evon_jax.evon(0.05, **EVON_HYPER)),
        lambda s, inner: s._replace(inner_states={
            **s.inner_states, "evon": s.inner_states["evon"]._replace(inner_state=inner)})),
}


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_posterior_through_wrapper(wrapper, problem, evon_state):
  make, replace_inner = WRAPPERS[wrapper]
  state = make().init(problem[1])
  state = replace_inner(state, evon_state)
  _check_all_functions(state, evon_state, NAMES)


def test_posterior_after_training_through_all_wrappers(problem):
  """A real run through MultiSteps(chain(clip, partition(inject_hyperparams(evon), adam))):
  EVON on the matrices, Adam elsewhere, so the EVON state holds masked (empty) leaves."""
  loss, params = problem
  tx = optax.MultiSteps(optax.chain(optax.clip(1.0), _partition(_inject_evon())),
                        every_k_schedule=2)
  state = train(tx, loss, params, steps=8)
  inner = state.inner_opt_state[1].inner_states["evon"].inner_state.inner_state
  assert isinstance(inner, evon_jax.EvonState)
  assert int(inner.count) == 4  # the engine really stepped (once per 2 calls)
  _check_all_functions(state, inner, ("w", "k"))
  mean = posterior.mean(state)
  assert {k for k in mean if not isinstance(mean[k], optax.MaskedNode)} == {"w", "k"}


def _block_diagonal(blocks):
  size = sum(b.shape[0] for b in blocks)
  out = np.zeros((size, size))
  start = 0
  for b in blocks:
    out[start:start + b.shape[0], start:start + b.shape[0]] = b
    start += b.shape[0]
  return out


def test_state_without_evon_raises(problem):
  _, params = problem
  state = optax.adam(1e-3).init(params)
  for fn in (posterior.mean, posterior.marginal_stddev, posterior.covariance,
             posterior.entropy, posterior.kl_to_prior, posterior.bases,
             posterior.variance_eigen):
    with pytest.raises(ValueError, match="No EVON/IVON"):
      fn(state)
  with pytest.raises(ValueError, match="No EVON/IVON"):
    posterior.sample(jax.random.key(0), state)


def _masked_leaves(tree):
  """Leaves with MaskedNode kept as None (the positions a group does not own)."""
  masked = lambda x: isinstance(x, optax.MaskedNode)
  return [None if masked(x) else x for x in jax.tree.leaves(tree, is_leaf=masked)]


def test_two_posteriors_in_one_partition_read_out_as_one(problem):
  """EVON on the matrices (ess 30, δ 1e-2) and IVON on the vectors (ess 10, δ 1e-3): every
  read-out of the whole state equals, leaf by leaf, that of the group owning the leaf, and
  the scalar read-outs are the groups' sums (the groups are independent)."""
  loss, params = problem
  tx = optax.partition({"evon": evon_jax.evon(0.05, key=1, **EVON_HYPER),
                        "other": evon_jax.ivon(0.05, ess=10.0, weight_decay=1e-3, key=2)},
                       _matrix_labels)
  state = train(tx, loss, params)
  groups = [state.inner_states[name] for name in ("evon", "other")]
  for fn in (posterior.mean, posterior.marginal_stddev, posterior.variance_eigen,
             posterior.covariance, lambda s: posterior.sample(3, s, 2)):
    whole = _masked_leaves(fn(state))
    per_group = [_masked_leaves(fn(group)) for group in groups]
    for i, value in enumerate(whole):
      owners = [leaves[i] for leaves in per_group if leaves[i] is not None]
      assert len(owners) == 1
      if fn.__name__ == "<lambda>":  # samples: one key split over all leaves, so only shapes
        assert value.shape == owners[0].shape
      else:
        np.testing.assert_allclose(value, owners[0], rtol=1e-6, atol=1e-7)
  for fn in (posterior.entropy, posterior.kl_to_prior):
    np.testing.assert_allclose(fn(state), sum(fn(group) for group in groups), rtol=1e-5)
  # The two groups' widths really differ (ess 30 vs 10), so per-leaf ess is used.
  combined = posterior.bubble(state)
  assert sorted({float(e) for e in jax.tree.leaves(combined.ess)}) == [10.0, 30.0]
  # The samples have the right spread per group: the deviation from the mean, standardised
  # by each leaf's own marginal std, has unit mean square (2 x (all leaves) draws).
  deviations = posterior.sample_deviation(0, state, 400)
  stddev = posterior.marginal_stddev(state)
  z = np.concatenate([np.ravel(d / s[None]) for d, s in zip(jax.tree.leaves(deviations),
                                                            jax.tree.leaves(stddev))
                      if np.all(np.asarray(s) > 0)])  # frozen leaves have no spread
  # n = 400 x (entries) standard normals: mean square 1 +- 3 sqrt(2/n) < 0.05.
  assert abs(np.mean(z ** 2) - 1) < 0.05, np.mean(z ** 2)


def test_two_posteriors_over_the_same_leaves_raise(problem):
  _, params = problem
  tx = optax.chain(evon_jax.evon(0.05, **EVON_HYPER), evon_jax.ivon(0.05, ess=10.0))
  state = tx.init(params)
  with pytest.raises(ValueError, match="held by 2 posteriors"):
    posterior.mean(state)


# ----------------------------------------------------------------------------------------------
# Read-out tempering


def test_tempered_scales_the_covariance_and_keeps_the_prior(evon_state):
  """N(M, T Σ): the dense covariance times T, the same mean, and the KL to the *same* prior
  N(0, 1/(ess δ)) (dense NumPy formula with T Σ)."""
  mean, cov = dense_posterior(evon_state)
  prior_variance = 1.0 / (float(evon_state.ess) * float(evon_state.weight_decay))
  for temperature in (0.25, 3.0):
    warm = posterior.tempered(evon_state, temperature)
    warm_mean, warm_cov = dense_posterior(warm)
    np.testing.assert_allclose(warm_mean, mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(warm_cov, temperature * cov, rtol=1e-4,
                               atol=1e-6 * np.abs(cov).max())
    np.testing.assert_allclose(float(posterior.kl_to_prior(warm)),
                               _gaussian_kl(mean, temperature * cov, prior_variance),
                               rtol=FLOAT32_RTOL, atol=1e-3)


def test_tempered_per_leaf_and_zero(evon_state):
  """A callable gives each leaf its own T; T = 0 is a point mass (samples are the mean)."""
  std = posterior.marginal_stddev(evon_state)
  warm = posterior.tempered(evon_state, lambda path, leaf: 0.0 if "w" in jax.tree_util.keystr(
      path) else 4.0)
  warm_std = posterior.marginal_stddev(warm)
  np.testing.assert_array_equal(np.asarray(warm_std["w"]), 0.0)
  for name in ("k", "v"):
    np.testing.assert_allclose(warm_std[name], 2.0 * np.asarray(std[name]), rtol=1e-5)
  samples = posterior.sample(0, warm, 3)
  np.testing.assert_allclose(samples["w"], np.broadcast_to(posterior.mean(evon_state)["w"],
                                                           samples["w"].shape), atol=1e-6)
  # A params-shaped tree of temperatures is the same as the callable.
  tree = jax.tree_util.tree_map_with_path(
      lambda path, leaf: 0.0 if "w" in jax.tree_util.keystr(path) else 4.0,
      posterior.mean(evon_state))
  np.testing.assert_allclose(posterior.marginal_stddev(posterior.tempered(evon_state, tree))["k"],
                             warm_std["k"], rtol=1e-6)
  with pytest.raises(ValueError, match=">= 0"):
    posterior.tempered(evon_state, -1.0)
  with pytest.raises(ValueError, match="shaped like the parameters"):
    posterior.tempered(evon_state, {"nope": 1.0})


def test_tempered_under_partition(problem):
  """Under optax.partition the other optimizer's leaves stay masked; the posterior's widen."""
  loss, params = problem
  tx = optax.partition({"evon": evon_jax.evon(0.05, key=1, **EVON_HYPER),
                        "other": optax.adam(1e-3)}, _matrix_labels)
  state = train(tx, loss, params)
  std = posterior.marginal_stddev(state, params)
  warm_std = posterior.marginal_stddev(posterior.tempered(state, 9.0), params)
  for a, b in zip(jax.tree.leaves(std), jax.tree.leaves(warm_std)):
    np.testing.assert_allclose(b, 3.0 * np.asarray(a), rtol=1e-5, atol=1e-12)
  assert any(float(jnp.max(a)) > 0 for a in jax.tree.leaves(std))
