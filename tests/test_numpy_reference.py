"""Self-checks of the NumPy oracles in numpy_reference.py (no evon_jax involved)."""

from __future__ import annotations

import numpy as np
import pytest

import numpy_reference as ref


def test_reference_newton_schulz_is_nearly_orthogonal():
  rng = np.random.default_rng(0)
  for shape in [(3, 4), (5, 3), (4, 4)]:
    x = ref.newton_schulz(rng.standard_normal(shape))
    singular_values = np.linalg.svd(x, compute_uv=False)
    # The quintic's fixed band is roughly [0.7, 1.2], not exactly 1.
    assert np.all((singular_values > 0.6) & (singular_values < 1.25)), singular_values


def test_reference_evon_with_identity_bases_is_reference_ivon():
  rng = np.random.default_rng(1)
  hyper = dict(ess=50.0, hess_init=0.5, b1=0.9, b2=0.9, weight_decay=1e-2)
  mean = rng.standard_normal((3, 4))
  ivon = ref.IvonReference(mean, learning_rate=0.05, rescale_lr=True, **hyper)
  evon = ref.EvonReference(mean, learning_rate=0.05 * (0.5 + 1e-2), eps=0.0, whiten=False,
                           max_precond_dim=0, **hyper)
  evon.first_call(rng.standard_normal((3, 4)))
  for _ in range(20):
    grad, noise = rng.standard_normal((3, 4)), 0.2 * rng.standard_normal((3, 4))
    ivon.step(grad, noise)
    evon.step(grad, noise)
  np.testing.assert_allclose(evon.mean, ivon.mean, rtol=1e-13)
  np.testing.assert_allclose(evon.hess, ivon.hess, rtol=1e-13)


@pytest.mark.parametrize('kind', ['evon', 'soap'])
def test_reference_refresh_keeps_momentum_and_orthonormality(kind):
  rng = np.random.default_rng(2)
  if kind == 'evon':
    opt = ref.EvonReference(rng.standard_normal((3, 4)), learning_rate=0.01, ess=50.0,
                            hess_init=0.5, b1=0.9, b2=0.9, precondition_frequency=3)
    opt.first_call(rng.standard_normal((3, 4)))
  else:
    opt = ref.SoapReference(rng.standard_normal((3, 4)), learning_rate=0.01, b1=0.9, b2=0.9,
                            precondition_frequency=3)
    opt.step(rng.standard_normal((3, 4)))
  for _ in range(6):
    grad = rng.standard_normal((3, 4))
    momentum = opt.momentum if kind == 'evon' else opt.mu
    expected = opt.bases.rotate_out(
        opt.b1 * momentum + (1 - opt.b1) * opt.bases.rotate_in(grad))
    if kind == 'evon':
      opt.step(grad, 0.1 * rng.standard_normal((3, 4)))
    else:
      opt.step(grad)
    momentum = opt.momentum if kind == 'evon' else opt.mu
    np.testing.assert_allclose(opt.bases.rotate_out(momentum), expected, atol=1e-12)
    for q in (opt.bases.q_left, opt.bases.q_right):
      np.testing.assert_allclose(q.T @ q, np.eye(q.shape[0]), atol=1e-12)
