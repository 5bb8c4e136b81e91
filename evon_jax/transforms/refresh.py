"""The eigenbasis refresh that owns the bases.

`eigenbasis_refresh(inner, factors=...)` (the factor EMA: `transforms.factors`) rotates the
gradients into the eigenbasis of those factors, runs its inner diagonal method there, rotates the inner's update back out, updates
the factors and, when due, refreshes the bases (power iteration + QR, or eigh; full eigh on the
first call) and re-expresses the inner's eigen-coordinate buffers (`eigen_fields`) in them.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from evon_jax.maths import eigenbasis, prior as prior_maths
from evon_jax.maths.layout import as_view, from_view, tree_layouts
from evon_jax.maths.kronecker import (
    bases_to_storage, empty_bases, num_slots, rotate_in, rotate_out, storage_to_bases)
from evon_jax import _validation as check
from evon_jax.transforms import _protocol as protocol
from evon_jax.transforms.factors import (
    FactorSpec, KroneckerFactorState, _storage_dtypes, _stored_dtypes)
# Re-exported from their old home (`from evon_jax.transforms.refresh import ...`).
from evon_jax.transforms.factors import kl_shampoo_statistics, kronecker_factor_ema  # noqa: F401


# ----------------------------------------------------------------------------- refresh


# Leaves refreshed under one `lax.switch` (when they share a schedule). XLA's CPU runtime runs
# conditionals one after another but the independent LAPACK calls inside one side by side
# (one thread each), so a branch of two leaves keeps both cores busy through the QRs; a
# branch of all leaves makes every leaf's next step wait for every leaf's factors and
# copies the bases and factors each step. Refresh step minus normal step, d = 256, 4 layers
# (`benchmarks.run` shapes), one run, EVON / SOAP: 1 leaf 768 / 732 ms, 2 leaves 575 / 557,
# 4 leaves 618 / 637, all 16 616 / 580 with EVON's normal step 12 ms slower.
LEAVES_PER_REFRESH_BRANCH = 2


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
    return self.inner.bubble(self.bases)._replace(factors=self.factors.factors)

@dataclasses.dataclass(frozen=True)
class RefreshSpec(protocol.Spec):
  inner: protocol.Spec
  factors: FactorSpec
  precondition_frequency: Any = 10  # an int, or a function of the (traced) step
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
  timing: str = "after"
  warmup_steps: int = 0
  adaptive_tolerance: Any = None
  adaptive_per_side: bool = False
  options: eigenbasis.RefreshOptions = eigenbasis.DEFAULT_OPTIONS
  inner_l2: float = 0.0

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

  def _frequency(self, step):
    every = self.precondition_frequency
    return jnp.maximum(jnp.asarray(every(step), jnp.int32), 1) if callable(every) else every

  def _refresh_offset(self, leaf_index: int) -> int:
    if not self.stagger_refresh:
      return 0
    return leaf_index % self.precondition_frequency

  def _rotate_in(self, grads, bases):
    """G ×₁ Q₁ᵀ ×₂ Q₂ᵀ … for a stack of samples. A stack of one sample (a plain gradient,
    or EVON's single Monte-Carlo sample) is rotated without its axis: the same products as
    a lone gradient (so SOAP stays bit-identical to its single-engine form), and no
    axis-permuting copies of the result (a leading axis makes XLA transpose each side's
    product: 32 copies per step on `benchmarks.run`'s d = 256 shapes)."""
    if grads.shape[0] == 1:
      return rotate_in(grads[0], bases, self.rotation_precision)[None]
    return rotate_in(grads, bases, self.rotation_precision)

  def _kind(self, gates, count, leaf_index, factors, bases):
    """This call's refresh of one leaf (KEEP / POWER_QR / EIGH).

    'after': `eigh` on the first call, then every `precondition_frequency` steps.
    'before' (the reference SOAP's schedule, 0-based step t): due when t ≥ warmup_steps and
    t % frequency(t) == 0; `eigh` at t == warmup_steps (the first basis), the periodic
    method afterwards. With `adaptive_tolerance`, a due periodic refresh is skipped while
    every side's basis still diagonalises its factor (`eigenbasis.basis_is_current`).
    """
    periodic = eigenbasis.EIGH if self.refresh_method == "eigh" else eigenbasis.POWER_QR
    every = self._frequency(count)
    if self.timing == "before":
      scheduled = (count >= self.warmup_steps) & (count % every == 0)
      fresh = scheduled & (count == self.warmup_steps)
    else:
      scheduled = (count + self._refresh_offset(leaf_index)) % every == 0
      fresh = gates.first
    def kind_of(scheduled):
      kind = jnp.where(fresh, eigenbasis.EIGH, jnp.where(scheduled, periodic, eigenbasis.KEEP))
      return jnp.where(gates.active, kind, eigenbasis.KEEP).astype(jnp.int32)

    if self.adaptive_tolerance is None:
      return kind_of(scheduled)
    sides = [k for k, basis in enumerate(bases) if basis is not None]

    def current(operands):
      return jnp.stack([jnp.all(eigenbasis.basis_is_current(
          operands[0][k], operands[1][k], self.adaptive_tolerance)) for k in sides])

    # The criterion costs a product F Q per side: only on the steps it decides.
    met = jax.lax.cond(scheduled, current, lambda _: jnp.ones(len(sides), bool),
                       (tuple(factors), tuple(bases)))
    if not self.adaptive_per_side:  # the reference: refresh the leaf unless all sides met it
      return kind_of(scheduled & ~jnp.all(met))
    per_side = dict(zip(sides, [kind_of(scheduled & ~m) for m in met]))
    return tuple(per_side.get(k, kind_of(scheduled)) for k in range(len(bases)))

  def _factors_and_kind(self, i, record, layout, gates, count, factors, bases, factor_traced,
                        replica_axis, prior=None):
    """One leaf's factor statistics and EMA, and the refresh it is due (see `_kind`)."""
    if prior is not None:  # the structured prior's part of the regularised gradient
      leaf_prior, ess = prior
      record = record._replace(
          grads=record.grads + prior_maths.leaf_gradient_at(record.thetas, leaf_prior, ess))
    statistic = self.factors.leaf_statistic(record, layout, factor_traced, gates.active,
                                            replica_axis, factors, bases)
    if self.timing == "before":
      # The reference's order: the factors take this step's gradient, then the schedule
      # (and the adaptive criterion) looks at them.
      factors = self.factors.leaf_update(factors, statistic, gates.active, factor_traced,
                                         count + 1)
      return factors, self._kind(gates, count, i, factors, bases)
    kind = self._kind(gates, count, i, factors, bases)
    factors_on = gates.active & (gates.first | gates.factors_free | eigenbasis.is_due(kind))
    factors = self.factors.leaf_update(factors, statistic, factors_on, factor_traced,
                                       count + 1)
    return factors, kind

  def _schedule_group(self, leaf_index: int):
    """Leaves whose refresh kind is the same value by construction (the same schedule, no
    per-leaf criterion) may refresh under one switch, `LEAVES_PER_REFRESH_BRANCH` at a time
    in tree order; None: the leaf decides alone."""
    if self.adaptive_tolerance is not None:
      return None
    return self._refresh_offset(leaf_index) if self.timing != "before" else 0

  def _inner_buffers(self, inner_state, treedef):
    names = type(inner_state).eigen_fields
    sorted_names = type(inner_state).sorted_fields if self.options.sort else ()
    return (names, protocol.fields(inner_state, names, treedef), sorted_names,
            protocol.fields(inner_state, sorted_names, treedef))

  def _factor_priors(self, inner_state, inner_traced, layouts, treedef, plain):
    """Per leaf (prior, ess) when the factors take the gradient of the regularised objective
    and the inner keeps a structured prior (`kronecker_factor_ema(prior_gradient=True)`);
    else None. A plain gradient tree carries no sampled points, so none is added there."""
    if plain or not self.factors.prior_gradient or getattr(inner_state, "prior", None) is None:
      return [None] * len(layouts)
    ess = self.inner.hyperparams(inner_traced).ess
    return [None if p is None else (p, ess)
            for p in self.inner.prior_leaves(inner_state, layouts, treedef)]

  def _refresh_all(self, message, gates, count, inner_state, factors, bases, treedef,
                   factor_traced, priors):
    """Every leaf's factor update and refresh; the inner state with its buffers moved."""
    names, buffers, sorted_names, per_coordinate = self._inner_buffers(inner_state, treedef)
    changed = [None] * len(bases)
    kinds, groups = {}, {}
    for i, (record, layout) in enumerate(zip(message.leaves, message.layouts)):
      if record is None or not layout.any_rotated:
        continue
      factors[i], kinds[i] = self._factors_and_kind(
          i, record, layout, gates, count, factors[i], bases[i], factor_traced,
          message.replica_axis, priors[i])
      group = self._schedule_group(i)
      groups.setdefault(("alone", i) if group is None else ("shared", group), []).append(i)
    columns = buffers + per_coordinate
    batches = [members[start:start + LEAVES_PER_REFRESH_BRANCH]
               for members in groups.values()
               for start in range(0, len(members), LEAVES_PER_REFRESH_BRANCH)]
    for members in batches:
      leaves = [eigenbasis.LeafRefresh(
          factors[i], bases[i],
          tuple(as_view(column[i], message.layouts[i]) for column in buffers),
          tuple(as_view(column[i], message.layouts[i]) for column in per_coordinate))
          for i in members]
      kind = kinds[members[0]]
      if isinstance(kind, tuple):  # one kind per side
        results = [eigenbasis.refresh(kind, leaf.factors, leaf.basis, leaf.carried,
                                      leaf.permuted, self.options) for leaf in leaves]
      else:
        results = eigenbasis.refresh_leaves(kind, leaves, self.options)
      for i, (new_bases, carried, permuted) in zip(members, results):
        bases[i] = new_bases
        for column, value in zip(columns, tuple(carried) + tuple(permuted)):
          column[i] = from_view(value, message.layouts[i])
        changed[i] = eigenbasis.is_due(kinds[i])
    inner_state = inner_state._replace(**{
        name: treedef.unflatten(column)
        for name, column in zip(names + sorted_names, columns)})
    if getattr(inner_state, "prior", None) is not None:  # what the new bases see of it
      inner_state = self.inner.rebase(inner_state, message.layouts, treedef, bases, changed)
    return inner_state

  def _inner_step(self, message, gates, bases, inner_state, params, inner_traced, treedef):
    """The inner method's step on the gradients rotated into `bases`; its update rotated
    back out with the same bases."""
    thetas = (treedef.flatten_up_to(params) if self.inner_l2 else [None] * len(bases))
    eigen = []
    for rec, q, layout, theta in zip(message.leaves, bases, message.layouts, thetas):
      if rec is None:
        eigen.append(None)
        continue
      grads = rec.grads
      if self.inner_l2:  # L2 on the inner's gradient only (the factors took the plain one)
        grads = grads + self.inner_l2 * as_view(theta, layout).astype(grads.dtype)[None]
      eigen.append(protocol.EigenGradients(self._rotate_in(grads, q), rec.normals))
    inner_out, inner_state = self.inner.apply(
        protocol.Message(eigen, gates, message.layouts, message.replica_axis), inner_state,
        params, inner_traced)
    outs = None
    if self.updates_read:
      outs = [None if rec is None else rotate_out(out, q, self.rotation_precision)
              for rec, out, q in zip(message.leaves, inner_out, bases)]
    return outs, inner_state

  def apply(self, updates, state, params, traced):
    inner_traced, factor_traced = traced
    # The inner's first eigen buffer (IVON's mean, Adam's mu) is params-shaped in the
    # statistics dtype: a plain gradient tree is checked against it.
    message, plain = protocol.as_message(
        updates, params, self.layouts, getattr(state.inner, type(state.inner).eigen_fields[0]))
    reference = updates if params is None else params
    if self.inner_l2 and params is None:
      raise ValueError("eigenbasis_refresh(inner_l2=...) adds inner_l2 * params to the "
                       "gradient: call update(grads, state, params).")
    treedef = jax.tree.structure(reference)
    layouts = message.layouts
    bases = storage_to_bases(state.bases, treedef, layouts)
    factors = storage_to_bases(state.factors.factors, treedef, layouts)
    priors = self._factor_priors(state.inner, inner_traced, layouts, treedef, plain)
    if self.timing == "before":
      # The reference SOAP's order: factors and bases first, then the step in the new basis
      # (the first call is a step too).
      inner_state = self._refresh_all(message, message.gates, state.count, state.inner,
                                      factors, bases, treedef, factor_traced, priors)
      outs, inner_state = self._inner_step(message, message.gates, bases, inner_state,
                                           params, inner_traced, treedef)
    else:
      gates = message.gates._replace(first=message.gates.first | (state.count == 0))
      # SOAP rotates its direction out with the basis it was made in.
      outs, inner_state = self._inner_step(message, gates, bases, state.inner, params,
                                           inner_traced, treedef)
      inner_state = self._refresh_all(message, gates, state.count, inner_state, factors,
                                      bases, treedef, factor_traced, priors)

    dtypes = _stored_dtypes(state.bases, reference, self.dtype)
    slots = len(state.bases)
    new_state = EigenbasisRefreshState(
        count=state.count + message.gates.active.astype(state.count.dtype),
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
    timing: str = "after",
    warmup_steps: int = 0,
    adaptive_tolerance=None,
    adaptive_per_side: bool = False,
    power_iter_steps: int = 1,
    power_shift: float = eigenbasis.POWER_SHIFT,
    sort_columns: bool = False,
    qr_precision="highest",
    inner_l2: float = 0.0,
) -> protocol.PieceTransformation:
  r"""Runs `inner` (a diagonal method) in the eigenbasis of Kronecker factors it keeps.

  Per leaf and call: the gradient is rotated in (``G° = G ×₁ Q₁ᵀ ×₂ Q₂ᵀ …``; a matrix:
  ``Q_Lᵀ G Q_R``), `inner` steps in those coordinates, its update is rotated back out with
  the same bases, the `factors` take the call's statistics, and every
  `precondition_frequency` steps the bases are refreshed from the factors (power iteration
  + QR, or `eigh`; `eigh` on the first call, which only initialises) and the inner's
  eigen-coordinate buffers are re-expressed in the new bases (their parameter-space value
  kept). The refresh runs under a `lax.cond`, on the steps it is due (see `eigenbasis.refresh`).

  Args:
    inner: `eigenspace_ivon(...)` (EVON) or `eigenspace_adam(...)` (SOAP).
    factors: `kronecker_factor_ema(...)`.
    precondition_frequency: steps between refreshes: an int, or a schedule
      ``step -> int`` called with the traced 0-based step (write it with `jnp`, e.g.
      ``lambda t: jnp.where(t < 100, 1, 10)``).
    max_precond_dim: axes longer than this keep the identity basis.
    precondition_1d: give 1-D leaves a basis too.
    refresh_method: 'power_qr' or 'eigh' for the periodic refresh.
    stagger_refresh: leaf i refreshes on steps ≡ -i (mod frequency), spreading the cost.
    stacked_dims, dimension_numbers, merge_dims: which dims form the Kronecker axes
      (see `evon_jax.evon`).
    dtype: dtype of bases and factors (default float32, wider if params are wider).
    rotation_precision: `jax.lax.Precision` of the per-step rotations.
    timing: 'after' (default): the step runs in the bases of the last refresh, then the
      factors take its gradient and the bases are refreshed when due; the first call only
      initialises (factors and an `eigh` basis, a zero step). 'before' (the NVIDIA reference
      SOAP's order, and REKLS's "real-time" refresh): the factors take the step's gradient
      and the due refresh runs first, then the step runs in the new bases; the first call
      is a step. Its schedule counts 0-based steps t: a refresh is due when
      t ≥ `warmup_steps` and t % frequency == 0, `eigh` at t == `warmup_steps`; before
      `warmup_steps` the bases stay the identity (the inner method on plain gradients).
    warmup_steps: see `timing` ('before' only; the reference's `adam_warmup_steps`).
    adaptive_tolerance: if set, a due periodic refresh is skipped while, on every side of the
      leaf, ‖diag(Qᵀ F Q)‖ ≥ (1 - tolerance) ‖F‖_F (the reference's
      `use_adaptive_criteria` / `adaptive_update_tolerance`; never the first basis).
    adaptive_per_side: judge and refresh each side on its own (only the sides whose basis
      no longer diagonalises their factor); False: the reference's rule, the whole leaf
      unless every side meets the criterion.
    power_iter_steps: power iterations (each followed by a QR) per power-QR refresh.
    power_shift: the shift of each power iteration as a fraction of the factor's scale
      (see `eigenbasis.power_qr`; 0: the reference's plain ``qr(F Q)``).
    sort_columns: before a power-QR refresh, order the columns by ``diag(Qᵀ F Q)``
      (descending) and permute the inner's per-coordinate second moments (Adam's nu, IVON's
      H) with them, as the reference does.
    qr_precision: `jax.lax.Precision` of the power iterations' products.
    inner_l2: adds ``inner_l2 · params`` to the gradient the inner method sees, not to the
      factor statistics (the reference's `weight_decay_method='l2'`); needs `params`.
  """
  inner_spec, inner_traced = protocol.spec_of(inner, "eigenbasis_refresh")
  if not protocol.is_diagonal(inner_spec):
    raise TypeError("eigenbasis_refresh wraps a diagonal method: eigenspace_ivon(...) or "
                    f"eigenspace_adam(...), got {type(inner_spec).__name__}.")
  if not callable(precondition_frequency):
    check.check_static_int("precondition_frequency", precondition_frequency, 1)
  elif stagger_refresh:
    raise ValueError("stagger_refresh needs an int precondition_frequency, not a schedule.")
  check.check_static_int("max_precond_dim", max_precond_dim, 0)
  check.check_choice("refresh_method", refresh_method, ("power_qr", "eigh"))
  check.check_choice("timing", timing, ("after", "before"))
  check.check_static_int("warmup_steps", warmup_steps, 0)
  if warmup_steps and timing != "before":
    raise ValueError("warmup_steps belongs to timing='before' (the reference's schedule).")
  if stagger_refresh and timing == "before":
    raise ValueError("stagger_refresh belongs to timing='after'.")
  if adaptive_tolerance is not None:
    check.check_non_negative("adaptive_tolerance", adaptive_tolerance)
  check.check_static_int("power_iter_steps", power_iter_steps, 1)
  check.check_non_negative("power_shift", power_shift)
  check.check_non_negative("inner_l2", inner_l2)
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
      merge_dims=bool(merge_dims), dtype=dtype, rotation_precision=rotation_precision,
      timing=timing, warmup_steps=int(warmup_steps),
      adaptive_tolerance=None if adaptive_tolerance is None else float(adaptive_tolerance),
      adaptive_per_side=bool(adaptive_per_side),
      options=eigenbasis.RefreshOptions(int(power_iter_steps), float(power_shift),
                                        bool(sort_columns), qr_precision),
      inner_l2=float(inner_l2))
  return protocol.transformation(spec, (inner_traced, factor_traced))
