"""evon_jax against independent NumPy float64 re-derivations (tests/numpy_reference.py).

Each test drives an optimizer on a small deterministic loss (drop-in mode unless stated),
records at every call the sample the loop held, the posterior mean before the update and the
gradient, and feeds the NumPy reference the same gradient and the same noise (sample - mean, in
parameter space). The references rotate that noise into their own eigenbasis, so the comparison
does not depend on the sign conventions of eigh / QR. SOAP is deterministic: only gradients.

Tolerances. JAX runs in float32, the references in float64. Per step the float32 arithmetic
contributes relative errors of a few ulp (~1e-7); in addition the noise is recovered as
sample - mean, whose absolute error is one ulp of the sample (~6e-8 |W|), i.e. ~1e-6 relative
to noise of standard deviation ~0.1. The Hessian estimate is linear in that noise and the
trajectories are short (<= 30 steps) and contracting, so diagonal IVON stays within rtol 1e-5.
EVON and SOAP add float32 eigh / QR / rotations: an eigenvector is accurate to
~1e-7 * |factor| / eigengap, which on these well-separated 3x3..4x4 factors is ~1e-6, and
Newton-Schulz amplifies small singular values; we allow rtol 1e-4 there.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import evon_jax
from evon_jax import posterior
from evon_jax.kronecker import matrix_sides
import numpy_reference as ref


# ----------------------------------------------------------------------------------------------
# Problem and drop-in driver


def _spd(rng, n):
  """A random SPD matrix with eigenvalues in about [1, 4]."""
  a = rng.standard_normal((n, n))
  return a @ a.T / n + np.eye(n)


def _point_with_gradient(rng, left, right, singular_values, shift):
  """X such that left @ X @ right + shift = U diag(singular_values) Vᵀ (random U, V)."""
  m, n = shift.shape
  k = len(singular_values)
  u = np.linalg.qr(rng.standard_normal((m, m)))[0][:, :k]
  v = np.linalg.qr(rng.standard_normal((n, n)))[0][:, :k]
  target = u @ np.diag(singular_values) @ v.T
  return np.linalg.solve(left, target - shift) @ np.linalg.inv(right)


def make_problem(seed=0, with_conv=False):
  """A quadratic with Kronecker-structured Hessians on a (3, 4) matrix, plus a (4,) vector
  coupled to it (and optionally a (2, 2, 3) leaf, viewed as a (4, 3) matrix).

  The starting point is chosen so that each matrix's first gradient has singular values
  (2, 1.3, 0.7): the first-call factors g gᵀ, gᵀ g then have well separated eigenvalues and at
  most one zero eigenvalue, so the eigh bases are unique up to column signs, well conditioned
  in float32, and any implementation's bases can be compared with the reference's.
  """
  rng = np.random.default_rng(seed)
  singular_values = np.array([2.0, 1.3, 0.7])
  left, right, k_left, k_right = _spd(rng, 3), _spd(rng, 4), _spd(rng, 4), _spd(rng, 3)
  c = rng.uniform(0.5, 2.0, size=4)
  u = rng.standard_normal(3)
  b0 = 0.5 * rng.standard_normal(4)
  b_star = b0 + 0.5 * rng.standard_normal(4)
  w0 = 0.5 * rng.standard_normal((3, 4))
  w_star = w0 - _point_with_gradient(rng, left, right, singular_values, 0.1 * np.outer(u, b0))
  k0 = 0.5 * rng.standard_normal((4, 3))
  k_star = k0 - _point_with_gradient(rng, k_left, k_right, singular_values, np.zeros((4, 3)))
  consts = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32),
                        (left, right, w_star, c, b_star, u, k_left, k_right, k_star))

  def loss(p):
    left, right, w_star, c, b_star, u, k_left, k_right, k_star = consts
    dw = p['w'] - w_star
    value = 0.5 * jnp.sum((left @ dw @ right) * dw)
    value += 0.5 * jnp.sum(c * (p['b'] - b_star) ** 2) + 0.1 * (u @ p['w'] @ p['b'])
    if with_conv:
      dk = jnp.reshape(p['k'], (4, 3)) - k_star
      value += 0.5 * jnp.sum((k_left @ dk @ k_right) * dk)
    return value

  params = {'w': w0, 'b': b0}
  if with_conv:
    params['k'] = k0.reshape(2, 2, 3)
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  return loss, params


class Call(NamedTuple):
  """What one call of tx.update saw and produced (float64 NumPy pytrees)."""
  sample: dict
  mean_before: dict
  grad: dict
  mean_after: dict
  state: object


def _np(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def drop_in_trajectory(tx, params, loss, num_calls, *, use_mean=True):
  """Runs the drop-in loop (the loop holds the sample) and records every call.

  use_mean=False is for deterministic optimizers (soap): the "mean" is then the params.
  """
  grad_fn = jax.jit(jax.grad(loss))
  update_fn = jax.jit(tx.update)
  mean_fn = jax.jit(posterior.mean)
  state = tx.init(params)
  calls = []
  for _ in range(num_calls):
    mean_before = mean_fn(state) if use_mean else params
    grad = grad_fn(params)
    updates, state = update_fn(grad, state, params)
    mean_after = mean_fn(state) if use_mean else optax.apply_updates(params, updates)
    calls.append(Call(_np(params), _np(mean_before), _np(grad), _np(mean_after), state))
    params = optax.apply_updates(params, updates)
  return calls


def assert_tree_close(actual, expected, rtol, atol, what=''):
  for name in expected:
    np.testing.assert_allclose(actual[name], expected[name], rtol=rtol, atol=atol,
                               err_msg=f'{what} leaf {name!r}')


# ----------------------------------------------------------------------------------------------
# IVON

IVON_HYPER = dict(ess=50.0, hess_init=0.5, b1=0.9, b2=0.9, weight_decay=1e-2)
IVON_LR = 0.05


@functools.lru_cache(maxsize=None)
def _ivon_run(clip_radius, hessian_baseline='momentum'):
  """(initial params, calls) of ivon in drop-in mode; shared by two tests."""
  loss, params = make_problem(seed=0)
  tx = evon_jax.ivon(IVON_LR, clip_radius=clip_radius, key=3,
                     hessian_baseline=hessian_baseline, **IVON_HYPER)
  return params, drop_in_trajectory(tx, params, loss, num_calls=31)


# hessian_baseline=None is the reference's (ivon-opt's) Price estimate, one argument away.
@pytest.mark.parametrize('clip_radius,hessian_baseline',
                         [(np.inf, 'momentum'), (0.05, 'momentum'), (np.inf, None)])
def test_ivon_matches_numpy_reference(clip_radius, hessian_baseline):
  lr = IVON_LR
  params, calls = _ivon_run(clip_radius, hessian_baseline)

  # Call 0 sees the mean itself, only initialises, and does not move the mean.
  assert_tree_close(calls[0].sample, _np(params), 0, 0, 'call 0 sample')
  assert_tree_close(calls[0].mean_after, _np(params), 0, 0, 'call 0 mean')

  refs = {k: ref.IvonReference(v, learning_rate=lr, clip_radius=clip_radius,
                               hessian_baseline=hessian_baseline, **IVON_HYPER)
          for k, v in _np(params).items()}
  standardized = []
  for i, call in enumerate(calls[1:], start=1):
    for name, r in refs.items():
      noise = call.sample[name] - call.mean_before[name]
      # The sample was drawn with the reference's current variance 1 / (ess (H + wd)).
      standardized.append(noise * np.sqrt(IVON_HYPER['ess'] * (r.hess + r.wd)))
      r.step(call.grad[name], noise)
    assert_tree_close(call.mean_after, {k: r.mean for k, r in refs.items()}, 1e-5, 1e-6,
                      f'call {i}')
  standardized = np.concatenate([z.ravel() for z in standardized])
  # 480 standard normals: mean square 1 +- 3 * sqrt(2/480) ~ 0.19.
  assert abs(np.mean(standardized ** 2) - 1) < 0.2
  if clip_radius < np.inf:  # the clip was active at least once
    # A clipped move is lr (hess_init + wd) clip_radius = 1.3e-3, read from float32 means.
    deltas = [np.abs(c.mean_after['w'] - c.mean_before['w']) for c in calls[1:]]
    assert np.isclose(np.max(deltas), lr * (0.5 + 1e-2) * clip_radius, rtol=1e-3)


def test_evon_with_identity_bases_is_ivon():
  loss, params = make_problem(seed=0)
  _, ivon_calls = _ivon_run(np.inf)
  evon_calls = drop_in_trajectory(
      evon_jax.evon(IVON_LR * (IVON_HYPER['hess_init'] + IVON_HYPER['weight_decay']),
                    eps=0.0, max_precond_dim=0, whiten=False, key=3, **IVON_HYPER),
      params, loss, num_calls=31)
  for i, (a, b) in enumerate(zip(evon_calls, ivon_calls)):
    # Same key, same arithmetic up to the rounding of lr * (hess_init + wd).
    assert_tree_close(a.sample, b.sample, 1e-6, 1e-7, f'call {i} sample')
    assert_tree_close(a.mean_after, b.mean_after, 1e-6, 1e-7, f'call {i} mean')


# ----------------------------------------------------------------------------------------------
# EVON with eigenbases

EVON_HYPER = dict(ess=50.0, hess_init=0.5, b1=0.9, b2=0.9, shampoo_b=0.8, eps=1e-10,
                  weight_decay=1e-2, precondition_frequency=10)
# The NumPy reference views every leaf as a matrix (a conv kernel as (9 C_in) x C_out):
# the problems with a conv leaf keep that view through dimension numbers.
MATRIX_VIEW = dict(dimension_numbers=evon_jax.matrix_view)


def _assert_bases_match(impl_bases, r, what):
  """Same basis up to column signs: |diag(Q_impl^T Q_ref)| == 1."""
  q_left, q_right = matrix_sides(impl_bases)
  for q_impl, side, q_ref in [(q_left, r.bases.left, r.bases.q_left),
                              (q_right, r.bases.right, r.bases.q_right)]:
    if not side:
      assert q_impl is None, what
      continue
    overlap = np.abs(np.diag(np.asarray(q_impl, np.float64).T @ q_ref))
    np.testing.assert_allclose(overlap, 1.0, atol=1e-4, err_msg=what)


# The last case is the authors' EVON (loss-gradient factors, no Price baseline).
@pytest.mark.parametrize('whiten,hess_clip_ratio,factor_gradient,hessian_baseline', [
    (False, None, 'regularized', 'momentum'), (True, None, 'regularized', 'momentum'),
    (False, 1.5, 'regularized', 'momentum'), (False, None, 'loss', None)])
def test_evon_matches_numpy_reference(whiten, hess_clip_ratio, factor_gradient,
                                      hessian_baseline):
  loss, params = make_problem(seed=2, with_conv=True)
  lr = 0.02
  hyper = {**EVON_HYPER, 'hess_clip_ratio': hess_clip_ratio, 'factor_gradient': factor_gradient,
           'hessian_baseline': hessian_baseline}
  tx = evon_jax.evon(lr, whiten=whiten, key=11, **hyper, **MATRIX_VIEW)
  calls = drop_in_trajectory(tx, params, loss, num_calls=26)  # 25 real steps, refresh at 10, 20

  # The mean may be stored in eigen coordinates: Q (Qᵀ M) costs a few ulp; a real update
  # would move it by ~lr = 2e-2.
  assert_tree_close(calls[0].mean_after, _np(params), 1e-5, 1e-6, 'call 0 mean')
  refs = {k: ref.EvonReference(v, learning_rate=lr, whiten=whiten, **hyper)
          for k, v in _np(params).items()}
  clipped = 0
  for name, r in refs.items():
    r.first_call(calls[0].grad[name])
  standardized = []
  variance_fn = jax.jit(posterior.variance_eigen)
  for i, call in enumerate(calls[1:], start=1):
    bases = posterior.bases(call.state)
    for name, r in refs.items():
      noise = call.sample[name] - call.mean_before[name]
      noise_eig = r.bases.rotate_in(r.bases.as_matrix(noise))
      standardized.append(noise_eig * np.sqrt(r.ess * (r.hess + r.wd)))
      r.step(call.grad[name], noise)
      clipped += r.clipped
      _assert_bases_match(bases[name], r, f'call {i} leaf {name}')
    assert_tree_close(call.mean_after, {k: r.mean for k, r in refs.items()}, 1e-4, 1e-5,
                      f'call {i}')
    variance = _np(variance_fn(call.state))
    assert_tree_close(
        variance,
        {k: r.bases.from_matrix(1 / (r.ess * (r.hess + r.wd))) for k, r in refs.items()},
        1e-4, 0, f'call {i} variance_eigen')
  standardized = np.concatenate([z.ravel() for z in standardized])
  # 25 x 28 = 700 standard normals (the reference basis): mean square 1 +- ~0.16.
  assert abs(np.mean(standardized ** 2) - 1) < 0.17
  if hess_clip_ratio is not None:  # the clip was exercised
    assert clipped > 20, clipped


class MonteCarloStep(NamedTuple):
  """One real step with several samples: what the optimizer saw (float64 NumPy pytrees)."""
  grads: list
  noises: list
  mean_after: dict


def monte_carlo_steps(tx, params, loss, num_steps, mc_samples, drop_in):
  """Runs evon with mc_samples > 1 and groups what it saw by real step.

  Returns the gradient at the mean on the first call and a list of MonteCarloStep.
  """
  if drop_in:
    calls = drop_in_trajectory(tx, params, loss, 1 + mc_samples * num_steps)
    steps = []
    for j in range(num_steps):
      group = calls[1 + mc_samples * j: 1 + mc_samples * (j + 1)]
      for call in group[:-1]:  # accumulate-only calls draw from, and keep, the same mean
        assert_tree_close(call.mean_after, group[0].mean_before, 0, 0, f'step {j + 1}')
      steps.append(MonteCarloStep(
          [c.grad for c in group],
          [jax.tree.map(np.subtract, c.sample, group[0].mean_before) for c in group],
          group[-1].mean_after))
    return calls[0].grad, steps

  grads_fn = jax.jit(jax.vmap(jax.grad(loss)))
  update_fn = jax.jit(tx.update)
  mean_fn = jax.jit(posterior.mean)
  samples_fn = jax.jit(lambda s: evon_jax.training_samples(s, mc_samples))
  state = tx.init(params)
  first_grad, steps = None, []
  for j in range(num_steps + 1):
    samples = samples_fn(state)
    mean_before = _np(mean_fn(state))
    grads = grads_fn(samples)
    updates, state = update_fn(grads, state, params)
    params = optax.apply_updates(params, updates)
    mean_after = _np(mean_fn(state))
    # Explicit mode: the loop holds the mean; update = new mean - params.
    assert_tree_close(_np(params), mean_after, 1e-6, 1e-6, f'step {j} params')
    grads, samples = _np(grads), _np(samples)
    if j == 0:  # the first call's samples are the mean itself
      for s in range(mc_samples):
        assert_tree_close({k: v[s] for k, v in samples.items()}, mean_before, 1e-6, 1e-6)
      first_grad = {k: v[0] for k, v in grads.items()}
      continue
    steps.append(MonteCarloStep(
        [{k: v[s] for k, v in grads.items()} for s in range(mc_samples)],
        [{k: samples[k][s] - mean_before[k] for k in samples} for s in range(mc_samples)],
        mean_after))
  return first_grad, steps


# Explicit mode with the noise drawn in parameter coordinates: training_samples must draw
# what the update regenerates (tests/test_parameter_noise.py has the rest of that option).
@pytest.mark.parametrize('drop_in,noise_basis', [(True, 'eigen'), (False, 'eigen'),
                                                 (False, 'parameter')])
def test_evon_monte_carlo_matches_numpy_reference(drop_in, noise_basis):
  """mc_samples=2 (accumulating calls in drop-in mode, stacked gradients in explicit mode),
  with the full-eigh refresh every 5 steps."""
  mc_samples, lr = 2, 0.02
  hyper = {**EVON_HYPER, 'precondition_frequency': 5}
  loss, params = make_problem(seed=5, with_conv=True)
  tx = evon_jax.evon(lr, whiten=False, refresh_method='eigh', mc_samples=mc_samples,
                     **MATRIX_VIEW, drop_in=drop_in, key=13, noise_basis=noise_basis,
                     **hyper)
  first_grad, steps = monte_carlo_steps(tx, params, loss, 12, mc_samples, drop_in)
  refs = {k: ref.EvonReference(v, learning_rate=lr, whiten=False, refresh_method='eigh',
                               **hyper)
          for k, v in _np(params).items()}
  for name, r in refs.items():
    r.first_call(first_grad[name])
  for j, step in enumerate(steps, start=1):
    for name, r in refs.items():
      r.step([g[name] for g in step.grads], [e[name] for e in step.noises])
    assert_tree_close(step.mean_after, {k: r.mean for k, r in refs.items()}, 1e-4, 1e-5,
                      f'step {j}')
  # The two samples of a step carry different noise.
  assert not np.allclose(steps[-1].noises[0]['w'], steps[-1].noises[1]['w'])


def _matrix(x):
  x = np.asarray(x, np.float64)
  return x.reshape(-1, x.shape[-1]) if x.ndim >= 2 else x.reshape(-1, 1)


def _rotate_out(x, q_left, q_right):
  if q_left is not None:
    x = np.asarray(q_left, np.float64) @ x
  if q_right is not None:
    x = x @ np.asarray(q_right, np.float64).T
  return x


def _momentum_and_bases(kind, state):
  """Eigen-coordinate momentum and the bases of an evon (EvonState) or soap (chain) state."""
  if kind == 'evon':
    inner = posterior.find_evon_state(state)
    return inner.momentum, _sides_tree(inner.bases, inner.momentum)
  inner = state[0]
  assert isinstance(inner, evon_jax.ScaleBySoapState)
  return inner.inner.mu, _sides_tree(inner.bases, inner.inner.mu)


def _sides_tree(stored_bases, like):
  per_leaf = evon_jax.kronecker.per_leaf(stored_bases, like)
  return {name: matrix_sides(bases) for name, bases in per_leaf.items()}


@pytest.mark.parametrize('kind', ['evon', 'soap'])
def test_refresh_keeps_orthonormality_and_momentum(kind):
  """Every 3rd real step the bases change, stay orthonormal, and the momentum's
  parameter-space value is the plain EMA b1 m + (1 - b1) g computed in the old basis."""
  every, b1 = 3, 0.9
  loss, params = make_problem(seed=3, with_conv=True)
  if kind == 'evon':
    tx = evon_jax.evon(0.02, whiten=True, key=5, **MATRIX_VIEW,
                       **{**EVON_HYPER, 'b1': b1, 'precondition_frequency': every})
  else:
    tx = evon_jax.soap(0.02, **{**SOAP_HYPER, 'b1': b1, 'precondition_frequency': every},
                       **MATRIX_VIEW)
  calls = drop_in_trajectory(tx, params, loss, num_calls=11, use_mean=kind == 'evon')
  for t in range(1, len(calls)):
    momentum_old, bases_old = _momentum_and_bases(kind, calls[t - 1].state)
    momentum_new, bases_new = _momentum_and_bases(kind, calls[t].state)
    for name, (q_left, q_right) in bases_new.items():
      what = f'real step {t} leaf {name}'
      old_left, old_right = bases_old[name]
      changed = [not np.array_equal(a, b) for a, b in
                 [(q_left, old_left), (q_right, old_right)] if a is not None]
      assert all(changed) if t % every == 0 else not any(changed), what
      for q in (q_left, q_right):
        if q is not None:
          q = np.asarray(q, np.float64)
          np.testing.assert_allclose(q.T @ q, np.eye(q.shape[0]), atol=2e-6, err_msg=what)
      g = _matrix(calls[t].grad[name])
      g_eig = g if old_left is None else np.asarray(old_left, np.float64).T @ g
      g_eig = g_eig if old_right is None else g_eig @ np.asarray(old_right, np.float64)
      expected = _rotate_out(b1 * _matrix(momentum_old[name]) + (1 - b1) * g_eig,
                             old_left, old_right)
      actual = _rotate_out(_matrix(momentum_new[name]), q_left, q_right)
      np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6, err_msg=what)


# ----------------------------------------------------------------------------------------------
# SOAP

SOAP_HYPER = dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01, precondition_frequency=10)


@pytest.mark.parametrize('shampoo_b', [None, 0.8])
def test_soap_matches_numpy_reference(shampoo_b):
  loss, params = make_problem(seed=4, with_conv=True)
  lr = 0.02
  tx = evon_jax.soap(lr, shampoo_b=shampoo_b, **SOAP_HYPER, **MATRIX_VIEW)
  calls = drop_in_trajectory(tx, params, loss, num_calls=26, use_mean=False)
  refs = {k: ref.SoapReference(v, learning_rate=lr, shampoo_b=shampoo_b, **SOAP_HYPER)
          for k, v in _np(params).items()}
  for i, call in enumerate(calls):
    for name, r in refs.items():
      r.step(call.grad[name])
    assert_tree_close(call.mean_after, {k: r.params for k, r in refs.items()}, 1e-4, 1e-5,
                      f'call {i}')
