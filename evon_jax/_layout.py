"""How each parameter leaf is viewed as a matrix, and which sides get an eigenbasis.

Every decision here depends only on a leaf's shape and dtype, so it is static under `jit` and
is recomputed identically in `init` and `update`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

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
  """

  shape: tuple[int, ...]
  rows: int
  cols: int
  left: bool
  right: bool
  trainable: bool


def leaf_layout(
    shape: tuple[int, ...],
    dtype,
    *,
    max_precond_dim: int,
    precondition_1d: bool,
    use_bases: bool = True,
) -> LeafLayout:
  """Decides the matrix view of a leaf and which sides are rotated."""
  shape = tuple(int(s) for s in shape)
  size = math.prod(shape)
  trainable = bool(jnp.issubdtype(dtype, jnp.inexact)) and size > 0
  if len(shape) >= 2:
    rows, cols = size // shape[-1], shape[-1]
    vector_like = False
  else:
    # Scalars behave as vectors of length one; vectors are column matrices.
    rows, cols = max(size, 1) if shape else 1, 1
    vector_like = True
  if not (use_bases and trainable):
    return LeafLayout(shape, rows, cols, False, False, trainable)
  if vector_like:
    left = precondition_1d and rows <= max_precond_dim and rows > 1
    right = False
  else:
    left = 1 < rows <= max_precond_dim
    right = 1 < cols <= max_precond_dim
  return LeafLayout(shape, rows, cols, left, right, trainable)


def as_matrix(x, layout: LeafLayout):
  """The (rows, cols) view of a parameter-shaped array."""
  return jnp.reshape(x, (layout.rows, layout.cols))


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
