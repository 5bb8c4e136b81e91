"""Kronecker factors of a matrix leaf and rotations into / out of their eigenbasis.

A matrix gradient G (m x n) gives Shampoo's two factor statistics G Gᵀ (m x m) and Gᵀ G
(n x n). Their eigenvectors Q_L, Q_R define the eigenbasis in which SOAP runs Adam and EVON
runs IVON. A side whose basis is absent (`None`) is the identity: nothing is stored for it and
no product is spent on it.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from evon_jax._layout import LeafLayout

_EXACT = jax.lax.Precision.HIGHEST


class KroneckerPair(NamedTuple):
  """A left (rows) and right (columns) square matrix; `None` marks an identity side."""

  left: Optional[jax.Array]
  right: Optional[jax.Array]


def empty_pair(layout: LeafLayout, dtype, fill: str) -> KroneckerPair:
  """Zero factors (`fill='zeros'`) or identity bases (`fill='eye'`) for the rotated sides."""

  def make(size):
    shape = layout.batch + (size, size)
    if fill == "eye":
      return jnp.array(jnp.broadcast_to(jnp.eye(size, dtype=dtype), shape))
    return jnp.zeros(shape, dtype)

  return KroneckerPair(
      make(layout.rows) if layout.left else None,
      make(layout.cols) if layout.right else None)


def factor_statistics(grad: jax.Array, layout: LeafLayout) -> KroneckerPair:
  """Shampoo's statistics G Gᵀ and Gᵀ G of one matrix gradient (only for rotated sides)."""
  left = jnp.matmul(grad, jnp.matrix_transpose(grad), precision=_EXACT) if layout.left else None
  right = jnp.matmul(jnp.matrix_transpose(grad), grad, precision=_EXACT) if layout.right else None
  return KroneckerPair(left, right)


def mean_factor_statistics(grads: jax.Array, layout: LeafLayout) -> KroneckerPair:
  """Average over a leading sample axis of per-sample statistics G_s G_sᵀ and G_sᵀ G_s."""
  count = grads.shape[0]
  left = (
      jnp.einsum("s...ij,s...kj->...ik", grads, grads, precision=_EXACT) / count
      if layout.left else None)
  right = (
      jnp.einsum("s...ji,s...jk->...ik", grads, grads, precision=_EXACT) / count
      if layout.right else None)
  return KroneckerPair(left, right)


def ema(old: KroneckerPair, new: KroneckerPair, decay, one_minus_decay=None) -> KroneckerPair:
  """Exponential moving average side by side; identity sides stay `None`.

  `one_minus_decay` may be passed separately (see `_gating.ema_coefficients`).
  """
  take = 1 - decay if one_minus_decay is None else one_minus_decay
  return jax.tree.map(lambda a, b: decay * a + take * b, old, new)


def rotate_in(x: jax.Array, basis: KroneckerPair, precision=None) -> jax.Array:
  """Parameter coordinates to eigen coordinates: Q_Lᵀ X Q_R (leading batch dims allowed)."""
  if basis.left is not None:
    x = jnp.matmul(jnp.matrix_transpose(basis.left), x, precision=precision)
  if basis.right is not None:
    x = jnp.matmul(x, basis.right, precision=precision)
  return x


def rotate_out(x: jax.Array, basis: KroneckerPair, precision=None) -> jax.Array:
  """Eigen coordinates to parameter coordinates: Q_L X Q_Rᵀ (leading batch dims allowed)."""
  if basis.left is not None:
    x = jnp.matmul(basis.left, x, precision=precision)
  if basis.right is not None:
    x = jnp.matmul(x, jnp.matrix_transpose(basis.right), precision=precision)
  return x


def change_basis(x: jax.Array, old: KroneckerPair, new: KroneckerPair) -> jax.Array:
  """Re-expresses eigen coordinates in a new basis, keeping the parameter-space value.

  Uses the small transition matrices Q_newᵀ Q_old, so a stack of buffers costs one product
  per side, always at full float32 precision because errors here accumulate over refreshes.
  """
  dtype = x.dtype  # a low-precision buffer (e.g. bf16 momentum) stays in its dtype
  transition = jax.tree.map(
      lambda n, o: jnp.matmul(jnp.matrix_transpose(n), o, precision=_EXACT), new, old)
  if transition.left is not None:
    x = jnp.matmul(transition.left, x, precision=_EXACT)
  if transition.right is not None:
    x = jnp.matmul(x, jnp.matrix_transpose(transition.right), precision=_EXACT)
  return x.astype(dtype)


# Storage: an optimizer state keeps the left and right sides as two params-shaped trees of
# plain arrays (zero-size arrays mark identity sides), so every state leaf is an array, as
# flax.nnx.Optimizer expects; the maths works on per-leaf pairs with None. (orbax refuses
# zero-size arrays: `evon_jax.checkpoint` leaves them out on save and rebuilds them.)

_IDENTITY = (0, 0)


def pairs_to_storage(pairs, treedef) -> KroneckerPair:
  """Per-leaf KroneckerPairs (None sides) -> KroneckerPair of two params-shaped trees."""

  def side(x):
    return jnp.zeros(_IDENTITY, jnp.float32) if x is None else x

  return KroneckerPair(treedef.unflatten([side(p.left) for p in pairs]),
                       treedef.unflatten([side(p.right) for p in pairs]))


def storage_to_pairs(stored: KroneckerPair, treedef) -> list[KroneckerPair]:
  """Inverse of `pairs_to_storage`: the per-leaf pairs, identity sides as None."""

  def side(x):
    return None if x.size == 0 else x

  return [KroneckerPair(side(l), side(r)) for l, r in zip(
      treedef.flatten_up_to(stored.left), treedef.flatten_up_to(stored.right))]


def leaf_pairs(stored: KroneckerPair):
  """A params-shaped tree whose leaves are the per-leaf `KroneckerPair(Q_L, Q_R)`."""
  treedef = jax.tree.structure(stored.left)
  return treedef.unflatten(storage_to_pairs(stored, treedef))
