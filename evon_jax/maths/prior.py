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
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from evon_jax.maths.kronecker import AxisBases, rotate_in, rotate_out, stored_layout
from evon_jax.maths.layout import LeafLayout

_EXACT = jax.lax.Precision.HIGHEST


class PriorState(NamedTuple):
  """A structured Gaussian prior, stored in its own eigen coordinates.

  Attributes:
    mean: m₀°, the prior mean in the prior's eigen coordinates (params-shaped; a frozen
      leaf keeps its value).
    precision: π₀ = ess₀ (H₀ + δ₀), the prior's total precision per eigen coordinate
      (params-shaped; a frozen leaf: a scalar placeholder).
    bases: the prior's bases, stored as a `SoapBubble` stores them (a tuple of
      params-shaped trees, one per axis slot; () for a diagonal prior).
  """

  mean: Any
  precision: Any
  bases: tuple


class PriorLeaf(NamedTuple):
  """One leaf's prior in the view the computations run in (see `leaf_priors`)."""

  mean: jax.Array        # m₀°, in `view_shape`
  precision: jax.Array   # π₀, in `view_shape`
  bases: AxisBases       # Q₀ per axis of the view (None: identity)
  view_shape: tuple


def _trimmed(layout: LeafLayout, bases: Sequence) -> tuple[tuple, tuple, list]:
  """(batch, axes, bases) with the trailing identity axes of size one dropped (they do not
  change the view; a stored layout never has them)."""
  axes, bases = list(layout.axes), list(bases) + [None] * (len(layout.axes) - len(bases))
  while axes and axes[-1] == 1 and bases[-1] is None:
    axes.pop()
    bases.pop()
  return tuple(layout.batch), tuple(axes), bases


def prior_layout(mean: jax.Array, slots: Sequence[jax.Array]) -> LeafLayout:
  """The prior's own layout of one leaf, read from its stored mean and bases."""
  return stored_layout(mean, slots)


def check_compatible(prior: LeafLayout, current: LeafLayout, name: str) -> None:
  """A clear error when both the prior and the run rotate a leaf, along different axes."""
  if not (prior.any_rotated and current.any_rotated):
    return
  if _trimmed(prior, [])[:2] != _trimmed(current, [])[:2]:
    raise ValueError(
        f"Leaf {name}: the prior's Kronecker axes {prior.batch + prior.axes} differ from "
        f"this optimizer's {current.batch + current.axes} (stacked dims first). A "
        "structured prior needs the same stacked_dims / dimension_numbers as the run it "
        "came from, or a diagonal prior (IVON's).")


def leaf_prior(mean: jax.Array, precision: jax.Array, slots: Sequence[jax.Array],
               current: LeafLayout) -> PriorLeaf:
  """One leaf's prior in the view the computations run in: the run's own view when the run
  rotates the leaf (the prior then has the same axes or none), else the prior's."""
  own = prior_layout(mean, slots)
  if own.any_rotated:
    columns = [s if s.ndim >= 2 else None for s in slots]
    _, _, bases = _trimmed(own, columns[:len(own.axes)])
    view = own.batch + tuple(own.axes)
  else:
    view = current.view_shape if current.any_rotated else tuple(jnp.shape(mean))
    axes = len(view) - (len(current.batch) if current.any_rotated else 0)
    bases = [None] * axes
  if current.any_rotated:  # the run's view; the prior's bases (if any) align with it
    batch, axes, _ = _trimmed(current, [])
    view = batch + axes
    bases = (bases + [None] * len(axes))[:len(axes)]
  return PriorLeaf(jnp.reshape(mean, view), jnp.reshape(precision, view), tuple(bases), view)


def _current_bases(bases: AxisBases, count: int) -> list:
  """The run's bases aligned with the prior view's axes (identity where it has none)."""
  bases = list(bases or ())
  return (bases + [None] * count)[:count]


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


