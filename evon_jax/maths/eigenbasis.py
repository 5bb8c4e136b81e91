"""Eigenbasis refresh: full `eigh` warm start, then power iteration + QR every few steps.

The refresh runs under a `lax.cond` on the steps it is due (see `refresh`).

All solves run in float32 or wider (never bf16) and are guarded: a solve that returns a
non-finite basis keeps the previous one, so a bad factor never corrupts the posterior.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from evon_jax.maths.kronecker import AxisBases, change_bases
from evon_jax.maths.null_space import canonical_null_basis, null_tolerance

_EXACT = jax.lax.Precision.HIGHEST

# Refresh kinds, as indices for `lax.switch`.
KEEP, POWER_QR, EIGH = 0, 1, 2
RefreshMethod = Literal["power_qr", "eigh"]


def eigh_descending(factor: jax.Array, reference: jax.Array | None = None,
                    tolerance: float | None = None) -> jax.Array:
  """Eigenvectors of a symmetric factor, columns in descending eigenvalue order.

  With a `reference` basis the columns get `canonical_signs`, and those whose eigenvalue
  is below `tolerance` (default `null_tolerance`) times the largest are replaced by
  `canonical_null_basis`'s continuous choice (signed by the reference columns they come
  from), when there are such columns.
  """
  symmetric = 0.5 * (factor + jnp.matrix_transpose(factor))
  values, vectors = jnp.linalg.eigh(symmetric)
  values, vectors = values[..., ::-1], vectors[..., ::-1]
  if reference is None:
    return vectors
  vectors = canonical_signs(vectors)
  if tolerance is None:
    tolerance = null_tolerance(factor.shape[-1], factor.dtype)
  null = values <= tolerance * values[..., :1]
  return jax.lax.cond(jnp.any(null), canonical_null_basis, lambda v, n, r: v,
                      vectors, null, reference.astype(vectors.dtype))


def fresh_eigenbasis(factor: jax.Array) -> jax.Array:
  """A basis built from scratch: `eigh_descending` in at least float32 (null directions
  tie-broken against the identity), canonical signs, in the factor's dtype (post-hoc fits
  such as `evon_jax.laplace`; the optimizers go through `refresh`, which also keeps the old
  basis when the new one is not finite)."""
  compute_dtype = jnp.promote_types(factor.dtype, jnp.float32)
  identity = jnp.broadcast_to(jnp.eye(factor.shape[-1], dtype=compute_dtype), factor.shape)
  return eigh_descending(factor.astype(compute_dtype), identity).astype(factor.dtype)


# `power_qr`'s shift, as a fraction of the factor's scale.
POWER_SHIFT = 1e-3

# Zero rows appended to a QR's input on CPU (see `orthonormal_columns`).
QR_ROW_PADDING = 8


def _padded_householder_q(matrix: jax.Array) -> jax.Array:
  # LAPACK stores the matrix column-major, one column every (rows) floats: with n a
  # multiple of 256 that stride is a multiple of 1 KiB and the columns LAPACK walks together
  # map to the same cache sets, and so do the transposing copies XLA places around the call.
  # Zero rows below the matrix change the stride and nothing else: a Householder reflector
  # of a column whose tail is zero has a zero tail, so Q's extra rows stay exactly zero and
  # its first n rows are the Q of the unpadded matrix (rounding aside).
  rows = matrix.shape[-2]
  widths = [(0, 0)] * (matrix.ndim - 2) + [(0, QR_ROW_PADDING), (0, 0)]
  q, _ = jnp.linalg.qr(jnp.pad(matrix, widths))
  return q[..., :rows, :]


def _householder_q(matrix: jax.Array) -> jax.Array:
  return jnp.linalg.qr(matrix)[0]


def orthonormal_columns(matrix: jax.Array) -> jax.Array:
  """The Q of a (stack of) square matrix's QR decomposition.

  On CPU the matrix gets `QR_ROW_PADDING` zero rows first (measured on a 2-core Xeon, one
  LAPACK thread: QR of 1024² 43 -> 35 ms, 2048² 269 -> 230 ms, 512² 6.0 -> 5.3 ms, and the
  layout copies around it ~5x faster at 1024); other backends take the matrix as it is.
  """
  return jax.lax.platform_dependent(matrix, cpu=_padded_householder_q, default=_householder_q)


def power_qr(factor: jax.Array, basis: jax.Array, shift: float = POWER_SHIFT,
             steps: int = 1, precision=_EXACT, product: jax.Array | None = None) -> jax.Array:
  """One power iteration followed by QR: the cheap refresh SOAP uses (columns not sorted).

  The iteration runs on `F + μ I` with μ = `shift` times the largest column of `F Q` (about
  F's largest eigenvalue): the same eigenvectors, so the fixed point and the directions that
  matter are F's, but `(F + μI) Q` is never rank-deficient. Without the shift, where F is
  rank-deficient (early steps, wide or thin leaves), QR turns the float noise of `F Q`'s
  dependent columns into unit vectors pointing anywhere, and a change of the inputs by 1e-7
  gives another basis; with it, directions whose eigenvalue is far below μ keep their old
  direction, and one refresh moves the basis by at most about eps/`shift` where the factor
  moves by eps. A zero factor keeps the basis. `steps` > 1 repeats the pair
  (orthogonal iteration); `shift=0` is the reference SOAP's plain ``qr(F Q)``. `product`:
  F Q for the first iteration, where the caller has it already.
  """
  for step in range(steps):
    if step or product is None:
      product = jnp.matmul(factor, basis, precision=precision)
    if shift:
      largest = jnp.max(jnp.linalg.norm(product, axis=-2, keepdims=True), axis=-1,
                        keepdims=True)
      product = product + jnp.where(largest > 0, shift * largest, 1.0) * basis
    basis = orthonormal_columns(product)
  return basis


def _diagonal_of_rotated(basis: jax.Array, product: jax.Array) -> jax.Array:
  # diag(Qᵀ F Q) from Q and F Q.
  return jnp.sum(basis * product, axis=-2)


def approximate_eigenvalues(factor: jax.Array, basis: jax.Array) -> jax.Array:
  """diag(Qᵀ F Q): the factor's eigenvalues as the current basis sees them."""
  return _diagonal_of_rotated(basis, jnp.matmul(factor, basis, precision=_EXACT))


def _descending(values: jax.Array) -> jax.Array:
  return jnp.argsort(-values, axis=-1, stable=True)


def descending_order(factor: jax.Array, basis: jax.Array) -> jax.Array:
  """The column order that sorts `approximate_eigenvalues` descending (ties keep their
  order): the reference SOAP sorts its basis, and Adam's nu with it, before each QR."""
  return _descending(approximate_eigenvalues(factor, basis))


def basis_is_current(factor: jax.Array, basis: jax.Array, tolerance) -> jax.Array:
  """The reference SOAP's adaptive criterion: ‖diag(Qᵀ F Q)‖ ≥ (1 - tolerance) ‖F‖_F.

  Q is orthogonal, so ‖Qᵀ F Q‖_F = ‖F‖_F and the left side falls short of it exactly by
  the off-diagonal mass of F in the basis: True means the basis still diagonalises F to
  the tolerance and a refresh can be skipped. Per stacked matrix (reduces the last two
  dims).
  """
  diagonal = jnp.linalg.norm(approximate_eigenvalues(factor, basis), axis=-1)
  return diagonal >= (1 - tolerance) * jnp.linalg.norm(factor, axis=(-2, -1))


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


def aligned_signs(basis: jax.Array, previous: jax.Array) -> jax.Array:
  """Flips each column to point the way of the previous basis's column in its position.

  The sign rule of `canonical_signs` jumps where a column's two largest entries have
  nearly equal magnitude and opposite signs, which a column that rotates during a refresh
  can cross; the sign of its overlap with its predecessor only jumps where the overlap
  passes through 0, which a power-QR refresh (a small turn of each column) does not reach.
  A column exactly orthogonal to its predecessor keeps QR's sign. Deterministic either
  way, so devices and shardings draw the same samples.
  """
  overlap = jnp.sum(basis * previous, axis=-2, keepdims=True)
  return basis * jnp.where(overlap < 0, -1.0, 1.0).astype(basis.dtype)


@dataclasses.dataclass(frozen=True)
class RefreshOptions:
  """How a power-QR refresh runs (static).

  Attributes:
    power_steps: power iterations, each followed by a QR (orthogonal iteration).
    shift: `power_qr`'s shift (0: the reference SOAP's plain ``qr(F Q)``).
    sort: sort the columns by ``diag(Qᵀ F Q)`` before the iteration and permute the buffers
      named as sorted (Adam's nu, IVON's H) with them, as the reference SOAP does.
    precision: of the power iteration's product.
  """

  power_steps: int = 1
  shift: float = POWER_SHIFT
  sort: bool = False
  precision: object = _EXACT


DEFAULT_OPTIONS = RefreshOptions()


def _no_reorder(basis: jax.Array) -> jax.Array:
  return jnp.broadcast_to(jnp.arange(basis.shape[-1]), basis.shape[:-1])


def _new_side(method: int, factor: jax.Array, basis: jax.Array,
              options: RefreshOptions = DEFAULT_OPTIONS):
  """(new basis, column order the old basis was permuted by) for one axis, by `method`
  (POWER_QR or EIGH, a Python int); a basis that is not finite keeps the old one."""
  compute_dtype = jnp.promote_types(basis.dtype, jnp.float32)
  f, q = factor.astype(compute_dtype), basis.astype(compute_dtype)
  if method == POWER_QR:
    if options.sort:
      # One F Q serves the sort and the first power iteration: F (Q P) = (F Q) P.
      product = jnp.matmul(f, q, precision=options.precision)
      order = _descending(_diagonal_of_rotated(q, product))
      start = jnp.take_along_axis(q, order[..., None, :], axis=-1)
      product = jnp.take_along_axis(product, order[..., None, :], axis=-1)
    else:
      order, start, product = _no_reorder(q), q, None
    new = power_qr(f, start, options.shift, options.power_steps, options.precision, product)
    # Signs: a power-QR column follows its predecessor.
    new = aligned_signs(new, start)
  else:
    # eigh's columns are sorted by eigenvalue, not tied to the old ones: canonical signs.
    new, order = eigh_descending(f, q), _no_reorder(q)
  finite = jnp.all(jnp.isfinite(new))
  new = jnp.where(finite, new, q)
  order = jnp.where(finite, order, _no_reorder(q))
  return new.astype(basis.dtype), order


def _refresh_side(kind, factor: jax.Array, basis: jax.Array,
                  options: RefreshOptions = DEFAULT_OPTIONS):
  """`_new_side` by a traced `kind` (KEEP keeps the basis)."""
  def keep(f, q):
    return q, _no_reorder(q)

  branches = [keep] + [lambda f, q, m=m: _new_side(m, f, q, options) for m in (POWER_QR, EIGH)]
  return jax.lax.switch(kind, branches, factor, basis)


def _permute_axis(x: jax.Array, order: jax.Array, axis: int) -> jax.Array:
  """x with its entries along `axis` (a Kronecker axis; `order`'s leading dims are x's
  stacked dims) taken in `order`."""
  batch = order.ndim - 1
  shape = [1] * x.ndim
  shape[:batch] = order.shape[:-1]
  shape[axis] = order.shape[-1]
  return jnp.take_along_axis(x, jnp.reshape(order, shape), axis=axis)


def _moved(sides, old_basis, buffers, per_coordinate, options):
  """A leaf's new bases (`sides`: (basis, order) per axis, None where not rotated), its
  eigen-coordinate buffers moved to them and, with `options.sort`, its per-coordinate
  buffers permuted with the columns."""
  new_basis = tuple(None if side is None else side[0] for side in sides)
  buffers = change_bases(tuple(buffers), old_basis, new_basis)
  if options.sort:
    reordered = []
    for x in per_coordinate:
      start = x.ndim - len(sides)
      for k, side in enumerate(sides):
        if side is not None:
          x = _permute_axis(x, side[1], start + k)
      reordered.append(x)
    per_coordinate = tuple(reordered)
  return new_basis, buffers, tuple(per_coordinate)


class LeafRefresh(NamedTuple):
  """One leaf's part of a refresh: factors and bases per axis (None where not rotated),
  eigen-coordinate buffers (`carried`) and per-coordinate ones (`permuted`)."""

  factors: AxisBases
  basis: AxisBases
  carried: tuple = ()
  permuted: tuple = ()


def is_due(kind) -> jax.Array:
  """Whether a refresh `kind` (one for the leaf, or a tuple of one per side) changes a basis."""
  kinds = kind if isinstance(kind, (tuple, list)) else (kind,)
  return jnp.any(jnp.stack([k != KEEP for k in kinds]))


def refresh_leaves(kind: jax.Array, leaves: Sequence[LeafRefresh],
                   options: RefreshOptions = DEFAULT_OPTIONS) -> list:
  """Refreshes several leaves that share one `kind` (KEEP / POWER_QR / EIGH) under one
  `lax.switch`; returns per leaf (bases, carried, permuted) as `refresh` does.

  One switch for all leaves, and no further branching inside it: XLA's CPU runtime runs the
  sides' independent QRs (LAPACK, one thread each) side by side there, while every
  conditional of its own runs after the previous one (measured: 8 QRs of 768² under one cond
  6.4x one QR's time, under a cond each 8.1x).
  """
  def keep(operands):
    return operands

  def refreshed(method):
    def branch(operands):
      out = []
      for leaf, (basis, carried, permuted) in zip(leaves, operands):
        sides = [None if q is None else _new_side(method, f, q, options)
                 for f, q in zip(leaf.factors, basis)]
        out.append(_moved(sides, basis, carried, permuted, options))
      return out
    return branch

  operands = [(tuple(leaf.basis), tuple(leaf.carried), tuple(leaf.permuted))
              for leaf in leaves]
  return jax.lax.switch(kind, [keep, refreshed(POWER_QR), refreshed(EIGH)], operands)


def refresh(
    kind: jax.Array,
    factors: AxisBases,
    basis: AxisBases,
    carried: Sequence[jax.Array],
    permuted: Sequence[jax.Array] = (),
    options: RefreshOptions = DEFAULT_OPTIONS,
) -> tuple[AxisBases, tuple[jax.Array, ...], tuple[jax.Array, ...]]:
  """Refreshes a basis (`kind` in KEEP / POWER_QR / EIGH, for the leaf or one per side) and
  moves eigen-coordinate buffers.

  `carried` are buffers held in eigen coordinates (momentum, the mean) whose parameter-space
  value must not change when the basis does. `permuted` are per-coordinate buffers that stay
  in place (Adam's nu, IVON's H) except that, with `options.sort`, their entries follow the
  columns of a sorted power-QR refresh. The refresh runs only when due, under a conditional
  (`refresh_leaves` for one kind; a kind per side: a `lax.cond`, then a switch per side).
  Returns (bases, carried, permuted).

  (Until 2026-12-07 EVON ran it as a `while_loop` taken zero or one times, whose carry was
  meant to update in place. With jax 0.10 the loop's carry takes LAPACK's column-major
  layout: 32 transposing copies of the bases per step on `benchmarks.run`'s d = 256 shapes,
  41 ms of op time, 12 MB more temporaries. The cond is 17 ms per step faster there.)
  """
  if all(b is None for b in basis):
    return basis, tuple(carried), tuple(permuted)
  if not isinstance(kind, (tuple, list)):
    return refresh_leaves(kind, [LeafRefresh(factors, basis, tuple(carried),
                                             tuple(permuted))], options)[0]
  # One kind per side (an adaptive criterion judged per side).
  kinds = tuple(kind)

  def moved(operands):
    old_basis, buffers, per_coordinate = operands
    sides = [None if q is None else _refresh_side(k, f, q, options)
             for k, f, q in zip(kinds, factors, old_basis)]
    return _moved(sides, old_basis, buffers, per_coordinate, options)

  operands = (tuple(basis), tuple(carried), tuple(permuted))
  return jax.lax.cond(is_due(kinds), moved, lambda ops: ops, operands)


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
