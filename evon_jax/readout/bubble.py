"""The SOAP-Bubble: the one posterior type every evon_jax read-out takes.

A SOAP-Bubble is a Gaussian over a network's weights with Kronecker-structured eigenbases:
per leaf ``W = M + E ×₁ Q₁ ×₂ Q₂ …`` (for a matrix ``M + Q_L E Q_Rᵀ``), ``E`` diagonal
Gaussian with variances ``V = 1 / (ess (H + δ))``. EVON's state holds one (read it with
`evon_jax.posterior.bubble`), a post-hoc Laplace fit returns one, IVON's is the case without
bases. `records` turns it into per-leaf `EigenPosterior`s and `draw` is the one sampler.
"""

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from evon_jax.maths import ivon_update as ivon_step
from evon_jax.maths.layout import LeafLayout, elementwise_layout
from evon_jax.maths.kronecker import AxisBases, rotate_in, rotate_out, stored_layout


class SoapBubble(NamedTuple):
  """A SOAP-Bubble posterior (see the module docstring).

  Attributes:
    mean: the mean M° in eigen coordinates, params-shaped (a frozen leaf: its value).
    hessian: the diagonal precision per example H in eigen coordinates, params-shaped (a
      frozen leaf: a scalar placeholder).
    factors: the Kronecker factors the bases are eigenvectors of, stored like `bases`
      (() when unknown or without bases).
    bases: the eigenbases per Kronecker axis: a tuple of params-shaped trees, tree k holding
      every leaf's k-th axis basis (ones((n,)) on identity axes; see `evon_jax.kronecker`);
      () for a diagonal posterior.
    ess: the effective sample size: a scalar, or (a bubble `combine` made of several
      posteriors, e.g. two EVONs under `optax.partition`) a params-shaped tree of scalars.
    weight_decay: δ, the prior precision per example (a scalar or a tree, as `ess`).
  """

  mean: Any
  hessian: Any
  factors: tuple
  bases: tuple
  ess: jax.Array
  weight_decay: jax.Array


class EigenPosterior(NamedTuple):
  """One leaf's Gaussian in eigen coordinates."""

  mean: jax.Array      # parameter-shaped
  std: jax.Array       # parameter-shaped: 1/sqrt(ess (H + δ))
  bases: AxisBases     # () without bases
  layout: LeafLayout


def per_leaf_scalar(value, treedef) -> list:
  """`ess` or `weight_decay` of a bubble, one entry per leaf of its mean's `treedef`: a
  scalar is every leaf's, a tree (a `combine`d bubble) gives each leaf its own."""
  leaves = jax.tree.leaves(value)
  if len(leaves) == 1:  # one scalar (possibly wrapped, e.g. in an nnx Variable)
    return leaves * treedef.num_leaves
  return treedef.flatten_up_to(value)


def records(bubble: SoapBubble) -> list:
  """Per leaf its `EigenPosterior`, or None for a frozen (integer or empty) leaf."""
  treedef = jax.tree.structure(bubble.mean)
  columns = [treedef.flatten_up_to(tree) for tree in bubble.bases]
  ess = per_leaf_scalar(bubble.ess, treedef)
  weight_decay = per_leaf_scalar(bubble.weight_decay, treedef)
  out = []
  for i, (mean, hessian) in enumerate(zip(treedef.flatten_up_to(bubble.mean),
                                          treedef.flatten_up_to(bubble.hessian))):
    if not elementwise_layout(jnp.shape(mean), jnp.result_type(mean)).trainable:
      out.append(None)
      continue
    layout = stored_layout(mean, [column[i] for column in columns])
    bases = tuple(columns[k][i] if rotated else None for k, rotated in enumerate(layout.rotated)
                  ) if layout.any_rotated else ()
    std = ivon_step.posterior_std(hessian, jnp.asarray(ess[i]).astype(hessian.dtype),
                                  jnp.asarray(weight_decay[i]).astype(hessian.dtype))
    out.append(EigenPosterior(mean, std, bases, layout))
  return out


def draw(record: EigenPosterior, normals, noise_scale, precision="highest", centered=False):
  """The one sampler: Q (M° + scale · sqrt(V) ⊙ z) Qᵀ, in parameter shape.

  `normals` (the leaf's own shape, or with a leading sample axis) are standard normal draws
  in eigen coordinates, or None for the mean; `noise_scale` is 0 or 1; `centered` leaves the
  mean out (the deviation W - M, without cancellation).
  """
  if normals is None:  # the mean
    view = jnp.reshape(record.mean, record.layout.view_shape)
    return jnp.reshape(rotate_out(view, record.bases, precision), record.mean.shape)
  mean, std = record.mean, noise_scale * record.std
  stacked = normals.ndim > mean.ndim
  if stacked:
    mean, std = mean[None], std[None]
  eigen = std * normals if centered else mean + std * normals
  view = jnp.reshape(eigen, eigen.shape[:1] * stacked + record.layout.view_shape)
  return jnp.reshape(rotate_out(view, record.bases, precision), eigen.shape)