def leaf_precision(bases: AxisBases, prior: PriorLeaf, ess, shape) -> jax.Array:
  """diag(Qᵀ P₀ Q)/ess in the run's eigen coordinates, in `shape`: (T∘T) π₀/ess."""
  t = transitions(_current_bases(bases, len(prior.bases)), prior.bases)
  scaled = prior.precision / ess
  return jnp.reshape(rotate_out(scaled, _squared(t), _EXACT), shape)


def leaf_terms(mean: jax.Array, bases: AxisBases, prior: PriorLeaf, ess):
  """(diag(Qᵀ P₀ Q)/ess, Qᵀ P₀ (M − m₀)/ess) in the run's eigen coordinates, shaped like
  `mean` (M°, the run's mean in its eigen coordinates)."""
  t = transitions(_current_bases(bases, len(prior.bases)), prior.bases)
  scaled = (prior.precision / ess).astype(mean.dtype)
  in_prior = rotate_in(jnp.reshape(mean, prior.view_shape), t, _EXACT) - prior.mean
  gradient = rotate_out(scaled * in_prior, t, _EXACT)
  precision = rotate_out(scaled, _squared(t), _EXACT)
  return (jnp.reshape(precision, mean.shape).astype(mean.dtype),
          jnp.reshape(gradient, mean.shape).astype(mean.dtype))


def leaf_gradient_at(points: jax.Array, prior: PriorLeaf, ess) -> jax.Array:
  """P₀ (θ − m₀)/ess in parameter coordinates for a stack of points θ (leading sample axis,
  then the run's view of the leaf): the structured prior's part of the regularised gradient
  the Kronecker factors take."""
  stack = jnp.reshape(points, points.shape[:1] + prior.view_shape)
  scaled = (prior.precision / ess).astype(points.dtype)
  in_prior = rotate_in(stack, prior.bases, _EXACT) - prior.mean[None]
  return jnp.reshape(rotate_out(scaled[None] * in_prior, prior.bases, _EXACT), points.shape)


def leaf_priors(state: Optional[PriorState], layouts: Sequence[LeafLayout], treedef) -> list:
  """Per leaf its `PriorLeaf` in the view of `layouts` (the run's), None for frozen leaves
  or when there is no prior."""
  if state is None:
    return [None] * len(layouts)
  means = treedef.flatten_up_to(state.mean)
  precisions = treedef.flatten_up_to(state.precision)
  columns = [treedef.flatten_up_to(tree) for tree in state.bases]
  out = []
  for i, (layout, mean, precision) in enumerate(zip(layouts, means, precisions)):
    if not layout.trainable:
      out.append(None)
      continue
    out.append(leaf_prior(mean, precision, [column[i] for column in columns], layout))
  return out


def leaf_kl(mean: jax.Array, variance: jax.Array, bases: AxisBases, prior: PriorLeaf):
  """KL(q ‖ p) of one leaf: q = N(M°, diag V) in the run's basis Q, p the prior.

  ``½ [Σ ((T∘T) π₀) ⊙ V + Σ π₀ ⊙ (Tᵀ M° − m₀°)² − n − Σ log π₀ − Σ log V]``: the trace
  term is tr(P₀ Σ_q) with Σ_q = Q diag(V) Qᵀ, the second the Mahalanobis distance of the
  means in the prior's coordinates (π₀ here is the prior's total precision, not per
  example)."""
  t = transitions(_current_bases(bases, len(prior.bases)), prior.bases)
  precision = prior.precision.astype(variance.dtype)
  seen = rotate_out(precision, _squared(t), _EXACT)
  difference = rotate_in(jnp.reshape(mean, prior.view_shape), t, _EXACT) - prior.mean
  v = jnp.reshape(variance, prior.view_shape)
  return 0.5 * (jnp.sum(seen * v) + jnp.sum(precision * difference ** 2) - v.size
                - jnp.sum(jnp.log(precision)) - jnp.sum(jnp.log(v)))
