"""The optax battery (after optax/contrib/_common_test.py) over evon_jax's optimizer configs.

Every config is run on the same checks: it converges on simple targets, does not recompile on
the second call of a jitted update, accepts unknown extra arguments, matches its
`optax.inject_hyperparams` version, keeps parameter dtypes, keeps a stable state (under
`lax.cond` and between steps) and skips non-finite gradients; a representative subset is run
through a constant schedule and the wrappers (MultiSteps, chain, flax nnx and linen).

Compilation dominates the cost of these tests (an EVON update compiles in seconds, runs in
microseconds), so each (config, target) pair compiles one jitted loop, `_Harness.advance`,
that is shared by all tests using it, and checks that concern only types (dtypes, tree
structure, accepted arguments) are made by tracing (`jax.eval_shape`), without compiling.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import evon_jax
from evon_jax import posterior

# ----------------------------------------------------------------------------------------------
# Optimizer configs

_NUM_STEPS = 300  # real steps of the convergence runs


class Case(NamedTuple):
  """One optimizer config under test.

  Attributes:
    name: test id.
    factory: evon_jax.evon, evon_jax.ivon or evon_jax.soap.
    kwargs: all hyperparameters but the learning rate.
    learning_rate: the constant learning rate of every run (convergence runs included).
    atol: convergence tolerance on the posterior mean (the params for soap), see below.
  """

  name: str
  factory: Callable[..., optax.GradientTransformation]
  kwargs: dict
  learning_rate: float
  atol: float

  @property
  def explicit(self) -> bool:
    return self.kwargs.get('drop_in', True) is False

  @property
  def calls_per_step(self) -> int:
    """Drop-in mode with mc_samples = k makes one real step every k calls."""
    return 1 if self.explicit else self.kwargs.get('mc_samples', 1)

  @property
  def bayesian(self) -> bool:
    return self.factory is not evon_jax.soap

  def make(self, learning_rate=None, **overrides) -> optax.GradientTransformation:
    lr = self.learning_rate if learning_rate is None else learning_rate
    return self.factory(lr, **{**self.kwargs, **overrides})


# Tolerances. ess = 1e6 and hess_init = 1 (the targets' curvatures are O(1)) make the posterior
# narrow: its standard deviation 1/sqrt(ess (H + weight_decay)) is ~1e-3, and the mean, driven
# by gradients taken at samples, wanders on about that scale; the prior pull weight_decay θ*/H
# is < 3e-4. So 1e-2 (~10 posterior standard deviations) is the tolerance of the unwhitened
# configs and of soap (Adam's steps shrink with its first moment). A whitened step has norm
# lr per leaf whatever the gradient (Newton-Schulz / L2 normalisation), so with a constant lr
# the mean ends in a cycle of radius ~lr about the optimum: those configs get 4 lr. Measured
# for evon_precondition_1d (lr 0.02) over keys 0-7 x factor_gradient {regularized, loss}:
# max error 0.062 (rosenbrock) and 0.048 (quadratic), medians 0.024 and 0.026; the 2.5 lr
# bound used before was exceeded by 2 of those 16 runs.
#
# Decay rates and weight decays are close to the defaults but exactly representable in float32
# with 1 - b exact too. The plain optimizers do arithmetic such as 1 - b2 on Python floats
# (float64), their inject_hyperparams versions on float32 arrays; only for such values do the
# two agree to rounding. (With b2 = 0.9999, 1 - b2 differs by 1.7e-4 relative, and IVON's
# Hessian update (1 - b2) ĥ, with |ĥ| ~ 1e3 far from the optimum, carries that into the
# trajectory at ~1e-4.)
_B1, _B2, _IVON_B2 = 1 - 2.0**-4, 1 - 2.0**-13, 1 - 2.0**-17  # ~ 0.94, 0.99988, 0.999992
_BAYES = dict(ess=1e6, hess_init=1.0, b1=_B1)
_EVON = dict(_BAYES, b2=_B2, weight_decay=2.0**-20, precondition_frequency=4)  # refresh on
# real steps 4, 8, ...

_OPTIMIZERS_UNDER_TEST = (
    Case('soap', evon_jax.soap, dict(b1=_B1, b2=_B1, weight_decay=0.0, precondition_frequency=4),
         0.02, 1e-2),
    Case('ivon', evon_jax.ivon, dict(_BAYES, b2=_IVON_B2, weight_decay=2.0**-13), 0.1, 1e-2),
    Case('evon', evon_jax.evon, _EVON, 0.02, 8e-2),
    Case('evon_no_whiten', evon_jax.evon, dict(_EVON, whiten=False), 0.1, 1e-2),
    Case('evon_precondition_1d', evon_jax.evon, dict(_EVON, precondition_1d=True), 0.02, 8e-2),
    Case('evon_mc_samples_2', evon_jax.evon, dict(_EVON, whiten=False, mc_samples=2), 0.1,
         1e-2),
    Case('evon_phasing', evon_jax.evon, dict(_EVON, whiten=False, phasing=True), 0.05, 1e-2),
    Case('evon_explicit', evon_jax.evon,
         dict(_EVON, whiten=False, drop_in=False, mc_samples=2), 0.1, 1e-2),
)
_CASES = {case.name: case for case in _OPTIMIZERS_UNDER_TEST}
_BAYESIAN = tuple(case for case in _OPTIMIZERS_UNDER_TEST if case.bayesian)
# The three ways a learning rate reaches an update (optax's scale_by_learning_rate, IVON's
# rescaled lr, EVON's lr); the other EVON configs share EVON's path.
_LR_PATHS = tuple(_CASES[name] for name in ('soap', 'ivon', 'evon'))


def _ids(cases):
  return [case.name for case in cases]


# ----------------------------------------------------------------------------------------------
# Targets


class Target(NamedTuple):
  name: str
  initial: Any
  optimum: Any
  loss: Callable[[Any], jax.Array]


def _quadratic() -> Target:
  """0.5 <A D B, D> + 0.5 |b - b*|², D = W - W*: a (2, 3) matrix with the Kronecker Hessian
  A ⊗ B (eigenvalues 0.5 .. 3, so the eigenbases matter) and a (3,) vector leaf."""
  a = jnp.array([[2.0, 0.5], [0.5, 1.0]])
  b = jnp.array([[1.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 1.0]])
  optimum = {'w': jnp.array([[1.0, -2.0, 0.5], [0.0, 1.5, -1.0]]),
             'b': jnp.array([0.5, -1.0, 2.0])}

  def loss(params):
    d = params['w'] - optimum['w']
    return 0.5 * jnp.sum((a @ d @ b) * d) + 0.5 * jnp.sum((params['b'] - optimum['b']) ** 2)

  initial = {'w': jnp.zeros((2, 3)), 'b': jnp.zeros(3)}
  return Target('quadratic', initial, optimum, loss)


def _rosenbrock() -> Target:
  """(1 - x)² + 5 (y - x²)²: a curved parabolic valley with its minimum at (1, 1).

  Optax uses 100 for the valley's steepness; IVON's Hessian barely moves from hess_init in a
  few hundred steps (b2 = 0.9999 or more), so these runs are momentum SGD along the valley and
  a milder valley keeps them short.
  """

  def loss(params):
    return (1.0 - params[0]) ** 2 + 5.0 * (params[1] - params[0] ** 2) ** 2

  return Target('rosenbrock', jnp.zeros(2), jnp.ones(2), loss)


_TARGETS = {'quadratic': _quadratic(), 'rosenbrock': _rosenbrock()}


# ----------------------------------------------------------------------------------------------
# The shared jitted loop


def _gradients(case: Case, target: Target, params, state):
  """Drop-in: the gradient at the params the loop holds (a posterior sample).
  Explicit: one gradient per training sample drawn from the state (a leading axis)."""
  if case.explicit:
    samples = evon_jax.training_samples(state, case.kwargs['mc_samples'])
    return jax.vmap(jax.grad(target.loss))(samples)
  return jax.grad(target.loss)(params)


class _Harness:
  """One optimizer on one target with a jitted loop `advance(params, state, num_steps,
  grad_offset)` that makes `num_steps` update calls (gradients + grad_offset); `traces` counts
  how often it was traced, i.e. compiled."""

  def __init__(self, case: Case, target: Target, tx: optax.GradientTransformation):
    self.case, self.target, self.tx = case, target, tx
    self.traces = 0

    def advance(params, state, num_steps, grad_offset):
      self.traces += 1

      def body(_, carry):
        params, state = carry
        grads = _gradients(case, target, params, state)
        grads = jax.tree.map(lambda g: g + grad_offset, grads)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

      return jax.lax.fori_loop(0, num_steps, body, (params, state))

    self._advance = jax.jit(advance)

  def init(self):
    return self.target.initial, self.tx.init(self.target.initial)

  def advance(self, params, state, num_steps=1, grad_offset=0.0):
    return self._advance(params, state, jnp.asarray(num_steps, jnp.int32),
                         jnp.asarray(grad_offset, jnp.float32))

  def trajectory(self, num_calls):
    """Params after each call and the final state.

    The first call's gradient is offset: soap does not move on its first call, so on a
    deterministic target its second gradient would equal the first, whose rotated components
    along the null space of the rank-deficient first factors are pure rounding noise, which
    Adam's normalisation turns into full steps (two compilations then disagree by O(lr)).
    """
    params, state = self.init()
    trajectory = []
    for call in range(num_calls):
      params, state = self.advance(params, state, grad_offset=0.25 if call == 0 else 0.0)
      trajectory.append(params)
    return trajectory, state


@functools.lru_cache(maxsize=None)
def _harness(case_name: str, target_name: str) -> _Harness:
  case = _CASES[case_name]
  return _Harness(case, _TARGETS[target_name], case.make())


def _estimate(case: Case, params, state):
  """What the optimizer believes is the optimum: the posterior mean, or the params (soap)."""
  return posterior.mean(state) if case.bayesian else params


def _float_leaves(tree):
  """Leaves as NumPy arrays (PRNG keys as their key data)."""
  def to_numpy(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)
  return [to_numpy(x) for x in jax.tree.leaves(tree)]


def _avals(tree):
  """(structure, [(shape, dtype, weak_type)]) of a pytree of arrays or ShapeDtypeStructs."""
  def aval(x):
    return tuple(x.shape), x.dtype, bool(getattr(x, 'weak_type', False))
  return jax.tree.structure(tree), [aval(x) for x in jax.tree.leaves(tree)]


def _sample_gradients(case: Case, params):
  """Gradients with the shape `update` expects (a leading sample axis in explicit mode)."""
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  if case.explicit:
    k = case.kwargs['mc_samples']
    grads = jax.tree.map(lambda g: jnp.broadcast_to(g, (k,) + g.shape), grads)
  return grads


# ----------------------------------------------------------------------------------------------
# The battery


@pytest.mark.parametrize('target_name', list(_TARGETS))
@pytest.mark.parametrize('case', _OPTIMIZERS_UNDER_TEST, ids=_ids(_OPTIMIZERS_UNDER_TEST))
def test_converges(case, target_name):
  harness = _harness(case.name, target_name)
  params, state = harness.init()
  params, state = harness.advance(params, state, _NUM_STEPS * case.calls_per_step)
  estimate = _estimate(case, params, state)
  for got, want in zip(jax.tree.leaves(estimate), jax.tree.leaves(harness.target.optimum)):
    np.testing.assert_allclose(got, want, atol=case.atol, rtol=0)


@pytest.mark.parametrize('case', _OPTIMIZERS_UNDER_TEST, ids=_ids(_OPTIMIZERS_UNDER_TEST))
def test_no_recompilation_on_second_call(case):
  harness = _harness(case.name, 'quadratic')
  params, state = harness.advance(*harness.init())
  harness.advance(params, state)
  # Every test calls this (shared) loop with the initial state or states it returned, so one
  # trace in all means no call ever recompiled, whichever tests ran before.
  assert harness.traces == 1, 'a call with a returned state retraced the jitted update'


@pytest.mark.parametrize('case', _OPTIMIZERS_UNDER_TEST, ids=_ids(_OPTIMIZERS_UNDER_TEST))
def test_accepts_unknown_extra_args(case):
  tx = case.make()
  params = _TARGETS['quadratic'].initial
  grads = _sample_gradients(case, params)
  updates, _ = jax.eval_shape(
      lambda grads, state, params: tx.update(
          grads, state, params, unexpected_extra_arg=1, value=jnp.zeros([])),
      grads, tx.init(params), params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)


def _static_args(factory):
  parameters = inspect.signature(factory).parameters
  return tuple(name for name in evon_jax.STATIC_ARGS if name in parameters)


@pytest.mark.parametrize('case', _OPTIMIZERS_UNDER_TEST, ids=_ids(_OPTIMIZERS_UNDER_TEST))
def test_inject_hyperparams_gives_the_same_trajectory(case):
  # 9 calls: the first-call initialisation, refreshes on real steps 4 and 8 (mc_samples=2:
  # step 4 only), so every branch of the update sees injected (traced) hyperparameters.
  num_calls = 9
  injected = optax.inject_hyperparams(case.factory, static_args=_static_args(case.factory))(
      case.learning_rate, **case.kwargs)
  plain_run, plain_state = _harness(case.name, 'quadratic').trajectory(num_calls)
  injected_run, injected_state = _Harness(
      case, _TARGETS['quadratic'], injected).trajectory(num_calls)
  # The hyperparameters are float32-exact (see _OPTIMIZERS_UNDER_TEST), so the two programs
  # differ only by how XLA fuses float32 arithmetic: a few ulp of O(1) values per call (in
  # practice they agree bit for bit). Exactness matters beyond rounding: rank-deficient first
  # factors (g gᵀ of a vector leaf under precondition_1d) have degenerate eigenspaces whose
  # eigh basis, and so the noise the same key draws there, changes with the last bit.
  for call, (got, want) in enumerate(zip(injected_run, plain_run)):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=f'call {call}')
  for g, w in zip(_float_leaves(injected_state.inner_state), _float_leaves(plain_state)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


class _AbstractCall(NamedTuple):
  updates: Any
  params: Any  # after apply_updates
  state: Any


@functools.lru_cache(maxsize=None)
def _abstract_calls(case_name: str, dtype: str):
  """(init state, two update calls) traced by jax.eval_shape, with params of `dtype`: the
  dtypes, shapes and structures a jitted loop would see, without compiling anything."""
  case = _CASES[case_name]
  tx = case.make()
  params = jax.tree.map(lambda p: p.astype(dtype), _TARGETS['quadratic'].initial)
  grads = _sample_gradients(case, params)

  def call(params, state):
    updates, state = tx.update(grads, state, params)
    return _AbstractCall(updates, optax.apply_updates(params, updates), state)

  state = tx.init(params)
  first = jax.eval_shape(call, params, state)
  return state, (first, jax.eval_shape(call, first.params, first.state))


@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
@pytest.mark.parametrize('case', _OPTIMIZERS_UNDER_TEST, ids=_ids(_OPTIMIZERS_UNDER_TEST))
def test_preserves_param_dtype(case, dtype):
  _, calls = _abstract_calls(case.name, dtype)
  for call in calls:
    for tree in (call.updates, call.params):
      assert [x.dtype for x in jax.tree.leaves(tree)] == [jnp.dtype(dtype)] * 2
    inexact = {x.dtype for x in jax.tree.leaves(call.state)
               if jnp.issubdtype(x.dtype, jnp.inexact)}
    assert inexact == {jnp.dtype(jnp.float32)}, inexact


@pytest.mark.parametrize('case', _OPTIMIZERS_UNDER_TEST, ids=_ids(_OPTIMIZERS_UNDER_TEST))
def test_state_structure_dtypes_and_shapes_identical_between_steps(case):
  """Also weak types: a flip between calls would retrace a jitted loop."""
  state, calls = _abstract_calls(case.name, 'float32')
  for number, call in enumerate(calls):
    assert _avals(call.state) == _avals(state), f'call {number}'


@pytest.mark.parametrize('case', _OPTIMIZERS_UNDER_TEST, ids=_ids(_OPTIMIZERS_UNDER_TEST))
def test_state_is_stable_under_lax_cond(case):
  """As optax's test: the update and the identity are the two branches of a cond (both are
  traced, so this holds for either branch taken), then a cond picks the old or new state."""
  tx = case.make()
  params = _TARGETS['quadratic'].initial
  grads = _sample_gradients(case, params)

  def step(params, state, pick_update):
    updates, new_state = jax.lax.cond(
        pick_update, lambda: tx.update(grads, state, params),
        lambda: (jax.tree.map(jnp.zeros_like, params), state))
    new_state = jax.lax.cond(pick_update, lambda: new_state, lambda: state)
    return optax.apply_updates(params, updates), new_state

  params, state = jax.eval_shape(step, params, tx.init(params), True)
  jax.eval_shape(step, params, state, True)


@pytest.mark.parametrize('case', _LR_PATHS, ids=_ids(_LR_PATHS))
def test_constant_schedule_matches_constant_learning_rate(case):
  # On the cheap-to-compile target: the learning rate's path does not depend on the leaves.
  num_calls = 6
  constant_run, _ = _harness(case.name, 'rosenbrock').trajectory(num_calls)
  schedule = optax.constant_schedule(case.learning_rate)
  schedule_run, _ = _Harness(case, _TARGETS['rosenbrock'], case.make(schedule)).trajectory(
      num_calls)
  for got, want in zip(schedule_run, constant_run):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('case', _BAYESIAN, ids=_ids(_BAYESIAN))
def test_non_finite_gradient_skips_the_step(case):
  harness = _harness(case.name, 'quadratic')
  params, state = harness.advance(*harness.init(), 3)
  new_params, new_state = harness.advance(params, state, grad_offset=jnp.nan)
  assert int(new_state.skipped) == int(state.skipped) + 1
  assert int(new_state.count) == int(state.count)
  for got, want in zip(_float_leaves((new_params, posterior.mean(new_state))),
                       _float_leaves((params, posterior.mean(state)))):
    np.testing.assert_array_equal(got, want)
  # The optimizer goes on normally afterwards.
  params, state = harness.advance(new_params, new_state)
  assert int(state.count) == int(new_state.count) + 1
  assert all(np.all(np.isfinite(x)) for x in _float_leaves(posterior.mean(state)))


# ----------------------------------------------------------------------------------------------
# Wrappers and frameworks (one or two representative configs: each compiles its own update)


def _drop_in_loss_decreases(step, params, state, loss, num_steps):
  """Runs a jitted drop-in loop; returns the loss at the posterior mean before and after."""
  # Jitted: posterior functions run eagerly compile every primitive on first use (seconds).
  loss_at_mean = jax.jit(lambda state: loss(posterior.mean(state)))
  before = float(loss_at_mean(state))
  for _ in range(num_steps):
    params, state = step(params, state)
  return before, float(loss_at_mean(state)), state


def _jitted_drop_in_step(tx, loss):
  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state
  return step


def test_multi_steps_wrapping():
  every_k = 3
  target = _TARGETS['quadratic']
  tx = optax.MultiSteps(_CASES['ivon'].make(), every_k_schedule=every_k)
  step = _jitted_drop_in_step(tx, target.loss)
  params = target.initial
  state = tx.init(params)
  params, state = step(params, state)
  # MultiSteps only accumulates on the first k - 1 calls: the inner state has not moved.
  assert int(posterior.find_evon_state(state).count) == 0
  before, after, state = _drop_in_loss_decreases(step, params, state, target.loss, 30)
  assert int(posterior.find_evon_state(state).count) == 31 // every_k
  assert after < 0.5 * before, (before, after)
  samples = jax.eval_shape(lambda state: posterior.sample(jax.random.key(0), state, 4), state)
  assert [x.shape for x in jax.tree.leaves(samples)] == [(4, 3), (4, 2, 3)]


def test_chain_with_gradient_clipping():
  target = _TARGETS['quadratic']
  tx = optax.chain(optax.clip_by_global_norm(1.0), _CASES['evon'].make(0.1))
  step = _jitted_drop_in_step(tx, target.loss)
  params = target.initial
  state = tx.init(params)
  before, after, state = _drop_in_loss_decreases(step, params, state, target.loss, 30)
  assert after < 0.5 * before, (before, after)
  stddev, kl = jax.jit(lambda s: (posterior.marginal_stddev(s), posterior.kl_to_prior(s)))(
      state)
  assert jax.tree.structure(stddev) == jax.tree.structure(params)
  # ess = 1e6, H ~ 1: standard deviations ~ 1e-3.
  assert all(np.all((x > 1e-4) & (x < 1e-2)) for x in _float_leaves(stddev))
  assert np.isfinite(float(kl))


def _regression_data():
  x = jax.random.normal(jax.random.key(1), (32, 3))
  w = jnp.array([[1.0, -1.0], [0.5, 2.0], [-1.0, 0.0]])
  return x, x @ w + jnp.array([[0.3, -0.2]])


_NNX_CASES = (_CASES['ivon'], _CASES['evon'], _CASES['evon_mc_samples_2'])


@pytest.mark.parametrize('case', _NNX_CASES, ids=lambda c: c.name)
def test_flax_nnx_optimizer(case):
  from flax import nnx

  x, y = _regression_data()
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, case.make(0.1), wrt=nnx.Param)

  def loss_fn(model):
    return jnp.mean((model(x) - y) ** 2)

  @nnx.jit
  def step(model, optimizer):
    optimizer.update(model, nnx.grad(loss_fn)(model))

  @jax.jit
  def loss_at_mean(opt_state):
    mean = posterior.mean(opt_state)
    return jnp.mean((x @ mean['kernel'] + mean['bias'][None] - y) ** 2)

  before = float(loss_at_mean(nnx.as_pure(optimizer.opt_state)))
  for _ in range(30):
    step(model, optimizer)
  after = float(loss_at_mean(nnx.as_pure(optimizer.opt_state)))
  assert after < 0.5 * before, (before, after)
  # The mean reads from the nnx-wrapped state too; the model holds a posterior sample, within
  # a few posterior standard deviations (~1e-3) of it.
  mean = nnx.as_pure(posterior.mean(optimizer.opt_state))
  np.testing.assert_allclose(model.kernel[...], mean['kernel'], atol=1e-2)


def test_flax_linen_train_state():
  from flax import linen as nn
  from flax.training import train_state

  x, y = _regression_data()
  model = nn.Dense(2)
  params = model.init(jax.random.key(0), x)['params']
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=params, tx=_CASES['evon_no_whiten'].make(0.1))

  def loss_fn(params):
    return jnp.mean((state.apply_fn({'params': params}, x) - y) ** 2)

  @jax.jit
  def step(state):
    return state.apply_gradients(grads=jax.grad(loss_fn)(state.params))

  loss_at_mean = jax.jit(lambda opt_state: loss_fn(posterior.mean(opt_state)))
  before = float(loss_at_mean(state.opt_state))
  for _ in range(30):
    state = step(state)
  after = float(loss_at_mean(state.opt_state))
  assert after < 0.5 * before, (before, after)
  assert int(state.step) == 30


# ----------------------------------------------------------------------------------------------
# optax's own targets (contrib/_common_test.py: parabola, Rosenbrock with b = 100, matrix
# parabola, mixed 1-D/2-D) at the effective sample sizes of real datasets, with optax's
# 30,000 steps and tolerance (3e-2 on the posterior mean).
#
# The Price estimate z g(θ)/σ has variance ~ g(M)² ess (H + δ): far from the optimum, at a
# large ess, IVON's correction ½(1-b2)²(H-ĥ)²/(H+δ) then inflates H until an unwhitened step
# stalls. The default `hessian_baseline='momentum'` subtracts the momentum from g (unbiased:
# z is independent of it). Measured (posterior-mean error after 30k steps, ess 1e4 / 1e6 /
# 1e8), with the baseline, max over the 12 (target, ess) pairs: EVON whiten=False 2.1e-3 and
# 1.1e-2 (keys 0, 1); EVON whitened at lr 0.0015 5e-3 to 9.6e-3 (keys 0-3; a whitened step has
# norm lr, so it ends in a cycle about the optimum: at lr 0.003 it was 2.4e-2); IVON 1.5e-3 and
# 1.8e-3 (keys 0, 1). The 3e-2 bound is >= 2.7x the worst of these.
# Without it (the reference's estimate) at ess 1e8: EVON whiten=False 11 / 7.3e-2 / 3.1 / 1.2
# (H up to 7e5 where the true Hessian is 2), IVON on Rosenbrock 3.2 (H 4e9).
# Rosenbrock's valley is diagonal-ill-conditioned (Hessian eigenvalues 1000 and 0.4 at the
# optimum): EVON runs it with `precondition_1d` (a full basis for the 2-vector), as its
# diagonal-only mode is IVON with b2 = 0.9999 and measured 1.7e-2 / 2.9e-2 / 6.1e-2.


def _optax_targets():
  t1, t2 = jnp.array([1.0, -1.0, 2.0]), jnp.array([[1.0, 0.0], [-1.0, 1.0]])
  parabola_t, matrix_t = jnp.array([1.0, -1.0, 1.0]), jnp.array([[3.0, -2.0], [1.0, 4.0]])
  return {
      'parabola': (jnp.array([-1.0, 10.0, 1.0]), parabola_t,
                   lambda p: jnp.sum((p - parabola_t) ** 2)),
      'rosenbrock': (jnp.zeros(2), jnp.ones(2),
                     lambda p: (1.0 - p[0]) ** 2 + 100.0 * (p[1] - p[0] ** 2) ** 2),
      'matrix': (jnp.zeros((2, 2)), matrix_t, lambda p: jnp.sum((p - matrix_t) ** 2)),
      'mixed': ((jnp.zeros(3), jnp.zeros((2, 2))), (t1, t2),
                lambda p: jnp.sum((p[0] - t1) ** 2) + jnp.sum((p[1] - t2) ** 2)),
  }


_OPTAX_CONFIGS = {
    # δ as when the tolerance's spread was measured (evon's default was then 1e-6).
    'evon_no_whiten': (evon_jax.evon, dict(whiten=False, weight_decay=1e-6), 0.03),
    'evon': (evon_jax.evon, dict(whiten=True, weight_decay=1e-6), 0.0015),
    'ivon': (evon_jax.ivon, {}, 0.03),
}


def _optax_target_error(config, target, ess, **overrides):
  factory, kwargs, lr = _OPTAX_CONFIGS[config]
  if target == 'rosenbrock' and factory is evon_jax.evon:
    kwargs = dict(kwargs, precondition_1d=True)
  initial, optimum, loss = _optax_targets()[target]
  tx = factory(lr, ess=ess, hess_init=1.0, **{**kwargs, **overrides})

  def call(carry, _):
    params, state = carry
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return (optax.apply_updates(params, updates), state), None

  run = jax.jit(lambda p: jax.lax.scan(call, (p, tx.init(p)), None, length=30_000)[0][1])
  mean = posterior.mean(run(initial))
  return max(float(jnp.max(jnp.abs(m - o)))
             for m, o in zip(jax.tree.leaves(mean), jax.tree.leaves(optimum)))


@pytest.mark.parametrize('ess', [1e4, 1e6, 1e8])
@pytest.mark.parametrize('target', ['parabola', 'rosenbrock', 'matrix', 'mixed'])
@pytest.mark.parametrize('config', list(_OPTAX_CONFIGS))
def test_converges_on_optax_targets_at_large_ess(config, target, ess):
  assert _optax_target_error(config, target, ess) < 3e-2


def test_reference_price_estimate_stalls_at_large_ess():
  """The same target without the baseline: the failure the default removes (measured 11)."""
  assert _optax_target_error('evon_no_whiten', 'parabola', 1e8, hessian_baseline=None) > 1.0
