"""Unit tests of evon_jax.kronecker, evon_jax.eigenbasis and evon_jax.whitening against NumPy.

Tolerances. Inputs are O(1) float32 matrices of side <= 6, so a product of two or three of
them carries a relative error of a few float32 ulp; we allow 1e-5 (absolute, on O(1) values).
Newton–Schulz: see `test_newton_schulz_commutes_with_rotations`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evon_jax import eigenbasis, kronecker, whitening
from evon_jax.maths import null_space
from evon_jax.maths.layout import leaf_layout

ATOL = 1e-5


def _orthogonal(rng, n):
  q, r = np.linalg.qr(rng.standard_normal((n, n)))
  return q * np.sign(np.diag(r))


def _f64(x):
  return np.asarray(x, np.float64)


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def _basis(rng, rows, cols, sides):
  left = _orthogonal(rng, rows) if "L" in sides else None
  right = _orthogonal(rng, cols) if "R" in sides else None
  return left, right


def _pair(left, right):
  return (None if left is None else _f32(left), None if right is None else _f32(right))


def _dense(q, n):
  return np.eye(n) if q is None else q


# ----------------------------------------------------------------------------------------------
# kronecker


@pytest.mark.parametrize("sides", ["LR", "L", "R", ""])
def test_rotate_in_out(sides):
  rng = np.random.default_rng(0)
  left, right = _basis(rng, 5, 4, sides)
  basis = _pair(left, right)
  x = rng.standard_normal((5, 4))
  ql, qr = _dense(left, 5), _dense(right, 4)

  rotated = kronecker.rotate_in(_f32(x), basis)
  np.testing.assert_allclose(_f64(rotated), ql.T @ x @ qr, atol=ATOL)
  back = kronecker.rotate_out(rotated, basis)
  np.testing.assert_allclose(_f64(back), x, atol=ATOL)
  np.testing.assert_allclose(_f64(kronecker.rotate_out(_f32(x), basis)), ql @ x @ qr.T,
                             atol=ATOL)
  np.testing.assert_allclose(
      _f64(kronecker.rotate_in(kronecker.rotate_out(_f32(x), basis), basis)), x, atol=ATOL)

  # A leading batch axis is rotated slice by slice.
  batch = rng.standard_normal((3, 5, 4))
  out = _f64(kronecker.rotate_out(_f32(batch), basis))
  for i in range(3):
    np.testing.assert_allclose(out[i], ql @ batch[i] @ qr.T, atol=ATOL)


@pytest.mark.parametrize("sides", ["LR", "L", "R"])
def test_change_basis_keeps_parameter_value(sides):
  rng = np.random.default_rng(1)
  old_l, old_r = _basis(rng, 5, 4, sides)
  new_l, new_r = _basis(rng, 5, 4, sides)
  old, new = _pair(old_l, old_r), _pair(new_l, new_r)
  x = rng.standard_normal((2, 5, 4))  # a stack of buffers (momentum, mean)
  moved = _f64(kronecker.change_basis(_f32(x), old, new))
  for i in range(2):
    value = _dense(old_l, 5) @ x[i] @ _dense(old_r, 4).T
    np.testing.assert_allclose(_dense(new_l, 5) @ moved[i] @ _dense(new_r, 4).T, value,
                               atol=ATOL)
    np.testing.assert_allclose(moved[i], _dense(new_l, 5).T @ value @ _dense(new_r, 4),
                               atol=ATOL)


@pytest.mark.parametrize("buffers", [1, 3])
@pytest.mark.parametrize("batch", [(), (2,)])
def test_change_bases_both_routes_keep_parameter_value(buffers, batch):
  """A 3 x 12 leaf: its 12 side goes through parameter coordinates (12² > buffers·36), its
  3 side through the transition matrix; either way each buffer must keep its value
  Q_L X Q_Rᵀ. With `batch`, a stack of leaves with their own bases."""
  assert kronecker._through_parameter_space(12, 36, buffers)
  assert not kronecker._through_parameter_space(3, 36, buffers)
  rng = np.random.default_rng(31)
  count = int(np.prod(batch)) if batch else 1
  olds = [(_orthogonal(rng, 3), _orthogonal(rng, 12)) for _ in range(count)]
  news = [(_orthogonal(rng, 3), _orthogonal(rng, 12)) for _ in range(count)]

  def stacked(mats, k):
    return _f32(np.stack([m[k] for m in mats]).reshape(batch + mats[0][k].shape))

  old = (stacked(olds, 0), stacked(olds, 1))
  new = (stacked(news, 0), stacked(news, 1))
  xs = [rng.standard_normal(batch + (3, 12)) for _ in range(buffers)]
  moved = kronecker.change_bases(tuple(_f32(x) for x in xs), old, new)
  assert len(moved) == buffers
  for x, m in zip(xs, moved):
    x, m = x.reshape(count, 3, 12), _f64(m).reshape(count, 3, 12)
    for i in range(count):
      value = olds[i][0] @ x[i] @ olds[i][1].T
      np.testing.assert_allclose(m[i], news[i][0].T @ value @ news[i][1], atol=ATOL)


def test_factor_statistics_and_ema():
  rng = np.random.default_rng(2)
  layout = leaf_layout((5, 4), jnp.float32, max_precond_dim=100, precondition_1d=False)
  g = rng.standard_normal((5, 4))
  stats = kronecker.factor_statistics(_f32(g), layout)
  np.testing.assert_allclose(_f64(stats[0]), g @ g.T, rtol=1e-6, atol=ATOL)
  np.testing.assert_allclose(_f64(stats[1]), g.T @ g, rtol=1e-6, atol=ATOL)

  stack = rng.standard_normal((3, 5, 4))
  mean_stats = kronecker.mean_factor_statistics(_f32(stack), layout)
  np.testing.assert_allclose(_f64(mean_stats[0]),
                             np.mean([s @ s.T for s in stack], axis=0), atol=ATOL)
  np.testing.assert_allclose(_f64(mean_stats[1]),
                             np.mean([s.T @ s for s in stack], axis=0), atol=ATOL)

  old = (_f32(np.eye(5)), _f32(np.eye(4)))
  updated = kronecker.ema(old, stats, 0.9)
  np.testing.assert_allclose(_f64(updated[0]), 0.9 * np.eye(5) + 0.1 * g @ g.T, atol=ATOL)
  np.testing.assert_allclose(_f64(updated[1]), 0.9 * np.eye(4) + 0.1 * g.T @ g, atol=ATOL)

  # A one-sided layout (the column side is too long) keeps the identity side None.
  one_sided = leaf_layout((5, 4), jnp.float32, max_precond_dim=4, precondition_1d=False)
  assert not one_sided.rotated[0] and one_sided.rotated[1]  # 5 rows > max_precond_dim = 4
  stats = kronecker.factor_statistics(_f32(g), one_sided)
  assert stats[0] is None
  np.testing.assert_allclose(_f64(stats[1]), g.T @ g, atol=ATOL)


# ----------------------------------------------------------------------------------------------
# eigenbasis


def _symmetric_with_spectrum(rng, eigenvalues):
  q = _orthogonal(rng, len(eigenvalues))
  return q @ np.diag(eigenvalues) @ q.T


def test_eigh_descending():
  rng = np.random.default_rng(3)
  a = rng.standard_normal((6, 6))
  a = a @ a.T
  q = _f64(eigenbasis.eigh_descending(_f32(a)))
  np.testing.assert_allclose(q.T @ q, np.eye(6), atol=ATOL)
  rayleigh = q.T @ a @ q
  scale = np.abs(a).max()
  np.testing.assert_allclose(rayleigh, np.diag(np.diag(rayleigh)), atol=1e-5 * scale)
  diagonal = np.diag(rayleigh)
  assert np.all(np.diff(diagonal) <= 1e-5 * scale), diagonal
  np.testing.assert_allclose(diagonal, np.sort(np.linalg.eigvalsh(a))[::-1], atol=1e-5 * scale)


def test_power_qr_orthonormal_and_spans_factor_times_basis():
  rng = np.random.default_rng(4)
  factor = _symmetric_with_spectrum(rng, [5.0, 3.0, 2.0, 1.0, 0.5])
  basis = _orthogonal(rng, 5)
  q = _f64(eigenbasis.power_qr(_f32(factor), _f32(basis)))
  np.testing.assert_allclose(q.T @ q, np.eye(5), atol=ATOL)
  # Q R = (F + μI) Q_old with R upper triangular (μ = shift × the largest column of F Q_old):
  # Q spans the shifted power step column by column.
  shifted = _shifted_power_step(factor, basis)
  r = q.T @ shifted
  np.testing.assert_allclose(np.tril(r, -1), 0, atol=1e-5 * np.abs(r).max())
  np.testing.assert_allclose(q @ r, shifted, atol=1e-5 * np.abs(factor).max())


def _shifted_power_step(factor, basis):
  product = factor @ basis
  mu = eigenbasis.POWER_SHIFT * np.linalg.norm(product, axis=0).max()
  return product + mu * basis


@pytest.mark.parametrize("shape", [(3, 5, 5), (256, 256), (2, 200, 200)])
def test_orthonormal_columns_is_the_q_of_numpys_qr(shape):
  """The QR behind `power_qr` (on CPU with zero rows appended, which must not change Q):
  against NumPy's float64 QR of the same matrices, columns signed by R's diagonal. These
  random matrices have condition numbers up to 1.7e3, so float32 Householder QR gives Q
  within ~cond·eps = 1e-4 of float64's at worst; measured max deviation 1.6e-6 (tolerance
  5e-5), orthonormality 6e-7 (tolerance 2e-5)."""
  rng = np.random.default_rng(21)
  a = rng.standard_normal(shape)
  q = _f64(eigenbasis.orthonormal_columns(_f32(a)))
  assert q.shape == shape
  ref_q, ref_r = np.linalg.qr(a)
  ref_q = ref_q * np.sign(np.diagonal(ref_r, axis1=-2, axis2=-1))[..., None, :]
  # Our Q's column signs are LAPACK's: fix them the same way (R = Qᵀ A).
  r_diag = np.einsum("...ij,...ij->...j", q, a)
  q = q * np.sign(r_diag)[..., None, :]
  np.testing.assert_allclose(q, ref_q, atol=5e-5)
  eye = np.broadcast_to(np.eye(shape[-1]), shape)
  np.testing.assert_allclose(np.swapaxes(q, -1, -2) @ q, eye, atol=2e-5)


def test_power_qr_rank_deficient_factor_stays_orthonormal():
  """The first factor is (1 - b) g gᵀ, of rank one: Q must still be orthonormal and keep
  F Q_old in its span (the shift keeps (F + μI) Q_old of full rank)."""
  rng = np.random.default_rng(12)
  g = rng.standard_normal((5, 1))
  factor = g @ g.T
  basis = _orthogonal(rng, 5)
  q = _f64(eigenbasis.power_qr(_f32(factor), _f32(basis)))
  assert np.all(np.isfinite(q))
  np.testing.assert_allclose(q.T @ q, np.eye(5), atol=ATOL)
  np.testing.assert_allclose(q @ (q.T @ factor @ basis), factor @ basis,
                             atol=1e-5 * float(np.sum(g * g)))


def test_power_qr_fixed_point_is_eigenbasis():
  rng = np.random.default_rng(5)
  eigenvalues = [5.0, 3.0, 2.0, 1.0]
  vectors = _orthogonal(rng, 4)
  factor = vectors @ np.diag(eigenvalues) @ vectors.T
  q = _f64(eigenbasis.power_qr(_f32(factor), _f32(vectors)))
  # Same columns up to sign.
  np.testing.assert_allclose(np.abs(np.sum(q * vectors, axis=0)), 1.0, atol=ATOL)


@pytest.mark.parametrize("kind", [eigenbasis.POWER_QR, eigenbasis.EIGH])
def test_refresh_moves_buffers_and_keeps_their_value(kind):
  rng = np.random.default_rng(6)
  old_l, old_r = _orthogonal(rng, 5), _orthogonal(rng, 4)
  factors = (_f32(_symmetric_with_spectrum(rng, [6.0, 4.0, 3.0, 2.0, 1.0])),
                          _f32(_symmetric_with_spectrum(rng, [4.0, 2.0, 1.5, 1.0])))
  buffers = [rng.standard_normal((5, 4)) for _ in range(2)]
  basis, moved, _ = eigenbasis.refresh(jnp.asarray(kind, jnp.int32), factors,
                                       _pair(old_l, old_r), tuple(_f32(b) for b in buffers))
  new_l, new_r = _f64(basis[0]), _f64(basis[1])
  np.testing.assert_allclose(new_l.T @ new_l, np.eye(5), atol=ATOL)
  np.testing.assert_allclose(new_r.T @ new_r, np.eye(4), atol=ATOL)
  assert not np.allclose(new_l, old_l, atol=1e-2)
  for b, m in zip(buffers, moved):
    np.testing.assert_allclose(new_l @ _f64(m) @ new_r.T, old_l @ b @ old_r.T, atol=ATOL)
  if kind == eigenbasis.EIGH:
    rayleigh = new_l.T @ _f64(factors[0]) @ new_l
    np.testing.assert_allclose(rayleigh, np.diag([6.0, 4.0, 3.0, 2.0, 1.0]), atol=1e-4)


def test_refresh_keep_changes_nothing():
  rng = np.random.default_rng(7)
  basis = _pair(_orthogonal(rng, 5), _orthogonal(rng, 4))
  factors = (_f32(np.eye(5)), _f32(np.eye(4)))
  buffer = _f32(rng.standard_normal((5, 4)))
  new_basis, (moved,), _ = eigenbasis.refresh(jnp.asarray(eigenbasis.KEEP, jnp.int32), factors,
                                           basis, (buffer,))
  np.testing.assert_array_equal(np.asarray(new_basis[0]), np.asarray(basis[0]))
  np.testing.assert_array_equal(np.asarray(new_basis[1]), np.asarray(basis[1]))
  np.testing.assert_array_equal(np.asarray(moved), np.asarray(buffer))


@pytest.mark.parametrize("kind", [eigenbasis.POWER_QR, eigenbasis.EIGH])
def test_refresh_with_nan_factor_keeps_previous_basis(kind):
  rng = np.random.default_rng(8)
  old_l, old_r = _orthogonal(rng, 5), _orthogonal(rng, 4)
  bad_left = _symmetric_with_spectrum(rng, [6.0, 4.0, 3.0, 2.0, 1.0])
  bad_left[1, 2] = bad_left[2, 1] = np.nan
  good_right = _symmetric_with_spectrum(rng, [4.0, 2.0, 1.5, 1.0])
  buffer = rng.standard_normal((5, 4))
  basis, (moved,), _ = eigenbasis.refresh(
      jnp.asarray(kind, jnp.int32), (_f32(bad_left), _f32(good_right)),
      _pair(old_l, old_r), (_f32(buffer),))
  # The NaN side keeps its basis; the healthy side is refreshed; all finite.
  np.testing.assert_allclose(_f64(basis[0]), old_l, atol=1e-7)
  assert not np.allclose(_f64(basis[1]), old_r, atol=1e-2)
  assert np.all(np.isfinite(_f64(moved)))
  new_r = _f64(basis[1])
  np.testing.assert_allclose(old_l @ _f64(moved) @ new_r.T, old_l @ buffer @ old_r.T,
                             atol=ATOL)

  # Both sides NaN: nothing moves.
  bad_right = good_right.copy()
  bad_right[0, 0] = np.nan
  basis, (moved,), _ = eigenbasis.refresh(
      jnp.asarray(kind, jnp.int32), (_f32(bad_left), _f32(bad_right)),
      _pair(old_l, old_r), (_f32(buffer),))
  np.testing.assert_allclose(_f64(basis[0]), old_l, atol=1e-7)
  np.testing.assert_allclose(_f64(basis[1]), old_r, atol=1e-7)
  np.testing.assert_allclose(_f64(moved), buffer, atol=ATOL)


def test_refresh_kind_schedule():
  kinds = [int(eigenbasis.refresh_kind(jnp.asarray(step == 0), jnp.asarray(step), 3, 0,
                                       "power_qr")) for step in range(7)]
  p, k, e = eigenbasis.POWER_QR, eigenbasis.KEEP, eigenbasis.EIGH
  assert kinds == [e, k, k, p, k, k, p]
  assert int(eigenbasis.refresh_kind(jnp.asarray(False), jnp.asarray(3), 3, 0, "eigh")) == e
  # An offset shifts the period (stagger_refresh).
  assert int(eigenbasis.refresh_kind(jnp.asarray(False), jnp.asarray(2), 3, 1, "power_qr")) == p


def test_refresh_is_a_no_op_without_bases():
  buffer = _f32(np.ones((3, 1)))
  basis, (moved,), _ = eigenbasis.refresh(jnp.asarray(eigenbasis.EIGH, jnp.int32),
                                       (None, None), (None, None),
                                       (buffer,))
  assert basis == (None, None)
  np.testing.assert_array_equal(np.asarray(moved), np.asarray(buffer))


# ----------------------------------------------------------------------------------------------
# whitening


def _newton_schulz_numpy(x, steps=5):
  """The quintic iteration of docs/algorithm.md in float64 (independent re-implementation)."""
  a, b, c = 3.4445, -4.7750, 2.0315
  transpose = x.shape[0] > x.shape[1]
  if transpose:
    x = x.T
  x = x / (np.linalg.norm(x) + 1e-7)
  for _ in range(steps):
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x.T if transpose else x


# Float32 tolerance for Newton–Schulz: each of the 5 iterations applies the odd quintic
# p(s) = a s + b s³ + c s⁵ to the singular values, whose derivative is at most |a| = 3.44 on
# [0, 1.2]; a rounding error therefore grows by at most 3.44⁵ ≈ 480 over the iteration. Each
# step's products (inner dimension <= 6) add ~6 ulp ≈ 7e-7, so the worst case is
# ≈ 480 x 7e-7 ≈ 3.4e-4 on O(1) entries; we allow 5e-4.
NS_ATOL = 5e-4


@pytest.mark.parametrize("shape", [(5, 4), (4, 6), (3, 3)])
def test_newton_schulz_matches_numpy_and_commutes_with_rotations(shape):
  rng = np.random.default_rng(9)
  x = rng.standard_normal(shape)
  a, b = _orthogonal(rng, shape[0]), _orthogonal(rng, shape[1])
  ns_x = _f64(whitening.newton_schulz(_f32(x)))
  np.testing.assert_allclose(ns_x, _newton_schulz_numpy(x), atol=NS_ATOL)
  rotated = _f64(whitening.newton_schulz(_f32(a @ x @ b)))
  np.testing.assert_allclose(rotated, a @ ns_x @ b, atol=NS_ATOL)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape", [(5, 4), (4, 6), (6, 6), (2, 6)])
def test_newton_schulz_singular_values(seed, shape):
  """Five quintic steps map every singular value σ >= 1.31e-3 ‖X‖_F into [0.6, 1.21].

  (Iterating the scalar map p five times from s0 = σ/‖X‖_F: below s0 ≈ 1.3e-3 the growth
  factor p'(0)⁵ = 3.44⁵ ≈ 480 is not enough to reach 0.6 — e.g. a random Gaussian 6x6 matrix
  can have σ_min / ‖X‖_F ~ 1e-3 — so the spectrum is drawn with a bounded condition number.)
  """
  rng = np.random.default_rng(100 + seed)
  k = min(shape)
  spectrum = 10.0 ** rng.uniform(-2, 0, size=k)  # condition number <= 100
  spectrum[0] = 1.0
  assert spectrum.min() / np.linalg.norm(spectrum) > 1.31e-3 * 1.2
  u, _ = np.linalg.qr(rng.standard_normal((shape[0], k)))
  v, _ = np.linalg.qr(rng.standard_normal((shape[1], k)))
  x = (u * spectrum) @ v.T * 10.0 ** rng.uniform(-3, 3)  # the overall scale must not matter
  singular_values = np.linalg.svd(_f64(whitening.newton_schulz(_f32(x))), compute_uv=False)
  assert singular_values.min() >= 0.6 and singular_values.max() <= 1.3, singular_values


def _spectrum_matrix(rng, shape, smallest):
  """A matrix of `shape` with singular values log-spaced from 1 down to `smallest`."""
  k = min(shape)
  u, _ = np.linalg.qr(rng.standard_normal((shape[0], k)))
  v, _ = np.linalg.qr(rng.standard_normal((shape[1], k)))
  return (u * np.logspace(0, np.log10(smallest), k)) @ v.T


@pytest.mark.parametrize("shape", [(16, 64), (64, 16), (24, 80), (128, 512)])
def test_newton_schulz_on_wide_matrices_is_float32_accurate(shape):
  """Wide leaves (n > 1.5 m) run the iteration on m x m polynomials of X Xᵀ. Against the
  float64 direct iteration, relative to the largest entry, over seeds 0-3 and spectra down
  to 1e-2 / 1e-6 of the largest singular value: measured ≤ 1.9e-5 (the direct float32
  iteration: ≤ 2.1e-5). Bound 1e-4. Running all five steps on one Gram matrix measured
  1.0e-3 on the same inputs and fails it."""
  worst = 0.0
  for seed in range(4):
    rng = np.random.default_rng(seed)
    for smallest in (1e-2, 1e-6):
      x = _spectrum_matrix(rng, shape, smallest)
      expected = _newton_schulz_numpy(x)
      got = _f64(whitening.newton_schulz(_f32(x)))
      worst = max(worst, np.abs(got - expected).max() / np.abs(expected).max())
  assert worst < 1e-4, worst


def test_newton_schulz_takes_the_cheaper_path():
  """Counted in the traced program, not timed: a wide matrix forms X's size only once per
  Gram chunk (the products P X), a square one in each of the direct iteration's three
  products per step; both as `iteration_flops` says is cheaper."""
  def full_size_products(shape):
    jaxpr = jax.make_jaxpr(whitening.newton_schulz)(jnp.ones(shape, jnp.float32))
    return sum(1 for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "dot_general"
               and tuple(eqn.outvars[0].aval.shape[-2:]) in (shape, shape[::-1]))

  wide, square = whitening.iteration_flops(32, 128), whitening.iteration_flops(32, 32)
  assert wide["gram"] < 0.7 * wide["direct"] and square["direct"] < square["gram"]
  assert full_size_products((32, 128)) == 2  # chunks of 3 + 2 steps
  assert full_size_products((128, 32)) == 2
  assert full_size_products((32, 32)) == 3 * 5  # X Xᵀ, G², (bG + cG²) X: all m x m


def test_whiten_vector_is_l2_normalisation():
  rng = np.random.default_rng(10)
  v = rng.standard_normal(6)
  layout = leaf_layout((6,), jnp.float32, max_precond_dim=100, precondition_1d=True)
  out = _f64(whitening.whiten(_f32(v.reshape(6, 1)), layout))
  np.testing.assert_allclose(out.ravel(), v / np.linalg.norm(v), rtol=1e-6, atol=1e-7)
  # The scalar case: a sign.
  scalar = leaf_layout((), jnp.float32, max_precond_dim=100, precondition_1d=True)
  np.testing.assert_allclose(_f64(whitening.whiten(_f32([[-0.3]]), scalar)), [[-1.0]],
                             rtol=1e-5)
  # A matrix leaf goes through Newton–Schulz instead.
  matrix = leaf_layout((5, 4), jnp.float32, max_precond_dim=100, precondition_1d=False)
  x = rng.standard_normal((5, 4))
  np.testing.assert_allclose(_f64(whitening.whiten(_f32(x), matrix)), _newton_schulz_numpy(x),
                             atol=NS_ATOL)
  # Norms are rotation invariant: L2 normalisation commutes with an orthogonal map.
  q = _orthogonal(rng, 6)
  rotated = _f64(whitening.whiten(_f32((q @ v).reshape(6, 1)), layout)).ravel()
  np.testing.assert_allclose(rotated, q @ (v / np.linalg.norm(v)), atol=1e-6)


# --------------------------------------------------------------- null spaces (issue 16)
# A factor G Gᵀ of a 48 x 24 gradient has a 24-dimensional null space, whose eigenvectors
# `eigh` picks from its rounding errors. The bases must not jump when G changes by 1e-7
# (relative): measured max |ΔQ| of the refreshed bases over seeds 0-9 below (float32).

import sys, pathlib  # noqa: E402
sys.path.insert(0, str(pathlib.Path(__file__).parent))
import numpy_reference as ref  # noqa: E402

CONTINUITY_BOUND = 1e-3


def _rank_deficient(seed, rows=48, rank=24):
  rng = np.random.default_rng(seed)
  g = rng.standard_normal((rows, rank)).astype(np.float32)
  perturbed = g * (1 + 1e-7 * rng.standard_normal(g.shape)).astype(np.float32)
  return g @ g.T, perturbed @ perturbed.T


def _refreshed(kind, factor, basis):
  # Through the optimizers' own path (float32, canonical signs, non-finite guard).
  return _f64(eigenbasis._refresh_side(kind, _f32(factor), _f32(basis))[0])


@pytest.mark.parametrize("seed", range(4))
def test_first_eigh_basis_is_continuous_in_the_factor(seed):
  """Measured over seeds 0-9: max |ΔQ| 1.3e-6 … 1.0e-5; eigh's untreated basis differs by
  0.68 … 0.80 between the two factors."""
  factor, perturbed = _rank_deficient(seed)
  identity = np.eye(48)
  a, b = (_refreshed(eigenbasis.EIGH, f, identity) for f in (factor, perturbed))
  assert np.max(np.abs(a - b)) <= CONTINUITY_BOUND


@pytest.mark.parametrize("seed", range(4))
def test_power_qr_basis_is_continuous_in_the_factor(seed):
  """A power-QR refresh from a basis whose last columns lie in the factor's null space
  (as after a first eigh): with the shift they keep their direction instead of
  QR-normalising noise. Measured over seeds 0-9: max |ΔQ| 1.0e-5 … 1.6e-5, null columns
  within 1.0e-5 … 1.8e-5 of the old ones (bound 1e-4)."""
  factor, perturbed = _rank_deficient(seed)
  start = _refreshed(eigenbasis.EIGH, factor, np.eye(48))
  a, b = (_refreshed(eigenbasis.POWER_QR, f, start) for f in (factor, perturbed))
  assert np.max(np.abs(a - b)) <= CONTINUITY_BOUND
  # The null columns are the old ones (signs aligned with them).
  np.testing.assert_allclose(a[:, 24:], start[:, 24:], atol=1e-4)


def test_null_tie_break_keeps_the_eigenvectors_and_the_null_span():
  rng = np.random.default_rng(4)
  g = rng.standard_normal((8, 3))
  factor = g @ g.T                      # rank 3
  reference = _orthogonal(rng, 8)
  q = _f64(eigenbasis.eigh_descending(_f32(factor), _f32(reference)))
  np.testing.assert_allclose(q.T @ q, np.eye(8), atol=ATOL)
  values, vectors = np.linalg.eigh(factor)
  genuine = vectors[:, ::-1][:, :3]
  # The first three columns are eigh's eigenvectors (up to sign), the rest span the null space.
  np.testing.assert_allclose(np.abs(np.sum(q[:, :3] * genuine, axis=0)), 1.0, atol=1e-5)
  np.testing.assert_allclose(factor @ q[:, 3:], 0.0, atol=1e-5 * np.abs(factor).max())
  # And the null columns are the rule's: the NumPy re-derivation (k x k eigenproblem).
  expected = ref.eigh_descending(factor, reference)
  np.testing.assert_allclose(np.abs(np.sum(q[:, 3:] * expected[:, 3:], axis=0)), 1.0,
                             atol=1e-5)


def test_zero_factor_keeps_the_reference_basis():
  reference = _orthogonal(np.random.default_rng(5), 6)
  for kind in (eigenbasis.EIGH, eigenbasis.POWER_QR):
    q = _refreshed(kind, np.zeros((6, 6)), reference)
    np.testing.assert_allclose(np.abs(np.sum(q * reference, axis=0)), 1.0, atol=1e-6)


@pytest.mark.parametrize("count", [0, 3, 7])
def test_pivoted_householder_equals_the_gram_schmidt_loop(count):
  """The CPU path (LAPACK's pivoted QR) and the portable loop give the same vectors."""
  rng = np.random.default_rng(count)
  null = rng.normal(size=(10, 7))
  basis = np.linalg.qr(null)[0]
  columns = jnp.asarray(basis @ basis.T @ np.linalg.qr(rng.normal(size=(10, 10)))[0],
                        jnp.float32)
  loop = null_space._pivoted_gram_schmidt(columns, jnp.asarray(count))
  householder = null_space._pivoted_householder(columns, jnp.asarray(count))
  # Measured max difference 2e-7 (float32); columns past `count` are exactly zero in both.
  np.testing.assert_allclose(np.asarray(householder), np.asarray(loop), atol=1e-5)
  assert not np.any(np.asarray(loop)[:, count:])
