"""Stacked leaves (`stacked_dims`): a (L, m, n) leaf is L independent matrices, each with
its own factors and bases — checked against the NumPy reference run block by block, against
SOAP on separate leaves, and through the posterior read-outs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import evon_jax
from evon_jax import posterior
import numpy_reference as ref
from test_equivalence import EVON_HYPER, _assert_bases_match, _np, drop_in_trajectory, make_problem

BLOCKS = 2


def stacked_problem():
  """Two independent copies (different seeds) of the equivalence tests' coupled quadratic,
  stacked along a leading axis: 'w' is (2, 3, 4), 'b' is (2, 4)."""
  problems = [make_problem(seed=s) for s in (2, 5)]

  def loss(p):
    return sum(problem_loss({"w": p["w"][l], "b": p["b"][l]})
               for l, (problem_loss, _) in enumerate(problems))

  params = {name: jnp.stack([params[name] for _, params in problems]) for name in ("w", "b")}
  return loss, params


@pytest.mark.parametrize("whiten", [False, True])
def test_stacked_evon_matches_reference_per_block(whiten):
  loss, params = stacked_problem()
  lr = 0.02
  tx = evon_jax.evon(lr, whiten=whiten, key=4, stacked_dims=1, **EVON_HYPER)
  calls = drop_in_trajectory(tx, params, loss, num_calls=24)  # refreshes at steps 10, 20
  state = calls[-1].state
  assert state.bases[0]["w"].shape == (BLOCKS, 3, 3)
  assert state.bases[1]["w"].shape == (BLOCKS, 4, 4)
  assert state.factors[0]["b"].ndim == 1  # 1-D blocks: no basis without precondition_1d

  start = _np(params)
  refs = {(name, l): ref.EvonReference(start[name][l], learning_rate=lr, whiten=whiten,
                                       **EVON_HYPER)
          for name in start for l in range(BLOCKS)}
  for (name, l), r in refs.items():
    r.first_call(calls[0].grad[name][l])
  for i, call in enumerate(calls[1:], start=1):
    bases = posterior.bases(call.state)
    for (name, l), r in refs.items():
      r.step(call.grad[name][l], call.sample[name][l] - call.mean_before[name][l])
      # Same tolerance as the unstacked EVON equivalence test (float32 vs float64).
      np.testing.assert_allclose(call.mean_after[name][l], r.mean, rtol=1e-4, atol=1e-5,
                                 err_msg=f"call {i} {name}[{l}]")
      block_bases = jax.tree.map(lambda q: q[l], bases[name])
      _assert_bases_match(block_bases, r, f"call {i} {name}[{l}]")


def test_stacked_soap_equals_separate_leaves():
  loss, params = stacked_problem()
  split = {f"{name}{l}": params[name][l] for name in params for l in range(BLOCKS)}
  unsplit = lambda p: {n: jnp.stack([p[f"{n}{l}"] for l in range(BLOCKS)]) for n in params}
  split_loss = lambda p: loss(unsplit(p))
  runs = []
  for tx, p0, fn in [(evon_jax.soap(1e-2, precondition_frequency=3, stacked_dims=1), params,
                      loss),
                     (evon_jax.soap(1e-2, precondition_frequency=3), split, split_loss)]:
    state, p = tx.init(p0), p0
    for _ in range(8):
      updates, state = tx.update(jax.grad(fn)(p), state, p)
      p = optax.apply_updates(p, updates)
    runs.append(p)
  stacked, separate = runs
  for name in params:
    # Batched and unbatched float32 products/QR round differently: a few ulp, compounded
    # over 8 steps.
    np.testing.assert_allclose(stacked[name], unsplit(separate)[name], rtol=2e-5, atol=2e-6)


def test_stacked_posterior_readouts_are_block_diagonal():
  loss, params = stacked_problem()
  tx = evon_jax.evon(0.02, stacked_dims=lambda path, leaf: 1, key=1, **EVON_HYPER)
  state = tx.init(params)
  for _ in range(4):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  cov = np.asarray(posterior.covariance(state)["w"], np.float64)
  assert cov.shape == (24, 24)
  np.testing.assert_array_equal(cov[:12, 12:], 0.0)
  v = np.asarray(posterior.variance_eigen(state)["w"], np.float64)
  q = posterior.bases(state)["w"]
  for l in range(BLOCKS):
    rotation = np.kron(np.asarray(q[0][l], np.float64), np.asarray(q[1][l], np.float64))
    expected = rotation @ np.diag(v[l].ravel()) @ rotation.T
    np.testing.assert_allclose(cov[12 * l:12 * (l + 1), 12 * l:12 * (l + 1)], expected,
                               rtol=1e-4, atol=1e-9)
  std = np.asarray(posterior.marginal_stddev(state)["w"], np.float64).ravel()
  np.testing.assert_allclose(std, np.sqrt(np.diag(cov)), rtol=1e-4)
  # Explicit-mode samples follow the same stacked layout as the state.
  samples = evon_jax.training_samples(state, 3)
  assert samples["w"].shape == (3, BLOCKS, 3, 4)
  drawn = posterior.sample(jax.random.key(0), state, num_samples=2000)["w"]
  empirical = np.std(np.asarray(drawn, np.float64), axis=0).ravel()
  # 2000 draws: the sample std has relative standard error 1/sqrt(2*2000) ~ 1.6%; 8% is 5 SE.
  np.testing.assert_allclose(empirical, std, rtol=0.08)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_bad_stacked_dims_raise(bad):
  with pytest.raises(ValueError, match="stacked_dims"):
    evon_jax.evon(0.1, ess=1.0, hess_init=1.0, stacked_dims=bad)


def test_callable_returning_bad_value_raises():
  tx = evon_jax.evon(0.1, ess=1.0, hess_init=1.0, stacked_dims=lambda path, leaf: -2)
  with pytest.raises(ValueError, match="stacked_dims"):
    tx.init({"w": jnp.ones((2, 3, 4))})
