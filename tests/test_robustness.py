"""Bad input loses nothing: non-finite gradients skip a call exactly, degenerate gradients and
extreme hyperparameters stay finite, odd leaves pass through, mismatched trees raise, and a
property-based sweep over leaf shapes and dtypes keeps state, updates and dtypes sane.

All comparisons of skipped calls are exact (bit for bit): the engine gates a skipped call with
scalar coefficients (1 * x + 0 * y == x), so "nothing lost" means nothing changed at all.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import example, given, settings, strategies as st

import evon_jax
from evon_jax import posterior


def _bits(tree):
  """Leaves as NumPy arrays (typed keys as key data) for exact comparisons."""
  out = []
  for leaf in jax.tree.leaves(tree):
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    out.append(np.asarray(leaf))
  return out


def _assert_bit_identical(got, want, what=""):
  assert jax.tree.structure(got) == jax.tree.structure(want), what
  for g, w in zip(_bits(got), _bits(want)):
    assert g.dtype == w.dtype and g.shape == w.shape, what
    np.testing.assert_array_equal(g, w, err_msg=what)


def _avals(tree):
  return jax.tree.structure(tree), [
      (tuple(x.shape), x.dtype, bool(getattr(x, "weak_type", False)))
      for x in jax.tree.leaves(tree)]


def _all_finite(tree):
  return all(np.all(np.isfinite(np.asarray(x, np.float64)))
             for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact))


# ----------------------------------------------------------------------------------------------
# Non-finite gradients

_LEAVES = ("b", "v", "w")  # sorted: the order of jax.tree.leaves on the params dict


def _params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"w": jax.random.normal(k1, (4, 3)), "b": jnp.zeros(3),
          "v": 0.5 * jax.random.normal(k2, (2, 2, 3))}


def _loss(params):
  w_target = jnp.arange(12.0).reshape(4, 3) / 10
  return (jnp.sum((params["w"] - w_target) ** 2) + jnp.sum((params["b"] - 1.0) ** 2)
          + jnp.sum(jnp.sin(params["v"]) ** 2))


_SKIP_CONFIGS = {
    "evon": dict(precondition_frequency=3),
    # Poisoned mid-step: the accumulator holds the first of the step's two samples.
    "evon_mc2": dict(precondition_frequency=3, mc_samples=2),
}


@functools.lru_cache(maxsize=None)
def _poisonable_step(name):
  tx = evon_jax.evon(0.05, ess=1e3, hess_init=0.5, key=2, **_SKIP_CONFIGS[name])

  @jax.jit
  def step(params, state, poison):
    """One call; poison[i] is added to the first entry of leaf i's gradient (0: clean)."""
    grads = jax.grad(_loss)(params)
    grads = {name: g.reshape(-1).at[0].add(poison[i]).reshape(g.shape)
             for i, (name, g) in enumerate(sorted(grads.items()))}
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), updates, state

  return tx, step


@pytest.mark.parametrize("name", list(_SKIP_CONFIGS))
def test_non_finite_gradient_in_one_leaf_skips_the_call_exactly(name):
  tx, step = _poisonable_step(name)
  clean = jnp.zeros(len(_LEAVES))
  stats = jax.jit(lambda s: (posterior.mean(s), posterior.marginal_stddev(s),
                             posterior.kl_to_prior(s)))
  poison_at, total = 4, 9

  params, state = _params(), tx.init(_params())
  for _ in range(total):
    params, _, state = step(params, state, clean)
  uninterrupted = (params, state)

  params, state = _params(), tx.init(_params())
  for _ in range(poison_at):
    params, _, state = step(params, state, clean)
  before = stats(state)
  for bad in (math.nan, math.inf, -math.inf):
    for leaf in range(len(_LEAVES)):
      what = f"{bad} in leaf {_LEAVES[leaf]!r}"
      new_params, updates, new_state = step(params, state, clean.at[leaf].set(bad))
      assert int(new_state.skipped) == int(state.skipped) + 1, what
      assert int(new_state.count) == int(state.count), what
      for u in jax.tree.leaves(updates):
        np.testing.assert_array_equal(u, 0.0, err_msg=what)
      _assert_bit_identical(new_params, params, what)
      _assert_bit_identical(new_state._replace(skipped=state.skipped), state, what)
      _assert_bit_identical(stats(new_state), before, what)
      params, state = new_params, new_state
  assert int(state.skipped) == 9
  # Nothing lost: the run continues exactly as the run that never saw the bad calls.
  for _ in range(total - poison_at):
    params, _, state = step(params, state, clean)
  _assert_bit_identical(params, uninterrupted[0])
  _assert_bit_identical(state._replace(skipped=uninterrupted[1].skipped), uninterrupted[1])


