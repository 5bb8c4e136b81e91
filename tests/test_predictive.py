"""evon_jax.predictive: wiring of posterior samples / mean into softmax predictions."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

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
  probs = predictive.sample_predictive(_apply, state, x, key, 5)
  weights = posterior.sample(key, state, 5)
  for s in range(5):
    w_s = jax.tree.map(lambda leaf, s=s: leaf[s], weights)
    np.testing.assert_allclose(probs[s], jax.nn.softmax(_apply(w_s, x)), rtol=1e-5, atol=1e-6)


def test_bayesian_model_average_is_mean_of_samples():
  state, x = _trained_state()
  key = jax.random.key(2)
  bma = predictive.bayesian_model_average(_apply, state, x, key, 16)
  assert bma.shape == (40, 3)
  np.testing.assert_allclose(bma.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(
      bma, predictive.sample_predictive(_apply, state, x, key, 16).mean(0), rtol=1e-6)
  jitted = jax.jit(predictive.bayesian_model_average, static_argnums=(0, 4))
  np.testing.assert_allclose(jitted(_apply, state, x, key, 16), bma, rtol=1e-5, atol=1e-6)


def test_mean_predictive_is_softmax_at_posterior_mean():
  state, x = _trained_state()
  np.testing.assert_allclose(predictive.mean_predictive(_apply, state, x),
                             jax.nn.softmax(_apply(posterior.mean(state), x)), rtol=1e-6)
