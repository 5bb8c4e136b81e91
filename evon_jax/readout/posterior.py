"""Reading the SOAP-Bubble posterior out of an EVON or IVON optimizer state.

Every function accepts a `SoapBubble` (e.g. from `evon_jax.laplace.fit`) or the whole
optimizer state (the posterior is found inside optax.chain, masked, partition,
inject_hyperparams and MultiSteps wrappers; `bubble(opt_state)` returns it). For a leaf with
Kronecker axes 1 … K the posterior is W = M + E ×₁ Q₁ ×₂ Q₂ … ×_K Q_K, E ~ N(0, diag V),
V = 1 / (ess (H + δ)) (for a matrix W = M + Q_L E Q_Rᵀ); identity bases give IVON's
diagonal Gaussian.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import jax.scipy.linalg
import optax

from evon_jax.maths.layout import LeafLayout, as_view, elementwise_layout, from_view
from evon_jax.readout.locate import find_state
from evon_jax.transforms._common import as_typed_key
from evon_jax.readout.bubble import (
    SoapBubble, combine, draw, per_leaf_scalar, records as bubble_records)
from evon_jax.maths.kronecker import AxisBases, per_leaf, rotate_out, storage_to_bases, stored_layouts_of
from evon_jax.maths import prior as prior_maths
from evon_jax.transforms import (
    EigenbasisRefreshState, EigenspaceIvonState, InjectNoiseState, _prior)

# Posterior read-outs are off the training hot path: always use full float32 matmuls (the
# default precision is TF32/bf16 on GPUs and TPUs, which would blur covariances and means).
_EXACT = jax.lax.Precision.HIGHEST

__all__ = [
    "mean", "sample", "sample_deviation", "marginal_stddev", "covariance", "entropy",
    "kl_to_prior", "kl", "prior", "bases", "variance_eigen", "find_evon_state", "bubble", "SoapBubble",
    "tempered",
]


def find_evon_state(opt_state) -> InjectNoiseState:
  """The EVON/IVON optimizer state (`evon_jax.EvonState`) inside any optax state pytree."""
  return find_state(opt_state, InjectNoiseState)


def bubble(opt_state) -> SoapBubble:
  """The `SoapBubble` posterior an optimizer state holds (or the bubble itself).

  Found inside optax.chain, masked, partition, inject_hyperparams and MultiSteps; any
  composition with `eigenspace_ivon` innermost holds one (`eigenspace_adam`, SOAP, does not).
  Several posteriors over disjoint leaves (two EVONs in one `optax.partition`, each with
  its own ess and weight decay) come back as one bubble (`evon_jax.readout.bubble.combine`)
  whose `ess` and `weight_decay` are params-shaped trees; every read-out takes it.
  """
  if isinstance(opt_state, SoapBubble):
    return opt_state
  kinds = (SoapBubble, InjectNoiseState, EigenbasisRefreshState, EigenspaceIvonState)
  nodes = [node for node in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, kinds))
           if isinstance(node, kinds) and _holds_posterior(node)]
  if not nodes:  # the search's own error says what it looked for
    return find_state(nodes, SoapBubble)
  # Several (e.g. two EVONs under optax.partition, each with its own ess and δ): one bubble
  # holding each leaf's posterior from the group that owns it.
  return combine([node if isinstance(node, SoapBubble) else node.bubble() for node in nodes])


def tempered(opt_state, temperature) -> SoapBubble:
  """The posterior with its covariance multiplied by `temperature` (per leaf if you like).

  q_T = N(M, T Σ): the mean and bases unchanged, the eigen-precision ``H + δ`` divided by
  T — the usual "cold/warm posterior" knob (T < 1 sharpens, T > 1 widens), applied at
  read-out time with no retraining. The prior N(0, 1/(ess δ)) stays as it was (only H
  moves), so `kl_to_prior` compares the tempered posterior with the same prior (with a
  structured prior: ``kl(tempered(state, T), prior(state))``).
  `temperature` is a number for every leaf, a params-shaped tree of numbers, or a callable
  ``(path, leaf) -> number`` (e.g. to keep uncertainty in some layers only); T = 0 gives
  that leaf a point mass at its mean. Every read-out takes the result, e.g.
  ``predictive.bayesian_model_average(key, apply_fn, tempered(state, 4.0), x, 8)``.

  Example:
    >>> import jax.numpy as jnp, evon_jax
    >>> tx = evon_jax.evon(1e-2, ess=100.0, hess_init=1.0)
    >>> state = tx.init({"w": jnp.zeros((3, 2))})
    >>> wide = evon_jax.posterior.tempered(state, 4.0)
    >>> bool(jnp.allclose(evon_jax.posterior.marginal_stddev(wide)["w"],
    ...                   2 * evon_jax.posterior.marginal_stddev(state)["w"]))
    True
  """
  state = bubble(opt_state)
  masked = lambda x: isinstance(x, optax.MaskedNode)
  slots, slot_treedef = jax.tree.flatten(state.mean, is_leaf=masked)
  if callable(temperature):
    paths = [path for path, _ in jax.tree.flatten_with_path(state.mean, is_leaf=masked)[0]]
    values = [temperature(path, leaf) for path, leaf in zip(paths, slots)]
  elif not jax.tree.structure(temperature).num_nodes > 1:
    values = [temperature] * len(slots)
  else:
    try:
      values = slot_treedef.flatten_up_to(temperature)
    except (ValueError, TypeError) as error:
      raise ValueError("tempered: `temperature` must be a number, a callable "
                       "(path, leaf) -> number or a tree shaped like the parameters: "
                       f"{error}") from error
  values = [value for leaf, value in zip(slots, values) if not masked(leaf)]
  for value in values:
    if isinstance(value, (int, float)) and not value >= 0:  # arrays may be traced
      raise ValueError(f"tempered: temperatures must be >= 0, got {value!r}.")
  treedef = jax.tree.structure(state.mean)
  means, hessians = treedef.flatten_up_to(state.mean), treedef.flatten_up_to(state.hessian)
  out = []
  for m, h, (_, weight_decay), t in zip(means, hessians, _leaf_scalars(state), values):
    if jnp.shape(h) != jnp.shape(m):  # frozen leaf: a placeholder, no posterior
      out.append(h)
      continue
    t = jnp.asarray(t, h.dtype)
    precision = (h + weight_decay) / jnp.where(t > 0, t, 1)
    # T = 0: H = inf, so V = 1/(ess (H + δ)) = 0, a point mass at the mean.
    out.append(jnp.where(t > 0, precision - weight_decay, jnp.inf).astype(h.dtype))
  return state._replace(hessian=treedef.unflatten(out))


def _holds_posterior(node) -> bool:
  """SOAP's refresh state (Adam inside) has bases but no posterior."""
  return not isinstance(node, EigenbasisRefreshState) or isinstance(node.inner,
                                                                     EigenspaceIvonState)