# ----------------------------------------------------------------------------------------------
# Degenerate gradients and extreme hyperparameters

_DEGENERATE_TXS = {
    "evon": lambda: evon_jax.evon(0.01, ess=1e3, hess_init=0.1),
    "evon_no_whiten": lambda: evon_jax.evon(0.01, ess=1e3, hess_init=0.1, whiten=False),
    "ivon": lambda: evon_jax.ivon(0.01, ess=1e3),
}


@pytest.mark.parametrize("name", list(_DEGENERATE_TXS))
def test_zero_and_constant_gradients_for_200_steps_stay_finite(name):
  """Zero gradients: zero factors (eigh of 0), a zero Price estimate, only the prior term
  drives the mean. Constant gradients: rank-one factors with a degenerate null space; the
  momentum saturates. Neither may produce a NaN or inf anywhere."""
  tx = _DEGENERATE_TXS[name]()
  params = _params()

  @jax.jit
  def run(params, value):
    def body(carry, _):
      params, state = carry
      grads = jax.tree.map(lambda p: jnp.full_like(p, value), params)
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None
    return jax.lax.scan(body, (params, tx.init(params)), None, length=200)[0]

  for value in (0.0, 1.0):
    final_params, state = run(params, value)
    assert int(state.count) == 200 and int(state.skipped) == 0
    assert _all_finite((final_params, state)), (name, value)
    assert _all_finite(jax.jit(lambda s: (posterior.mean(s), posterior.marginal_stddev(s)))(
        state)), (name, value)


_injected_evon = optax.inject_hyperparams(evon_jax.evon, static_args=evon_jax.STATIC_ARGS)


@functools.lru_cache(maxsize=None)
def _injected_run(num_calls):
  """A jitted loop on _loss for injected-hyperparameter EVON states. The update reads every
  float hyperparameter from the state, so one compilation serves all their values."""
  tx = _injected_evon(0.01, ess=1.0, hess_init=1.0, precondition_frequency=5, whiten=True,
                      weight_decay=1e-6)  # the setting the docstring's numbers are for

  @jax.jit
  def run(params, state):
    def body(carry, _):
      params, state = carry
      updates, state = tx.update(jax.grad(_loss)(params), state, params)
      return (optax.apply_updates(params, updates), state), None
    return jax.lax.scan(body, (params, state), None, length=num_calls)[0]

  return run


@pytest.mark.parametrize("hess_init,ess", [(1e-8, 1e3), (1.0, 1e9), (1e-8, 1e9)])
def test_extreme_hess_init_and_ess_stay_finite(hess_init, ess):
  """hess_init = 1e-8 (a posterior std of 1/sqrt(ess (1e-8 + δ)), ~1 at ess 1e3: samples far
  from the mean, large Price estimates) and ess = 1e9 (std ~3e-5: samples at the mean in
  float32; the Price estimate E ⊙ G° / V multiplies by ess (H + δ) ~ 1e9)."""
  params = _params()
  state = _injected_evon(0.01, ess=ess, hess_init=hess_init, whiten=True, weight_decay=1e-6,
                         precondition_frequency=5).init(params)
  np.testing.assert_array_equal(state.hyperparams["ess"], np.float32(ess))
  final_params, state = _injected_run(60)(params, state)
  inner = state.inner_state  # (the hyperparameters hold clip_radius = inf by design)
  assert int(inner.count) == 60 and int(inner.skipped) == 0
  assert _all_finite((final_params, inner))
  mean, stddev = jax.jit(lambda s: (posterior.mean(s), posterior.marginal_stddev(s)))(inner)
  assert _all_finite((mean, stddev))
  assert all(np.all(x > 0) for x in jax.tree.leaves(stddev))
  # The mean moved towards the optimum of the (convex in w, b) loss.
  assert float(_loss(mean)) < float(_loss(params))


