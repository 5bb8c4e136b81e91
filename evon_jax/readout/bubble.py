"""The SOAP-Bubble: the one posterior type every evon_jax read-out takes.

A SOAP-Bubble is a Gaussian over a network's weights with Kronecker-structured eigenbases:
per leaf ``W = M + E ×₁ Q₁ ×₂ Q₂ …`` (for a matrix ``M + Q_L E Q_Rᵀ``), ``E`` diagonal
Gaussian with variances ``V = 1 / (ess (H + δ))``. EVON's state holds one (read it with
`evon_jax.posterior.bubble`), a post-hoc Laplace fit returns one, IVON's is the case without
bases. `records` turns it into per-leaf `EigenPosterior`s and `draw` is the one sampler.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from evon_jax.maths import ivon_update as ivon_step
from evon_jax.maths.layout import LeafLayout, elementwise_layout
from evon_jax.maths.kronecker import AxisBases, rotate_out, stored_layout


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
    ess: the effective sample size.
    weight_decay: δ, the prior precision per example.
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


def records(bubble: SoapBubble) -> list:
  """Per leaf its `EigenPosterior`, or None for a frozen (integer or empty) leaf."""
  treedef = jax.tree.structure(bubble.mean)
  columns = [treedef.flatten_up_to(tree) for tree in bubble.bases]
  out = []
  for i, (mean, hessian) in enumerate(zip(treedef.flatten_up_to(bubble.mean),
                                          treedef.flatten_up_to(bubble.hessian))):
    if not elementwise_layout(jnp.shape(mean), jnp.result_type(mean)).trainable:
      out.append(None)
      continue
    layout = stored_layout(mean, [column[i] for column in columns])
    bases = tuple(columns[k][i] if rotated else None for k, rotated in enumerate(layout.rotated)
                  ) if layout.any_rotated else ()
    std = ivon_step.posterior_std(hessian, jnp.asarray(bubble.ess).astype(hessian.dtype),
                                  jnp.asarray(bubble.weight_decay).astype(hessian.dtype))
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
