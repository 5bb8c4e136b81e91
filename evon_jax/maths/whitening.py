"""Update whitening: Newton–Schulz orthogonalisation of matrices, L2 normalisation of vectors.

Both maps commute with orthogonal rotations (NS(Q_L U Q_Rᵀ) = Q_L NS(U) Q_Rᵀ because the
quintic is an odd polynomial in U Uᵀ U, and norms are rotation invariant), so EVON whitens
its update in eigen coordinates and saves the rotation a parameter-space whitening would need.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from evon_jax.maths.layout import LeafLayout

# Quintic Newton–Schulz coefficients (as in Muon / the EVON reference), five iterations.
_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
_NS_STEPS = 5
_NORM_EPS = 1e-7


def _frobenius(x: jax.Array) -> jax.Array:
  """Norm of each matrix of a stack (the last two axes), kept for broadcasting."""
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True))


def newton_schulz(x: jax.Array, steps: int = _NS_STEPS) -> jax.Array:
  """Approximately orthogonalises a matrix, or each of a stack (the last two axes)."""
  a, b, c = _NS_COEFFICIENTS
  transpose = x.shape[-2] > x.shape[-1]
  if transpose:
    x = jnp.matrix_transpose(x)
  x = x / (_frobenius(x) + _NORM_EPS)
  for _ in range(steps):
    gram = x @ jnp.matrix_transpose(x)
    x = a * x + (b * gram + c * gram @ gram) @ x
  return jnp.matrix_transpose(x) if transpose else x


def l2_normalise(x: jax.Array) -> jax.Array:
  """Unit Frobenius norm for a matrix, or for each of a stack (the last two axes)."""
  return x / (_frobenius(x) + _NORM_EPS)


def whiten(update: jax.Array, layout: LeafLayout) -> jax.Array:
  """Whitens a leaf's update given in its Kronecker view: NS on the matrix view (all axes but
  the last merged into rows) when the leaf has two or more axes, L2 otherwise (per stacked
  tensor when the leaf has stacked dims). Rotating the axes by orthogonal matrices rotates the
  rows and the columns of that matrix view orthogonally, so NS still commutes with them."""
  matrix = jnp.reshape(update, layout.matrix_shape)
  whitened = newton_schulz(matrix) if layout.is_matrix else l2_normalise(matrix)
  return jnp.reshape(whitened, update.shape)
