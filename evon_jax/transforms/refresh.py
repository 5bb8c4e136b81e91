"""The Kronecker-factor EMA and the eigenbasis refresh that owns the bases.

`kronecker_factor_ema` keeps, per Kronecker axis k of every leaf, an EMA of G_(k) G_(k)ᵀ.
`eigenbasis_refresh(inner, factors=...)` rotates the gradients into the eigenbasis of those
factors, runs its inner diagonal method there, rotates the inner's update back out, updates
the factors and, when due, refreshes the bases (power iteration + QR, or eigh; full eigh on the
first call) and re-expresses the inner's eigen-coordinate buffers (`eigen_fields`) in them.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from evon_jax.maths import eigenbasis
from evon_jax.maths.gates import ema_coefficients
from evon_jax.maths.layout import as_view, from_view, state_dtype, tree_layouts
from evon_jax.maths.kronecker import (
    bases_to_storage, empty_bases, ema, factor_statistics, mean_factor_statistics, num_slots,
    rotate_in, rotate_out, storage_to_bases)
from evon_jax import _validation as check
from evon_jax.transforms import _protocol as protocol
from evon_jax.transforms._common import (
    join_hyperparams, replica_mean, split_hyperparams, zero_unless)


def _full_layouts(tree):
  """Layouts of a factor EMA used on its own: every axis its own factor (the defaults)."""
  return tree_layouts(tree, max_precond_dim=10000, precondition_1d=False)


def _storage_dtypes(tree, requested):
  """Per leaf, the dtype its factors and bases are kept in (float32 for frozen leaves)."""
  return [state_dtype(jnp.result_type(leaf), requested) for leaf in jax.tree.leaves(tree)]


def _stored_dtypes(stored: tuple, reference, requested):
  """The per-leaf dtypes a state already stores its axis slots in (so an update never changes
  them, e.g. with float32 gradients of float64 params and no `params`); from `reference`
  when there are no slots."""
  if stored:
    return [x.dtype for x in jax.tree.leaves(stored[0])]
  return _storage_dtypes(reference, requested)


# ----------------------------------------------------------------------------- factor EMA


class FactorHyperparams(NamedTuple):
  decay: Any
  regularization: Any


class KroneckerFactorState(NamedTuple):
  """State of `kronecker_factor_ema`.

  Attributes:
    factors: one params-shaped tree per axis slot (see `evon_jax.kronecker`): tree k holds
      every leaf's k-th axis factor (ones((n,)) on identity axes, ones((1,)) past a leaf's
      last axis).
  """

  factors: tuple


@dataclasses.dataclass(frozen=True)
class FactorSpec(protocol.Spec):
  static_hp: tuple
  statistic: str = "mean_gradient"
  dtype: Any = None

  def init(self, params, traced, layouts=None):
    layouts = layouts or _full_layouts(params)
    dtypes = _storage_dtypes(params, self.dtype)
    zeros = [empty_bases(l, d, "zeros") if l.trainable else ()
             for l, d in zip(layouts, dtypes)]
    return KroneckerFactorState(bases_to_storage(
        zeros, layouts, jax.tree.structure(params), num_slots(layouts), dtypes))

  def leaf_statistic(self, record, layout, traced, active, replica_axis):
    """Per axis the statistic of one leaf's step: of the mean (regularized) gradient, or the
    mean of per-sample statistics; zero on an inactive call."""
    hp = join_hyperparams(FactorHyperparams, self.static_hp, traced)
    grads = record.grads
    if not (isinstance(hp.regularization, (int, float)) and hp.regularization == 0):
      grads = grads + hp.regularization * record.thetas  # the gradient of loss + δ/2 |θ|²
    if self.statistic == "per_sample":
      statistic = replica_mean(mean_factor_statistics(grads, layout), replica_axis)
    else:
      statistic = factor_statistics(replica_mean(jnp.mean(grads, axis=0), replica_axis),
                                    layout)
    return zero_unless(active, statistic)

  def leaf_update(self, factors, statistic, on, traced):
    """The EMA of one leaf's factors; (1, 0) coefficients when `on` is False (exact no-op)."""
    hp = join_hyperparams(FactorHyperparams, self.static_hp, traced)
    new = ema(factors, statistic, *ema_coefficients(hp.decay, on))
    return jax.tree.map(lambda n, o: n.astype(o.dtype), new, factors)

  def apply(self, updates, state, params, traced):
    reference = updates if params is None else params
    dtypes = _stored_dtypes(state.factors, reference, self.dtype)
    like = jax.tree.structure(reference).unflatten(  # shapes and dtypes only: dead code
        [jnp.zeros(jnp.shape(x), d) for x, d in zip(jax.tree.leaves(reference), dtypes)])
    message, plain = protocol.as_message(updates, params, _full_layouts, like)
    treedef = jax.tree.structure(reference)
    layouts = message.layouts
    per_leaf = storage_to_bases(state.factors, treedef, layouts)
    new = []
    for record, layout, factors in zip(message.leaves, layouts, per_leaf):
      if record is None or not layout.any_rotated:
        new.append(factors)
        continue
      statistic = self.leaf_statistic(record, layout, traced, message.gates.active,
                                      message.replica_axis)
      new.append(self.leaf_update(factors, statistic, message.gates.active, traced))
    stored = bases_to_storage(new, layouts, treedef, len(state.factors), dtypes)
    return updates, KroneckerFactorState(stored)


