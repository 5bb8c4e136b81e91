"""Kronecker factors of a leaf, one per axis, and rotations into / out of their eigenbasis.

A gradient tensor G with axes (n_1, …, n_K) gives one factor statistic per axis,
F_k = G_(k) G_(k)ᵀ (n_k x n_k; G_(k) is the mode-k unfolding: axis k against all others). For
a matrix these are Shampoo's G Gᵀ and Gᵀ G. Their eigenvectors Q_k define the eigenbasis
in which SOAP runs Adam and EVON runs IVON; a tensor is rotated by mode products,
X ×₁ Q₁ᵀ ×₂ Q₂ᵀ … (for a matrix Q_Lᵀ X Q_R). An axis whose basis is absent (`None`) is the
identity: nothing is stored for it and no product is spent on it.

Per leaf the maths works on `AxisBases`, a tuple with one entry (an array or None) per
Kronecker axis. Leading stacked dims (see `_layout`) are batch dims of every product.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from evon_jax.maths.layout import LeafLayout, elementwise_layout

_EXACT = jax.lax.Precision.HIGHEST

# One square matrix (batch + (n, n)) or None (identity) per Kronecker axis of a leaf.
AxisBases = tuple[Optional[jax.Array], ...]


def empty_bases(layout: LeafLayout, dtype, fill: str) -> AxisBases:
  """Zero factors (`fill='zeros'`) or identity bases (`fill='eye'`) for the rotated axes."""

  def make(size):
    shape = layout.batch + (size, size)
    if fill == "eye":
      return jnp.array(jnp.broadcast_to(jnp.eye(size, dtype=dtype), shape))
    return jnp.zeros(shape, dtype)

  return tuple(make(size) if rotated else None
               for size, rotated in zip(layout.axes, layout.rotated))


def _mode_product(x: jax.Array, matrix: jax.Array, axis: int, batch_start: int,
                  transpose: bool, precision) -> jax.Array:
  """x ×_axis M with M = matrix (or matrixᵀ): out[.., i, ..] = Σ_j M[i, j] x[.., j, ..].

  `matrix` is batch + (n, n); its batch dims are dims batch_start, batch_start + 1, … of x.
  One dot_general whose operand order avoids a transpose when the axis comes right after
  the batch dims (matrix first) or is the last one (x first), as a matmul would.
  """
  batch_ndim = matrix.ndim - 2
  contract_m = batch_ndim + (0 if transpose else 1)
  batch_x = tuple(range(batch_start, batch_start + batch_ndim))
  batch_m = tuple(range(batch_ndim))
  other_x = [d for d in range(x.ndim) if d != axis and d not in batch_x]
  if batch_x == batch_m and all(d > axis for d in other_x):
    out = jax.lax.dot_general(matrix, x, (((contract_m,), (axis,)), (batch_m, batch_x)),
                              precision=precision)
    order = list(batch_x) + [axis] + other_x
  else:
    out = jax.lax.dot_general(x, matrix, (((axis,), (contract_m,)), (batch_x, batch_m)),
                              precision=precision)
    order = list(batch_x) + other_x + [axis]
  if order != list(range(x.ndim)):
    out = jnp.transpose(out, [order.index(d) for d in range(x.ndim)])
  return out


def _apply(x: jax.Array, bases: Sequence[Optional[jax.Array]], transpose: bool,
           precision) -> jax.Array:
  """x ×_k op(B_k) over the Kronecker axes, which are the last len(bases) dims of x."""
  first_axis = x.ndim - len(bases)
  for k, basis in enumerate(bases):
    if basis is not None:
      x = _mode_product(x, basis, first_axis + k, first_axis - (basis.ndim - 2), transpose,
                        precision)
  return x


def rotate_in(x: jax.Array, bases: AxisBases, precision=None) -> jax.Array:
  """Parameter coordinates to eigen coordinates: X ×₁ Q₁ᵀ ×₂ Q₂ᵀ … (Q_Lᵀ X Q_R for a
  matrix). `x` is (leading..., batch..., axes...): extra leading dims (samples) allowed."""
  return _apply(x, bases, True, precision)


def rotate_out(x: jax.Array, bases: AxisBases, precision=None) -> jax.Array:
  """Eigen coordinates to parameter coordinates: X ×₁ Q₁ ×₂ Q₂ … (Q_L X Q_Rᵀ)."""
  return _apply(x, bases, False, precision)


def _gram(x: jax.Array, axis: int, batch_axes: tuple[int, ...], precision) -> jax.Array:
  """Σ over every dim but `axis` and the batch dims of x[.., a, ..] x[.., b, ..]."""
  contract = tuple(d for d in range(x.ndim) if d != axis and d not in batch_axes)
  return jax.lax.dot_general(x, x, ((contract, contract), (batch_axes, batch_axes)),
                             precision=precision)


def factor_statistics(grad: jax.Array, layout: LeafLayout) -> AxisBases:
  """Per rotated axis k the statistic G_(k) G_(k)ᵀ of a gradient in its Kronecker view."""
  batch = tuple(range(len(layout.batch)))
  return tuple(
      _gram(grad, len(layout.batch) + k, batch, _EXACT) if rotated else None
      for k, rotated in enumerate(layout.rotated))


def mean_factor_statistics(grads: jax.Array, layout: LeafLayout) -> AxisBases:
  """Average over a leading sample axis of per-sample statistics G_s,(k) G_s,(k)ᵀ."""
  count = grads.shape[0]
  batch = tuple(range(1, 1 + len(layout.batch)))
  return tuple(
      _gram(grads, 1 + len(layout.batch) + k, batch, _EXACT) / count if rotated else None
      for k, rotated in enumerate(layout.rotated))


def ema(old, new, decay, one_minus_decay=None):
  """Exponential moving average axis by axis; identity axes stay `None`.

  `one_minus_decay` may be passed separately (see `maths.gates.ema_coefficients`).
  """
  take = 1 - decay if one_minus_decay is None else one_minus_decay
  return jax.tree.map(lambda a, b: decay * a + take * b, old, new)


def _through_parameter_space(side: int, entries: int, buffers: int) -> bool:
  """Whether `change_bases` moves an axis of size `side` (of a basis matrix that acts on
  `entries` entries of each buffer) through parameter coordinates
  (x ×_k Q_old, then ×_k Q_newᵀ: 4·entries·side flops per buffer) rather than through the
  transition matrix Q_newᵀ Q_old (2·side³ once, then 2·entries·side per buffer): the former
  is cheaper when side² > buffers·entries, i.e. for the long side of a rectangular leaf
  (the 1024 side of a 256 x 1024 matrix: 2.1 vs 3.2 GFLOP with two buffers)."""
  return side * side > buffers * entries


def change_bases(xs: Sequence[jax.Array], old: AxisBases, new: AxisBases) -> tuple:
  """Re-expresses eigen-coordinate buffers (all of one leaf's shape) in new bases, keeping
  their parameter-space value.

  Per axis, by whichever of two exact routes costs fewer flops (`_through_parameter_space`):
  the transition matrix Q_newᵀ Q_old (one product per axis shared by the buffers), or out
  to parameter coordinates along that axis and back in. Always at full float32 precision,
  because errors here accumulate over refreshes.
  """
  if not xs:
    return ()
  first_axis = xs[0].ndim - len(new)
  routes = []
  for k, (o, n) in enumerate(zip(old, new)):
    if n is None:
      routes.append(None)
    elif _through_parameter_space(n.shape[-1], xs[0].size // math.prod(n.shape[:-2]), len(xs)):
      routes.append(("direct", o, n))
    else:
      routes.append(("transition", jnp.matmul(jnp.matrix_transpose(n), o, precision=_EXACT)))
  out = []
  for x in xs:
    dtype = x.dtype  # a low-precision buffer (e.g. bf16 momentum) stays in its dtype
    for k, route in enumerate(routes):
      if route is None:
        continue
      axis = first_axis + k
      batch_start = first_axis - (route[1].ndim - 2)
      if route[0] == "transition":
        x = _mode_product(x, route[1], axis, batch_start, False, _EXACT)
      else:
        x = _mode_product(x, route[1], axis, batch_start, False, _EXACT)
        x = _mode_product(x, route[2], axis, batch_start, True, _EXACT)
    out.append(x.astype(dtype))
  return tuple(out)


def change_basis(x: jax.Array, old: AxisBases, new: AxisBases) -> jax.Array:
  """`change_bases` of one buffer."""
  return change_bases((x,), old, new)[0]


# Storage. An optimizer state keeps the per-axis matrices as a tuple of params-shaped trees
# of plain arrays, one tree per axis slot (so every state leaf is one array, as
# flax.nnx.Optimizer expects, and plain orbax saves it). A rotated axis stores its matrix
# (batch + (n, n)); an identity axis stores the diagonal of the identity, ones((n,)), which
# records its size so that the Kronecker view can be read back from the state; a leaf with
# fewer axes than there are slots fills the rest with ones((1,)) (an axis of size one does
# not change the view). No array in the state has size zero.


def _identity_slot(size: int, dtype) -> jax.Array:
  return jnp.ones((max(int(size), 1),), dtype)


def num_slots(layouts: Sequence[LeafLayout]) -> int:
  """Axis slots a state needs: the largest number of Kronecker axes of a trainable leaf."""
  return max([len(l.axes) for l in layouts if l.trainable and l.any_rotated] + [0])


def bases_to_storage(per_leaf: Sequence[AxisBases], layouts: Sequence[LeafLayout], treedef,
                     slots: int, dtypes: Sequence = ()) -> tuple:
  """Per-leaf AxisBases -> a tuple of `slots` params-shaped trees (see the note above).

  Identity slots take the leaf's statistics dtype (`dtypes`, per leaf; float32 by default),
  so every float array of a leaf's state has the dtype its statistics were asked in.
  """
  dtypes = list(dtypes) or [jnp.float32] * len(layouts)

  def slot(bases, layout, dtype, k):
    if k < len(bases) and bases[k] is not None:
      return bases[k]
    size = layout.axes[k] if k < len(layout.axes) and layout.any_rotated else 1
    return _identity_slot(size, dtype)

  return tuple(
      treedef.unflatten([slot(b, l, d, k) for b, l, d in zip(per_leaf, layouts, dtypes)])
      for k in range(slots))


def storage_to_bases(stored: tuple, treedef, layouts: Sequence[LeafLayout]) -> list[AxisBases]:
  """Inverse of `bases_to_storage` for known layouts: per leaf, one entry per axis."""
  columns = [treedef.flatten_up_to(tree) for tree in stored]
  return [tuple(columns[k][i] if rotated else None for k, rotated in enumerate(layout.rotated))
          for i, layout in enumerate(layouts)]


def stored_axes(slots: Sequence[jax.Array]) -> tuple[tuple[int, ...], AxisBases]:
  """Reads one leaf's (axis sizes, bases) from its stored slots.

  Dense slots are bases (their leading dims are the stacked dims), 1-D slots identity axes
  of their length; trailing axes of size one are dropped (they do not change the view).
  """
  sizes = [int(s.shape[-1]) for s in slots]
  bases = [s if s.ndim >= 2 else None for s in slots]
  while sizes and sizes[-1] == 1 and bases[-1] is None:
    sizes.pop()
    bases.pop()
  return tuple(sizes), tuple(bases)


def stored_layout(mean: jax.Array, slots: Sequence[jax.Array]) -> LeafLayout:
  """A leaf's layout read back from its stored mean (its shape) and axis slots.

  A leaf without a dense slot has no rotation, so its view does not matter: it is read as
  elementwise (the noise, drawn by flat index, is the same either way).
  """
  shape, dtype = tuple(mean.shape), mean.dtype
  sizes, bases = stored_axes(slots)
  dense = [b for b in bases if b is not None]
  if not dense:
    return elementwise_layout(shape, dtype)
  batch = tuple(int(d) for d in dense[0].shape[:-2])
  if math.prod(batch + sizes) != math.prod(shape):
    raise ValueError(f"A stored basis set with axes {sizes} (stacked {batch}) does not fit "
                     f"a leaf of shape {shape}: the state is not one evon_jax wrote.")
  return LeafLayout(shape, batch, sizes, tuple(b is not None for b in bases), True)


def stored_layouts_of(means: Sequence[jax.Array], stored: tuple, treedef) -> list[LeafLayout]:
  """`stored_layout` of every leaf of a state (its means and its stored bases)."""
  columns = [treedef.flatten_up_to(tree) for tree in stored]
  return [stored_layout(mean, [column[i] for column in columns])
          for i, mean in enumerate(means)]


def per_leaf(stored: tuple, like) -> object:
  """A params-shaped tree (shaped like `like`, e.g. the state's mean) whose leaves are the
  per-leaf tuples of `stored` axis matrices (factors or bases): one entry per Kronecker axis,
  the matrix or None (identity); () for a leaf without any."""
  treedef = jax.tree.structure(like)
  means = treedef.flatten_up_to(like)
  layouts = stored_layouts_of(means, stored, treedef)
  per = storage_to_bases(stored, treedef, layouts)
  return treedef.unflatten([b if l.any_rotated else () for b, l in zip(per, layouts)])


def matrix_sides(bases: AxisBases) -> tuple[Optional[jax.Array], Optional[jax.Array]]:
  """(Q_L, Q_R) of a leaf with at most two Kronecker axes (None for identity sides; a
  vector's single axis is its left side)."""
  if len(bases) > 2:
    raise ValueError(f"matrix_sides: the leaf has {len(bases)} Kronecker axes, not a matrix.")
  padded = tuple(bases) + (None, None)
  return padded[0], padded[1]
