"""EVON with float64 parameters (see test_mixed_precision.py); needs JAX_ENABLE_X64=1.

Run as `python tests/_x64_worker.py`; asserts the state dtypes, prints one JSON line with the
largest differences of the float64 run against the NumPy float64 reference and against the
same run in float32, and exits non-zero on failure.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend import core as jex_core

jax.config.update("jax_numpy_rank_promotion", "raise")
sys.path.insert(0, str(pathlib.Path(__file__).parent))

import evon_jax  # noqa: E402
from evon_jax import posterior  # noqa: E402
import numpy_reference as ref  # noqa: E402
ref.COMPUTE_DTYPE = np.float64
from test_equivalence import EVON_HYPER, MATRIX_VIEW, make_problem  # noqa: E402

NUM_CALLS = 26  # the first call and 25 real steps; power-QR refreshes at steps 10 and 20
LR = 0.02


def _trajectory(params, loss):
  """(sample, mean before, gradient, mean after, state) of every drop-in call, as float64."""
  tx = evon_jax.evon(LR, key=11, **EVON_HYPER, **MATRIX_VIEW)
  grad_fn, update_fn, mean_fn = jax.jit(jax.grad(loss)), jax.jit(tx.update), jax.jit(
      posterior.mean)
  state = tx.init(params)
  calls = []
  as64 = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float64), t)
  for _ in range(NUM_CALLS):
    before = mean_fn(state)
    grad = grad_fn(params)
    updates, state = update_fn(grad, state, params)
    calls.append((as64(params), as64(before), as64(grad), as64(mean_fn(state)), state))
    params = optax.apply_updates(params, updates)
  return calls


def _inexact_dtypes(tree):
  """Dtypes of the floating leaves that hold data (the (0, 0) placeholders that mark identity
  sides of factors and bases are float32 whatever the parameters are)."""
  return {str(x.dtype) for x in jax.tree.leaves(tree)
          if jnp.issubdtype(x.dtype, jnp.inexact) and x.size}


def _eigensolve_dtypes(fn, *args):
  """Input dtypes of every eigh / QR in the traced update (sub-jaxprs included)."""
  found = set()

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ("eigh", "geqrf", "householder_product", "qr"):
        found.update(str(v.aval.dtype) for v in eqn.invars)
      for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else [param]:
          if isinstance(sub, jex_core.ClosedJaxpr):
            visit(sub.jaxpr)
          elif isinstance(sub, jex_core.Jaxpr):
            visit(sub)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def main():
  assert jax.config.jax_enable_x64, "run with JAX_ENABLE_X64=1"
  loss, params32 = make_problem(seed=2, with_conv=True)
  params64 = jax.tree.map(lambda x: x.astype(jnp.float64), params32)

  calls64 = _trajectory(params64, loss)
  state64 = calls64[-1][-1]
  # Every statistic (mean, momentum, Hessian, factors, bases, accumulator) in float64; the
  # scalars ess, weight_decay and noise_scale are float32 by design.
  for field in ("mean", "momentum", "hessian", "factors", "bases"):
    assert _inexact_dtypes(getattr(state64, field)) == {"float64"}, (
        field, _inexact_dtypes(getattr(state64, field)))
  assert _inexact_dtypes(posterior.mean(state64)) == {"float64"}
  assert _inexact_dtypes(posterior.marginal_stddev(state64)) == {"float64"}
  tx = evon_jax.evon(LR, key=11, **EVON_HYPER, **MATRIX_VIEW)
  state0 = tx.init(params64)
  solves = _eigensolve_dtypes(lambda g, s, p: tx.update(g, s, p), params64, state0, params64)
  assert solves == {"float64"}, solves

  # The NumPy float64 reference fed the samples and gradients the float64 run saw.
  refs = {k: ref.EvonReference(v, learning_rate=LR, **EVON_HYPER)
          for k, v in calls64[0][0].items()}
  for name, r in refs.items():
    r.first_call(calls64[0][2][name])
  reference_diff = 0.0
  for sample, before, grad, after, _ in calls64[1:]:
    for name, r in refs.items():
      r.step(grad[name], sample[name] - before[name])
      reference_diff = max(reference_diff, float(np.max(np.abs(after[name] - r.mean))))

  # The same run in float32 (same key, so the same standard normals z).
  calls32 = _trajectory(params32, loss)
  float32_diff = max(
      float(np.max(np.abs(c64[3][k] - c32[3][k])))
      for c64, c32 in zip(calls64, calls32) for k in c64[3])
  mean_size = max(float(np.max(np.abs(v))) for v in calls64[-1][3].values())
  print(json.dumps({"reference": reference_diff, "float32": float32_diff,
                    "mean_size": mean_size, "solve_dtypes": sorted(solves)}))


if __name__ == "__main__":
  main()