def stored_layouts(state) -> list[LeafLayout]:
  """Leaf layouts as a bubble's (or a state's) bases record them (`kronecker.stored_layout`)."""
  state = bubble(state)
  treedef = jax.tree.structure(state.mean)
  return stored_layouts_of(treedef.flatten_up_to(state.mean), state.bases, treedef)


def _per_leaf(state: SoapBubble):
  """Yields (layout, mean°, variance V, basis) per leaf; layout is None for frozen leaves."""
  treedef = jax.tree.structure(state.mean)
  layouts = stored_layouts(state)
  for layout, mean_eigen, hessian, basis, (ess, weight_decay) in zip(
      layouts, treedef.flatten_up_to(state.mean), treedef.flatten_up_to(state.hessian),
      storage_to_bases(state.bases, treedef, layouts), _leaf_scalars(state)):
    if not layout.trainable:
      yield None, mean_eigen, None, basis
      continue
    yield layout, mean_eigen, _variance(ess, weight_decay, hessian), basis


def _leaf_scalars(state: SoapBubble):
  """(ess, δ) per leaf: the bubble's, or each group's own after `combine`."""
  treedef = jax.tree.structure(state.mean)
  return zip(per_leaf_scalar(state.ess, treedef), per_leaf_scalar(state.weight_decay, treedef))


def _map_leaves(state: SoapBubble, trainable_fn, frozen_fn):
  treedef = jax.tree.structure(state.mean)
  out = [frozen_fn(m) if layout is None else trainable_fn(layout, m, h, q)
         for layout, m, h, q in _per_leaf(state)]
  return treedef.unflatten(out)


def _variance(ess, weight_decay, hessian):
  return (1.0 / (ess * (hessian + weight_decay))).astype(hessian.dtype)


def to_parameters(layout: LeafLayout, eigen, bases: AxisBases):
  """A leaf's eigen-coordinate array in parameter coordinates: E ×₁ Q₁ ×₂ Q₂ … (full
  float32 products), in the leaf's own shape."""
  return from_view(rotate_out(as_view(eigen, layout), bases, _EXACT), layout)


