"""A continuous choice of basis inside a (numerically) null eigenspace.

Inside a null eigenspace any orthonormal basis is an eigenbasis, and `eigh` returns
whichever its rounding errors pick. `canonical_null_basis` replaces those columns by a basis
that depends on the span only (used by `eigenbasis.eigh_descending`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_EXACT = jax.lax.Precision.HIGHEST


def null_tolerance(size: int, dtype) -> float:
  """The fraction of a factor's largest eigenvalue below which an eigenvalue is float noise.

  A product such as `F q` or an `eigh` of an n x n factor carries rounding errors of about
  √n·eps·‖F‖; the directions whose eigenvalue (or `‖F q‖`) sits below 100× that cannot be
  told apart from a null direction, and their basis vectors are decided by that noise.
  """
  return float(100.0 * size ** 0.5 * jnp.finfo(dtype).eps)


PIVOT_PREFERENCE = 1e-3


def _preference(size: int, dtype) -> jax.Array:
  # Residuals within 0.1 % of each other are taken in column order (the reference's order
  # when they tie exactly, e.g. a zero factor, instead of the order of rounding errors).
  return 1.0 + PIVOT_PREFERENCE * (1.0 - jnp.arange(size, dtype=dtype) / size)


def _pivoted_gram_schmidt(columns: jax.Array, count: jax.Array) -> jax.Array:
  """`_pivoted_orthonormal_columns` as a loop of `count` rank-1 updates (any backend)."""
  size = columns.shape[-1]
  preference = _preference(size, columns.dtype)

  def step(i, carry):
    residual, basis, taken = carry
    norms = jnp.where(taken, -1.0, preference * jnp.linalg.norm(residual, axis=0))
    pivot = jnp.argmax(norms)
    vector = residual[:, pivot] / jnp.maximum(jnp.linalg.norm(residual[:, pivot]), 1e-30)
    residual = residual - jnp.outer(vector, vector @ residual)
    return residual, basis.at[:, i].set(vector), taken.at[pivot].set(True)

  start = (columns, jnp.zeros_like(columns), jnp.zeros(size, bool))
  return jax.lax.fori_loop(0, count, step, start)[1]


def _pivoted_householder(columns: jax.Array, count: jax.Array) -> jax.Array:
  """`_pivoted_orthonormal_columns` by LAPACK's QR with column pivoting (geqp3): the same
  pivots and, once each column's sign is that of its R diagonal, the same vectors as the
  Gram–Schmidt loop (a positive column scale moves the choice, not the vectors), at a
  fraction of the loop's memory traffic."""
  size = columns.shape[-1]
  q, r, _ = jax.lax.linalg.qr(columns * _preference(size, columns.dtype)[None, :], pivoting=True,
                              full_matrices=False)
  signs = jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0).astype(q.dtype)
  return jnp.where((jnp.arange(size) < count)[None, :], q * signs[None, :], 0.0)


def _pivoted_orthonormal_columns(columns: jax.Array, count: jax.Array) -> jax.Array:
  """The first `count` vectors of Gram–Schmidt with column pivoting: each step takes the
  column with the largest residual. Pivoting keeps every step well conditioned (a column
  nearly dependent on those taken is never taken while a better one is left), so the
  result is a continuous function of `columns` away from ties between residual norms.
  Columns past `count` are zero. `columns`: (n, n); `count`: a scalar.

  On CPU this is LAPACK's pivoted QR (10x faster than the loop at n = 768); elsewhere
  (pivoted QR is host-only on GPU and absent on TPU) the loop."""
  return jax.lax.platform_dependent(columns, count, cpu=_pivoted_householder,
                                    default=_pivoted_gram_schmidt)


def canonical_null_basis(vectors: jax.Array, null: jax.Array, reference: jax.Array
                         ) -> jax.Array:
  """Replaces the columns of `vectors` flagged `null` by a basis of the same span that is a
  continuous function of that span.

  Inside a null (or numerically null) eigenspace any orthonormal basis is an eigenbasis,
  and `eigh` returns whichever its rounding errors pick: a change of the inputs by 1e-7
  picks another one. The replacement depends on the span's projector P only: the
  reference basis R projected onto the span, `P R`, orthonormalised by Gram–Schmidt with
  column pivoting (the reference columns nearest the span go first). Choosing columns by
  their norm alone is not enough (k columns of `P R` can be dependent however long each
  is), and an eigenbasis of a tie-breaking matrix compressed to the span hinges on that
  compression's own eigenvalue gaps, which can be 1e-4. The new vectors fill the flagged
  positions in pivot order; the other columns are returned unchanged (they must be
  orthonormal and span the complement of the flagged ones).
  """
  mask = null.astype(vectors.dtype)[..., None, :]
  null_part = vectors * mask
  projector = jnp.matmul(null_part, jnp.matrix_transpose(null_part), precision=_EXACT)
  projected = jnp.matmul(projector, reference, precision=_EXACT)
  count = jnp.sum(null.astype(jnp.int32), axis=-1)
  replacement = jnp.vectorize(_pivoted_orthonormal_columns, signature="(n,n),()->(n,n)")(
      projected, count)
  # The i-th flagged column (in index order) gets the i-th new vector.
  null_rank = jnp.cumsum(null.astype(jnp.int32), axis=-1) - 1
  source = jnp.clip(null_rank, 0, vectors.shape[-1] - 1)
  replacement = jnp.take_along_axis(replacement, source[..., None, :], axis=-1)
  return jnp.where(null[..., None, :], replacement, vectors)
