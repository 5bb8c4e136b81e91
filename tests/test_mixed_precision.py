"""Mixed precision: bfloat16 parameters with float32 statistics, eigen-solves never in
bfloat16, and float64 end to end (in a subprocess with JAX_ENABLE_X64=1).

EVON keeps the posterior (mean, momentum, Hessian, Kronecker factors, bases) in float32 for
bfloat16 or float32 parameters (`dtype=` overrides; float64 parameters get float64), and
`eigenbasis` promotes every eigh / QR input to at least float32. The loop's parameters stay
in their own dtype: they are samples, the float32 mean is the master copy.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.extend import core as jex_core

import evon_jax
from evon_jax import posterior

_STATE_FIELDS = ("mean", "momentum", "hessian", "factors", "bases")


def _params(dtype):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  return {"w": (1.0 + 0.1 * jax.random.normal(k1, (6, 5))).astype(dtype),
          "b": (0.1 * jax.random.normal(k2, (5,))).astype(dtype),
          "k": (0.3 * jax.random.normal(k3, (2, 3, 4))).astype(dtype)}


_TARGET = {"w": jnp.full((6, 5), 0.5), "b": jnp.full((5,), -0.5), "k": jnp.full((2, 3, 4), 0.2)}


def _loss(params):
  """A loss computed in float32 whatever the parameters' dtype (as bf16 training does)."""
  total = jnp.zeros([], jnp.float32)
  for name, p in params.items():
    d = p.astype(jnp.float32) - _TARGET[name]
    total = total + jnp.sum(d ** 2) + 0.1 * jnp.sum(jnp.cos(3 * d))
  return total


@functools.lru_cache(maxsize=None)
def _run(dtype: str, learning_rate: float, num_calls: int, state_dtype=None):
  """num_calls jitted drop-in calls from _params(dtype); returns (params, state) per call."""
  tx = evon_jax.evon(learning_rate, ess=1e8, hess_init=1.0, precondition_frequency=3, key=5,
                     dtype=state_dtype)

  @jax.jit
  def run(params, state):
    def body(carry, _):
      params, state = carry
      updates, state = tx.update(jax.grad(_loss)(params), state, params)
      assert all(u.dtype == p.dtype for u, p in zip(
          jax.tree.leaves(updates), jax.tree.leaves(params)))
      carry = (optax.apply_updates(params, updates), state)
      return carry, carry
    return jax.lax.scan(body, (params, state), None, length=num_calls)[1]

  params = _params(dtype)
  return params, tx, run(params, tx.init(params))


def _data_dtypes(tree):
  """Floating dtypes of leaves holding data ((0, 0) identity placeholders are float32)."""
  return {x.dtype for x in jax.tree.leaves(tree)
          if jnp.issubdtype(x.dtype, jnp.inexact) and x.size}


def test_bfloat16_params_keep_float32_statistics():
  params, _, (history_params, history_state) = _run("bfloat16", 1e-4, 12)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(history_params))
  for field in _STATE_FIELDS:
    assert _data_dtypes(getattr(history_state, field)) == {jnp.dtype(jnp.float32)}, field
  assert all(np.all(np.isfinite(np.asarray(x, np.float32)))
             for x in jax.tree.leaves(history_state) if jnp.issubdtype(x.dtype, jnp.inexact))
  # The bases (after the eigh of call 0 and power-QR refreshes at steps 3, 6, 9) are
  # orthonormal to float32 accuracy; bfloat16 (eps 7.8e-3) could not get within 1e-5.
  last = jax.tree.map(lambda x: x[-1], history_state)
  for pair in jax.tree.leaves(posterior.bases(last), is_leaf=lambda x: x is None):
    if pair is None:
      continue
    q = np.asarray(pair, np.float64)
    np.testing.assert_allclose(q.T @ q, np.eye(q.shape[0]), atol=1e-5)


