"""The pieces an optimizer step is made of, timed alone: where EVON's and SOAP's time goes.

Per transformer-shaped parameter set (all leaves at once, one jitted function per piece):
rotations (Q_Lᵀ G Q_R for every leaf), factor statistics (G Gᵀ, Gᵀ G), Newton–Schulz
whitening, the noise draw (JAX's threefry `normal`, and a counter-hash alternative), the
elementwise IVON update, the refresh (power iteration + QR of every factor, `eigh`) and
the change of basis. Per factor size k: Householder QR (LAPACK), Cholesky-QR2, `eigh`,
one k x k product — with the OpenBLAS thread count LAPACK runs with as found and with 1.
"""

from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from evon_jax import eigenbasis, ivon_step, kronecker, whitening
from evon_jax.maths.layout import leaf_layout

_EXACT = jax.lax.Precision.HIGHEST


def time_call(fn, *args, repeats: int = 7) -> float:
  """Median wall time of a jitted call in milliseconds (after one warm-up call)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def cholesky_qr2(a: jax.Array) -> jax.Array:
  """Q of A = QR by two rounds of Cholesky-QR (matmul + Cholesky + triangular solve).

  Same Q as Householder QR (up to column signs) while A is not too ill-conditioned
  (cond(A) below ~1e4 in float32); a production version needs a shift or a QR fallback.
  """

  def once(x):
    gram = jnp.matmul(x.T, x, precision=_EXACT)
    upper = jnp.linalg.cholesky(gram).T
    return jax.scipy.linalg.solve_triangular(upper, x.T, trans="T", lower=False).T

  return once(once(a))


def _lowbias32(x):
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def hash_normal(seed: jax.Array, shape) -> jax.Array:
  """Standard normals from a counter hash (lowbias32) + erfinv: a cheap non-threefry draw."""
  size = int(np.prod(shape))
  counter = jax.lax.iota(jnp.uint32, size) * jnp.uint32(0x9E3779B9) + seed
  bits = _lowbias32(counter)
  uniform = jax.lax.bitcast_convert_type(
      (bits >> 9) | jnp.uint32(0x3F800000), jnp.float32) - 1.0  # [0, 1)
  return (np.sqrt(2.0) * jax.scipy.special.erfinv(2.0 * uniform - 1.0 + 2.0 ** -23)).reshape(
      shape)


def step_pieces(d: int, layers: int, repeats: int = 5) -> dict:
  """Milliseconds of each piece of a step over all leaves of `transformer_shapes(d, layers)`."""
  shapes = common.transformer_shapes(d, layers)
  params = common.make_params(shapes, 0, scale=1.0)
  leaves = jax.tree.leaves(params)
  layouts = [leaf_layout(x.shape, x.dtype, max_precond_dim=10000, precondition_1d=False)
             for x in leaves]
  factors = [kronecker.factor_statistics(x, lay) for x, lay in zip(leaves, layouts)]
  bases = [tuple(None if f is None else eigenbasis.eigh_descending(f) for f in per_axis)
           for per_axis in factors]
  num = sum(x.size for x in leaves)
  out = {"d": d, "layers": layers, "num_params": int(num)}

  def timed(name, fn, *args):
    out[name] = time_call(jax.jit(fn), *args, repeats=repeats)

  timed("rotate_in_all", lambda xs, qs: [kronecker.rotate_in(x, q) for x, q in zip(xs, qs)],
        leaves, bases)
  timed("factor_statistics_all",
        lambda xs: [kronecker.factor_statistics(x, lay) for x, lay in zip(xs, layouts)], leaves)
  timed("newton_schulz_all",
        lambda xs: [whitening.whiten(x, lay) for x, lay in zip(xs, layouts)], leaves)
  key = jax.random.key(0)
  timed("threefry_normal_all",
        lambda k: [jax.random.normal(jax.random.fold_in(k, i), x.shape)
                   for i, x in enumerate(leaves)], key)
  timed("threefry_bits_all",
        lambda k: [jax.random.bits(jax.random.fold_in(k, i), x.shape)
                   for i, x in enumerate(leaves)], key)
  timed("hash_normal_all",
        lambda s: [hash_normal(s + jnp.uint32(i * 7919), x.shape) for i, x in enumerate(leaves)],
        jnp.uint32(1234))

  def ivon_elementwise(ms, hs, gs, zs):
    outs = []
    for m, h, g, z in zip(ms, hs, gs, zs):
      est = ivon_step.price_hessian_estimate(z * g, h, 1e6, 1e-6)
      h2 = ivon_step.ivon_hessian_update(h, est, 0.9999, 1e-6)
      u = ivon_step.ivon_direction(g, 0.5, m, h2, 1e-6, 1e-10)
      outs.append((m - 1e-3 * u, h2, m + ivon_step.posterior_std(h2, 1e6, 1e-6) * z))
    return outs

  hess = [jnp.full(x.shape, 0.1) for x in leaves]
  timed("ivon_elementwise_all", ivon_elementwise, leaves, hess, leaves, leaves)
  timed("adam_elementwise_all",
        lambda ms, gs: [(0.9 * m + 0.1 * g, m / (jnp.sqrt(0.99 * m * m + 0.01 * g * g) + 1e-8))
                        for m, g in zip(ms, gs)], leaves, leaves)
  timed("power_qr_all", lambda fs, qs: [
      [eigenbasis.power_qr(f, q) for f, q in zip(fp, qp)] for fp, qp in zip(fs, qs)],
        factors, bases)
  timed("power_cholesky_qr2_all", lambda fs, qs: [
      [cholesky_qr2(jnp.matmul(f, q, precision=_EXACT)) for f, q in zip(fp, qp)]
      for fp, qp in zip(fs, qs)], factors, bases)
  timed("eigh_all", lambda fs: [[eigenbasis.eigh_descending(f) for f in fp] for fp in fs],
        factors)
  others = [2.0 * x + 1.0 for x in leaves]  # a second, different buffer (no CSE)
  timed("change_basis_1_buffer_all", lambda xs, qs, q2s: [
      kronecker.change_basis(x, q, q2) for x, q, q2 in zip(xs, qs, q2s)],
        leaves, bases, bases)
  timed("change_basis_2_buffers_all", lambda xs, ys, qs, q2s: [
      kronecker.change_bases((x, y), q, q2) for x, y, q, q2 in zip(xs, ys, qs, q2s)],
        leaves, others, bases, bases)
  return out


def factor_size_pieces(sizes: Sequence[int], repeats: int = 5) -> list[dict]:
  """QR (plain, and with the refresh's zero rows appended: `eigenbasis.orthonormal_columns`)
  / Cholesky-QR2 / eigh / product of one k x k factor, per k and LAPACK thread count."""
  qr = jax.jit(lambda a: jnp.linalg.qr(a)[0])
  padded_qr = jax.jit(eigenbasis.orthonormal_columns)
  chol = jax.jit(cholesky_qr2)
  eigh = jax.jit(eigenbasis.eigh_descending)
  product = jax.jit(lambda a, b: jnp.matmul(a, b, precision=_EXACT))
  default_threads = common.lapack_threads()
  thread_settings = sorted({max(default_threads or [1]), 1}, reverse=True)
  out = []
  try:
    for threads in thread_settings:
      common.set_lapack_threads(threads)
      for k in sizes:
        a = jax.random.normal(jax.random.key(k), (k, k))
        spd = jnp.matmul(a, a.T, precision=_EXACT) / k + 1e-3 * jnp.eye(k)
        power = jnp.matmul(spd, a, precision=_EXACT)
        out.append({
            "k": k, "lapack_threads": threads,
            "qr_ms": time_call(qr, power, repeats=repeats),
            "padded_qr_ms": time_call(padded_qr, power, repeats=repeats),
            "cholesky_qr2_ms": time_call(chol, power, repeats=repeats),
            "eigh_ms": time_call(eigh, spd, repeats=repeats),
            "matmul_ms": time_call(product, spd, a, repeats=repeats)})
  finally:
    if default_threads:
      common.set_lapack_threads(max(default_threads))
  return out