def _fill_masked(tree, params, fill):
  """Leaves the EVON state does not own (`optax.MaskedNode` under `partition`/`masked`)
  replaced by `fill(param)`; `tree` unchanged when `params` is None."""
  if params is None:
    return tree
  masked = lambda x: isinstance(x, optax.MaskedNode)
  try:
    return jax.tree.map(lambda out, p: fill(p) if masked(out) else out, tree, params,
                        is_leaf=masked)
  except ValueError as error:
    raise ValueError("`params` must have the structure of the parameters the optimizer "
                     f"was initialised with: {error}") from error


def mean(opt_state, params=None) -> Any:
  """Posterior mean M in parameter space (params-shaped; float32 or the state's dtype).

  Under `optax.partition` / `masked` the leaves another optimizer owns come back as
  `optax.MaskedNode`; pass the loop's `params` to take those leaves from it instead.
  """
  state = bubble(opt_state)
  out = _map_leaves(
      state,
      lambda layout, m, h, q: to_parameters(layout, m, q),
      lambda m: m)
  return _fill_masked(out, params, lambda p: p)


def variance_eigen(opt_state) -> Any:
  """V = 1 / (ess (H + δ)), the variances in eigen coordinates (params-shaped)."""
  state = bubble(opt_state)
  return _map_leaves(state, lambda layout, m, v, q: v,
                     lambda m: jnp.zeros(m.shape, jnp.float32))


def bases(opt_state) -> Any:
  """Per leaf, its eigenbases: a tuple with one entry per Kronecker axis, the basis Q_k
  (stacked dims first, then (n_k, n_k)) or `None` for an identity axis; a matrix leaf gives
  (Q_L, Q_R), a leaf without bases ()."""
  state = bubble(opt_state)
  return per_leaf(state.bases, state.mean)


def sample(key: jax.Array, opt_state, num_samples: Optional[int] = None, params=None) -> Any:
  """Draws posterior samples; a leading axis of `num_samples` when it is given.

  `params`: fills leaves another optimizer owns (see `mean`) with the loop's values.
  """
  out = _draw(key, opt_state, num_samples, centered=False)
  return _fill_masked(out, params, lambda p: _repeat(p, num_samples))


def _repeat(x, num_samples):
  x = jnp.asarray(x)
  return x if num_samples is None else jnp.broadcast_to(x, (num_samples,) + x.shape)


def sample_deviation(key: jax.Array, opt_state, num_samples: Optional[int] = None,
                     params=None) -> Any:
  """The deviations W - M of the samples `sample` draws with the same key: Q_L (√V z) Q_Rᵀ.

  Computed without the mean (no cancellation in ``sample(...) - mean(...)`` for a narrow
  posterior); zero on frozen leaves (and, given `params`, on leaves another optimizer owns).
  ``mean + sample_deviation(key, ...)`` equals ``sample(key, ...)`` up to rounding. Used by
  the linearised predictive.
  """
  out = _draw(key, opt_state, num_samples, centered=True)
  return _fill_masked(out, params, lambda p: _repeat(jnp.zeros_like(p), num_samples))


def _draw(key, opt_state, num_samples, centered):
  key = as_typed_key(key)  # an int seed works wherever a key does
  state = bubble(opt_state)
  count = 1 if num_samples is None else num_samples
  leaf_keys = jax.random.split(key, len(jax.tree.leaves(state.mean)))
  treedef = jax.tree.structure(state.mean)
  out = []
  for leaf_key, record, m in zip(leaf_keys, bubble_records(state),
                                 treedef.flatten_up_to(state.mean)):
    if record is None:
      out.append(_repeat(jnp.zeros_like(m) if centered else m, num_samples))
      continue
    z = jax.random.normal(leaf_key, (count,) + record.mean.shape, record.mean.dtype)
    samples = draw(record, z, 1.0, _EXACT, centered=centered)
    out.append(samples[0] if num_samples is None else samples)
  return treedef.unflatten(out)


def _squared(basis: AxisBases) -> AxisBases:
  return jax.tree.map(jnp.square, basis)


