"""Mean-field Gaussian variational inference (Bayes by Backprop) on any params pytree.

The baseline every structured posterior is compared with: each parameter θ_i gets an
independent ``q(θ_i) = N(μ_i, σ_i²)``, ``σ_i = softplus(ρ_i)``, and ``(μ, ρ)`` — a `MeanField`
pytree — are trained by any optax optimizer on the negative ELBO per datum

    L(μ, ρ) = E_q[ 1/|B| Σ_{(x,y)∈B} -log p(y | x, θ) ] + β KL(q ‖ p) / N,

estimated with reparameterised samples θ = μ + σ ⊙ ε, ε ~ N(0, I), so gradients reach μ and ρ.
The prior p is a `GaussianPrior` (closed-form KL) or Blundell et al.'s `ScaleMixturePrior`
(Monte-Carlo KL on the same samples).

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> from evon_jax import meanfield
  >>> x, y = jnp.ones((8, 3)), jnp.zeros(8)
  >>> nll = lambda p, batch: jnp.mean(0.5 * (batch[0] @ p["w"] - batch[1]) ** 2)
  >>> q = meanfield.init({"w": jnp.zeros(3)}, init_std=0.1)
  >>> tx = optax.adam(1e-2)
  >>> opt_state = tx.init(q)
  >>> loss, grads = jax.value_and_grad(meanfield.elbo_loss, argnums=2)(
  ...     jax.random.key(0), nll, q, (x, y), num_data=8, prior=meanfield.GaussianPrior(1.0))
  >>> updates, opt_state = tx.update(grads, opt_state, q)
  >>> q = optax.apply_updates(q, updates)

References:
  Blundell et al., Weight Uncertainty in Neural Networks, ICML 2015.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from evon_jax import _validation as check
from evon_jax.readout import predictive

__all__ = [
    "MeanField", "GaussianPrior", "ScaleMixturePrior", "init", "stddev", "sample",
    "log_density", "log_prior", "kl_divergence", "elbo_loss", "sample_predictive",
]

_LOG_2PI = math.log(2.0 * math.pi)


class MeanField(NamedTuple):
  """A fully factorised Gaussian q(θ) = Π_i N(μ_i, softplus(ρ_i)²).

  Attributes:
    mean: μ, a pytree with the structure of the params.
    rho: ρ, same structure; the standard deviations are softplus(ρ) > 0 for any real ρ,
      so an unconstrained optimizer can train them.
  """
  mean: Any
  rho: Any


class GaussianPrior(NamedTuple):
  """Isotropic prior N(0, stddev²) on every parameter."""
  stddev: float = 1.0


class ScaleMixturePrior(NamedTuple):
  """Blundell et al.'s prior π N(0, σ_wide²) + (1 - π) N(0, σ_narrow²) on every parameter.

  Attributes:
    mix: π in [0, 1], the weight of the wide component.
    stddev_wide: σ_wide (heavy tail: lets some weights be large).
    stddev_narrow: σ_narrow (a spike at zero: pulls the rest towards zero).
  """
  mix: float = 0.5
  stddev_wide: float = 1.0
  stddev_narrow: float = math.exp(-6.0)


Prior = Union[GaussianPrior, ScaleMixturePrior]


def _inverse_softplus(y: float) -> float:
  # softplus⁻¹(y) = log(eʸ - 1) = y + log(1 - e⁻ʸ): no overflow of eʸ for large y, and
  # expm1 keeps 1 - e⁻ʸ accurate for tiny y (where log(eʸ - 1) ≈ log y).
  return y + math.log(-math.expm1(-y))


def init(params: Any, init_std: float = 1e-3) -> MeanField:
  """q centred at `params` with every standard deviation equal to `init_std`.

  Args:
    params: a pytree of floating arrays (the initial mean; copied into arrays).
    init_std: initial σ > 0 (small: training starts close to the deterministic network).

  Returns:
    A `MeanField` whose ``rho`` leaves are ``softplus⁻¹(init_std)`` in each leaf's dtype.
  """
  check.check_positive("init_std", init_std)
  rho = _inverse_softplus(float(init_std))
  mean = jax.tree.map(jnp.asarray, params)
  for leaf in jax.tree.leaves(mean):
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise ValueError(f"meanfield.init needs floating params, got a leaf of dtype {leaf.dtype}.")
  return MeanField(mean, jax.tree.map(lambda m: jnp.full(m.shape, rho, m.dtype), mean))


def stddev(q: MeanField) -> Any:
  """σ = softplus(ρ), params-shaped."""
  return jax.tree.map(jax.nn.softplus, q.rho)


def _leaf_keys(key: jax.Array, tree: Any) -> Any:
  """One independent key per leaf (a fixed split of `key`: samples are reproducible)."""
  treedef = jax.tree.structure(tree)
  return treedef.unflatten(list(jax.random.split(key, treedef.num_leaves)))


def sample(key: jax.Array, q: MeanField, num_samples: Optional[int] = None) -> Any:
  """Reparameterised samples θ = μ + σ ⊙ ε, ε ~ N(0, I); differentiable w.r.t. q.

  Args:
    key: PRNG key (split once per leaf).
    q: the variational distribution.
    num_samples: None for one params-shaped sample, or S for a leading axis of S samples.

  Returns:
    A pytree like ``q.mean``, with a leading axis of `num_samples` when it is given.
  """
  if num_samples is not None:
    check.check_static_int("num_samples", num_samples, 1)
  lead = () if num_samples is None else (num_samples,)

  def draw(leaf_key, m, s):
    eps = jax.random.normal(leaf_key, lead + m.shape, m.dtype)
    return jnp.expand_dims(m, range(len(lead))) + jnp.expand_dims(s, range(len(lead))) * eps

  return jax.tree.map(draw, _leaf_keys(key, q.mean), q.mean, stddev(q))


def _gaussian_log_pdf(x, mean, std):
  return -0.5 * jnp.square((x - mean) / std) - jnp.log(std) - 0.5 * _LOG_2PI


def log_density(q: MeanField, params: Any) -> jax.Array:
  """log q(θ) at one params-shaped θ, summed over all entries of all leaves (a scalar).

  Use ``jax.vmap(lambda p: log_density(q, p))`` for a leading sample axis.
  """
  terms = jax.tree.map(lambda x, m, s: jnp.sum(_gaussian_log_pdf(x, m, s)),
                       params, q.mean, stddev(q))
  return sum(jax.tree.leaves(terms), jnp.zeros((), jnp.float32))


def _log_prior_entries(prior: Prior, x: jax.Array) -> jax.Array:
  if isinstance(prior, GaussianPrior):
    return _gaussian_log_pdf(x, 0.0, prior.stddev)
  if isinstance(prior, ScaleMixturePrior):
    # log(π N_wide + (1-π) N_narrow) with logaddexp: far from zero the narrow density
    # underflows (x = 1 is e^{-81000} under σ = e⁻⁶), which a direct sum would turn into
    # log of a wide density times π at best and log 0 at worst.
    return jnp.logaddexp(jnp.log(prior.mix) + _gaussian_log_pdf(x, 0.0, prior.stddev_wide),
                         jnp.log1p(-prior.mix)
                         + _gaussian_log_pdf(x, 0.0, prior.stddev_narrow))
  raise ValueError("prior must be a GaussianPrior or a ScaleMixturePrior, "
                   f"got {type(prior).__name__}.")


def _check_prior(prior: Prior) -> None:
  if isinstance(prior, GaussianPrior):
    check.check_positive("GaussianPrior.stddev", prior.stddev)
  elif isinstance(prior, ScaleMixturePrior):
    check.check_positive("ScaleMixturePrior.stddev_wide", prior.stddev_wide)
    check.check_positive("ScaleMixturePrior.stddev_narrow", prior.stddev_narrow)
    mix = check._concrete(prior.mix)
    if mix is not None and not 0.0 <= mix <= 1.0:
      raise ValueError(f"ScaleMixturePrior.mix must lie in [0, 1], got {prior.mix!r}.")
  else:
    raise ValueError("prior must be a GaussianPrior or a ScaleMixturePrior, "
                     f"got {type(prior).__name__}.")


def log_prior(prior: Prior, params: Any) -> jax.Array:
  """log p(θ) at one params-shaped θ, summed over all entries (a scalar)."""
  _check_prior(prior)
  terms = jax.tree.map(lambda x: jnp.sum(_log_prior_entries(prior, x)), params)
  return sum(jax.tree.leaves(terms), jnp.zeros((), jnp.float32))


def _kl_gaussian(q: MeanField, prior: GaussianPrior) -> jax.Array:
  # KL(N(μ, σ²) ‖ N(0, s²)) = log(s/σ) + (σ² + μ²) / (2 s²) - 1/2 per entry.
  def leaf(m, s):
    return jnp.sum(jnp.log(prior.stddev / s) + (jnp.square(s) + jnp.square(m))
                   / (2.0 * prior.stddev ** 2) - 0.5)

  terms = jax.tree.map(leaf, q.mean, stddev(q))
  return sum(jax.tree.leaves(terms), jnp.zeros((), jnp.float32))


def _kl_monte_carlo(q: MeanField, prior: Prior, samples: Any) -> jax.Array:
  """1/S Σ_s [log q(θ_s) - log p(θ_s)] over samples with a leading axis S."""
  per_sample = jax.vmap(lambda p: log_density(q, p) - log_prior(prior, p))(samples)
  return jnp.mean(per_sample)


def kl_divergence(q: MeanField, prior: Prior, key: Optional[jax.Array] = None,
                  num_samples: int = 1) -> jax.Array:
  """KL(q ‖ p) summed over all parameters.

  Closed form for a `GaussianPrior` (`key` unused); for a `ScaleMixturePrior`, which has no
  closed form, the unbiased reparameterised estimate ``1/S Σ_s log q(θ_s) - log p(θ_s)``,
  θ_s ~ q (differentiable w.r.t. q).

  Args:
    q: the variational distribution.
    prior: a `GaussianPrior` or a `ScaleMixturePrior`.
    key: PRNG key, required for the Monte-Carlo estimate.
    num_samples: S, Monte-Carlo samples (static int >= 1).

  Returns:
    A scalar.
  """
  _check_prior(prior)
  check.check_static_int("num_samples", num_samples, 1)
  if isinstance(prior, GaussianPrior):
    return _kl_gaussian(q, prior)
  if key is None:
    raise ValueError("kl_divergence with a ScaleMixturePrior is a Monte-Carlo estimate: "
                     "pass a PRNG `key`.")
  return _kl_monte_carlo(q, prior, sample(key, q, num_samples))


def elbo_loss(key: jax.Array, nll_fn: Callable[[Any, Any], jax.Array], q: MeanField,
              batch: Any, *, num_data: int, prior: Prior, beta: float = 1.0,
              num_samples: int = 1) -> jax.Array:
  r"""Negative ELBO per datum, a reparameterised Monte-Carlo estimate (Bayes by Backprop).

  ``1/S Σ_s nll_fn(θ_s, batch) + β KL(q ‖ p) / num_data`` with θ_s = μ + σ ⊙ ε_s. For a
  `ScaleMixturePrior` the KL is estimated on the same θ_s (as Blundell et al. do); for a
  `GaussianPrior` it is exact. With ``nll_fn`` the mean negative log-likelihood over a
  batch drawn uniformly from ``num_data`` examples, this is an unbiased estimate of
  ``-ELBO / num_data``; its gradient w.r.t. ``q`` (a `MeanField` pytree) feeds any optax
  optimizer.

  Args:
    key: PRNG key for the samples.
    nll_fn: ``(params, batch) -> scalar``, the MEAN negative log-likelihood over the batch.
    q: the variational distribution.
    batch: anything `nll_fn` takes.
    num_data: N, the size of the training set (weighs the KL once per epoch).
    prior: a `GaussianPrior` or a `ScaleMixturePrior`.
    beta: KL weight β (1 is the ELBO; < 1 is the common "cold" tempering).
    num_samples: S, Monte-Carlo samples per call (static int >= 1).

  Returns:
    A scalar loss.
  """
  _check_prior(prior)
  check.check_positive("num_data", num_data)
  check.check_non_negative("beta", beta)
  check.check_static_int("num_samples", num_samples, 1)
  samples = sample(key, q, num_samples)
  nll = jnp.mean(jax.vmap(lambda params: nll_fn(params, batch))(samples))
  if isinstance(prior, GaussianPrior):
    kl = _kl_gaussian(q, prior)
  else:
    kl = _kl_monte_carlo(q, prior, samples)
  return nll + beta * kl / num_data


@predictive.key_first
def sample_predictive(key, apply_fn: Callable[[Any, jax.Array], jax.Array], q: MeanField,
                      inputs: jax.Array, num_samples: int) -> jax.Array:
  """Softmax probabilities under `num_samples` draws θ_s ~ q, shape (S, *logits_shape).

  ``mean(axis=0)`` is the Bayesian model average; the argument order (key first) follows
  `evon_jax.predictive.sample_predictive`, and `evon_jax.metrics` takes the result.
  """
  weights = sample(key, q, num_samples)
  return predictive.probabilities_of_samples(apply_fn, weights, inputs)
