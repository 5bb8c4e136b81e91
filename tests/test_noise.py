"""The keyed-hash normal generator: distribution, reproducibility, independence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from evon_jax import noise

N = 400_000


@pytest.mark.parametrize("generator", ["hash", "threefry"])
def test_draws_are_standard_normal(generator):
  z = np.asarray(noise.standard_normal(jax.random.key(0), (N,), jnp.float32, generator),
                 np.float64)
  # Standard errors with N = 4e5: mean 1.6e-3, variance 2.2e-3, 4th moment ~1.5e-2.
  # Bounds are ~4 standard errors, so a correct generator fails with probability < 1e-3.
  assert abs(z.mean()) < 0.0065
  assert abs(z.var() - 1.0) < 0.009
  assert abs(np.mean(z ** 4) - 3.0) < 0.06
  # Kolmogorov–Smirnov against N(0, 1) at a fixed seed; p < 1e-3 would flag a wrong shape.
  assert stats.kstest(z, "norm").pvalue > 1e-3
  # Tails: P(|z| > 3) = 0.0027 (binomial std ~8e-5).
  assert abs(np.mean(np.abs(z) > 3) - 0.0027) < 4e-4


def test_reproducible_and_key_dependent():
  a = noise.standard_normal(jax.random.key(1), (64, 32))
  b = noise.standard_normal(jax.random.key(1), (64, 32))
  c = noise.standard_normal(jax.random.key(2), (64, 32))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_neighbouring_elements_and_keys_uncorrelated():
  z = np.asarray(noise.standard_normal(jax.random.key(3), (N,)), np.float64)
  # Lag-1 correlation of consecutive indices; std error 1/sqrt(N) = 1.6e-3.
  assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 0.0065
  keys = [jax.random.fold_in(jax.random.key(4), i) for i in range(2)]
  z0, z1 = (np.asarray(noise.standard_normal(k, (N,)), np.float64) for k in keys)
  assert abs(np.corrcoef(z0, z1)[0, 1]) < 0.0065


def test_shape_and_dtype():
  z = noise.standard_normal(jax.random.key(5), (3, 4, 5), jnp.bfloat16)
  assert z.shape == (3, 4, 5) and z.dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(z, np.float32)))
