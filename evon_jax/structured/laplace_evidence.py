"""The Laplace evidence of a `SoapBubble` and the choice of its prior precision λ.

`log_likelihood` and `log_marginal_likelihood` give the Laplace evidence
log p(D | θ̂) + log p(θ̂) + ½ log det(2π Σ); `tune_prior_precision` picks λ by it or by a
validation NLL; `with_prior_precision` sets λ. Re-exported by `evon_jax.laplace`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from evon_jax import _validation as check
from evon_jax._progress import progress
from evon_jax.readout import metrics, posterior, predictive
from evon_jax.readout.bubble import SoapBubble
from evon_jax.readout.posterior import stored_layouts
from evon_jax.structured._laplace_common import (
    DEFAULT_GRID, ApplyFn, Likelihood, PredictiveKind, TuningMethod, _LIKELIHOODS,
    _check_outputs, _chunks, _split_data, _take)

class PriorPrecisionSearch(NamedTuple):
  """What `tune_prior_precision` evaluated.

  Attributes:
    prior_precision: the chosen λ (after refinement for 'marglik').
    grid: the λ values evaluated, (G,).
    objective: the objective at each grid value, (G,): the log evidence ('marglik', larger is
      better) or the mean validation NLL per example ('nll', smaller is better).
    best_on_grid: the best grid value (before refinement).
  """

  prior_precision: jax.Array
  grid: jax.Array
  objective: jax.Array
  best_on_grid: jax.Array


# ----------------------------------------------------------------------------- evidence


def _gaussian_log_density(targets, outputs, sigma_noise):
  residual = (targets - outputs) / sigma_noise
  return -0.5 * residual ** 2 - math.log(sigma_noise) - 0.5 * math.log(2 * math.pi)


def log_likelihood(
    apply_fn: ApplyFn,
    params: Any,
    data: tuple[Any, Any],
    *,
    likelihood: Likelihood,
    sigma_noise: float = 1.0,
    batch_size: int = 1024,
) -> jax.Array:
  r"""``log p(D | θ)`` summed over the examples of ``data`` (the first term of the evidence).

  Classification: ``Σ_n log softmax(f(x_n; θ))_{y_n}``; regression:
  ``Σ_n Σ_d log N(y_nd; f_d(x_n; θ), σ²)``.

  Args:
    apply_fn, params, data, likelihood, sigma_noise: as in `fit`.
    batch_size: examples per chunk (static).

  Returns:
    A scalar (float32, or wider for wider outputs).
  """
  check.check_choice("likelihood", likelihood, _LIKELIHOODS)
  check.check_positive("sigma_noise", sigma_noise)
  check.check_static_int("batch_size", batch_size, 1)
  inputs, targets, n = _split_data(data)
  _check_outputs(apply_fn, params, inputs, targets, likelihood, batch_size)

  @jax.jit
  def chunk_sum(params, x, y, mask):
    outputs = apply_fn(params, x)
    if likelihood == "classification":
      per_example = jnp.take_along_axis(
          jax.nn.log_softmax(outputs, axis=-1), y[:, None], axis=-1)[:, 0]
    else:
      density = _gaussian_log_density(jnp.reshape(y, outputs.shape), outputs, sigma_noise)
      per_example = jnp.reshape(density, (outputs.shape[0], -1)).sum(axis=1)
    return jnp.sum(per_example * mask.astype(per_example.dtype))

  return sum(chunk_sum(params, _take(inputs, index), _take(targets, index), mask)
             for index, mask in _chunks(n, batch_size))


def _evidence_terms(state: SoapBubble):
  """(‖θ̂‖², P, the per-entry N·Ĥ arrays) over the trainable leaves of a Laplace state."""
  squared_norm, count, curvatures = 0.0, 0, []
  treedef = jax.tree.structure(state.mean)
  for layout, mean, hessian in zip(stored_layouts(state), treedef.flatten_up_to(state.mean),
                                   treedef.flatten_up_to(state.hessian)):
    if not layout.trainable:
      continue
    squared_norm = squared_norm + jnp.sum(jnp.square(mean))  # the norm is basis independent
    count += mean.size
    curvatures.append(jnp.ravel(state.ess * hessian))
  return squared_norm, count, jnp.concatenate(curvatures)


def _log_evidence(state: SoapBubble, log_lik, log_prior_precision):
  """The Laplace log evidence as a function of log λ (concave in log λ)."""
  squared_norm, count, curvature = _evidence_terms(state)
  prior_precision = jnp.exp(log_prior_precision)
  return (log_lik - 0.5 * prior_precision * squared_norm
          + 0.5 * count * log_prior_precision
          - 0.5 * jnp.sum(jnp.log(curvature + prior_precision)))


_log_evidence_compiled = jax.jit(_log_evidence)
_log_evidence_on_grid = jax.jit(jax.vmap(_log_evidence, in_axes=(None, None, 0)))


def log_marginal_likelihood(state, log_likelihood: Any, *,
                            prior_precision: Optional[Any] = None) -> jax.Array:
  r"""Laplace approximation of the log evidence ``log p(D)``.

  ``log p(D | θ̂) − ½ λ ‖θ̂‖² + (P/2) log λ − ½ Σ log(N Ĥ + λ)``: the log joint at θ̂ plus the
  Gaussian's normaliser (the ``2π`` terms cancel), with ``P`` the number of trainable entries
  and ``N Ĥ + λ`` the posterior precision's eigenvalues in the Kronecker eigenbasis. Exact for
  a linear-Gaussian model at its MAP. Differentiable in ``prior_precision``.

  Args:
    state: a Laplace state from `fit` (or any EVON state: then ``ess·H`` plays ``N Ĥ``).
    log_likelihood: ``log p(D | θ̂)`` summed over the N training examples, e.g. from
      `log_likelihood` (scaled by N / n when `fit` used a subset).
    prior_precision: λ to evaluate (default: the state's, ``ess · weight_decay``).

  Returns:
    The scalar log evidence.
  """
  state = posterior.bubble(state)
  if any(jnp.ndim(x) for x in jax.tree.leaves(state.weight_decay)):
    raise ValueError("log_marginal_likelihood assumes the isotropic prior N(0, 1/λ); this "
                     "posterior's δ is per coordinate (a structured prior, or a combined "
                     "bubble of several groups).")
  if prior_precision is None:
    prior_precision = state.ess * state.weight_decay
  else:
    check.check_positive("prior_precision", prior_precision)
  return _log_evidence_compiled(
      state, jnp.asarray(log_likelihood, state.ess.dtype),
      jnp.log(jnp.asarray(prior_precision, state.ess.dtype)))


def with_prior_precision(state: SoapBubble, prior_precision: Any) -> SoapBubble:
  """The same Laplace posterior under another prior precision λ (``weight_decay = λ / N``).

  Cheap (no pass over the data): the GGN does not depend on λ. Traceable in λ.
  """
  if not isinstance(state, SoapBubble):
    raise ValueError(f"with_prior_precision needs a SoapBubble (as `fit` returns), got "
                     f"{type(state).__name__}.")
  check.check_positive("prior_precision", prior_precision)
  return state._replace(
      weight_decay=jnp.asarray(prior_precision, state.weight_decay.dtype) / state.ess)


# ----------------------------------------------------------------------------- tuning λ


def tune_prior_precision(
    state: SoapBubble,
    *,
    method: TuningMethod,
    log_likelihood: Optional[Any] = None,
    apply_fn: Optional[ApplyFn] = None,
    validation: Optional[tuple[Any, Any]] = None,
    likelihood: Likelihood = "classification",
    sigma_noise: float = 1.0,
    grid: Any = None,
    refine: bool = True,
    key: Optional[jax.Array] = None,
    num_samples: int = 32,
    predictive_kind: PredictiveKind = "linearized",
) -> tuple[SoapBubble, PriorPrecisionSearch]:
  r"""Chooses the prior precision λ of a Laplace state.

  * ``method='marglik'``: maximises `log_marginal_likelihood` (θ̂ fixed, the post-hoc
    choice) over ``grid``, then, when ``refine``, polishes log λ by safeguarded Newton steps
    on ``jax.grad`` of the closed form, between the best grid point's neighbours (the
    evidence is concave in log λ, so the maximum is unique). Needs ``log_likelihood``.
  * ``method='nll'``: minimises the mean negative log predictive density of ``validation``
    over ``grid`` (no refinement: a Monte-Carlo objective). The predictive is
    `evon_jax.predictive.linearized_predictive` (``predictive_kind='linearized'``) or
    `evon_jax.predictive.bayesian_model_average` ('sampled'), with the same ``key`` for
    every λ; for regression the Monte-Carlo mixture of ``N(f_s, σ²)``. Needs ``apply_fn``,
    ``validation`` and ``key``.

  Args:
    state: a Laplace state from `fit`.
    method: 'marglik' or 'nll'.
    log_likelihood: ``log p(D | θ̂)`` over the training set ('marglik'; see `log_likelihood`).
    apply_fn: the model ('nll').
    validation: ``(inputs, targets)`` held-out data ('nll'; evaluated in one batch).
    likelihood: 'classification' or 'regression' ('nll').
    sigma_noise: regression noise std σ ('nll').
    grid: candidate λ values (default ``np.logspace(-4, 4, 41)``).
    refine: refine the 'marglik' optimum between grid points.
    key: PRNG key of the predictive's weight samples ('nll').
    num_samples: weight samples per predictive ('nll', static).
    predictive_kind: 'linearized' or 'sampled' ('nll').

  Returns:
    ``(state with the chosen λ, PriorPrecisionSearch)``.
  """
  check.check_choice("method", method, ("marglik", "nll"))
  if not isinstance(state, SoapBubble):
    raise ValueError(f"tune_prior_precision needs a SoapBubble (as `fit` returns), got "
                     f"{type(state).__name__}.")
  grid = jnp.asarray(DEFAULT_GRID if grid is None else grid, state.ess.dtype)
  if grid.ndim != 1 or grid.shape[0] == 0 or not bool(jnp.all(grid > 0)):
    raise ValueError("grid must be a non-empty 1-D array of prior precisions > 0.")
  if method == "marglik":
    if log_likelihood is None:
      raise ValueError("method='marglik' needs log_likelihood = log p(D | θ̂) (see "
                       "evon_jax.laplace.log_likelihood).")
    chosen, objective, best = _tune_marglik(state, log_likelihood, grid, refine)
  else:
    chosen, objective, best = _tune_nll(state, apply_fn, validation, likelihood, sigma_noise,
                                        grid, key, num_samples, predictive_kind)
  return with_prior_precision(state, chosen), PriorPrecisionSearch(
      prior_precision=chosen, grid=grid, objective=objective, best_on_grid=best)


def _tune_marglik(state, log_lik, grid, refine):
  log_lik = jnp.asarray(log_lik, state.ess.dtype)
  log_grid = jnp.log(grid)
  objective = _log_evidence_on_grid(state, log_lik, log_grid)
  best = int(jnp.argmax(objective))
  if not refine or grid.shape[0] == 1:
    return grid[best], objective, grid[best]
  order = jnp.sort(log_grid)
  position = int(jnp.searchsorted(order, log_grid[best]))
  low = order[max(position - 1, 0)]
  high = order[min(position + 1, order.shape[0] - 1)]
  log_best = _maximise_evidence(state, log_lik, low, high, log_grid[best])
  return jnp.exp(log_best), objective, grid[best]


@jax.jit
def _maximise_evidence(state, log_lik, low, high, start):
  """Maximiser in log λ ∈ [low, high] of the (concave) evidence: Newton steps, bisection
  whenever a step would leave the shrinking bracket (the slope's sign says which side the
  maximum is on)."""
  slope = jax.grad(lambda t: _log_evidence(state, log_lik, t))
  curvature = jax.grad(slope)

  def step(_, carry):
    low, high, t = carry
    g = slope(t)
    low, high = jnp.where(g > 0, t, low), jnp.where(g > 0, high, t)
    newton = t - g / curvature(t)
    inside = jnp.isfinite(newton) & (newton > low) & (newton < high)
    return low, high, jnp.where(inside, newton, 0.5 * (low + high))

  return jax.lax.fori_loop(0, 60, step, (low, high, start))[2]


def _tune_nll(state, apply_fn, validation, likelihood, sigma_noise, grid, key, num_samples,
              predictive_kind):
  check.check_choice("likelihood", likelihood, _LIKELIHOODS)
  check.check_choice("predictive_kind", predictive_kind, ("linearized", "sampled"))
  check.check_static_int("num_samples", num_samples, 1)
  check.check_positive("sigma_noise", sigma_noise)
  if apply_fn is None or validation is None or key is None:
    raise ValueError("method='nll' needs apply_fn, validation=(inputs, targets) and a key.")
  inputs, targets, n = _split_data(validation, "validation")
  _check_outputs(apply_fn, posterior.mean(state), inputs, targets, likelihood, n)
  targets = jnp.asarray(targets)

  @jax.jit
  def nll(prior_precision):
    candidate = with_prior_precision(state, prior_precision)
    if likelihood == "classification":
      average = (predictive.linearized_predictive if predictive_kind == "linearized"
                 else predictive.bayesian_model_average)
      return metrics.nll(average(key, apply_fn, candidate, inputs, num_samples), targets)
    if predictive_kind == "linearized":
      outputs = predictive.linearized_logits(key, apply_fn, candidate, inputs, num_samples)
    else:
      weights = posterior.sample(key, candidate, num_samples)
      outputs = jax.vmap(lambda p: apply_fn(p, inputs))(weights)
    density = _gaussian_log_density(
        jnp.broadcast_to(jnp.reshape(targets, outputs.shape[1:])[None], outputs.shape),
        outputs, sigma_noise)
    per_sample = jnp.reshape(density, (num_samples, n, -1)).sum(axis=2)
    mixture = jax.nn.logsumexp(per_sample, axis=0) - math.log(num_samples)
    return -jnp.mean(mixture)

  objective = jnp.stack([nll(value) for value in progress(
      grid, "tune_prior_precision: validation NLL over the grid")])
  best = grid[int(jnp.argmin(objective))]
  return best, objective, best
