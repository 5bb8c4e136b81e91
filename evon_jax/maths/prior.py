"""A Gaussian prior given as a SOAP-Bubble, seen from another Kronecker basis.

Per leaf the prior N(m₀, P₀⁻¹) lives in its own eigenbasis Q₀ (one matrix per Kronecker
axis, or the identity): ``P₀ = Q₀ diag(π₀) Q₀ᵀ`` with ``π₀ = ess₀ (H₀ + δ₀)`` and
``m₀ = Q₀ m₀°`` — exactly the posterior a SOAP-Bubble describes, so the posterior of one
task is the prior of the next. A run whose current basis is Q (EVON's, or the identity for
IVON) needs two things per example (÷ ess), with the per-axis transitions ``T = Qᵀ Q₀``:

* the prior's gradient at the mean, exactly:
  ``Qᵀ P₀ (M − m₀) / ess = T (π₀/ess ⊙ (Tᵀ M° − m₀°))`` — two mode products per axis;
* the diagonal of the prior precision in the current basis:
  ``diag(Qᵀ P₀ Q) / ess = (T∘T) π₀/ess`` — one mode product per axis with ``T∘T``.

IVON's update uses the first as the gradient of its prior term and the second where the
isotropic prior has δ (the per-coordinate prior precision of its diagonal Gaussian). When Q
diagonalises the whole posterior precision (the loss Hessian plus P₀/ess) the diagonal is
exact as well; when Q = Q₀ it is π₀/ess itself.

T and ``(T∘T) π₀`` change only when Q does: the state caches them (`PriorState.transitions`,
`.seen`) and `eigenbasis_refresh` recomputes them on the steps that refresh a leaf's bases
(`rebased`), so a step pays only the two mode products of the gradient.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from evon_jax.maths.kronecker import AxisBases, rotate_in, rotate_out, stored_layout
from evon_jax.maths.layout import LeafLayout

_EXACT = jax.lax.Precision.HIGHEST


class PriorState(NamedTuple):
  """A structured Gaussian prior, stored in its own eigen coordinates, and what the current
  basis sees of it.

  Attributes:
    mean: m₀°, the prior mean in the prior's eigen coordinates (params-shaped; a frozen
      leaf keeps its value).
    precision: π₀ = ess₀ (H₀ + δ₀), the prior's total precision per eigen coordinate
      (params-shaped; a frozen leaf: a scalar placeholder).
    bases: the prior's bases, stored as a `SoapBubble` stores them (a tuple of
      params-shaped trees, one per axis slot; () for a diagonal prior).
    transitions: per axis slot T = Qᵀ Q₀ for the run's current bases Q (stored like bases:
      ones((1,)) where both sides are the identity).
    seen: diag(Qᵀ P₀ Q) = (T∘T) π₀, the prior's total precision per coordinate of the
      current basis (params-shaped).
  """

  mean: Any
  precision: Any
  bases: tuple
  transitions: tuple
  seen: Any


class PriorLeaf(NamedTuple):
  """One leaf's prior in the view the computations run in (see `leaf_prior`)."""

  mean: jax.Array          # m₀°, in `view_shape`
  precision: jax.Array     # π₀, in `view_shape`
  bases: AxisBases         # Q₀ per axis of the view (None: identity)
  view_shape: tuple
  transitions: AxisBases   # T = Qᵀ Q₀ per axis (None: identity on both sides)
  seen: jax.Array          # (T∘T) π₀, in `view_shape`


def _trimmed(layout: LeafLayout) -> tuple[tuple, tuple]:
  """(batch, axes) with the trailing identity axes of size one dropped (they do not change
  the view; a stored layout never has them)."""
  axes, rotated = list(layout.axes), list(layout.rotated)
  while axes and axes[-1] == 1 and not rotated[-1]:
    axes.pop()
    rotated.pop()
  return tuple(layout.batch), tuple(axes)


def check_compatible(prior: LeafLayout, current: LeafLayout, name: str) -> None:
  """A clear error when both the prior and the run rotate a leaf, along different axes."""
  if prior.any_rotated and current.any_rotated and _trimmed(prior) != _trimmed(current):
    raise ValueError(
        f"Leaf {name}: the prior's Kronecker axes {prior.axes} (stacked dims "
        f"{prior.batch}) differ from this optimizer's {current.axes} (stacked dims "
        f"{current.batch}). A "
        "structured prior needs the same stacked_dims / dimension_numbers as the run it "
        "came from, or a diagonal prior (IVON's).")


