"""`momentum_dtype`: the momentum is stored in a narrower dtype, everything else unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import evon_jax


def _run(momentum_dtype, steps=12):
  rng = np.random.default_rng(0)
  target = {"w": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=4), jnp.float32)}
  loss = lambda p: sum(jnp.sum((p[k] - target[k]) ** 2 * (1 + jnp.arange(p[k].size).reshape(
      p[k].shape) / 10)) for k in p)
  params = jax.tree.map(jnp.zeros_like, target)
  tx = evon_jax.evon(0.05, ess=1e4, hess_init=1.0, precondition_frequency=2, whiten=False,
                     momentum_dtype=momentum_dtype)
  state = tx.init(params)
  dtypes = []
  for _ in range(steps):  # several refreshes: the change of basis must keep the dtype
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
    dtypes.append(jax.tree.map(lambda x: x.dtype, state))
  return state, dtypes


def test_bf16_momentum_is_stored_in_bf16_and_stays_so():
  state, dtypes = _run("bfloat16")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state.momentum))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.mean))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.hessian))
  assert all(d == dtypes[0] for d in dtypes)  # state structure never changes between steps


def test_bf16_momentum_follows_the_float32_run():
  low, _ = _run("bfloat16")
  full, _ = _run(None)
  for a, b in zip(jax.tree.leaves(evon_jax.posterior.mean(low)),
                  jax.tree.leaves(evon_jax.posterior.mean(full))):
    scale = float(jnp.max(jnp.abs(b)))
    # bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3 per store); over 12
    # steps the means agree to a few 1e-3 of their scale, while a wrong momentum would be
    # off by O(1) of the step size (~5e-2 relative).
    assert float(jnp.max(jnp.abs(a - b))) < 1e-2 * scale


@pytest.mark.parametrize("bad", ["int32", "not-a-dtype"])
def test_bad_momentum_dtype_raises(bad):
  with pytest.raises(ValueError, match="momentum_dtype"):
    evon_jax.evon(0.1, ess=1.0, hess_init=1.0, momentum_dtype=bad)