def kronecker_factor_ema(decay: float = 0.95, *, statistic: str = "mean_gradient",
                         regularization: float = 0.0, dtype=None) -> protocol.PieceTransformation:
  r"""EMA of the Kronecker factors: per axis k, ``L_k ← decay L_k + (1-decay) G_(k) G_(k)ᵀ``.

  G_(k) is the gradient's mode-k unfolding (for a matrix: ``G Gᵀ`` and ``Gᵀ G``). Used as the
  `factors` of `eigenbasis_refresh`, which decides which axes get factors; on its own it keeps
  a factor per axis (up to 10000) and passes the updates through unchanged.

  Args:
    decay: the EMA's decay (SOAP's `shampoo_beta`).
    statistic: 'mean_gradient' (the statistic of the step's mean gradient) or 'per_sample'
      (the mean of per-sample statistics, one per Monte-Carlo sample).
    regularization: δ: the statistics of ``G + δ θ`` (the gradient of the regularized loss
      at the sampled point θ), whose outer product has the Hessian's eigenvectors at the
      optimum (EVON's `factor_gradient='regularized'`). The sampled points come from
      `inject_noise`: a factor EMA or refresh used on plain gradients has none, and reads δ
      as 0.
    dtype: dtype of the factors (default float32, wider if params are wider).
  """
  check.check_beta("decay", decay)
  check.check_non_negative("regularization", regularization)
  check.check_choice("statistic", statistic, ("mean_gradient", "per_sample"))
  static_hp, traced_hp = split_hyperparams(FactorHyperparams(decay, regularization))
  spec = FactorSpec(static_hp, statistic=statistic, dtype=dtype)
  return protocol.transformation(spec, traced_hp)


# ----------------------------------------------------------------------------- refresh


class EigenbasisRefreshState(NamedTuple):
  """State of `eigenbasis_refresh`.

  Attributes:
    count: calls taken (the first computes the bases by eigh).
    bases: eigenbases Q_1, Q_2, … of the axes: a tuple of params-shaped trees, one per axis
      slot, stored like the factors.
    factors: the factor EMA's state.
    inner: the inner diagonal method's state (its eigen-coordinate buffers in these bases).
  """

  count: jax.Array
  bases: tuple
  factors: Any
  inner: Any

  def bubble(self):
    """The inner's posterior, in these bases."""
    return self.inner.bubble()._replace(factors=self.factors.factors, bases=self.bases)