# ----------------------------------------------------------------------------------------------
# Odd leaves


def test_zero_size_integer_and_boolean_leaves_pass_through():
  params = {"w": jnp.ones((3, 4)), "empty": jnp.zeros((0, 5)), "ints": jnp.arange(3),
            "flag": jnp.array([True, False])}
  tx = evon_jax.evon(0.1, ess=10.0, hess_init=1.0)

  def loss(p):
    return jnp.sum(p["w"] ** 2) + jnp.sum(p["empty"])

  def float_grads(p):
    return jax.grad(lambda w, e: loss({"w": w, "empty": e}), argnums=(0, 1))(
        p["w"], p["empty"])

  state = tx.init(params)
  # Both ways a user gets gradients for integer leaves: zeros, or float0 (allow_int=True).
  grad_fns = (lambda p: dict(zip(("w", "empty"), float_grads(p)),
                             ints=jnp.zeros(3, jnp.int32), flag=jnp.zeros(2, bool)),
              jax.grad(loss, allow_int=True))
  for grad_fn in grad_fns:
    p, s = params, state
    for _ in range(3):
      updates, s = tx.update(grad_fn(p), s, p)
      assert _avals(updates) == _avals(params)
      p = optax.apply_updates(p, updates)
    for name in ("empty", "ints", "flag"):
      _assert_bit_identical(p[name], params[name], name)
    assert not np.array_equal(p["w"], params["w"])
    mean = posterior.mean(s)
    for name in ("empty", "ints", "flag"):
      _assert_bit_identical(mean[name], params[name], name)
    assert _all_finite((p, s))


def test_zero_size_leaf_with_empty_last_dimension_passes_through():
  params = {"w": jnp.ones((3, 4)), "empty": jnp.zeros((3, 0))}
  tx = evon_jax.evon(0.1, ess=10.0, hess_init=1.0)
  state = tx.init(params)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  assert updates["empty"].shape == (3, 0)


# ----------------------------------------------------------------------------------------------
# Mismatched trees between init and update

_INIT_PARAMS = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}


_TREE = r"The gradient tree does not match the parameter tree the optimizer was initialised with: "


@pytest.mark.parametrize("grads,message", [
    ({"w": jnp.ones((3, 4)), "b": jnp.ones(4), "c": jnp.ones(2)},
     _TREE + r"missing leaves \[\], unexpected leaves \[\"\['c'\]\"\]"),
    ({"w": jnp.ones((3, 4))},
     _TREE + r"missing leaves \[\"\['b'\]\"\], unexpected leaves \[\]"),
    ({"w": jnp.ones((3, 4)), "bias": jnp.ones(4)},
     _TREE + r"missing leaves \[\"\['b'\]\"\], unexpected leaves \[\"\['bias'\]\"\]"),
    ([jnp.ones((3, 4)), jnp.ones(4)], _TREE + r"missing leaves .*unexpected leaves \['\[0\]'"),
    ({"w": jnp.ones((4, 3)), "b": jnp.ones(4)},
     r"Leaf \['w'\]: gradient shape \(4, 3\) does not match the parameter shape \(3, 4\) "
     r"the optimizer was initialised with"),
], ids=["extra_leaf", "missing_leaf", "renamed_leaf", "list_for_dict", "transposed_leaf"])
def test_gradients_that_do_not_match_the_init_tree_raise(grads, message):
  tx = evon_jax.evon(0.1, ess=10.0, hess_init=1.0)
  state = tx.init(_INIT_PARAMS)
  with pytest.raises(ValueError, match=message):
    tx.update(grads, state, _INIT_PARAMS)


def test_params_with_an_extra_leaf_raise():
  tx = evon_jax.evon(0.1, ess=10.0, hess_init=1.0)
  state = tx.init(_INIT_PARAMS)
  params = {**_INIT_PARAMS, "c": jnp.ones(2)}
  with pytest.raises(ValueError, match=r"The params tree does not match .* unexpected leaves "
                                       r"\[\"\['c'\]\"\]"):
    tx.update(_INIT_PARAMS, state, params)