def _view_and_bases(mean, slots, current: LeafLayout):
  """The view the computations run in — the run's own when it rotates the leaf (the prior
  then has the same axes or none), else the prior's — and Q₀ per axis of that view."""
  own = stored_layout(mean, slots)
  if current.any_rotated:
    batch, axes = _trimmed(current)
  elif own.any_rotated:
    batch, axes = own.batch, own.axes
  else:
    batch, axes = (), tuple(jnp.shape(mean))
  if own.any_rotated:
    bases = [s if s.ndim >= 2 else None for s in slots[:len(own.axes)]]
  else:
    bases = []
  return batch + tuple(axes), tuple((bases + [None] * len(axes))[:len(axes)])


def view_bases(bases: AxisBases, count: int) -> AxisBases:
  """The run's bases (None or () for the identity) aligned with `count` axes of the view."""
  return tuple((list(bases or ()) + [None] * count)[:count])


def transitions(current: AxisBases, prior: AxisBases) -> AxisBases:
  """Per axis T = Qᵀ Q₀ (Qᵀ when the prior axis is the identity, Q₀ when the run's is)."""
  out = []
  for q, q0 in zip(current, prior):
    if q is None:
      out.append(q0)
    elif q0 is None:
      out.append(jnp.matrix_transpose(q))
    else:
      out.append(jnp.matmul(jnp.matrix_transpose(q), q0.astype(q.dtype), precision=_EXACT))
  return tuple(out)


def _squared(bases: AxisBases) -> AxisBases:
  return tuple(None if b is None else jnp.square(b) for b in bases)


def leaf_cache(current: AxisBases, bases: AxisBases, precision: jax.Array):
  """(T, (T∘T) π₀) for the run's current bases (aligned with the view's axes)."""
  t = transitions(current, bases)
  return t, rotate_out(precision, _squared(t), _EXACT)


def leaf_prior(mean, precision, slots, current: LeafLayout, transitions_=None,
               seen=None, current_bases: AxisBases = ()) -> PriorLeaf:
  """One leaf's prior in the view the computations run in. Without a cache (`transitions_`,
  `seen`) it is computed from `current_bases`, the run's bases (identity when empty)."""
  view, bases = _view_and_bases(mean, slots, current)
  mean, precision = jnp.reshape(mean, view), jnp.reshape(precision, view)
  if transitions_ is None:
    transitions_, seen = leaf_cache(view_bases(current_bases, len(bases)), bases, precision)
  return PriorLeaf(mean, precision, bases, view, tuple(transitions_), jnp.reshape(seen, view))


def leaf_terms(mean: jax.Array, prior: PriorLeaf, ess):
  """(diag(Qᵀ P₀ Q)/ess, Qᵀ P₀ (M − m₀)/ess) in the run's eigen coordinates, shaped like
  `mean` (M°, the run's mean in its eigen coordinates)."""
  scaled = (prior.precision / ess).astype(mean.dtype)
  t = prior.transitions
  in_prior = rotate_in(jnp.reshape(mean, prior.view_shape), t, _EXACT) - prior.mean
  gradient = rotate_out(scaled * in_prior, t, _EXACT)
  return (jnp.reshape(prior.seen / ess, mean.shape).astype(mean.dtype),
          jnp.reshape(gradient, mean.shape).astype(mean.dtype))


def leaf_gradient_at(points: jax.Array, prior: PriorLeaf, ess) -> jax.Array:
  """P₀ (θ − m₀)/ess in parameter coordinates for a stack of points θ (leading sample axis,
  then the run's view of the leaf): the structured prior's part of the regularised gradient
  the Kronecker factors take."""
  stack = jnp.reshape(points, points.shape[:1] + prior.view_shape)
  scaled = (prior.precision / ess).astype(points.dtype)
  in_prior = rotate_in(stack, prior.bases, _EXACT) - prior.mean[None]
  return jnp.reshape(rotate_out(scaled[None] * in_prior, prior.bases, _EXACT), points.shape)


def leaf_kl(mean: jax.Array, variance: jax.Array, prior: PriorLeaf):
  """KL(q ‖ p) of one leaf: q = N(M°, diag V) in the run's basis Q, p the prior.

  ``½ [Σ ((T∘T) π₀) ⊙ V + Σ π₀ ⊙ (Tᵀ M° − m₀°)² − n − Σ log π₀ − Σ log V]``: the trace
  term is tr(P₀ Σ_q) with Σ_q = Q diag(V) Qᵀ, the second the Mahalanobis distance of the
  means in the prior's coordinates (π₀ here is the prior's total precision, not per
  example)."""
  precision = prior.precision.astype(variance.dtype)
  difference = rotate_in(jnp.reshape(mean, prior.view_shape), prior.transitions,
                         _EXACT) - prior.mean
  v = jnp.reshape(variance, prior.view_shape)
  return 0.5 * (jnp.sum(prior.seen * v) + jnp.sum(precision * difference ** 2) - v.size
                - jnp.sum(jnp.log(precision)) - jnp.sum(jnp.log(v)))


