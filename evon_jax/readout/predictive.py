"""Predictive distributions of a classifier under an EVON/IVON posterior.

``apply_fn(params, inputs) -> logits`` is any functional model (e.g. ``nnx.merge(graphdef,
params)(inputs)`` for Flax NNX, or ``model.apply`` for Linen), whose ``params`` have the tree
structure of the parameters the optimizer was initialised with. ``opt_state`` is the whole
optax state (the EVON/IVON state is found inside wrappers, see `evon_jax.posterior`).

Two ways to push the posterior ``q(W)`` through the network:

* **sampled** (`sample_predictive`, `bayesian_model_average`): ``softmax(f(x; W_s))`` for weight
  samples ``W_s ~ q``;
* **linearised** (`linearized_logits`, `linearized_sample_predictive`, `linearized_predictive`):
  the same samples pushed through the network's first-order Taylor expansion at the mean,
  ``f_lin(x; W) = f(x; M) + J_M(x) (W - M)`` (the generalised linear model of the
  linearised Laplace approximation), computed with Jacobian–vector products.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from evon_jax.readout import posterior

__all__ = [
    "sample_predictive", "probabilities_of_samples", "bayesian_model_average",
    "mean_predictive", "linearized_logits", "linearized_sample_predictive",
    "linearized_predictive",
]

ApplyFn = Callable[[Any, jax.Array], jax.Array]


def key_first(fn):
  """Lets ``fn(key, apply_fn, state, inputs, ...)`` also take the earlier order,
  ``fn(apply_fn, state, inputs, key, ...)``, with a DeprecationWarning.

  The first argument tells them apart: an apply function is callable, a key (a PRNG key
  array or an int seed) never is.
  """

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    if args and callable(args[0]):
      warnings.warn(
          f"{fn.__name__}(apply_fn, state, inputs, key, ...) is deprecated: the key comes "
          f"first, {fn.__name__}(key, apply_fn, state, inputs, ...), as in "
          "evon_jax.posterior.sample.", DeprecationWarning, stacklevel=2)
      head, rest = args[:3], args[3:]
      if rest:
        args = (rest[0],) + head + rest[1:]
      elif "key" in kwargs:
        args = (kwargs.pop("key"),) + head
    return fn(*args, **kwargs)

  return wrapper


@key_first
def sample_predictive(key, apply_fn: ApplyFn, opt_state, inputs: jax.Array,
                      num_samples: int, *, params=None) -> jax.Array:
  """Softmax probabilities under ``num_samples`` posterior weight samples.

  Draws the weights with `evon_jax.posterior.sample` and maps the model over them with
  `jax.vmap` (memory grows with ``num_samples``; call repeatedly on batches of inputs with the
  same key for consistent samples).

  `params`: under `optax.partition` / `masked`, the loop's params, whose values fill the
  leaves another optimizer owns (as in `evon_jax.posterior.sample`); every predictive here
  takes it. Every sampling predictive takes the key first (a PRNG key or an int seed), as
  `evon_jax.posterior.sample` does; the earlier order (the key after the inputs) still works,
  with a DeprecationWarning.

  Returns:
    ``(num_samples, *logits_shape)`` probabilities; ``mean(axis=0)`` is the Bayesian model
    average, and `evon_jax.metrics.mutual_information` takes this array directly.
  """
  return probabilities_of_samples(
      apply_fn, posterior.sample(key, opt_state, num_samples, params=params), inputs)


def probabilities_of_samples(apply_fn: ApplyFn, weights, inputs: jax.Array) -> jax.Array:
  """``softmax(f(x; W_s))`` for weight samples with a leading sample axis, ``(S, *logits)``.

  Shared by every sampling predictive (EVON/IVON/Laplace states here, `evon_jax.meanfield`,
  `evon_jax.viking`); memory grows with the number of samples.
  """
  return jax.vmap(lambda params: jax.nn.softmax(apply_fn(params, inputs), axis=-1))(weights)


@key_first
def bayesian_model_average(key, apply_fn: ApplyFn, opt_state, inputs: jax.Array,
                           num_samples: int, *, params=None) -> jax.Array:
  r"""Monte-Carlo Bayesian model average ``1/S Σ_s softmax(f(x; W_s))``, ``W_s ~ q``.

  Example:
    >>> import jax, jax.numpy as jnp, evon_jax
    >>> from evon_jax import predictive
    >>> params = {"w": jnp.zeros((3, 2))}
    >>> apply_fn = lambda p, x: x @ p["w"]
    >>> state = evon_jax.evon(0.1, ess=10.0, hess_init=1.0).init(params)
    >>> probs = predictive.bayesian_model_average(
    ...     jax.random.key(0), apply_fn, state, jnp.ones((4, 3)), num_samples=8)
    >>> probs.shape
    (4, 2)
  """
  return jnp.mean(sample_predictive(key, apply_fn, opt_state, inputs, num_samples,
                                    params=params), axis=0)


def mean_predictive(apply_fn: ApplyFn, opt_state, inputs: jax.Array, *,
                    params=None) -> jax.Array:
  """Softmax probabilities at the posterior mean (the point estimate ``softmax(f(x; M))``)."""
  return jax.nn.softmax(apply_fn(posterior.mean(opt_state, params), inputs), axis=-1)


@key_first
def linearized_logits(key, apply_fn: ApplyFn, opt_state, inputs: jax.Array,
                      num_samples: int, *, batch_size: Optional[int] = None,
                      params=None) -> jax.Array:
  r"""Logits of the network linearised at the posterior mean, under posterior samples.

  ``f_lin(x; W_s) = f(x; M) + J_M(x) (W_s - M)``, with ``J_M(x) = ∂f(x; W)/∂W`` at the mean
  ``M``. The deviations ``W_s - M`` are `evon_jax.posterior.sample_deviation` (the noise of
  `evon_jax.posterior.sample` with the same ``key``), so they are drawn once and shared by
  all inputs: call repeatedly on batches of inputs with the same ``key`` for one consistent
  set of ``num_samples`` linearised models. The network is linearised once (`jax.linearize`,
  i.e. a forward pass plus stored residuals) and each sample costs one Jacobian–vector product
  (about one forward pass, no ``J`` is ever formed); samples are vmapped, ``batch_size`` at a
  time when given (`jax.lax.map`) to bound memory.

  For a model that is linear in its parameters this equals `sample_predictive`'s logits.
  Under the Gaussian ``q = N(M, Σ)`` the linearised logits are exactly Gaussian,
  ``N(f(x; M), J_M Σ J_Mᵀ)``; this function returns Monte-Carlo samples of that Gaussian.

  Args:
    key: PRNG key (or int seed) of the weight samples (fix it for reproducible predictions).
    apply_fn: ``apply_fn(params, inputs) -> logits`` (any output pytree works for the logits;
      the probability functions below need an array with classes on the last axis).
    opt_state: the optimizer state holding the EVON/IVON posterior.
    inputs: a batch of inputs.
    num_samples: number of weight samples ``S`` (static under `jax.jit`).
    batch_size: if given, the JVPs run ``batch_size`` samples at a time (static).
    params: fills the leaves another optimizer owns under `optax.partition` / `masked`
      (their deviation is zero).

  Returns:
    ``(num_samples, *logits_shape)`` linearised logits.
  """
  mean = posterior.mean(opt_state, params)
  leaves, treedef = jax.tree.flatten(mean)
  # Integer/bool leaves (step counters, frozen indices) stay constants: `jax.linearize` has no
  # tangent space for them.
  floating = [jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) for leaf in leaves]

  def with_floating(values):
    values = iter(values)
    return treedef.unflatten([next(values) if f else leaf for leaf, f in zip(leaves, floating)])

  logits_at_mean, jvp = jax.linearize(
      lambda values: apply_fn(with_floating(values), inputs),
      [leaf for leaf, f in zip(leaves, floating) if f])
  deviations = [d for d, f in zip(
      treedef.flatten_up_to(posterior.sample_deviation(key, opt_state, num_samples,
                                                       params=params)), floating)
      if f]

  def one(deviation):
    return jax.tree.map(jnp.add, logits_at_mean, jvp(deviation))

  if batch_size is None:
    return jax.vmap(one)(deviations)
  return jax.lax.map(one, deviations, batch_size=batch_size)


@key_first
def linearized_sample_predictive(key, apply_fn: ApplyFn, opt_state, inputs: jax.Array,
                                 num_samples: int, *,
                                 batch_size: Optional[int] = None, params=None) -> jax.Array:
  """Per-sample softmax probabilities of the linearised network (see `linearized_logits`).

  Returns:
    ``(num_samples, *logits_shape)`` probabilities, the linearised counterpart of
    `sample_predictive` (``mean(axis=0)`` is `linearized_predictive`;
    `evon_jax.metrics.mutual_information` takes it directly).
  """
  logits = linearized_logits(key, apply_fn, opt_state, inputs, num_samples,
                             batch_size=batch_size, params=params)
  return jax.nn.softmax(logits, axis=-1)


@key_first
def linearized_predictive(key, apply_fn: ApplyFn, opt_state, inputs: jax.Array,
                          num_samples: int, *, batch_size: Optional[int] = None,
                          params=None) -> jax.Array:
  r"""Linearised (GLM) predictive ``1/S Σ_s softmax(f(x; M) + J_M(x)(W_s - M))``, ``W_s ~ q``.

  The posterior is pushed through the network's first-order expansion at the mean instead of
  the network itself: the linearised-Laplace / GLM predictive (Immer et al., 2021). Why it
  helps: a Gaussian posterior fitted in weight space puts mass along directions that change
  the weights but, to first order, not the function (reparameterisations such as rescaling
  adjacent layers, dead units, directions the data does not constrain). Through the full
  network those directions still move the logits nonlinearly, so raw samples can underfit —
  the BMA is then less accurate than the mean. Through ``J_M`` such directions are projected
  out: a deviation ``Δ`` with ``J_M Δ = 0`` leaves the linearised logits unchanged, and only
  the output-space covariance ``J_M Σ J_Mᵀ`` remains. The predictive is centred on the mean
  network's logits, so its accuracy is close to the mean's, while its spread reflects the
  posterior's uncertainty about the function.

  Example:
    >>> import jax, jax.numpy as jnp, evon_jax
    >>> from evon_jax import predictive
    >>> params = {"w": jnp.zeros((3, 2))}
    >>> apply_fn = lambda p, x: jnp.tanh(x @ p["w"])
    >>> state = evon_jax.evon(0.1, ess=10.0, hess_init=1.0).init(params)
    >>> probs = predictive.linearized_predictive(
    ...     jax.random.key(0), apply_fn, state, jnp.ones((4, 3)), num_samples=8)
    >>> probs.shape
    (4, 2)

  Returns:
    ``logits_shape`` probabilities averaged over ``num_samples`` linearised samples.

  References:
    Immer, Korzepa, Bauer: Improving predictions of Bayesian neural nets via local
    linearization, AISTATS 2021. Foong et al.: 'In-between' uncertainty in Bayesian neural
    networks, 2019.
  """
  return jnp.mean(linearized_sample_predictive(key, apply_fn, opt_state, inputs, num_samples,
                                               batch_size=batch_size, params=params), axis=0)
