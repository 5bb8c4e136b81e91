"""Predictive distributions of a classifier under an EVON/IVON posterior.

``apply_fn(params, inputs) -> logits`` is any functional model (e.g. ``nnx.merge(graphdef,
params)(inputs)`` for Flax NNX, or ``model.apply`` for Linen), whose ``params`` have the tree
structure of the parameters the optimizer was initialised with. ``opt_state`` is the whole
optax state (the EVON/IVON state is found inside wrappers, see `evon_jax.posterior`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from evon_jax import posterior

__all__ = ["sample_predictive", "bayesian_model_average", "mean_predictive"]

ApplyFn = Callable[[Any, jax.Array], jax.Array]


def sample_predictive(apply_fn: ApplyFn, opt_state, inputs: jax.Array, key: jax.Array,
                      num_samples: int) -> jax.Array:
  """Softmax probabilities under ``num_samples`` posterior weight samples.

  Draws the weights with `evon_jax.posterior.sample` and maps the model over them with
  `jax.vmap` (memory grows with ``num_samples``; call repeatedly on batches of inputs with the
  same key for consistent samples).

  Returns:
    ``(num_samples, *logits_shape)`` probabilities; ``mean(axis=0)`` is the Bayesian model
    average, and `evon_jax.metrics.mutual_information` takes this array directly.
  """
  weights = posterior.sample(key, opt_state, num_samples)
  return jax.vmap(lambda params: jax.nn.softmax(apply_fn(params, inputs), axis=-1))(weights)


def bayesian_model_average(apply_fn: ApplyFn, opt_state, inputs: jax.Array, key: jax.Array,
                           num_samples: int) -> jax.Array:
  r"""Monte-Carlo Bayesian model average ``1/S Σ_s softmax(f(x; W_s))``, ``W_s ~ q``.

  Example:
    >>> import jax, jax.numpy as jnp, evon_jax
    >>> from evon_jax import predictive
    >>> params = {"w": jnp.zeros((3, 2))}
    >>> apply_fn = lambda p, x: x @ p["w"]
    >>> state = evon_jax.evon(0.1, ess=10.0, hess_init=1.0).init(params)
    >>> probs = predictive.bayesian_model_average(
    ...     apply_fn, state, jnp.ones((4, 3)), jax.random.key(0), num_samples=8)
    >>> probs.shape
    (4, 2)
  """
  return jnp.mean(sample_predictive(apply_fn, opt_state, inputs, key, num_samples), axis=0)


def mean_predictive(apply_fn: ApplyFn, opt_state, inputs: jax.Array) -> jax.Array:
  """Softmax probabilities at the posterior mean (the point estimate ``softmax(f(x; M))``)."""
  return jax.nn.softmax(apply_fn(posterior.mean(opt_state), inputs), axis=-1)