def marginal_stddev(opt_state, params=None) -> Any:
  """Closed-form marginal standard deviations, params-shaped: Var W = V ×₁ (Q₁∘Q₁) ×₂ …
  (for a matrix sqrt((Q_L∘Q_L) V (Q_R∘Q_R)ᵀ)).

  Zero on frozen leaves and, given `params`, on leaves another optimizer owns.
  """
  state = bubble(opt_state)

  def stddev(layout, m, v, q):
    return jnp.sqrt(to_parameters(layout, v, _squared(q)))

  out = _map_leaves(state, stddev, lambda m: jnp.zeros(m.shape, jnp.float32))
  return _fill_masked(out, params, lambda p: jnp.zeros(jnp.shape(p), jnp.float32))


def _dense_rotations(layout: LeafLayout, q: AxisBases, dtype):
  """Q_1 ⊗ Q_2 ⊗ … per stacked tensor, (blocks, size, size): maps the row-major vec(E) of
  one tensor of the stack to the row-major vec(W)."""
  blocks = math.prod(layout.batch)
  rotation = jnp.ones((blocks, 1, 1), dtype)
  for basis, size in zip(q, layout.axes):
    side = (jnp.broadcast_to(jnp.eye(size, dtype=dtype), (blocks, size, size))
            if basis is None else jnp.reshape(basis, (blocks, size, size)).astype(dtype))
    rotation = jax.vmap(jnp.kron)(rotation, side)
  return rotation


def covariance(opt_state, max_size: int = 4096) -> Any:
  """Dense covariance of each leaf's row-major flattening, (size, size) per leaf.

  Cov(vec W) = (Q_1 ⊗ Q_2 ⊗ …) diag(vec V) (Q_1 ⊗ Q_2 ⊗ …)ᵀ (stacked tensors are
  independent: block diagonal). Meant for small leaves: raises if a
  leaf has more than `max_size` entries.
  """
  state = bubble(opt_state)

  def dense(layout, m, v, q):
    size = math.prod(layout.shape)
    if size > max_size:
      raise ValueError(f"covariance: a leaf of shape {layout.shape} has {size} entries, "
                       f"more than max_size={max_size}; use marginal_stddev or sample.")
    rotations = _dense_rotations(layout, q, m.dtype)
    v = jnp.reshape(v, (rotations.shape[0], 1, -1))
    blocks = jnp.matmul(rotations * v, jnp.matrix_transpose(rotations), precision=_EXACT)
    # Stacked matrices are independent: their covariance is block diagonal.
    return jax.scipy.linalg.block_diag(*blocks) if blocks.shape[0] > 1 else blocks[0]

  return _map_leaves(state, dense, lambda m: jnp.zeros((m.size, m.size), jnp.float32))


def _trainable_variances(state):
  return [v for layout, _, v, _ in _per_leaf(state) if layout is not None]


def entropy(opt_state) -> jax.Array:
  """Differential entropy of the whole posterior, ½ Σ log(2πe V) (rotations do not change it)."""
  state = bubble(opt_state)
  return sum((0.5 * jnp.sum(jnp.log(2 * math.pi * math.e * v))
              for v in _trainable_variances(state)), jnp.zeros([], jnp.float32))


def prior(opt_state) -> SoapBubble:
  """The prior an optimizer state regularises towards, as a `SoapBubble`.

  Without a structured prior: N(0, 1/(ess δ) I) per leaf (each group's own ess and δ in a
  combined bubble). With `evon(..., prior=p)`: N(m₀, P₀⁻¹) of `p`, multiplied by the
  isotropic N(0, 1/(ess δ)) when the run's `weight_decay` δ is not 0 — still diagonal in
  the prior's bases Q₀: precision ``π = ess₀ (H₀ + δ₀) + ess δ``, mean ``(ess₀ (H₀+δ₀)/π) ⊙
  m₀°``. The bubble has ess 1 and δ 0, so its `hessian` is that total precision per eigen
  coordinate; every read-out takes it (`sample`, `marginal_stddev`, `kl`). Several groups
  (`optax.partition`) give one bubble of their priors.

  Example (continual learning: task 1's posterior is task 2's prior):
    >>> import jax.numpy as jnp, evon_jax
    >>> params = {"w": jnp.ones((3, 2))}
    >>> task1 = evon_jax.evon(1e-2, ess=100.0).init(params)
    >>> tx = evon_jax.evon(1e-2, ess=50.0, prior=task1)
    >>> task2 = tx.init(evon_jax.posterior.mean(task1))
    >>> p = evon_jax.posterior.prior(task2)        # precision ess₁ (H₁ + δ₁) = 100 (1 + 1e-4)
    >>> bool(jnp.allclose(evon_jax.posterior.marginal_stddev(p)["w"], 100.01 ** -0.5))
    True
    >>> float(evon_jax.posterior.kl(task2, task1)) == float(evon_jax.posterior.kl_to_prior(task2))
    True
  """
  if isinstance(opt_state, SoapBubble):
    return _isotropic_prior(opt_state)
  nodes = [node for node in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, EigenspaceIvonState))
           if isinstance(node, EigenspaceIvonState)]
  if not nodes:  # e.g. a Laplace fit's state
    return _isotropic_prior(bubble(opt_state))
  return combine([_isotropic_prior(node.bubble()) if node.prior is None
                  else _structured_prior(node) for node in nodes])