def test_params_with_a_wrong_leaf_shape_raise_a_clear_error():
  tx = evon_jax.evon(0.1, ess=10.0, hess_init=1.0)
  state = tx.init(_INIT_PARAMS)
  params = {"w": jnp.ones((4, 3)), "b": jnp.ones(4)}
  with pytest.raises(ValueError, match=r"Leaf \['w'\]: params shape \(4, 3\) does not match "
                                       r"the shape \(3, 4\)"):
    tx.update(_INIT_PARAMS, state, params)


# ----------------------------------------------------------------------------------------------
# Property-based: leaf shapes (scalar, 1-D, 2-D, 4-D, a side above max_precond_dim) x dtypes

_MAX_PRECOND_DIM = 5
_small = st.integers(1, 4)
_shapes = st.one_of(
    st.just(()),
    st.tuples(st.integers(1, 7)),
    st.tuples(_small, _small),
    st.tuples(_small, _small, _small, _small),
    # one side (rows, or columns) above max_precond_dim: one-sided or identity bases
    st.tuples(st.integers(_MAX_PRECOND_DIM + 1, 8), _small),
    st.tuples(_small, st.integers(_MAX_PRECOND_DIM + 1, 8)),
)
_trees = st.dictionaries(
    st.sampled_from("abc"), st.tuples(_shapes, st.sampled_from(["float32", "bfloat16"])),
    min_size=1, max_size=3)


# Two explicit examples cover every shape kind and both dtypes; hypothesis adds a few more
# (derandomize: the same ones on every run). Each example compiles its own update (~2 s).
@settings(max_examples=3, deadline=None, derandomize=True, database=None)
@given(spec=_trees, precondition_1d=st.booleans())
@example(spec={"a": ((), "bfloat16"), "b": ((6, 3), "float32"),
               "c": ((2, 3, 2, 4), "bfloat16")}, precondition_1d=False)
@example(spec={"a": ((7,), "float32"), "b": ((3, 8), "bfloat16"), "c": ((4,), "bfloat16")},
         precondition_1d=True)
def test_property_state_stable_outputs_finite_and_dtypes_kept(spec, precondition_1d):
  params = {name: (0.5 + jnp.arange(math.prod(shape), dtype=jnp.float32).reshape(shape) / 7
                   ).astype(dtype) for name, (shape, dtype) in spec.items()}
  tx = evon_jax.evon(0.05, ess=100.0, hess_init=1.0, precondition_frequency=2,
                     max_precond_dim=_MAX_PRECOND_DIM, precondition_1d=precondition_1d, key=3)

  def grad_fn(p):  # a loss in float32 whatever the params' dtype
    return jax.grad(lambda q: sum(jnp.sum(jnp.sin(3 * x.astype(jnp.float32)) + x.astype(
        jnp.float32) ** 2) for x in jax.tree.leaves(q)))(p)

  def call(params, state):
    updates, state = tx.update(grad_fn(params), state, params)
    return updates, optax.apply_updates(params, updates), state

  state = tx.init(params)
  # Types by tracing: init state == state after a call (structure, shapes, dtypes, weak types).
  updates, new_params, new_state = jax.eval_shape(call, params, state)
  assert _avals(new_state) == _avals(state)
  assert _avals(updates) == _avals(params) == _avals(new_params)
  for x in jax.tree.leaves((state.mean, state.momentum, state.hessian)):
    assert x.dtype == jnp.float32
  # Values: the first call (eigh) and real steps 1, 2, 3 (a power-QR refresh at step 2).
  @jax.jit
  def run(params, state):
    def body(carry, _):
      params, state = carry
      updates, params, state = call(params, state)
      return (params, state), updates
    return jax.lax.scan(body, (params, state), None, length=4)

  (final_params, final_state), all_updates = run(params, state)
  assert _avals(final_state) == _avals(state)
  assert _avals(final_params) == _avals(params)
  assert int(final_state.count) == 4
  assert _all_finite((final_params, final_state, all_updates))
