"""evon_jax.predictive: wiring of posterior samples / mean into softmax predictions."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import evon_jax
from evon_jax import posterior, predictive


def _apply(params, x):
  return x @ params["w"] + params["b"][None, :]


@functools.cache
def _trained_state():
  """EVON after a few drop-in steps on a 3-class softmax regression (non-trivial bases)."""
  key_x, key_w = jax.random.split(jax.random.key(0))
  x = jax.random.normal(key_x, (40, 4))
  y = jnp.argmax(x @ jax.random.normal(key_w, (4, 3)), axis=-1)
  params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
  tx = evon_jax.evon(0.1, ess=40.0, hess_init=1.0, weight_decay=1e-2)
  state = tx.init(params)

  def loss(p):
    return optax.softmax_cross_entropy_with_integer_labels(_apply(p, x), y).mean()

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(12):
    params, state = step(params, state)
  return state, x


def test_sample_predictive_uses_posterior_samples():
  state, x = _trained_state()
  key = jax.random.key(1)
  probs = predictive.sample_predictive(key, _apply, state, x, 5)
  weights = posterior.sample(key, state, 5)
  for s in range(5):
    w_s = jax.tree.map(lambda leaf, s=s: leaf[s], weights)
    np.testing.assert_allclose(probs[s], jax.nn.softmax(_apply(w_s, x)), rtol=1e-5, atol=1e-6)


def test_bayesian_model_average_is_mean_of_samples():
  state, x = _trained_state()
  key = jax.random.key(2)
  bma = predictive.bayesian_model_average(key, _apply, state, x, 16)
  assert bma.shape == (40, 3)
  np.testing.assert_allclose(bma.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(
      bma, predictive.sample_predictive(key, _apply, state, x, 16).mean(0), rtol=1e-6)
  jitted = jax.jit(predictive.bayesian_model_average, static_argnums=(1, 4))
  np.testing.assert_allclose(jitted(key, _apply, state, x, 16), bma, rtol=1e-5, atol=1e-6)


def test_mean_predictive_is_softmax_at_posterior_mean():
  state, x = _trained_state()
  np.testing.assert_allclose(predictive.mean_predictive(_apply, state, x),
                             jax.nn.softmax(_apply(posterior.mean(state), x)), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Linearised (GLM) predictive.


def test_linearized_equals_sampled_for_a_model_linear_in_its_params():
  # f(x; W) = x W + b is linear in (W, b), so f(M) + J_M (W - M) = f(W) for every sample:
  # with the same key the two predictives see the same weight samples and must agree to
  # float32 rounding (|logits| ~ 1: atol 1e-5).
  state, x = _trained_state()
  key = jax.random.key(3)
  weights = posterior.sample(key, state, 6)
  sampled_logits = jax.vmap(lambda w: _apply(w, x))(weights)
  lin_logits = predictive.linearized_logits(key, _apply, state, x, 6)
  assert lin_logits.shape == (6, 40, 3)
  np.testing.assert_allclose(lin_logits, sampled_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(predictive.linearized_sample_predictive(key, _apply, state, x, 6),
                             predictive.sample_predictive(key, _apply, state, x, 6),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(predictive.linearized_predictive(key, _apply, state, x, 6),
                             predictive.bayesian_model_average(key, _apply, state, x, 6),
                             rtol=1e-5, atol=1e-6)


def test_sample_deviation_is_sample_minus_mean():
  state, _ = _trained_state()
  key = jax.random.key(4)
  deviations = posterior.sample_deviation(key, state, 3)
  expected = jax.tree.map(lambda s, m: s - m[None], posterior.sample(key, state, 3),
                          posterior.mean(state))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               deviations, expected)
  one = posterior.sample_deviation(key, state)
  assert jax.tree.map(jnp.shape, one) == jax.tree.map(jnp.shape, posterior.mean(state))


def _mlp(params, x):
  hidden = jnp.tanh(x @ params["w1"] + params["b1"][None, :])
  return hidden @ params["w2"] + params["b2"][None, :]


@functools.cache
def _trained_mlp_state():
  """EVON on a 3-5-3 tanh MLP (3 classes) with a small ess: a wide posterior with
  non-trivial Kronecker bases on both weight matrices."""
  keys = jax.random.split(jax.random.key(5), 4)
  x = jax.random.normal(keys[0], (30, 3))
  y = jnp.argmax(x @ jax.random.normal(keys[1], (3, 3)), axis=-1)
  params = {"w1": 0.5 * jax.random.normal(keys[2], (3, 5)), "b1": jnp.zeros(5),
            "w2": 0.5 * jax.random.normal(keys[3], (5, 3)), "b2": jnp.zeros(3)}
  # b2 = 0.9 lets H move away from hess_init within 30 steps, so V varies (by ~25x) and the
  # bases matter for the covariance (see test_dense_reference_sees_the_kronecker_bases).
  tx = evon_jax.evon(0.05, ess=30.0, hess_init=0.3, b2=0.9, weight_decay=1e-2,
                     precondition_frequency=2)
  state = tx.init(params)

  def loss(p):
    return optax.softmax_cross_entropy_with_integer_labels(_mlp(p, x), y).mean()

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(30):
    params, state = step(params, state)
  return state, x


def _dense_output_moments(state, x):
  """Reference: f(x; M) and J Σ Jᵀ in float64 NumPy, J = jax.jacobian of the flattened logits
  (rows: output entries, columns: a leaf's row-major entries), Σ = posterior.covariance per
  leaf (leaves are independent under q, so Σ is block diagonal over leaves)."""
  mean = posterior.mean(state)
  mu = np.asarray(_mlp(mean, x), np.float64).reshape(-1)
  jac = jax.jacobian(lambda p: _mlp(p, x).reshape(-1))(mean)
  cov = posterior.covariance(state)
  out_cov = np.zeros((mu.size, mu.size))
  for name in mean:
    j = np.asarray(jac[name], np.float64).reshape(mu.size, -1)
    out_cov += j @ np.asarray(cov[name], np.float64) @ j.T
  return mu, out_cov, jac, cov


def test_linearized_logit_moments_match_dense_jacobian_covariance():
  # Under q = N(M, Σ) the linearised logits f(M) + J (W - M) are exactly Gaussian with mean
  # f(M) and covariance C = J Σ Jᵀ. With S iid samples the sample mean of entry i has standard
  # deviation sqrt(C_ii / S) and the sample covariance entry (i, j) has standard deviation
  # sqrt((C_ii C_jj + C_ij²) / S) (Gaussian fourth moments; estimating the mean adds O(1/S)).
  # We allow 5 standard deviations per entry: with 12 outputs (78 distinct covariance entries)
  # a false failure has probability < 1e-4 for a random seed, and the seed is fixed. float32
  # rounding (~1e-6 relative) is far below the Monte-Carlo tolerance (5/sqrt(S) ≈ 3.5%).
  state, x = _trained_mlp_state()
  x = x[:4]
  num_samples = 20000
  mu, c, _, _ = _dense_output_moments(state, x)
  logits = predictive.linearized_logits(jax.random.key(6), _mlp, state, x, num_samples)
  flat = np.asarray(logits, np.float64).reshape(num_samples, -1)
  sd = np.sqrt(np.diag(c))
  assert np.all(sd > 1e-2)  # a wide posterior: the check is not vacuous
  np.testing.assert_array_less(np.abs(flat.mean(0) - mu), 5 * sd / np.sqrt(num_samples))
  cov_tol = 5 * np.sqrt((np.outer(sd**2, sd**2) + c**2) / num_samples)
  np.testing.assert_array_less(np.abs(np.cov(flat, rowvar=False) - c), cov_tol)


def test_dense_reference_sees_the_kronecker_bases():
  # The moment test above can tell the SOAP-Bubble covariance from a diagonal one: replacing
  # each leaf's Σ by its diagonal (what IVON-style marginals would give) moves some entry of
  # J Σ Jᵀ by much more than that test's tolerance (measured: 14 tolerances).
  state, x = _trained_mlp_state()
  x = x[:4]
  mu, c, jac, cov = _dense_output_moments(state, x)
  c_diag = sum(np.asarray(jac[n], np.float64).reshape(mu.size, -1)
               @ np.diag(np.diag(np.asarray(cov[n], np.float64)))
               @ np.asarray(jac[n], np.float64).reshape(mu.size, -1).T for n in cov)
  sd = np.sqrt(np.diag(c))
  cov_tol = 5 * np.sqrt((np.outer(sd**2, sd**2) + c**2) / 20000)
  assert np.max(np.abs(c_diag - c) / cov_tol) > 5


def test_linearized_predictive_batching_and_jit():
  state, x = _trained_mlp_state()
  key = jax.random.key(7)
  full = predictive.linearized_sample_predictive(key, _mlp, state, x, 7)
  assert full.shape == (7, 30, 3)
  np.testing.assert_allclose(full.sum(-1), 1.0, rtol=1e-5)
  batched = predictive.linearized_sample_predictive(key, _mlp, state, x, 7, batch_size=3)
  np.testing.assert_allclose(batched, full, rtol=1e-5, atol=1e-6)
  # Samples are shared across inputs: predicting two halves with one key = predicting all.
  halves = [predictive.linearized_sample_predictive(key, _mlp, state, x[i:i + 15], 7)
            for i in (0, 15)]
  np.testing.assert_allclose(jnp.concatenate(halves, axis=1), full, rtol=1e-5, atol=1e-6)
  jitted = jax.jit(predictive.linearized_predictive, static_argnums=(1, 4))
  np.testing.assert_allclose(jitted(key, _mlp, state, x, 7), full.mean(0), rtol=1e-5,
                             atol=1e-6)
  # A different key draws different samples.
  other = predictive.linearized_sample_predictive(jax.random.key(8), _mlp, state, x, 7)
  assert not np.allclose(other, full)


def test_predictives_take_params_under_partition():
  """Under optax.partition the leaves AdamW owns come from `params`; an int seed is a key."""
  params = {"w": jnp.ones((4, 3)) * 0.1, "b": jnp.full(3, 0.5)}
  tx = optax.partition({"evon": evon_jax.evon(0.1, ess=40.0, hess_init=1.0),
                        "adam": optax.adam(1e-3)}, {"w": "evon", "b": "adam"})
  state = tx.init(params)
  x = jnp.ones((5, 4))
  for fn in (predictive.bayesian_model_average, predictive.linearized_predictive):
    probs = fn(0, _apply, state, x, 4, params=params)
    assert probs.shape == (5, 3) and bool(jnp.all(jnp.isfinite(probs)))
    # At the first state the posterior is centred at params: the mean network's softmax.
  mean_probs = predictive.mean_predictive(_apply, state, x, params=params)
  np.testing.assert_allclose(mean_probs, jax.nn.softmax(_apply(params, x), axis=-1), atol=1e-6)
  np.testing.assert_array_equal(posterior.sample(0, state, 2, params=params)["b"],
                                jnp.broadcast_to(params["b"], (2, 3)))


def test_key_comes_first_and_the_earlier_order_still_works_with_a_warning():
  """One convention (key first, as `posterior.sample`); int seeds are keys."""
  state, x = _trained_state()
  for fn in (predictive.sample_predictive, predictive.bayesian_model_average,
             predictive.linearized_logits, predictive.linearized_sample_predictive,
             predictive.linearized_predictive):
    new = fn(jax.random.key(4), _apply, state, x, 3)
    np.testing.assert_array_equal(fn(4, _apply, state, x, 3), new)
    with pytest.warns(DeprecationWarning, match="the key comes first"):
      old = fn(_apply, state, x, jax.random.key(4), 3)
    np.testing.assert_array_equal(old, new)
    with pytest.warns(DeprecationWarning):
      old_keyword = fn(_apply, state, x, key=jax.random.key(4), num_samples=3)
    np.testing.assert_array_equal(old_keyword, new)
  # A different key draws different samples (the key is really used).
  assert not np.allclose(predictive.sample_predictive(5, _apply, state, x, 3),
                         predictive.sample_predictive(4, _apply, state, x, 3))