def _trainable(leaf) -> bool:
  return elementwise_layout(jnp.shape(leaf), jnp.result_type(leaf)).trainable


def _isotropic_prior(state: SoapBubble) -> SoapBubble:
  if any(jnp.ndim(x) for x in jax.tree.leaves(state.weight_decay)):
    raise ValueError("This bubble's δ is per coordinate (it was read from a run with a "
                     "structured prior): pass that optimizer's state to prior / kl_to_prior.")
  treedef = jax.tree.structure(state.mean)
  means, hessians = [], []
  for m, h, (ess, weight_decay) in zip(treedef.flatten_up_to(state.mean),
                                       treedef.flatten_up_to(state.hessian),
                                       _leaf_scalars(state)):
    trainable = _trainable(m)
    means.append(jnp.zeros_like(m) if trainable else m)
    hessians.append(jnp.full(jnp.shape(m), ess * weight_decay, h.dtype) if trainable else h)
  return SoapBubble(treedef.unflatten(means), treedef.unflatten(hessians), (), (),
                    jnp.ones([], jnp.float32), jnp.zeros([], jnp.float32))


def _structured_prior(ivon_state) -> SoapBubble:
  p = ivon_state.prior
  isotropic = ivon_state.ess * ivon_state.weight_decay
  treedef = jax.tree.structure(p.mean)

  def total(precision, mean):
    if not _trainable(mean):  # frozen leaf: its value and a placeholder
      return precision, mean
    combined = precision + isotropic.astype(precision.dtype)
    return combined, (precision / combined * mean).astype(mean.dtype)

  pairs = [total(pr, m) for pr, m in zip(treedef.flatten_up_to(p.precision),
                                        treedef.flatten_up_to(p.mean))]
  return SoapBubble(treedef.unflatten([m for _, m in pairs]),
                    treedef.unflatten([pr for pr, _ in pairs]), (), p.bases,
                    jnp.ones([], jnp.float32), jnp.zeros([], jnp.float32))


def kl(q, p) -> jax.Array:
  """KL(q ‖ p) between two Gaussians over the same parameters, each a `SoapBubble` or a
  state holding one (their bases may differ; a leaf's axes must agree where both rotate).

  Per leaf, with q = N(M°, diag V) in its bases Q and p = N(m_p°, diag(1/π)) in its bases
  Q_p, T = Qᵀ Q_p: ``½ [Σ ((T∘T) π) ⊙ V + Σ π (Tᵀ M° − m_p°)² − n − Σ log π − Σ log V]``
  (`maths.prior.leaf_kl`), summed over trainable leaves.
  """
  q, p = bubble(q), bubble(p)
  treedef = jax.tree.structure(q.mean)
  layouts = stored_layouts(q)
  current = storage_to_bases(q.bases, treedef, layouts)
  priors = prior_maths.leaf_priors(_prior.prior_state(p, q.mean, layouts, current=current),
                                   layouts, treedef)
  total = jnp.zeros([], jnp.float32)
  for (layout, m, v, _), leaf_prior in zip(_per_leaf(q), priors):
    if layout is not None:
      total = total + prior_maths.leaf_kl(m, v, leaf_prior)
  return total


def kl_to_prior(opt_state) -> jax.Array:
  """KL(q ‖ p) of the posterior to the prior the optimizer regularises towards (`prior`):
  N(0, 1/(ess δ) I), or the structured prior of `evon(..., prior=...)`.

  With s² = 1/(ess δ): ½ Σ [V/s² + M²/s² - 1 + log s² - log V]; ‖M‖ is basis independent.
  A combined bubble (several groups) uses each leaf's own ess δ.
  With weight_decay = 0 and no structured prior the prior is improper and the KL is infinite.
  A bubble read from a run with a structured prior (e.g. `tempered(state, T)`) does not
  carry that prior: use ``kl(tempered(state, T), prior(state))``.
  """
  return kl(bubble(opt_state), prior(opt_state))
