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
  ...     jax.random.key(0), apply_fn, state, x, num_samples=16)
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

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from evon_jax import _validation as check
from evon_jax._progress import progress
from evon_jax.maths import eigenbasis
from evon_jax.readout import posterior
from evon_jax.readout.bubble import SoapBubble
from evon_jax.maths.layout import as_view, from_view, tree_layouts
from evon_jax._optimizers import evon
from evon_jax.maths.kronecker import bases_to_storage, mean_factor_statistics, rotate_in

from evon_jax.structured._laplace_common import (  # noqa: F401  (DEFAULT_GRID re-exported)
    DEFAULT_GRID, _EXACT, _FISHERS, _LIKELIHOODS, ApplyFn, Fisher, Likelihood, _check_outputs,
    _chunks, _take, data_batches, is_in_memory)
from evon_jax.structured.laplace_evidence import (  # the evidence and the choice of λ
    PriorPrecisionSearch, log_likelihood, log_marginal_likelihood, tune_prior_precision,
    with_prior_precision)

__all__ = [
    "fit", "log_likelihood", "log_marginal_likelihood", "with_prior_precision",
    "tune_prior_precision", "PriorPrecisionSearch",
]

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
      regression. Or any re-iterable of such ``(inputs, targets)`` batches (a list, a
      DataLoader-style loader, or a function returning a fresh iterator: the fit reads the
      data twice), of any batch sizes; the model's outputs are checked on the first batch.
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
  first_inputs, first_targets, _ = next(data_batches(data))
  if num_data is not None:
    check.check_positive("num_data", num_data)
  # The template fixes layouts, dtypes and storage exactly as EVON's own init does (its ess
  # and weight decay are replaced at the end, once the data are counted).
  template = jax.jit(lambda p: posterior.bubble(evon(  # one compilation, not many eager
      0.0, ess=1.0, hess_init=1.0, weight_decay=1.0, max_precond_dim=max_precond_dim,
      precondition_1d=precondition_1d, stacked_dims=stacked_dims,
      dimension_numbers=dimension_numbers).init(p)))(params)
  _check_outputs(apply_fn, params, first_inputs, first_targets, likelihood, batch_size)
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

  over_data = lambda desc, statistic, *extra: _data_mean(
      desc, statistic, chunk_fn, trainable, data, batch_size, key, *extra)

  def factor_sums(grads):
    return [jax.tree.map(lambda s, count=g.shape[0]: s * count,
                         mean_factor_statistics(g, layout))
            for g, layout in zip(grads, trainable_layouts)]

  if any(layout.any_rotated for layout in trainable_layouts):
    factors, _ = over_data("laplace.fit: Kronecker factors", factor_sums)
  else:  # no leaf has a basis: skip the first pass
    factors = [(None,) * len(layout.axes) for layout in trainable_layouts]
  bases = jax.jit(lambda pairs: [jax.tree.map(eigenbasis.fresh_eigenbasis, pair)
                                 for pair in pairs])(factors)

  def rotated_squares(grads, bases):
    return [jnp.sum(jnp.square(rotate_in(g, q, _EXACT)), axis=0)
            for g, q in zip(grads, bases)]

  hessians, n = over_data("laplace.fit: GGN diagonal", rotated_squares, bases)
  num_data = n if num_data is None else num_data
  if not all(bool(jnp.all(jnp.isfinite(h))) for h in hessians):
    raise ValueError("The GGN has non-finite entries: the model's outputs or gradients at "
                     "`params` are not finite on some examples of `data`.")
  assemble = jax.jit(lambda template, leaves, factors, bases, hessians: _laplace_state(
      template, treedef, layouts, leaves, trainable_ids, factors, bases, hessians, num_data,
      prior_precision))
  return assemble(template, [jnp.asarray(leaf) for leaf in leaves], factors, bases, hessians)


def _data_mean(desc, statistic, chunk_fn, trainable, data, batch_size, key, *extra):
  """(Σ over the data of `statistic(pseudo-gradients per leaf, *extra)` / n, n), one
  compiled chunk of `batch_size` examples at a time (batches of a stream are chunked too)."""
  @jax.jit
  def chunk_sum(trainable, x, y, mask, chunk_key, *extra):
    return statistic(chunk_fn(trainable, x, y, mask, chunk_key), *extra)

  counted = [0]

  def chunks():
    for inputs, targets, size in data_batches(data):
      counted[0] += size
      for index, mask in _chunks(size, batch_size):
        yield _take(inputs, index), _take(targets, index), mask

  in_memory = is_in_memory(data)
  total = None
  for c, (x, y, mask) in enumerate(progress(
      chunks(), desc, total=-(-len(data[1]) // batch_size) if in_memory else None)):
    # The same key per chunk in both passes: 'sampled' targets are drawn once (a stream
    # must then yield its batches in the same order twice).
    part = chunk_sum(trainable, x, y, mask, jax.random.fold_in(key, c), *extra)
    total = part if total is None else jax.tree.map(jnp.add, total, part)
  n = counted[0]
  return jax.tree.map(lambda s: s / n, total), n


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
