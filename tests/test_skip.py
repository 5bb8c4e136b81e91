"""A non-finite gradient skips the call exactly, in every mode that gates the step.

The engine gates a skipped call with scalar coefficients (keep = 1, take = 0) and zeroed
statistics rather than a `lax.cond`, so these tests check that the result is bit-identical,
not merely close: every state array, the key, and exactly-zero updates.
"""

import jax
import jax.numpy as jnp
import pytest

import evon_jax

MODES = [
    dict(),
    dict(mc_samples=2, factor_gradient="regularized"),
    dict(mc_samples=3, factor_statistic="per_sample"),
    dict(phasing=True),
    dict(drop_in=False, mc_samples=2),
]


def _grads(params, mc, drop_in):
  g = jax.tree.map(lambda x: 2 * x + 0.1, params)
  if not drop_in:
    g = jax.tree.map(lambda x: jnp.stack([x * (1 + 0.1 * s) for s in range(mc)]), g)
  return g


@pytest.mark.parametrize("poison", [jnp.nan, jnp.inf])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()))
def test_skip_is_bit_exact(mode, poison):
  drop_in, mc = mode.get("drop_in", True), mode.get("mc_samples", 1)
  params = {"w": jnp.linspace(-1, 1, 12).reshape(4, 3), "b": jnp.ones(3)}
  tx = evon_jax.evon(0.1, ess=10.0, hess_init=1.0, precondition_frequency=2, **mode)
  state = tx.init(params)
  for _ in range(5):  # past the first call, an accumulation and a refresh
    updates, state = tx.update(_grads(params, mc, drop_in), state, params)
    params = jax.tree.map(jnp.add, params, updates)
  bad = _grads(params, mc, drop_in)
  bad["w"] = bad["w"].at[..., 0, 1].set(poison)  # one entry of one leaf
  updates, skipped = tx.update(bad, state, params)

  assert int(skipped.skipped) == int(state.skipped) + 1
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
  assert bool(jnp.all(jax.random.key_data(skipped.key) == jax.random.key_data(state.key)))
  before, after = (s._replace(skipped=0, key=0) for s in (state, skipped))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    assert jnp.asarray(a).dtype == jnp.asarray(b).dtype and bool(jnp.all(a == b))
  # ... and the next finite call proceeds as if the bad one never happened.
  good = _grads(params, mc, drop_in)
  expected = tx.update(good, state, params)
  resumed = tx.update(good, skipped, params)
  for a, b in zip(jax.tree.leaves(expected[0]), jax.tree.leaves(resumed[0])):
    assert bool(jnp.all(a == b))
