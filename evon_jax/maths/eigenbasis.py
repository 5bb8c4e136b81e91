"""Eigenbasis refresh: full `eigh` warm start, then power iteration + QR every few steps.

EVON's refresh is a `while_loop` run zero or one times (see `refresh`), so its update is
not reverse-mode differentiable through a refresh step.

All solves run in float32 or wider (never bf16) and are guarded: a solve that returns a
non-finite basis keeps the previous one, so a bad factor never corrupts the posterior.
"""

from __future__ import annotations

from typing import Literal, Sequence

import jax
import jax.numpy as jnp

from evon_jax.maths.kronecker import AxisBases, change_basis

_EXACT = jax.lax.Precision.HIGHEST

# Refresh kinds, as indices for `lax.switch`.
KEEP, POWER_QR, EIGH = 0, 1, 2
RefreshMethod = Literal["power_qr", "eigh"]


def eigh_descending(factor: jax.Array) -> jax.Array:
  """Eigenvectors of a symmetric factor, columns in descending eigenvalue order."""
  symmetric = 0.5 * (factor + jnp.matrix_transpose(factor))
  _, vectors = jnp.linalg.eigh(symmetric)
  return vectors[..., ::-1]


def fresh_eigenbasis(factor: jax.Array) -> jax.Array:
  """A basis built from scratch: `eigh_descending` in at least float32, canonical signs, in
  the factor's dtype (post-hoc fits such as `evon_jax.laplace`; the optimizers go through
  `refresh`, which also keeps the old basis when the new one is not finite)."""
  compute_dtype = jnp.promote_types(factor.dtype, jnp.float32)
  return canonical_signs(eigh_descending(factor.astype(compute_dtype))).astype(factor.dtype)


def power_qr(factor: jax.Array, basis: jax.Array) -> jax.Array:
  """One power iteration followed by QR: the cheap refresh SOAP uses (columns not sorted)."""
  q, _ = jnp.linalg.qr(jnp.matmul(factor, basis, precision=_EXACT))
  return q


def canonical_signs(basis: jax.Array) -> jax.Array:
  """Flips each column so that its largest-magnitude entry is positive.

  Eigenvectors (and QR's columns) are defined up to sign, and LAPACK, cuSOLVER or a
  different reduction order can pick either. The posterior does not depend on the choice,
  but a sample does (the same eigen-coordinate noise lands on ±q): fixing the sign makes
  runs on different devices or shardings draw the same samples from the same key.
  """
  rows = jnp.argmax(jnp.abs(basis), axis=-2)
  pivots = jnp.take_along_axis(basis, rows[..., None, :], axis=-2)
  return basis * jnp.where(pivots < 0, -1.0, 1.0).astype(basis.dtype)


def _keep_if_not_finite(new: jax.Array, old: jax.Array) -> jax.Array:
  return jnp.where(jnp.all(jnp.isfinite(new)), new, old)


def _refresh_side(kind: int, factor: jax.Array, basis: jax.Array) -> jax.Array:
  compute_dtype = jnp.promote_types(basis.dtype, jnp.float32)
  factor32, basis32 = factor.astype(compute_dtype), basis.astype(compute_dtype)
  new = jax.lax.switch(
      kind,
      [lambda f, q: q, power_qr, lambda f, q: eigh_descending(f)],
      factor32, basis32)
  return _keep_if_not_finite(canonical_signs(new), basis32).astype(basis.dtype)


def refresh(
    kind: jax.Array,
    factors: AxisBases,
    basis: AxisBases,
    carried: Sequence[jax.Array],
    in_place: bool = True,
) -> tuple[AxisBases, tuple[jax.Array, ...]]:
  """Refreshes a basis (`kind` in KEEP / POWER_QR / EIGH) and moves eigen-coordinate buffers.

  `carried` are buffers held in eigen coordinates (momentum, the mean) whose parameter-space
  value must not change when the basis does. The refresh runs only when due.

  `in_place=True` runs it as the body of a `while_loop` taken zero or one times: a loop
  carry is updated in place, while a `lax.cond` whose keep-branch passes the bases through
  makes XLA copy every basis on every step (46 MB per step on the d = 256 benchmark shapes).
  That holds when nothing reads the old basis after the refresh; SOAP, which rotates its
  update out with the old basis, gets more copies from the loop than from the cond (68 vs
  32 per step) and passes `in_place=False`.
  """
  if all(b is None for b in basis):
    return basis, tuple(carried)

  def moved(old_basis, buffers):
    new_basis = jax.tree.map(
        lambda f, q: _refresh_side(kind, f, q), factors, old_basis)
    return new_basis, tuple(change_basis(b, old_basis, new_basis) for b in buffers)

  due = kind != KEEP
  if not in_place:
    return jax.lax.cond(due, lambda ops: moved(*ops), lambda ops: ops,
                        (basis, tuple(carried)))

  def body(loop):
    done, old_basis, buffers = loop
    return (done + 1,) + moved(old_basis, buffers)

  _, new_basis, buffers = jax.lax.while_loop(
      lambda loop: loop[0] < due.astype(jnp.int32), body,
      (jnp.zeros([], jnp.int32), basis, tuple(carried)))
  return new_basis, buffers


def refresh_kind(
    is_first: jax.Array,
    step: jax.Array,
    every: int,
    offset: int,
    method: RefreshMethod,
) -> jax.Array:
  """Which refresh a leaf does now: `eigh` on the first call, then every `every` steps."""
  periodic = POWER_QR if method == "power_qr" else EIGH
  due = (step + offset) % every == 0
  return jnp.where(is_first, EIGH, jnp.where(due, periodic, KEEP)).astype(jnp.int32)
