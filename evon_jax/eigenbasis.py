"""Eigenbasis refresh: full `eigh` warm start, then power iteration + QR every few steps.

All solves run in float32 or wider (never bf16) and are guarded: a solve that returns a
non-finite basis keeps the previous one, so a bad factor never corrupts the posterior.
"""

from __future__ import annotations

from typing import Literal, Sequence

import jax
import jax.numpy as jnp

from evon_jax.kronecker import KroneckerPair, change_basis

_EXACT = jax.lax.Precision.HIGHEST

# Refresh kinds, as indices for `lax.switch`.
KEEP, POWER_QR, EIGH = 0, 1, 2
RefreshMethod = Literal["power_qr", "eigh"]


def eigh_descending(factor: jax.Array) -> jax.Array:
  """Eigenvectors of a symmetric factor, columns in descending eigenvalue order."""
  symmetric = 0.5 * (factor + jnp.swapaxes(factor, -1, -2))
  _, vectors = jnp.linalg.eigh(symmetric)
  return vectors[..., ::-1]


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
    factors: KroneckerPair,
    basis: KroneckerPair,
    carried: Sequence[jax.Array],
) -> tuple[KroneckerPair, tuple[jax.Array, ...]]:
  """Refreshes a basis (`kind` in KEEP / POWER_QR / EIGH) and moves eigen-coordinate buffers.

  `carried` are buffers held in eigen coordinates (momentum, the mean) whose parameter-space
  value must not change when the basis does. Only the chosen branch runs (`lax.cond`), so the
  cost of a refresh is paid on refresh steps alone.
  """
  if basis.left is None and basis.right is None:
    return basis, tuple(carried)

  def do_refresh(operands):
    old_basis, buffers = operands
    new_basis = jax.tree.map(
        lambda f, q: _refresh_side(kind, f, q), factors, old_basis)
    return new_basis, tuple(change_basis(b, old_basis, new_basis) for b in buffers)

  return jax.lax.cond(
      kind != KEEP, do_refresh, lambda operands: operands, (basis, tuple(carried)))


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