@dataclasses.dataclass(frozen=True)
class RefreshSpec(protocol.Spec):
  inner: protocol.Spec
  factors: FactorSpec
  precondition_frequency: int = 10
  max_precond_dim: int = 10000
  precondition_1d: bool = False
  refresh_method: str = "power_qr"
  stagger_refresh: bool = False
  stacked_dims: Any = None
  dimension_numbers: Any = None
  merge_dims: bool = False
  dtype: Any = None
  rotation_precision: Any = "highest"
  updates_read: bool = True

  def layouts(self, tree):
    return tree_layouts(tree, max_precond_dim=self.max_precond_dim,
                        precondition_1d=self.precondition_1d, stacked_dims=self.stacked_dims,
                        dimension_numbers=self.dimension_numbers, merge_dims=self.merge_dims)

  def without_updates(self):
    return dataclasses.replace(self, inner=self.inner.without_updates(), updates_read=False)

  def init(self, params, traced, layouts=None):
    inner_traced, factor_traced = traced
    layouts = layouts or self.layouts(params)
    dtypes = _storage_dtypes(params, self.dtype)
    eyes = [empty_bases(l, d, "eye") if l.trainable else () for l, d in zip(layouts, dtypes)]
    return EigenbasisRefreshState(
        count=jnp.zeros([], jnp.int32),
        bases=bases_to_storage(eyes, layouts, jax.tree.structure(params), num_slots(layouts),
                               dtypes),
        factors=self.factors.init(params, factor_traced, layouts),
        inner=self.inner.init(params, inner_traced, layouts))

  def _refresh_offset(self, leaf_index: int) -> int:
    return leaf_index % self.precondition_frequency if self.stagger_refresh else 0

  def _rotate_in(self, grads, bases, plain: bool):
    """G ×₁ Q₁ᵀ ×₂ Q₂ᵀ … for a stack of samples. A plain gradient is rotated without its
    sample axis of one: the same products as a lone gradient, so SOAP stays bit-identical to
    its single-engine form (a leading axis reorders the sums of N-D mode products)."""
    if plain:
      return rotate_in(grads[0], bases, self.rotation_precision)[None]
    return rotate_in(grads, bases, self.rotation_precision)

  def apply(self, updates, state, params, traced):
    inner_traced, factor_traced = traced
    # The inner's first eigen buffer (IVON's mean, Adam's mu) is params-shaped in the
    # statistics dtype: a plain gradient tree is checked against it.
    message, plain = protocol.as_message(
        updates, params, self.layouts, getattr(state.inner, type(state.inner).eigen_fields[0]))
    reference = updates if params is None else params
    treedef = jax.tree.structure(reference)
    layouts = message.layouts
    gates = message.gates._replace(first=message.gates.first | (state.count == 0))
    bases = storage_to_bases(state.bases, treedef, layouts)
    eigen = [None if rec is None else protocol.EigenGradients(
        self._rotate_in(rec.grads, q, plain), rec.normals)
        for rec, q in zip(message.leaves, bases)]
    inner_out, inner_state = self.inner.apply(
        protocol.Message(eigen, gates, layouts, message.replica_axis), state.inner, params,
        inner_traced)

    names = type(inner_state).eigen_fields
    buffers = protocol.fields(inner_state, names, treedef)
    factors = storage_to_bases(state.factors.factors, treedef, layouts)
    outs = []
    for i, (record, layout) in enumerate(zip(message.leaves, layouts)):
      if record is None:
        outs.append(None)
        continue
      if self.updates_read:  # SOAP rotates its direction out with the basis it was made in
        outs.append(rotate_out(inner_out[i], bases[i], self.rotation_precision))
      if not layout.any_rotated:
        continue
      kind = eigenbasis.refresh_kind(gates.first, state.count, self.precondition_frequency,
                                     self._refresh_offset(i), self.refresh_method)
      kind = jnp.where(gates.active, kind, eigenbasis.KEEP)
      factors_on = gates.active & (gates.first | gates.factors_free | (kind != eigenbasis.KEEP))
      statistic = self.factors.leaf_statistic(record, layout, factor_traced, gates.active,
                                              message.replica_axis)
      factors[i] = self.factors.leaf_update(factors[i], statistic, factors_on, factor_traced)
      carried = [as_view(column[i], layout) for column in buffers]
      bases[i], carried = eigenbasis.refresh(kind, factors[i], bases[i], carried,
                                             in_place=not self.updates_read)
      for column, value in zip(buffers, carried):
        column[i] = from_view(value, layout)

    dtypes = _stored_dtypes(state.bases, reference, self.dtype)
    slots = len(state.bases)
    inner_state = inner_state._replace(
        **{name: treedef.unflatten(column) for name, column in zip(names, buffers)})
    new_state = EigenbasisRefreshState(
        count=state.count + gates.active.astype(state.count.dtype),
        bases=bases_to_storage(bases, layouts, treedef, slots, dtypes),
        factors=KroneckerFactorState(bases_to_storage(factors, layouts, treedef, slots,
                                                      dtypes)),
        inner=inner_state)
    if not self.updates_read:
      return None, new_state
    return protocol.outputs(outs, updates, layouts, plain), new_state