def test_float32_mean_accumulates_steps_below_bfloat16_resolution():
  """lr = 1e-4: a whitened step moves each weight ~3e-5, far below bfloat16's spacing near
  1 (7.8e-3), so a bfloat16 master copy would never move; the float32 mean does. And it
  moves like the float32-parameter run's (from its own start): the two differ only by
  gradients taken at bfloat16-rounded samples (relative ~4e-3 here) and by the starts' rounding.
  Bound: the displacements agree to 25% of their size (measured: see the assertion message)."""
  params16, _, (_, states16) = _run("bfloat16", 1e-4, 12)
  params32, _, (_, states32) = _run("float32", 1e-4, 12)
  mean_fn = jax.jit(posterior.mean)
  mean16 = mean_fn(jax.tree.map(lambda x: x[-1], states16))
  mean32 = mean_fn(jax.tree.map(lambda x: x[-1], states32))
  move16 = {k: np.asarray(mean16[k]) - np.asarray(params16[k], np.float32) for k in mean16}
  move32 = {k: np.asarray(mean32[k]) - np.asarray(params32[k]) for k in mean32}
  moved = np.abs(move16["w"]).max()
  assert moved > 1e-4, moved  # 11 real steps of ~3e-5 each
  assert moved < 3.9e-3  # less than half a bfloat16 spacing: a bf16 master would round it away
  for name in move16:
    size = np.abs(move32[name]).max()
    gap = np.abs(move16[name] - move32[name]).max()
    assert gap < 0.25 * size, (name, gap, size)


def _eigensolve_dtypes(fn, *args):
  """Input dtypes of every eigh / QR primitive in fn's jaxpr (cond branches included)."""
  found = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ("eigh", "geqrf", "householder_product", "qr"):
        found.extend(str(v.aval.dtype) for v in eqn.invars)
      for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else [param]:
          if isinstance(sub, jex_core.ClosedJaxpr):
            visit(sub.jaxpr)
          elif isinstance(sub, jex_core.Jaxpr):
            visit(sub)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


@pytest.mark.parametrize("state_dtype", [None, "bfloat16"])
def test_eigensolves_never_run_in_bfloat16(state_dtype):
  """Also when the statistics themselves are requested in bfloat16 (`dtype=`)."""
  params = _params("bfloat16")
  tx = evon_jax.evon(1e-3, ess=1e8, hess_init=1.0, dtype=state_dtype)
  state = tx.init(params)
  expected = jnp.dtype(state_dtype or jnp.float32)
  for field in _STATE_FIELDS:
    assert _data_dtypes(getattr(state, field)) == {expected}, field
  solves = _eigensolve_dtypes(lambda g, s, p: tx.update(g, s, p), params, state, params)
  # Two matrix leaves (w: 6 x 5, k: 6 x 4), two sides each, an eigh and a QR branch.
  assert len(solves) >= 8, solves
  assert set(solves) == {"float32"}, solves


def test_float64_statistics_match_numpy_and_float32():
  """Subprocess with JAX_ENABLE_X64=1 (it must be set before JAX starts): see _x64_worker.

  Tolerances: the float64 run against the NumPy float64 reference, fed the same samples and
  gradients (26 calls, refreshes at real steps 10 and 20, means of size ~1.3): measured
  3e-15, bound 1e-11 (float64 eps 2.2e-16; room for other BLAS/LAPACK orderings). Against
  the same run in float32 (same key, same normals z): measured 1.3e-6, bound 1e-4
  (float32 eps 1.2e-7 grown over 26 steps), and the gap must exceed 1e-10 — i.e. the float64
  run really was computed in float64.
  """
  env = dict(os.environ, JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu")
  worker = pathlib.Path(__file__).with_name("_x64_worker.py")
  result = subprocess.run([sys.executable, "-W", "error", str(worker)], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
  if result.returncode != 0:
    pytest.fail(f"x64 worker failed:\n{result.stdout}\n{result.stderr[-5000:]}")
  diffs = json.loads(result.stdout.strip().splitlines()[-1])
  assert diffs["solve_dtypes"] == ["float64"], diffs
  assert diffs["reference"] < 1e-11, diffs
  assert 1e-10 < diffs["float32"] < 1e-4, diffs