# ----------------------------------------------------------------------------- a whole tree


def _slots(tree_slots: tuple, treedef) -> list:
  columns = [treedef.flatten_up_to(tree) for tree in tree_slots]
  return [[column[i] for column in columns] for i in range(treedef.num_leaves)]


def _stored(t: AxisBases, count: int, dtype) -> list:
  """A leaf's transitions as `count` slots (ones((1,)) for an identity axis)."""
  padded = list(t) + [None] * (count - len(t))
  return [jnp.ones((1,), dtype) if x is None else x for x in padded]


def new_state(mean, precision, bases: tuple, layouts: Sequence[LeafLayout], treedef,
              current: Sequence[AxisBases]) -> PriorState:
  """The `PriorState` of a prior (its mean, total precision and stored bases, trees like
  the params) for the run's `layouts` and its current bases (per leaf, aligned with the
  layout's axes; () for the identity)."""
  means, precisions = treedef.flatten_up_to(mean), treedef.flatten_up_to(precision)
  slots = _slots(bases, treedef)
  leaves = [None if not layout.trainable else leaf_prior(m, p, s, layout, current_bases=q)
            for m, p, s, layout, q in zip(means, precisions, slots, layouts, current)]
  count = max([len(leaf.bases) for leaf in leaves if leaf is not None] + [1])
  stored, seen = [], []
  for leaf, p in zip(leaves, precisions):
    if leaf is None:
      stored.append(_stored((), count, p.dtype))
      seen.append(p)
      continue
    stored.append(_stored(leaf.transitions, count, p.dtype))
    seen.append(jnp.reshape(leaf.seen, jnp.shape(p)))
  transitions_ = tuple(treedef.unflatten([s[k] for s in stored]) for k in range(count))
  return PriorState(mean, precision, bases, transitions_, treedef.unflatten(seen))


def leaf_priors(state: Optional[PriorState], layouts: Sequence[LeafLayout], treedef) -> list:
  """Per leaf its `PriorLeaf` (with the cached transitions) in the view of `layouts` (the
  run's), None for frozen leaves or when there is no prior."""
  if state is None:
    return [None] * len(layouts)
  out = []
  for layout, mean, precision, slots, cached, seen in zip(
      layouts, treedef.flatten_up_to(state.mean), treedef.flatten_up_to(state.precision),
      _slots(state.bases, treedef), _slots(state.transitions, treedef),
      treedef.flatten_up_to(state.seen)):
    if not layout.trainable:
      out.append(None)
      continue
    _, bases = _view_and_bases(mean, slots, layout)
    t = tuple(x if x.ndim >= 2 else None for x in cached[:len(bases)])
    out.append(leaf_prior(mean, precision, slots, layout, t, seen))
  return out


def rebased(state: PriorState, layouts, treedef, current: Sequence[AxisBases],
            changed: Sequence) -> PriorState:
  """The cache recomputed for the run's new bases, on the leaves whose bases `changed` (a
  traced flag per leaf, or None for a leaf that never changes): a `lax.cond` per leaf, so
  a step without a refresh pays only the test."""
  priors = leaf_priors(state, layouts, treedef)
  stored, seen = _slots(state.transitions, treedef), treedef.flatten_up_to(state.seen)
  for i, (prior, flag, q) in enumerate(zip(priors, changed, current)):
    if prior is None or flag is None:
      continue

    def fresh(_, prior=prior, q=q, old=stored[i]):
      t, s = leaf_cache(view_bases(q, len(prior.bases)), prior.bases, prior.precision)
      return [a.astype(b.dtype) for a, b in zip(_stored(t, len(old), old[0].dtype), old)], s

    def kept(_, prior=prior, old=stored[i]):
      return list(old), prior.seen

    new_slots, new_seen = jax.lax.cond(flag, fresh, kept, None)
    stored[i] = new_slots
    seen[i] = jnp.reshape(new_seen, jnp.shape(seen[i])).astype(seen[i].dtype)
  count = len(state.transitions)
  return state._replace(
      transitions=tuple(treedef.unflatten([s[k] for s in stored]) for k in range(count)),
      seen=treedef.unflatten(seen))
