"""How each parameter leaf is split into Kronecker axes, and which axes get an eigenbasis.

A leaf of shape `stacked + rest` is viewed as a stack (the leading `stacked_dims` dims, each
entry with its own factors and bases) of tensors whose axes are `rest`, one Kronecker factor
and basis per axis: a matrix is the two-axis case, an attention kernel (768, 12, 64) has three
small factors (768², 12², 64²) instead of one (768·12)² factor of a merged matrix view.
`dimension_numbers` may merge neighbouring axes into one (e.g. the old matrix view, or the
reference SOAP's `merge_dims`).

Every decision here depends only on a leaf's shape, dtype and path, so it is static under
`jit` and is recomputed identically in `init` and `update`.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

# Per leaf: None (one Kronecker axis per dim), groups of neighbouring dims (counted in the
# whole leaf), each merged into one axis, e.g. ((0, 1), (2,)) views a (3, 3, 16) kernel as
# 9 x 16, or "matrix": all dims after the stacked ones but the last merged into rows.
AxisGroups = Union[None, str, Sequence[Sequence[int]]]
DimensionNumbers = Union[None, Callable[..., AxisGroups]]


class LeafLayout(NamedTuple):
  """Static description of one parameter leaf.

  Attributes:
    shape: the leaf's own shape.
    batch: the leading dims that index stacked, independent tensors (e.g. the layer axis of
      `nnx.scan`-ned blocks): each gets its own factors and bases.
    axes: sizes of the Kronecker axes of one tensor of the stack (the leaf's remaining dims,
      possibly merged); () for a scalar.
    rotated: per axis, whether it gets an eigenbasis (otherwise the identity).
    trainable: False for integer/boolean leaves and empty leaves, which pass through.
  """

  shape: tuple[int, ...]
  batch: tuple[int, ...]
  axes: tuple[int, ...]
  rotated: tuple[bool, ...]
  trainable: bool

  @property
  def view_shape(self) -> tuple[int, ...]:
    """Shape of the Kronecker view: batch + axes (a reshape of the leaf, same element order)."""
    return self.batch + self.axes

  @property
  def matrix_shape(self) -> tuple[int, ...]:
    """batch + (rows, cols): all axes but the last merged into rows (whitening's view)."""
    if len(self.axes) >= 2:
      return self.batch + (math.prod(self.axes[:-1]), self.axes[-1])
    return self.batch + (math.prod(self.axes), 1)

  @property
  def is_matrix(self) -> bool:
    """Two or more Kronecker axes (whitened by Newton–Schulz, not by a norm)."""
    return len(self.axes) >= 2

  @property
  def any_rotated(self) -> bool:
    return any(self.rotated)

  @property
  def axis_offset(self) -> int:
    """Position of the first Kronecker axis in the view (after the stacked dims)."""
    return len(self.batch)


def _check_groups(groups, rest: tuple[int, ...], offset: int, where: str):
  """Validates axis groups: neighbouring dims, in order, covering the non-stacked dims."""
  flat = [int(d) for group in groups for d in group]
  expected = list(range(offset, offset + len(rest)))
  if (flat != expected or any(len(group) == 0 for group in groups)):
    raise ValueError(
        f"dimension_numbers for {where}: groups {tuple(tuple(g) for g in groups)} must list "
        f"the leaf's dims {tuple(expected)} (after its stacked dims) in order, each in one "
        f"non-empty group of neighbouring dims, e.g. {tuple((d,) for d in expected)}.")


def merge_dims_groups(rest: Sequence[int], max_precond_dim: int, offset: int = 0):
  """The reference SOAP's `merge_dims`: neighbouring dims are merged greedily while their
  product stays within `max_precond_dim` (a dim longer than that stays on its own)."""
  groups, current, size = [], [], 1
  for i, dim in enumerate(rest):
    if current and size * dim > max_precond_dim:
      groups.append(current)
      current, size = [], 1
    current.append(offset + i)
    size *= dim
  if current:
    groups.append(current)
  return tuple(tuple(g) for g in groups)


def matrix_view(path, leaf) -> AxisGroups:
  """Dimension numbers of the matrix view: all dims but the last merged into rows.

  Pass as `dimension_numbers=evon_jax.matrix_view` to get one (rows x cols) Kronecker pair
  for every leaf with two or more dims (e.g. a conv kernel (3, 3, C_in, C_out) as
  (9 C_in) x C_out). Leaves with stacked dims keep them; other leaves are unchanged.
  """
  del path, leaf
  return "matrix"


def leaf_layout(
    shape: tuple[int, ...],
    dtype,
    *,
    max_precond_dim: int,
    precondition_1d: bool,
    use_bases: bool = True,
    stacked_dims: int = 0,
    groups: AxisGroups = None,
    merge_dims: bool = False,
    where: str = "a leaf",
) -> LeafLayout:
  """Decides the Kronecker axes of a leaf and which of them are rotated.

  The first `stacked_dims` dims index independent tensors; the rest are the Kronecker axes,
  one per dim unless `groups` (dims counted in the whole leaf, stacked dims excluded) or
  `merge_dims` merge neighbours. An axis is rotated when 1 < size <= max_precond_dim; a
  leaf with a single axis (a vector) only when `precondition_1d`.
  """
  shape = tuple(int(s) for s in shape)
  if not 0 <= stacked_dims <= len(shape):
    raise ValueError(f"stacked_dims={stacked_dims} for a leaf of shape {shape}: it must lie "
                     f"between 0 and the leaf's number of dims.")
  batch, rest = shape[:stacked_dims], shape[stacked_dims:]
  if groups is not None and merge_dims:
    raise ValueError("Pass either dimension_numbers or merge_dims=True, not both.")
  if merge_dims:
    groups = merge_dims_groups(rest, max_precond_dim, stacked_dims)
  if isinstance(groups, str):
    if groups != "matrix":
      raise ValueError(f"dimension_numbers for {where}: got {groups!r}; the only string "
                       "allowed is 'matrix' (all dims but the last merged into rows).")
    groups = ((tuple(range(stacked_dims, len(shape) - 1)), (len(shape) - 1,))
              if len(rest) >= 2 else None)
  if groups is None:
    axes = rest
  else:
    _check_groups(groups, rest, stacked_dims, where)
    axes = tuple(math.prod(shape[d] for d in group) for group in groups)
  trainable = bool(jnp.issubdtype(dtype, jnp.inexact)) and math.prod(shape) > 0
  if not (use_bases and trainable):
    return LeafLayout(shape, batch, axes, (False,) * len(axes), trainable)
  if len(axes) == 1 and not precondition_1d:
    rotated = (False,)
  else:
    rotated = tuple(1 < size <= max_precond_dim for size in axes)
  return LeafLayout(shape, batch, axes, rotated, trainable)


def as_view(x, layout: LeafLayout):
  """The (batch..., axes...) Kronecker view of a parameter-shaped array."""
  return jnp.reshape(x, layout.view_shape)


def from_view(x, layout: LeafLayout):
  """Back from the Kronecker view to the leaf's own shape."""
  return jnp.reshape(x, layout.shape)


def _per_leaf_value(option, path, leaf):
  """An option given for every leaf, or a callable `(path, leaf) -> value` read per leaf."""
  return option(path, leaf) if callable(option) else option


def tree_layouts(tree, *, max_precond_dim: int, precondition_1d: bool,
                 use_bases: bool = True, stacked_dims=None, dimension_numbers=None,
                 merge_dims: bool = False) -> list[LeafLayout]:
  """Layouts of every leaf of a params-shaped tree (`stacked_dims` and `dimension_numbers`
  may be callables `(path, leaf) -> value` reading the paths)."""
  with_paths, _ = jax.tree_util.tree_flatten_with_path(tree)
  layouts = []
  for path, leaf in with_paths:
    name = jax.tree_util.keystr(path) or "<root>"
    if jnp.issubdtype(jnp.result_type(leaf), jnp.complexfloating):
      raise ValueError(f"Leaf {name} is complex ({jnp.result_type(leaf)}): evon_jax's "
                       "Gaussian posteriors and Kronecker factors are real; split it into "
                       "real and imaginary parameters.")
    groups = _per_leaf_value(dimension_numbers, path, leaf)
    layouts.append(leaf_layout(
        jnp.shape(leaf), jnp.result_type(leaf), max_precond_dim=max_precond_dim,
        precondition_1d=precondition_1d, use_bases=use_bases,
        stacked_dims=stacked_dims_of(path, leaf, stacked_dims), groups=groups,
        merge_dims=merge_dims, where=name))
  return layouts


def diagonal_layouts(tree) -> list[LeafLayout]:
  """Layouts of a diagonal method used without a refresh around it: each leaf as itself,
  no bases (the matrix view of whitening merges all dims but the last)."""
  return tree_layouts(tree, max_precond_dim=0, precondition_1d=False, use_bases=False)


def stacked_dims_of(path, leaf, stacked_dims) -> int:
  """The number of stacked dims of one leaf: `stacked_dims` is an int for every leaf, or a
  callable `(path, leaf) -> int` (path as in `jax.tree_util.tree_flatten_with_path`)."""
  if stacked_dims is None:
    return 0
  value = _per_leaf_value(stacked_dims, path, leaf)
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
    raise ValueError(f"stacked_dims must give a non-negative int per leaf, got {value!r} "
                     f"for {jax.tree_util.keystr(path)}.")
  return min(int(value), len(jnp.shape(leaf)))


def elementwise_layout(shape, dtype) -> LeafLayout:
  """A leaf without bases: every entry on its own (the view is the leaf itself)."""
  return leaf_layout(tuple(shape), dtype, max_precond_dim=0, precondition_1d=False,
                     use_bases=False)


def state_dtype(param_dtype, requested=None):
  """Floating dtype for statistics: float32, or wider when the parameters are wider."""
  if requested is not None:
    return jnp.dtype(requested)
  if jnp.issubdtype(param_dtype, jnp.inexact) and np.dtype(param_dtype).itemsize >= 8:
    return jnp.dtype(param_dtype)
  return jnp.dtype(jnp.float32)