def eigen_normals(record: EigenPosterior, draws, precision="highest"):
  """Standard normal draws ξ made in parameter coordinates, expressed in eigen coordinates:
  ``Qᵀ ξ`` (the leaf's own shape, or with a leading sample axis).

  ``Qᵀ ξ`` is again standard normal (Q is orthonormal), so ``draw(record, Qᵀ ξ, 1)`` is a
  sample of the same posterior: ``M + Q (√V ⊙ Qᵀ ξ) Qᵀ = M + Σ^{1/2} ξ``, the symmetric
  square root of the covariance. Unlike ``M + Q (√V ⊙ z)`` with z drawn in eigen
  coordinates, it does not depend on which basis `eigh` or a QR picks inside a subspace
  where V is (nearly) constant — a degenerate or ill-determined eigenspace — so a tiny
  change of the factors gives a tiny change of the sample (`inject_noise(noise_basis=
  'parameter')`)."""
  if not record.bases:
    return draws
  leading = draws.shape[:draws.ndim - record.mean.ndim]
  view = jnp.reshape(draws, leading + record.layout.view_shape)
  return jnp.reshape(rotate_in(view, record.bases, precision), draws.shape)


def _masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def _slots_of(tree) -> list:
  """A tree's leaves with `optax.MaskedNode` kept as a leaf (one slot per parameter)."""
  return jax.tree.flatten(tree, is_leaf=_masked)[0]


def combine(bubbles: Sequence[SoapBubble]) -> SoapBubble:
  """One bubble of several posteriors that own disjoint leaves of the same parameter tree.

  Under `optax.partition` (or `masked`) each posterior holds `optax.MaskedNode` where
  another optimizer owns the leaf: the combined bubble takes every leaf from the posterior
  that owns it (MaskedNode where none does) and keeps each leaf's own `ess` and δ in
  params-shaped trees. The groups are independent, so the product is the joint posterior.
  """
  bubbles = list(bubbles)
  if len(bubbles) == 1:
    return bubbles[0]
  for b in bubbles:
    if any(jnp.ndim(x) for x in jax.tree.leaves(b.ess)):
      raise ValueError("combine takes bubbles with a scalar ess.")
  treedef = jax.tree.structure(bubbles[0].mean, is_leaf=_masked)
  if any(jax.tree.structure(b.mean, is_leaf=_masked) != treedef for b in bubbles[1:]):
    raise ValueError("The posteriors do not share one parameter tree; combine reads "
                     "several posteriors of one model (e.g. the groups of optax.partition).")
  means = [_slots_of(b.mean) for b in bubbles]
  owners = []
  for i in range(treedef.num_leaves):
    owning = [k for k, leaves in enumerate(means) if not _masked(leaves[i])]
    if len(owning) > 1:
      raise ValueError(f"Leaf {i} of the parameter tree is held by {len(owning)} posteriors "
                       "(two EVON/IVON states over the same leaves); each leaf may have one.")
    owners.append(owning[0] if owning else None)

  def pick(trees):
    columns = [_slots_of(t) for t in trees]
    return treedef.unflatten([optax.MaskedNode() if k is None else columns[k][i]
                              for i, k in enumerate(owners)])

  def scalars(values):
    return treedef.unflatten([optax.MaskedNode() if k is None else jnp.asarray(values[k])
                              for k in owners])

  def per_leaf(values):
    """δ of each leaf from its owner: a scalar, or per coordinate (a structured prior)."""
    columns = []
    for value in values:
      leaves = jax.tree.leaves(value)
      columns.append(leaves * treedef.num_leaves if len(leaves) == 1 else _slots_of(value))
    return treedef.unflatten([optax.MaskedNode() if k is None else jnp.asarray(columns[k][i])
                              for i, k in enumerate(owners)])

  def slots(stores):
    """Per axis slot k, each leaf's slot from its owner; a posterior with fewer slots (or
    none: IVON) gives its leaves the size-one identity slot there."""
    count = max(len(store) for store in stores)
    out = []
    for k in range(count):
      columns = [_slots_of(store[k]) if k < len(store) else None for store in stores]
      out.append(treedef.unflatten([
          optax.MaskedNode() if owner is None else
          columns[owner][i] if columns[owner] is not None else
          jnp.ones((1,), jnp.result_type(means[owner][i]))
          for i, owner in enumerate(owners)]))
    return tuple(out)

  # Factors are kept only when every posterior has them (a post-hoc fit may not).
  factors = slots([b.factors for b in bubbles]) if all(b.factors for b in bubbles) else ()
  return SoapBubble(
      mean=pick([b.mean for b in bubbles]), hessian=pick([b.hessian for b in bubbles]),
      factors=factors, bases=slots([b.bases for b in bubbles]),
      ess=scalars([b.ess for b in bubbles]),
      weight_decay=per_leaf([b.weight_decay for b in bubbles]))
