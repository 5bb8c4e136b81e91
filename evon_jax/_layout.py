"""How each parameter leaf is viewed as a matrix, and which sides get an eigenbasis.

Every decision here depends only on a leaf's shape and dtype, so it is static under `jit` and
is recomputed identically in `init` and `update`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class LeafLayout(NamedTuple):
  """Static description of one parameter leaf.

  Attributes:
    shape: the leaf's own shape.
    rows: number of rows of its matrix view (product of all but the last dim; the length of
      a 1-D leaf; 1 for a scalar).
    cols: number of columns of its matrix view (last dim; 1 for 1-D leaves and scalars).
    left: whether the rows get an eigenbasis Q_L (otherwise the identity).
    right: whether the columns get an eigenbasis Q_R (otherwise the identity).
    trainable: False for integer/boolean leaves and empty leaves, which pass through.
    batch: the leading dims that index stacked, independent matrices (e.g. the layer axis
      of `nnx.scan`-ned blocks): each gets its own factors and bases; rows and cols
      describe one matrix of the stack.
  """

  shape: tuple[int, ...]
  rows: int
  cols: int
  left: bool
  right: bool
  trainable: bool
  batch: tuple[int, ...] = ()

  @property
  def matrix_shape(self) -> tuple[int, ...]:
    """Shape of the (stack of) matrix views: batch + (rows, cols)."""
    return self.batch + (self.rows, self.cols)


def leaf_layout(
    shape: tuple[int, ...],
    dtype,
    *,
    max_precond_dim: int,
    precondition_1d: bool,
    use_bases: bool = True,
    stacked_dims: int = 0,
) -> LeafLayout:
  """Decides the matrix view of a leaf and which sides are rotated.

  The first `stacked_dims` dims index independent matrices; the rest form one matrix view
  (all but the last dim merged into rows).
  """
  shape = tuple(int(s) for s in shape)
  if not 0 <= stacked_dims <= len(shape):
    raise ValueError(f"stacked_dims={stacked_dims} for a leaf of shape {shape}: it must lie "
                     f"between 0 and the leaf's number of dims.")
  batch, inner = shape[:stacked_dims], shape[stacked_dims:]
  size = math.prod(inner)
  trainable = bool(jnp.issubdtype(dtype, jnp.inexact)) and math.prod(shape) > 0
  if len(inner) >= 2:
    rows, cols = math.prod(inner[:-1]), inner[-1]
    vector_like = False
  else:
    # Scalars behave as vectors of length one; vectors are column matrices.
    rows, cols = max(size, 1) if inner else 1, 1
    vector_like = True
  if not (use_bases and trainable):
    return LeafLayout(shape, rows, cols, False, False, trainable, batch)
  if vector_like:
    left = precondition_1d and rows <= max_precond_dim and rows > 1
    right = False
  else:
    left = 1 < rows <= max_precond_dim
    right = 1 < cols <= max_precond_dim
  return LeafLayout(shape, rows, cols, left, right, trainable, batch)


def as_matrix(x, layout: LeafLayout):
  """The (batch..., rows, cols) view of a parameter-shaped array."""
  return jnp.reshape(x, layout.matrix_shape)


def tree_layouts(tree, *, max_precond_dim: int, precondition_1d: bool,
                 use_bases: bool = True, stacked_dims=None) -> list[LeafLayout]:
  """Layouts of every leaf of a params-shaped tree (`stacked_dims` may read the paths)."""
  with_paths, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [leaf_layout(jnp.shape(leaf), jnp.result_type(leaf), max_precond_dim=max_precond_dim,
                      precondition_1d=precondition_1d, use_bases=use_bases,
                      stacked_dims=stacked_dims_of(path, leaf, stacked_dims))
          for path, leaf in with_paths]


def stacked_dims_of(path, leaf, stacked_dims) -> int:
  """The number of stacked dims of one leaf: `stacked_dims` is an int for every leaf, or a
  callable `(path, leaf) -> int` (path as in `jax.tree_util.tree_flatten_with_path`)."""
  if stacked_dims is None:
    return 0
  if callable(stacked_dims):
    value = stacked_dims(path, leaf)
  else:
    value = stacked_dims
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
    raise ValueError(f"stacked_dims must give a non-negative int per leaf, got {value!r} "
                     f"for {jax.tree_util.keystr(path)}.")
  return min(int(value), len(jnp.shape(leaf)))


def from_matrix(x, layout: LeafLayout):
  """Back from the matrix view to the leaf's own shape."""
  return jnp.reshape(x, layout.shape)


def state_dtype(param_dtype, requested=None):
  """Floating dtype for statistics: float32, or wider when the parameters are wider."""
  if requested is not None:
    return jnp.dtype(requested)
  if jnp.issubdtype(param_dtype, jnp.inexact) and np.dtype(param_dtype).itemsize >= 8:
    return jnp.dtype(param_dtype)
  return jnp.dtype(jnp.float32)
