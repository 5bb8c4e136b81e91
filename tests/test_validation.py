"""Invalid hyperparameters and misuse fail early, with a ValueError that names the culprit."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import evon_jax

_FACTORIES = {
    'evon': lambda **kw: evon_jax.evon(**{'learning_rate': 0.1, 'ess': 100.0,
                                          'hess_init': 1.0, **kw}),
    'ivon': lambda **kw: evon_jax.ivon(**{'learning_rate': 0.1, 'ess': 100.0, **kw}),
    'soap': lambda **kw: evon_jax.soap(**{'learning_rate': 0.1, **kw}),
    'scale_by_soap': lambda **kw: evon_jax.scale_by_soap(**kw),
}
_BAYESIAN = ('evon', 'ivon')
_SOAPS = ('soap', 'scale_by_soap')


def _invalid(names, argument, values):
  return [pytest.param(name, argument, value, id=f'{name}-{argument}={value!r}')
          for name in names for value in values]


_INVALID = (
    _invalid(_BAYESIAN, 'ess', [0.0, -1.0, math.inf, math.nan])
    + _invalid(_BAYESIAN, 'hess_init', [0.0, -0.5, math.inf])
    + _invalid(_BAYESIAN + _SOAPS, 'b1', [-0.1, 1.0, 1.5, math.nan])
    + _invalid(_BAYESIAN + _SOAPS, 'b2', [-0.1, 1.0, 2.0])
    + _invalid(('evon',) + _SOAPS, 'shampoo_b', [-0.1, 1.0])
    + _invalid(('evon',) + _SOAPS, 'precondition_frequency', [0, -3, 2.5, 10.0, True, None])
    + _invalid(('evon',) + _SOAPS, 'max_precond_dim', [-1, 1.5, None])
    + _invalid(_BAYESIAN, 'mc_samples', [0, -1, 1.5, 2.0])
    + _invalid(_BAYESIAN + ('soap',), 'weight_decay', [-1e-4, math.inf])
    + _invalid(_BAYESIAN + ('soap',), 'learning_rate', [-0.1, math.nan])
    + _invalid(_BAYESIAN, 'clip_radius', [0.0, -1.0])
    + _invalid(('evon',) + _SOAPS, 'eps', [-1e-8])
    + _invalid(_SOAPS, 'relative_eps', [-1e-2, math.nan])
    + _invalid(('evon',), 'hess_clip_ratio', [0.0, -1.0])
    + _invalid(('evon',), 'refresh_method', ['qr', 'EIGH', None])
    + _invalid(('evon',), 'factor_gradient', ['regularised', ''])
    + _invalid(('evon',), 'factor_statistic', ['per-sample', 'mean'])
)


@pytest.mark.parametrize('name, argument, value', _INVALID)
def test_invalid_hyperparameter_raises_at_construction(name, argument, value):
  with pytest.raises(ValueError, match=argument):
    _FACTORIES[name](**{argument: value})


@pytest.mark.parametrize('name, kwargs', [
    ('evon', dict(b1=0.0, b2=0.0, shampoo_b=0.0, weight_decay=0.0, learning_rate=0.0,
                  eps=0.0, max_precond_dim=0, precondition_frequency=1, clip_radius=math.inf,
                  hess_clip_ratio=None, refresh_method='eigh', factor_gradient='regularized',
                  factor_statistic='per_sample')),
    ('evon', dict(ess=7, mc_samples=np.int64(3), precondition_frequency=np.int32(5))),
    ('ivon', dict(b1=0.0, clip_radius=1e-3, weight_decay=0.0, mc_samples=1)),
    ('soap', dict(b1=0.0, b2=0.0, eps=0.0, weight_decay=0.0, max_precond_dim=0)),
])
def test_boundary_values_are_accepted(name, kwargs):
  _FACTORIES[name](**kwargs)


def test_learning_rate_schedule_is_accepted():
  for name in ('evon', 'ivon', 'soap'):
    _FACTORIES[name](learning_rate=lambda count: 0.1 / (1 + count))


@pytest.mark.parametrize('name', _BAYESIAN + ('soap',))
def test_update_without_params_raises(name):
  tx = _FACTORIES[name]()
  params = {'w': jnp.zeros((2, 3))}
  state = tx.init(params)
  with pytest.raises(ValueError, match='params'):
    tx.update(params, state)
  with pytest.raises(ValueError, match='params'):
    tx.update(params, state, None)


_WRONG_SHAPES = (
    {'w': jnp.zeros((3, 2)), 'b': jnp.zeros(3)},  # transposed
    {'w': jnp.zeros((2, 3)), 'b': jnp.zeros(4)},  # wrong length
    {'w': jnp.zeros((6,)), 'b': jnp.zeros(3)},    # right size, wrong shape
)


@pytest.mark.parametrize('name', _BAYESIAN)
def test_gradients_of_the_wrong_shape_raise(name):
  tx = _FACTORIES[name]()
  params = {'w': jnp.zeros((2, 3)), 'b': jnp.zeros(3)}
  state = tx.init(params)
  for grads in _WRONG_SHAPES:
    with pytest.raises(ValueError, match='shape'):
      tx.update(grads, state, params)


def test_soap_gradients_of_the_wrong_shape_raise():
  # scale_by_soap does not check shapes itself: the error comes from inside (a TypeError from
  # a matmul or reshape), but none of these passes silently.
  tx = evon_jax.soap(0.1)
  params = {'w': jnp.zeros((2, 3)), 'b': jnp.zeros(3)}
  state = tx.init(params)
  for grads in _WRONG_SHAPES:
    with pytest.raises((TypeError, ValueError)):
      tx.update(grads, state, params)


@pytest.mark.parametrize('name', _BAYESIAN)
def test_explicit_mode_needs_one_gradient_per_training_sample(name):
  tx = _FACTORIES[name](mc_samples=2, drop_in=False)
  params = {'w': jnp.zeros((2, 3))}
  state = tx.init(params)
  for grads in ({'w': jnp.zeros((2, 3))},        # no sample axis
                {'w': jnp.zeros((3, 2, 3))},     # three samples, not two
                {'w': jnp.zeros((2, 3, 2))}):    # sample axis, wrong leaf shape
    with pytest.raises(ValueError, match='drop_in=False'):
      tx.update(grads, state, params)


@pytest.mark.parametrize('name', _BAYESIAN)
def test_gradients_of_a_different_tree_raise(name):
  tx = _FACTORIES[name]()
  params = {'w': jnp.zeros((2, 3)), 'b': jnp.zeros(3)}
  state = tx.init(params)
  with pytest.raises(ValueError):
    tx.update({'w': jnp.zeros((2, 3))}, state, params)


@pytest.mark.parametrize('name', _BAYESIAN + ('soap',))
@pytest.mark.parametrize('value', ['1e-3', None, [1e-3]])
def test_learning_rate_that_is_not_a_number_raises_at_construction(name, value):
  with pytest.raises(ValueError, match='learning_rate must be a number'):
    _FACTORIES[name](learning_rate=value)
  _FACTORIES[name](learning_rate=np.float32(1e-3))  # numbers and scalar arrays are fine
  _FACTORIES[name](learning_rate=jnp.asarray(1e-3))


@pytest.mark.parametrize('name', list(_FACTORIES))
def test_complex_parameters_raise_naming_the_leaf(name):
  tx = _FACTORIES[name]()
  with pytest.raises(ValueError, match=r"Leaf \['c'\] is complex"):
    tx.init({'w': jnp.zeros((2, 3)), 'c': jnp.zeros(3, jnp.complex64)})


@pytest.mark.parametrize('name', _BAYESIAN)
def test_none_gradient_of_a_frozen_leaf_points_to_masking(name):
  tx = _FACTORIES[name]()
  params = {'w': jnp.zeros((2, 3)), 'frozen': jnp.zeros(3)}
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"\['frozen'\].*optax.masked"):
    tx.update({'w': jnp.zeros((2, 3)), 'frozen': None}, state, params)


@pytest.mark.parametrize('factory', [evon_jax.evon, evon_jax.ivon, evon_jax.soap])
def test_learning_rate_annotation_is_resolvable(factory):
  """optax's own tests introspect `learning_rate`'s annotation to see schedule support: it
  must be the type itself, not a string (no `from __future__ import annotations`)."""
  import inspect
  import optax
  annotation = inspect.signature(factory).parameters['learning_rate'].annotation
  assert annotation == optax.ScalarOrSchedule


def test_evon_defaults_follow_the_whitening_choice():
  """hess_init defaults to 1.0 unwhitened (the default) and 0.1 with whiten=True; the prior
  precision per example δ defaults to 1e-4 (docs/hyperparameters.md)."""
  params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
  for kwargs, h0 in (({}, 1.0), ({"whiten": True}, 0.1), ({"whiten": True, "hess_init": 0.5},
                                                           0.5)):
    state = evon_jax.evon(0.05, ess=10.0, **kwargs).init(params)
    for leaf in jax.tree.leaves(state.hessian):
      np.testing.assert_allclose(np.asarray(leaf), h0, rtol=1e-6)
    assert float(state.weight_decay) == pytest.approx(1e-4)
