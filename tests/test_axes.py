"""Per-axis Kronecker structure of N-D leaves, against a NumPy mode-product reference.

A leaf with K dims gets one factor and basis per dim: W = M + E ×₁ Q₁ ×₂ Q₂ … ×_K Q_K. The
reference (`numpy_reference._AxisEigenbases`, float64) writes every product as
moveaxis(tensordot(M, X, (1, k)), 0, k), independently of the library's dot_general code.
Tolerances are those of the matrix-view equivalence tests (`test_equivalence.py`): means
rtol 1e-4 / atol 1e-5 after 25 float32 steps; the posterior read-outs of the final state are
float32 products of <= 4 O(1) factors (rtol 1e-5 with margin, as in `test_posterior.py`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import evon_jax
from evon_jax import posterior
from evon_jax.maths.layout import leaf_layout, merge_dims_groups
import numpy_reference as ref
from test_equivalence import _np, _spd, assert_tree_close, drop_in_trajectory

SHAPES = {"k3": (3, 4, 5), "k4": (2, 3, 2, 4), "w": (3, 4), "b": (4,)}
EVON_HYPER = dict(ess=50.0, hess_init=0.5, b1=0.9, b2=0.9, shampoo_b=0.8, eps=1e-10,
                  weight_decay=1e-2, precondition_frequency=10)
SOAP_HYPER = dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01, precondition_frequency=10)


def _mode(x, m, k):
  return np.moveaxis(np.tensordot(m, x, axes=([1], [k])), 0, k)


def make_problem(seed=0):
  """Quadratics 0.5 <D, D ×₁ A₁ ×₂ A₂ …> with SPD A_k on a 3-D and a 4-D leaf (Kronecker
  Hessians along every axis), plus a matrix and a vector."""
  rng = np.random.default_rng(seed)
  hessians = {name: [_spd(rng, n) for n in shape] for name, shape in SHAPES.items()}
  targets = {name: rng.standard_normal(shape) for name, shape in SHAPES.items()}
  consts = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), (hessians, targets))

  def loss(p):
    hessians, targets = consts
    value = 0.0
    for name, factors in hessians.items():
      d = p[name] - targets[name]
      hd = d
      for k, a in enumerate(factors):
        hd = jnp.moveaxis(jnp.tensordot(a, hd, axes=([1], [k])), 0, k)
      value = value + 0.5 * jnp.sum(d * hd)
    return value

  params = {name: jnp.asarray(0.5 * rng.standard_normal(shape), jnp.float32)
            for name, shape in SHAPES.items()}
  return loss, params


def _assert_axis_bases_match(impl, r, what):
  """Same basis per axis up to column signs (|diag(Q_implᵀ Q_ref)| == 1)."""
  impl = tuple(impl) + (None,) * (len(r.bases.q) - len(impl))
  for k, (q_impl, rotated, q_ref) in enumerate(zip(impl, r.bases.rotated, r.bases.q)):
    if not rotated:
      assert q_impl is None, what
      continue
    overlap = np.abs(np.diag(np.asarray(q_impl, np.float64).T @ q_ref))
    np.testing.assert_allclose(overlap, 1.0, atol=1e-4, err_msg=f"{what} axis {k}")


def test_layout_has_one_axis_per_dim():
  layout = leaf_layout((768, 12, 64), jnp.float32, max_precond_dim=10000,
                       precondition_1d=False)
  assert layout.axes == (768, 12, 64) and layout.rotated == (True, True, True)
  long_axis = leaf_layout((20000, 12, 1), jnp.float32, max_precond_dim=10000,
                          precondition_1d=False)
  assert long_axis.rotated == (False, True, False)  # too long, rotated, length one
  stacked = leaf_layout((6, 3, 4, 5), jnp.float32, max_precond_dim=100,
                        precondition_1d=False, stacked_dims=1)
  assert stacked.batch == (6,) and stacked.axes == (3, 4, 5)
  merged = leaf_layout((3, 3, 16, 32), jnp.float32, max_precond_dim=100,
                       precondition_1d=False, groups=((0, 1, 2), (3,)))
  assert merged.axes == (144, 32) and merged.rotated == (False, True)
  with pytest.raises(ValueError, match="in order"):
    leaf_layout((3, 4, 5), jnp.float32, max_precond_dim=100, precondition_1d=False,
                groups=((0, 2), (1,)))


def test_merge_dims_is_greedy_within_max_precond_dim():
  # The reference SOAP's rule: grow a group while the product stays <= max_precond_dim.
  assert merge_dims_groups((3, 3, 64, 128), 1024) == ((0, 1, 2), (3,))
  assert merge_dims_groups((3, 3, 64, 128), 100) == ((0, 1), (2,), (3,))
  assert merge_dims_groups((20000, 4, 5), 100) == ((0,), (1, 2))
  layout = leaf_layout((3, 3, 64, 128), jnp.float32, max_precond_dim=1024,
                       precondition_1d=False, merge_dims=True)
  assert layout.axes == (576, 128)


@pytest.mark.parametrize("whiten", [False, True])
def test_evon_per_axis_matches_numpy_reference(whiten):
  loss, params = make_problem(seed=1)
  lr = 0.02
  tx = evon_jax.evon(lr, whiten=whiten, key=7, **EVON_HYPER)
  calls = drop_in_trajectory(tx, params, loss, num_calls=26)  # refreshes at steps 10, 20
  refs = {k: ref.EvonReference(v, learning_rate=lr, whiten=whiten, view="axes", **EVON_HYPER)
          for k, v in _np(params).items()}
  for name, r in refs.items():
    r.first_call(calls[0].grad[name])
  for i, call in enumerate(calls[1:], start=1):
    bases = posterior.bases(call.state)
    for name, r in refs.items():
      r.step(call.grad[name], call.sample[name] - call.mean_before[name])
      _assert_axis_bases_match(bases[name], r, f"call {i} leaf {name}")
    assert_tree_close(call.mean_after, {k: r.mean for k, r in refs.items()}, 1e-4, 1e-5,
                      f"call {i}")
  _check_posterior_readouts(calls[-1].state, refs)


def _check_posterior_readouts(state, refs):
  """Mean, marginal std, dense covariance, entropy and sample moments of every leaf rebuilt
  from the reference's own bases and the state's H (column signs do not matter)."""
  ess, wd = float(state.ess), float(state.weight_decay)
  stddev, covariance = posterior.marginal_stddev(state), posterior.covariance(state)
  samples = posterior.sample(jax.random.key(3), state, num_samples=20000)
  log_det = 0.0
  for name, r in refs.items():
    variance = 1.0 / (ess * (np.asarray(state.hessian[name], np.float64) + wd))
    rotation = np.ones((1, 1))
    for q in r.bases.q:
      rotation = np.kron(rotation, q)
    expected_cov = rotation @ np.diag(variance.ravel()) @ rotation.T
    np.testing.assert_allclose(_np(covariance[name]), expected_cov, rtol=1e-4,
                               atol=1e-5 * expected_cov.max(), err_msg=name)
    # Var W = V ×₁ (Q₁∘Q₁) ×₂ …, the closed form marginal_stddev uses, from the reference.
    marginal = variance
    for k, q in enumerate(r.bases.q):
      marginal = _mode(marginal, q * q, k)
    np.testing.assert_allclose(_np(stddev[name]), np.sqrt(marginal), rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(np.diag(expected_cov), marginal.ravel(), rtol=1e-10)
    # 20,000 samples: the sample variance of each entry is within 5 standard errors
    # (SE of a variance estimate = σ² √(2 / (n - 1)) ≈ 1 % of σ²; 5 SE = 5 %).
    draws = np.asarray(samples[name], np.float64).reshape(20000, -1)
    np.testing.assert_allclose(draws.var(axis=0), marginal.ravel(), rtol=5 * math.sqrt(2 / 19999))
    log_det += np.sum(np.log(variance))
    assert np.abs(draws.mean(axis=0) - r.mean.ravel()).max() < 5 * np.sqrt(marginal.max() / 20000)
  count = sum(v.size for v in state.hessian.values())
  np.testing.assert_allclose(float(posterior.entropy(state)),
                             0.5 * (count * math.log(2 * math.pi * math.e) + log_det), rtol=1e-5)


@pytest.mark.parametrize("shampoo_b", [None, 0.8])
def test_soap_per_axis_matches_numpy_reference(shampoo_b):
  loss, params = make_problem(seed=2)
  lr = 0.02
  tx = evon_jax.soap(lr, shampoo_b=shampoo_b, **SOAP_HYPER)
  calls = drop_in_trajectory(tx, params, loss, num_calls=26, use_mean=False)
  refs = {k: ref.SoapReference(v, learning_rate=lr, shampoo_b=shampoo_b, view="axes",
                               **SOAP_HYPER) for k, v in _np(params).items()}
  # Adam's m/√v turns float32 rounding of small eigen coordinates into O(1e-5) moves in the
  # first steps (issue 16); the gap then stays flat. Measured max |Δ| over 26 calls, seeds 2-4
  # x shampoo_b in {None, 0.8}: 1.4e-5 … 2.9e-5 (at 1e-8 after the first step): atol 1e-4.
  for i, call in enumerate(calls):
    for name, r in refs.items():
      r.step(call.grad[name])
    assert_tree_close(call.mean_after, {k: r.params for k, r in refs.items()}, 1e-4, 1e-4,
                      f"call {i}")


def test_matrix_view_dimension_numbers_give_the_old_layout():
  """`dimension_numbers=evon_jax.matrix_view` merges all but the last dim: one rows x cols
  pair per leaf. (Its trajectories are checked against the matrix-view NumPy reference by
  the conv-leaf tests of test_equivalence.py, on gradients built to have well-separated
  factor spectra: a 12 x 5 first gradient here would leave a 7-dim null space whose basis
  is arbitrary.)"""
  _, params = make_problem(seed=3)
  tx = evon_jax.evon(0.02, dimension_numbers=evon_jax.matrix_view, **EVON_HYPER)
  bases = posterior.bases(tx.init(params))
  assert [q.shape for q in bases["k4"]] == [(12, 12), (4, 4)]
  assert [q.shape for q in bases["k3"]] == [(12, 12), (5, 5)]
  assert [q.shape for q in bases["w"]] == [(3, 3), (4, 4)]
  assert bases["b"] == ()
  per_axis = posterior.bases(evon_jax.evon(0.02, **EVON_HYPER).init(params))
  assert [q.shape for q in per_axis["k4"]] == [(2, 2), (3, 3), (2, 2), (4, 4)]


def _state_floats(tx, params):
  shapes = jax.eval_shape(tx.init, params)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)
             if jnp.issubdtype(x.dtype, jnp.floating))


def test_attention_kernel_state_is_three_buffers_plus_axis_factors():
  """The (768, 12, 64) attention kernel of issue 11: EVON's state is the mean, momentum and
  Hessian (3 parameter buffers) plus a factor and a basis per axis, 2 (768² + 12² + 64²)
  floats, plus scalars (count, ess, δ, noise flag); SOAP's the same with μ, ν. Counted from
  `jax.eval_shape` (nothing is allocated)."""
  params = {"qkv": jnp.zeros((768, 12, 64))}
  size = 768 * 12 * 64
  axis_floats = 2 * (768 ** 2 + 12 ** 2 + 64 ** 2)
  evon_floats = _state_floats(evon_jax.evon(1e-3, ess=1e4, hess_init=0.1), params)
  assert 3 * size + axis_floats <= evon_floats <= 3 * size + axis_floats + 8
  soap_floats = _state_floats(evon_jax.soap(1e-3), params)
  assert 2 * size + axis_floats <= soap_floats <= 2 * size + axis_floats + 8
  # The matrix view would hold a (768·12)² factor and basis: 85 x more floats.
  merged = _state_floats(evon_jax.evon(1e-3, ess=1e4, hess_init=0.1,
                                       dimension_numbers=evon_jax.matrix_view), params)
  assert merged > 2 * (768 * 12) ** 2


def test_dimension_numbers_validation():
  with pytest.raises(ValueError, match="dimension_numbers"):
    evon_jax.evon(1e-3, ess=10.0, hess_init=1.0, dimension_numbers=((0,), (1,)))
  with pytest.raises(ValueError, match="not both"):
    evon_jax.soap(1e-3, dimension_numbers=evon_jax.matrix_view, merge_dims=True)
  tx = evon_jax.evon(1e-3, ess=10.0, hess_init=1.0,
                     dimension_numbers=lambda path, leaf: ((1,), (0,)))
  with pytest.raises(ValueError, match=r"\['k'\]"):
    tx.init({"k": jnp.zeros((3, 4))})