def eigenbasis_refresh(
    inner,
    *,
    factors,
    precondition_frequency: int = 10,
    max_precond_dim: int = 10000,
    precondition_1d: bool = False,
    refresh_method: str = "power_qr",
    stagger_refresh: bool = False,
    stacked_dims=None,
    dimension_numbers=None,
    merge_dims: bool = False,
    dtype=None,
    rotation_precision="highest",
) -> protocol.PieceTransformation:
  r"""Runs `inner` (a diagonal method) in the eigenbasis of Kronecker factors it keeps.

  Per leaf and call: the gradient is rotated in (``G° = G ×₁ Q₁ᵀ ×₂ Q₂ᵀ …``; a matrix:
  ``Q_Lᵀ G Q_R``), `inner` steps in those coordinates, its update is rotated back out with
  the same bases, the `factors` take the call's statistics, and every
  `precondition_frequency` steps the bases are refreshed from the factors (power iteration
  + QR, or `eigh`; `eigh` on the first call, which only initialises) and the inner's
  eigen-coordinate buffers are re-expressed in the new bases (their parameter-space value
  kept). The refresh runs under a loop taken zero or one times (see `eigenbasis.refresh`).

  Args:
    inner: `eigenspace_ivon(...)` (EVON) or `eigenspace_adam(...)` (SOAP).
    factors: `kronecker_factor_ema(...)`.
    precondition_frequency: steps between refreshes.
    max_precond_dim: axes longer than this keep the identity basis.
    precondition_1d: give 1-D leaves a basis too.
    refresh_method: 'power_qr' or 'eigh' for the periodic refresh.
    stagger_refresh: leaf i refreshes on steps ≡ -i (mod frequency), spreading the cost.
    stacked_dims, dimension_numbers, merge_dims: which dims form the Kronecker axes
      (see `evon_jax.evon`).
    dtype: dtype of bases and factors (default float32, wider if params are wider).
    rotation_precision: `jax.lax.Precision` of the per-step rotations.
  """
  inner_spec, inner_traced = protocol.spec_of(inner, "eigenbasis_refresh")
  if not protocol.is_diagonal(inner_spec):
    raise TypeError("eigenbasis_refresh wraps a diagonal method: eigenspace_ivon(...) or "
                    f"eigenspace_adam(...), got {type(inner_spec).__name__}.")
  check.check_static_int("precondition_frequency", precondition_frequency, 1)
  check.check_static_int("max_precond_dim", max_precond_dim, 0)
  check.check_choice("refresh_method", refresh_method, ("power_qr", "eigh"))
  check.check_stacked_dims(stacked_dims)
  check.check_dimension_numbers(dimension_numbers, merge_dims)
  factor_spec, factor_traced = protocol.spec_of(factors, "eigenbasis_refresh(factors=...)")
  if not isinstance(factor_spec, FactorSpec):
    raise TypeError("eigenbasis_refresh: `factors` must be evon_jax.kronecker_factor_ema(...).")
  spec = RefreshSpec(
      inner_spec, factor_spec, precondition_frequency=precondition_frequency,
      max_precond_dim=max_precond_dim, precondition_1d=precondition_1d,
      refresh_method=refresh_method, stagger_refresh=stagger_refresh,
      stacked_dims=stacked_dims, dimension_numbers=dimension_numbers,
      merge_dims=bool(merge_dims), dtype=dtype, rotation_precision=rotation_precision)
  return protocol.transformation(spec, (inner_traced, factor_traced))
