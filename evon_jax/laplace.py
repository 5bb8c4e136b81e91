r"""Post-hoc linearised Laplace in the Kronecker eigenbasis (EK-FAC Laplace): a SOAP-Bubble for
any trained model.

Given a trained point estimate θ̂ (from AdamW, SOAP, anything), the linearised Laplace
approximation is the Gaussian ``N(θ̂, (N Ĥ_GGN + λ I)⁻¹)``, where ``N Ĥ_GGN`` is the
generalised Gauss–Newton matrix (GGN) of the log-likelihood summed over the ``N`` training
examples and ``λ`` the prior precision. For every matrix view ``W`` (m x n) of a leaf this
module approximates the GGN block by its eigenvalue-corrected Kronecker factorisation:

* Per example, pseudo-gradients ``G_s`` whose outer products sum to the example's GGN
  (``vec G_s`` are the columns of ``Jᵀ S``, ``S Sᵀ`` the Hessian of the negative
  log-likelihood in the outputs ``f``). Classification (softmax cross-entropy):
  ``diag(p) − p pᵀ = Σ_c p_c (e_c − p)(e_c − p)ᵀ``, so ``G_c = √p_c ∇_θ log softmax(f)_c``;
  regression (Gaussian, noise std σ): ``G_d = J_dᵀ / σ`` per output ``d``.
* Pass 1: Kronecker factors ``L = (1/N) Σ G Gᵀ`` and ``R = (1/N) Σ Gᵀ G`` and their
  eigenbases ``Q_L``, ``Q_R`` (the sides SOAP/EVON would rotate; others stay the identity).
* Pass 2, the eigenvalue correction: ``Ĥ_ij = (1/N) Σ (Q_Lᵀ G Q_R)_ij²``, exactly
  ``diag(Kᵀ GGN K) / N`` for ``K = Q_L ⊗ Q_R``.

The posterior precision in eigen coordinates is then ``N Ĥ + λ = N (Ĥ + λ/N)``, which is the
EVON posterior ``V = 1 / (ess (H + δ))`` with ``ess = N``, ``H = Ĥ`` and ``δ = λ / N``. `fit`
therefore returns an `evon_jax.SoapBubble`, and every read-out (`evon_jax.posterior`,
`evon_jax.predictive`) works on it unchanged. `log_marginal_likelihood` and
`tune_prior_precision` choose λ by the Laplace evidence or by a validation NLL.

Example:
  >>> import jax, jax.numpy as jnp, evon_jax
  >>> from evon_jax import laplace
  >>> params = {"w": jnp.ones((3, 2)) * 0.1, "b": jnp.zeros(2)}
  >>> apply_fn = lambda p, x: jnp.tanh(x @ p["w"]) + p["b"][None]
  >>> x, y = jnp.ones((8, 3)), jnp.zeros(8, jnp.int32)
  >>> state = laplace.fit(apply_fn, params, (x, y), likelihood="classification")
  >>> probs = evon_jax.predictive.linearized_predictive(
  ...     apply_fn, state, x, jax.random.key(0), num_samples=16)
  >>> probs.shape
  (8, 2)

References:
  MacKay, A practical Bayesian framework for backpropagation networks, 1992. Martens &
  Grosse, Optimizing neural networks with Kronecker-factored approximate curvature, 2015.
  George et al., Fast approximate natural gradient descent in a Kronecker-factored
  eigenbasis, 2018. Immer et al., Improving predictions of Bayesian neural nets via local
  linearization, 2021. Daxberger et al., Laplace Redux, 2021.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from evon_jax import _validation as check
from evon_jax import eigenbasis, posterior, predictive
from evon_jax.bubble import SoapBubble
from evon_jax.posterior import stored_layouts
from evon_jax._layout import as_view, from_view, tree_layouts
from evon_jax._optimizers import evon
from evon_jax.kronecker import bases_to_storage, mean_factor_statistics, rotate_in

__all__ = [
    "fit", "log_likelihood", "log_marginal_likelihood", "with_prior_precision",
    "tune_prior_precision", "PriorPrecisionSearch",
]

Likelihood = Literal["classification", "regression"]
Fisher = Literal["exact", "sampled", "empirical"]
TuningMethod = Literal["marglik", "nll"]
PredictiveKind = Literal["linearized", "sampled"]
ApplyFn = Callable[[Any, Any], jax.Array]

_LIKELIHOODS = ("classification", "regression")
_FISHERS = ("exact", "sampled", "empirical")
_EXACT = jax.lax.Precision.HIGHEST
DEFAULT_GRID = np.logspace(-4, 4, 41)


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


# ----------------------------------------------------------------------------- data handling


def _split_data(data, name: str = "data"):
  """(inputs, targets, n): inputs any pytree of arrays, all with the same leading axis n."""
  if not isinstance(data, (tuple, list)) or len(data) != 2:
    raise ValueError(f"{name} must be a tuple (inputs, targets) of arrays with a leading "
                     f"example axis, got {type(data).__name__}.")
  inputs, targets = data
  sizes = {int(np.shape(leaf)[0]) if np.ndim(leaf) > 0 else -1
           for leaf in jax.tree.leaves(inputs) + [targets]}
  if len(sizes) != 1 or -1 in sizes:
    raise ValueError(f"{name}: inputs and targets must be arrays sharing one leading example "
                     f"axis, got leading sizes {sorted(sizes)}.")
  n = sizes.pop()
  if n == 0:
    raise ValueError(f"{name} holds no examples.")
  return inputs, targets, n


def _chunks(n: int, batch_size: int):
  """(indices, mask) per chunk: every chunk has `batch_size` rows (one compilation); the last
  one repeats its final valid example, masked out, so padding never feeds odd inputs."""
  for start in range(0, n, batch_size):
    index = np.arange(start, start + batch_size)
    yield np.minimum(index, n - 1), (index < n).astype(np.float32)


def _take(tree, index):
  return jax.tree.map(lambda a: a[index], tree)


def _check_outputs(apply_fn, params, inputs, targets, likelihood, batch_size):
  """Checks the model's outputs and the targets against the likelihood; returns the number
  of outputs (classes) per example."""
  sample = _take(inputs, np.zeros(min(batch_size, 2), np.int64))
  shape = tuple(jax.eval_shape(apply_fn, params, sample).shape)
  rows = len(jax.tree.leaves(sample)[0])
  target_shape, target_dtype = np.shape(targets), jnp.result_type(targets)
  if likelihood == "classification":
    if len(shape) != 2 or shape[0] != rows or shape[1] < 2:
      raise ValueError(f"likelihood='classification' needs apply_fn to return logits of shape "
                       f"(batch, classes >= 2); it returned {shape} for a batch of {rows}.")
    if len(target_shape) != 1 or not jnp.issubdtype(target_dtype, jnp.integer):
      raise ValueError(f"likelihood='classification' needs integer class labels of shape "
                       f"(n,), got {target_dtype} targets of shape {target_shape}.")
    labels = np.asarray(targets)
    if labels.min() < 0 or labels.max() >= shape[1]:
      raise ValueError(f"class labels must lie in [0, {shape[1]}), got values in "
                       f"[{labels.min()}, {labels.max()}].")
    return shape[1]
  if len(shape) not in (1, 2) or shape[0] != rows:
    raise ValueError(f"likelihood='regression' needs apply_fn to return outputs of shape "
                     f"(batch,) or (batch, outputs); it returned {shape} for a batch of {rows}.")
  if tuple(target_shape[1:]) != shape[1:]:
    raise ValueError(f"regression targets of shape {target_shape} do not match the model's "
                     f"outputs (n,) + {shape[1:]}.")
  return 1 if len(shape) == 1 else shape[1]


# ----------------------------------------------------------------------------- pseudo-gradients


def _output_cotangents(outputs, target, key, likelihood, fisher, sigma_noise):
  """Rows s of S with S Sᵀ = the example's output-space GGN (its expectation for 'sampled').

  The pseudo-gradients are the vector–Jacobian products Jᵀ S[s].
  """
  if likelihood == "classification":
    probs = jax.nn.softmax(outputs)
    classes = outputs.shape[0]
    if fisher == "exact":  # diag(p) − p pᵀ = Σ_c p_c (e_c − p)(e_c − p)ᵀ
      return jnp.sqrt(probs)[:, None] * (jnp.eye(classes, dtype=probs.dtype) - probs[None, :])
    label = jax.random.categorical(key, outputs) if fisher == "sampled" else target
    return (jax.nn.one_hot(label, classes, dtype=probs.dtype) - probs)[None, :]
  if fisher == "exact":
    return jnp.eye(outputs.shape[0], dtype=outputs.dtype) / sigma_noise
  if fisher == "sampled":  # y − f ~ N(0, σ² I): E[(y − f)(y − f)ᵀ] / σ⁴ = I / σ²
    return jax.random.normal(key, (1,) + outputs.shape, outputs.dtype) / sigma_noise
  return ((jnp.reshape(target, outputs.shape) - outputs) / sigma_noise ** 2)[None, :]


def _pseudo_gradient_fn(apply_fn, params, layouts, dtypes, likelihood, fisher, sigma_noise):
  """chunk_fn(trainable, inputs, targets, mask, key) -> per trainable leaf the stacked
  pseudo-gradients (B·S, *view_shape) in that leaf's state dtype, padding rows zeroed.

  Only the trainable leaves (`dtypes` maps their flat indices to state dtypes) are
  differentiated: integer leaves stay constants of the model.
  """
  leaves, treedef = jax.tree.flatten(params)
  trainable_ids = sorted(dtypes)

  def rebuild(trainable):
    full = list(leaves)
    for i, leaf in zip(trainable_ids, trainable):
      full[i] = leaf
    return treedef.unflatten(full)

  def per_example(trainable, x, target, key):
    def outputs_of(t):  # one example as a batch of one, back to its own output vector
      out = apply_fn(rebuild(t), jax.tree.map(lambda a: a[None], x))
      return jnp.reshape(out, (-1,))
    outputs, vjp = jax.vjp(outputs_of, trainable)
    cotangents = _output_cotangents(outputs, target, key, likelihood, fisher, sigma_noise)
    return jax.vmap(lambda c: vjp(c.astype(outputs.dtype))[0])(cotangents)

  def chunk_fn(trainable, inputs, targets, mask, key):
    keys = jax.random.split(key, mask.shape[0])
    grads = jax.vmap(per_example, in_axes=(None, 0, 0, 0))(trainable, inputs, targets, keys)
    out = []
    for i, grad in zip(trainable_ids, grads):
      layout, dtype = layouts[i], dtypes[i]
      grad = grad * jnp.reshape(mask, mask.shape + (1,) * (grad.ndim - 1)).astype(grad.dtype)
      out.append(jnp.reshape(grad, (-1,) + layout.view_shape).astype(dtype))
    return out

  return chunk_fn


# ----------------------------------------------------------------------------- fit


def fit(
    apply_fn: ApplyFn,
    params: Any,
    data: tuple[Any, Any],
    *,
    likelihood: Likelihood,
    prior_precision: float = 1.0,
    num_data: Optional[float] = None,
    sigma_noise: float = 1.0,
    fisher: Fisher = "exact",
    key: Optional[jax.Array] = None,
    batch_size: int = 128,
    max_precond_dim: int = 10000,
    precondition_1d: bool = False,
    stacked_dims=None,
    dimension_numbers=None,
) -> SoapBubble:
  r"""EK-FAC linearised Laplace posterior ``N(θ̂, (N Ĥ + λ)⁻¹)`` at trained ``params``.

  Two passes over ``data`` (see the module docstring): Kronecker factors and eigenbases of the
  per-example pseudo-gradients, then the GGN diagonal ``Ĥ`` in that eigenbasis. The result is
  an EVON state with ``mean = θ̂``, ``hessian = Ĥ``, ``ess = N``, ``weight_decay = λ / N``:
  pass it to `evon_jax.posterior` and `evon_jax.predictive` like a trained EVON state.

  Cost: each example costs one forward pass and ``S`` vector–Jacobian products (``S`` = classes
  or outputs for ``fisher='exact'``, 1 otherwise), twice; memory ~ ``batch_size·S`` gradients.
  Prefer ``fisher='sampled'`` when there are many classes.

  Args:
    apply_fn: ``apply_fn(params, inputs) -> outputs`` on a batch: logits ``(batch, classes)``
      for classification, ``(batch,)`` or ``(batch, outputs)`` for regression.
    params: the trained parameters θ̂ (a pytree; integer and empty leaves pass through).
    data: ``(inputs, targets)``, arrays (inputs may be a pytree of arrays) with a leading
      example axis, NumPy or JAX: chunks of ``batch_size`` are moved to the device one at a
      time. Integer labels ``(n,)`` for classification; targets shaped like the outputs for
      regression.
    likelihood: 'classification' (softmax cross-entropy) or 'regression' (Gaussian).
    prior_precision: λ of the prior ``N(0, I/λ)`` (`tune_prior_precision` can choose it).
    num_data: N, the training-set size the posterior is scaled to (default: the number of
      examples in ``data``; pass it when ``data`` is a subset of the training set).
    sigma_noise: the regression noise standard deviation σ (ignored for classification).
    fisher: 'exact' (the GGN), 'sampled' (one target per example drawn from the model: an
      unbiased Monte-Carlo GGN, needs ``key``) or 'empirical' (the observed target's gradient:
      the empirical Fisher, biased).
    key: PRNG key (or int seed) for ``fisher='sampled'``.
    batch_size: examples per vectorised chunk (static; sets memory).
    max_precond_dim, precondition_1d, stacked_dims, dimension_numbers: which Kronecker axes
      a leaf has and which of them get an eigenbasis, as in
      `evon_jax.evon` (sides without one get the diagonal GGN).

  Returns:
    An `evon_jax.SoapBubble` holding the Laplace posterior.
  """
  check.check_choice("likelihood", likelihood, _LIKELIHOODS)
  check.check_choice("fisher", fisher, _FISHERS)
  check.check_positive("prior_precision", prior_precision)
  check.check_positive("sigma_noise", sigma_noise)
  check.check_static_int("batch_size", batch_size, 1)
  if fisher == "sampled" and key is None:
    raise ValueError("fisher='sampled' draws targets from the model: pass a PRNG key.")
  inputs, targets, n = _split_data(data)
  if num_data is None:
    num_data = n
  check.check_positive("num_data", num_data)
  # The template fixes layouts, dtypes and storage exactly as EVON's own init does.
  template = jax.jit(lambda p: posterior.bubble(evon(  # one compilation, not many eager
      0.0, ess=float(num_data), hess_init=1.0,
      weight_decay=float(prior_precision) / float(num_data), max_precond_dim=max_precond_dim,
      precondition_1d=precondition_1d, stacked_dims=stacked_dims,
      dimension_numbers=dimension_numbers).init(p)))(params)
  _check_outputs(apply_fn, params, inputs, targets, likelihood, batch_size)
  leaves, treedef = jax.tree.flatten(params)
  layouts = tree_layouts(params, max_precond_dim=max_precond_dim,
                         precondition_1d=precondition_1d, stacked_dims=stacked_dims,
                         dimension_numbers=dimension_numbers)
  template_hessians = treedef.flatten_up_to(template.hessian)
  trainable_ids = [i for i, layout in enumerate(layouts) if layout.trainable]
  chunk_fn = _pseudo_gradient_fn(
      apply_fn, params, layouts, {i: template_hessians[i].dtype for i in trainable_ids},
      likelihood, fisher, sigma_noise)
  trainable = [jnp.asarray(leaves[i]) for i in trainable_ids]
  trainable_layouts = [layouts[i] for i in trainable_ids]
  if key is None or isinstance(key, (int, np.integer)):
    key = jax.random.key(0 if key is None else int(key))

  def over_data(statistic, *extra):
    """Σ over the data of `statistic(pseudo-gradients per leaf, *extra)`, then / n."""
    @jax.jit
    def chunk_sum(trainable, x, y, mask, chunk_key, *extra):
      return statistic(chunk_fn(trainable, x, y, mask, chunk_key), *extra)

    total = None
    for c, (index, mask) in enumerate(_chunks(n, batch_size)):
      # The same key per chunk in both passes: 'sampled' targets are drawn once.
      part = chunk_sum(trainable, _take(inputs, index), _take(targets, index), mask,
                       jax.random.fold_in(key, c), *extra)
      total = part if total is None else jax.tree.map(jnp.add, total, part)
    return jax.tree.map(lambda s: s / n, total)

  def factor_sums(grads):
    return [jax.tree.map(lambda s, count=g.shape[0]: s * count,
                         mean_factor_statistics(g, layout))
            for g, layout in zip(grads, trainable_layouts)]

  if any(layout.any_rotated for layout in trainable_layouts):
    factors = over_data(factor_sums)
  else:  # no leaf has a basis: skip the first pass
    factors = [(None,) * len(layout.axes) for layout in trainable_layouts]
  bases = jax.jit(lambda pairs: [jax.tree.map(eigenbasis.fresh_eigenbasis, pair)
                                 for pair in pairs])(factors)

  def rotated_squares(grads, bases):
    return [jnp.sum(jnp.square(rotate_in(g, q, _EXACT)), axis=0)
            for g, q in zip(grads, bases)]

  hessians = over_data(rotated_squares, bases)
  if not all(bool(jnp.all(jnp.isfinite(h))) for h in hessians):
    raise ValueError("The GGN has non-finite entries: the model's outputs or gradients at "
                     "`params` are not finite on some examples of `data`.")
  assemble = jax.jit(lambda template, leaves, factors, bases, hessians: _laplace_state(
      template, treedef, layouts, leaves, trainable_ids, factors, bases, hessians, num_data,
      prior_precision))
  return assemble(template, [jnp.asarray(leaf) for leaf in leaves], factors, bases, hessians)


def _laplace_state(template, treedef, layouts, leaves, trainable_ids, factors, bases,
                   hessians, num_data, prior_precision) -> SoapBubble:
  """The template EVON state with the Laplace posterior's mean, Ĥ, factors, bases, N, λ/N."""
  template_means = treedef.flatten_up_to(template.mean)
  template_hessians = treedef.flatten_up_to(template.hessian)
  per_leaf = dict(zip(trainable_ids, zip(factors, bases, hessians)))
  means, hessian_leaves, factor_pairs, basis_pairs = [], [], [], []
  for i, layout in enumerate(layouts):
    if i not in per_leaf:
      means.append(template_means[i])
      hessian_leaves.append(template_hessians[i])
      factor_pairs.append(())
      basis_pairs.append(())
      continue
    factor, basis, hessian = per_leaf[i]
    dtype = template_hessians[i].dtype
    mean = rotate_in(as_view(jnp.asarray(leaves[i]), layout).astype(dtype), basis, _EXACT)
    means.append(from_view(mean, layout))
    hessian_leaves.append(from_view(hessian, layout).astype(dtype))
    factor_pairs.append(factor)
    basis_pairs.append(basis)
  ess = jnp.asarray(num_data, template.ess.dtype)
  return template._replace(
      mean=treedef.unflatten(means),
      hessian=treedef.unflatten(hessian_leaves),
      factors=bases_to_storage(factor_pairs, layouts, treedef, len(template.factors),
                               [h.dtype for h in template_hessians]),
      bases=bases_to_storage(basis_pairs, layouts, treedef, len(template.bases),
                             [h.dtype for h in template_hessians]),
      ess=ess,
      weight_decay=jnp.asarray(prior_precision, template.weight_decay.dtype) / ess)


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
      probs = average(apply_fn, candidate, inputs, key, num_samples)
      picked = jnp.take_along_axis(probs, targets[:, None], axis=-1)[:, 0]
      return -jnp.mean(jnp.log(jnp.maximum(picked, jnp.finfo(picked.dtype).tiny)))
    if predictive_kind == "linearized":
      outputs = predictive.linearized_logits(apply_fn, candidate, inputs, key, num_samples)
    else:
      weights = posterior.sample(key, candidate, num_samples)
      outputs = jax.vmap(lambda p: apply_fn(p, inputs))(weights)
    density = _gaussian_log_density(
        jnp.broadcast_to(jnp.reshape(targets, outputs.shape[1:])[None], outputs.shape),
        outputs, sigma_noise)
    per_sample = jnp.reshape(density, (num_samples, n, -1)).sum(axis=2)
    mixture = jax.nn.logsumexp(per_sample, axis=0) - math.log(num_samples)
    return -jnp.mean(mixture)

  objective = jnp.stack([nll(value) for value in grid])
  best = grid[int(jnp.argmin(objective))]
  return best, objective, best
