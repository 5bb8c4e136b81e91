"""Runs EVON under `jax.jit` with shardings on 4 forced host devices (see test_sharding.py).

Run as a script (`python tests/_sharding_worker.py CASE`) with
XLA_FLAGS=--xla_force_host_platform_device_count=4 set before JAX starts; it asserts, prints
what it measured as one JSON line and exits non-zero on failure. Cases:

  data_parallel: params and optimizer state replicated, the batch sharded over a 4-way
    'data' axis; compared with the same jitted step on one device.
  model_sharded: a (2 data) x (2 model) mesh; batch over 'data', every optimizer-state
    array with a dimension divisible by 2 sharded over 'model' (FSDP-style: Kronecker
    factors, bases, mean, momentum, Hessian), params replicated; compared likewise. The
    final sharded state is then saved with evon_jax.checkpoint and restored into a template
    of ShapeDtypeStructs with the same shardings: placements and bits must match.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

jax.config.update("jax_numpy_rank_promotion", "raise")

import evon_jax  # noqa: E402  (after the config update, as conftest does)
from evon_jax import posterior  # noqa: E402

NUM_STEPS = 13  # the first call (eigh) and real steps 1..12: power-QR refreshes at 4, 8, 12
BATCH = 32


def _problem():
  keys = jax.random.split(jax.random.key(0), 4)
  params = {
      "w1": 0.3 * jax.random.normal(keys[0], (8, 8)),
      "b1": jnp.zeros(8),
      "w2": 0.3 * jax.random.normal(keys[1], (8, 8)),
      "b2": jnp.zeros(8),
  }
  x = jax.random.normal(keys[2], (BATCH, 8))
  y = jnp.tanh(x @ jax.random.normal(keys[3], (8, 8)))
  return params, x, y


def _loss(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b1"][None])
  return jnp.mean((h @ params["w2"] + params["b2"][None] - y) ** 2)


def _tx():
  return evon_jax.evon(0.05, ess=1e3, hess_init=0.5, precondition_frequency=4, key=7)


def _step_fn(tx):
  def step(params, state, x, y):
    grads = jax.grad(_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def _run(step, params, state, x, y):
  history = []
  for _ in range(NUM_STEPS):
    params, state = step(params, state, x, y)
    history.append((params, state))
  return history


def _numpy_leaves(tree):
  out = []
  for leaf in jax.tree.leaves(tree):
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    out.append(np.asarray(leaf))
  return out


def _max_differences(history, reference):
  """Largest |sharded - single| over all steps, for params, posterior mean, and whole state."""
  diffs = {"params": 0.0, "mean": 0.0, "state": 0.0}
  mean_fn = jax.jit(posterior.mean)
  for (p, s), (p0, s0) in zip(history, reference):
    for name, a, b in (("params", p, p0), ("mean", mean_fn(s), mean_fn(s0)), ("state", s, s0)):
      for u, v in zip(_numpy_leaves(a), _numpy_leaves(b)):
        if u.dtype.kind in "ui":
          np.testing.assert_array_equal(u, v)  # counters and key data: exactly equal
        elif u.size:
          diffs[name] = max(diffs[name], float(np.max(np.abs(u - v))))
  return diffs


def _shardings(tree):
  return [leaf.sharding for leaf in jax.tree.leaves(tree)]


def _check_stable(history, expected):
  """Every step's state has exactly the expected shardings (equivalent placements)."""
  for number, (_, state) in enumerate(history):
    leaves = jax.tree.leaves(state)
    for leaf, want in zip(leaves, expected):
      assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (
          f"step {number}: state leaf {leaf.shape} has sharding {leaf.sharding}, "
          f"expected {want}")


def _reference(params, x, y):
  tx = _tx()
  device = jax.devices()[0]
  put = lambda t: jax.device_put(t, device)
  return _run(jax.jit(_step_fn(tx)), put(params), put(tx.init(params)), put(x), put(y))


def data_parallel():
  params, x, y = _problem()
  tx = _tx()
  mesh = Mesh(np.array(jax.devices()), ("data",))
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))
  state = jax.device_put(tx.init(params), replicated)
  p = jax.device_put(params, replicated)
  xs, ys = jax.device_put((x, y), batch_sharding)
  assert len(xs.sharding.device_set) == 4
  # No in/out shardings given: jit follows the arguments' shardings (sharding propagation
  # decides the outputs'). Compiled ahead of time: the executable raises if a later call's
  # arguments (the state it returned) had other shardings or types, so running all steps
  # through it shows there is never a recompilation.
  step = jax.jit(_step_fn(tx)).lower(p, state, xs, ys).compile()
  history = _run(step, p, state, xs, ys)
  _check_stable(history, [replicated] * len(jax.tree.leaves(state)))
  for params_now, _ in history:
    for leaf in jax.tree.leaves(params_now):
      assert leaf.sharding.is_equivalent_to(replicated, leaf.ndim), leaf.sharding
  return _max_differences(history, _reference(params, x, y))


def _model_spec(leaf):
  """FSDP-style: shard the first dimension divisible by the model axis (size 2)."""
  for dim, size in enumerate(leaf.shape):
    if size % 2 == 0 and size >= 2:
      return P(*([None] * dim + ["model"]))
  return P()


def model_sharded():
  params, x, y = _problem()
  tx = _tx()
  mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
  state = tx.init(params)
  state_shardings = jax.tree.map(
      lambda leaf: NamedSharding(mesh, P()) if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)
      else NamedSharding(mesh, _model_spec(leaf)), state)
  sharded_leaves = [s for s, leaf in zip(jax.tree.leaves(state_shardings),
                                         jax.tree.leaves(state)) if s.spec != P()]
  factor_left = state_shardings.factors[0]["w1"]
  assert factor_left.spec == P("model"), factor_left.spec  # the (8, 8) Kronecker factor
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))
  step = jax.jit(_step_fn(tx),
                 in_shardings=(replicated, state_shardings, batch_sharding, batch_sharding),
                 out_shardings=(replicated, state_shardings))
  state = jax.device_put(state, state_shardings)
  xs, ys = jax.device_put((x, y), batch_sharding)
  p = jax.device_put(params, replicated)
  step = step.lower(p, state, xs, ys).compile()
  assert len(state.bases[0]["w1"].addressable_shards[0].data.shape) == 2
  assert state.bases[0]["w1"].addressable_shards[0].data.shape == (4, 8)
  history = _run(step, p, state, xs, ys)
  _check_stable(history, jax.tree.leaves(state_shardings))
  diffs = _max_differences(history, _reference(params, x, y))
  diffs["num_sharded_state_leaves"] = len(sharded_leaves)
  diffs["checkpoint"] = _checkpoint_round_trip(history[-1][1], state_shardings)
  return diffs


def _checkpoint_round_trip(state, shardings):
  """evon_jax.checkpoint restores a sharded state onto the template's shardings, bit for bit."""
  import tempfile
  from evon_jax import checkpoint
  try:
    import orbax.checkpoint  # noqa: F401
  except ImportError:
    return "skipped (no orbax)"
  template = jax.tree.map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      state, shardings)
  with tempfile.TemporaryDirectory() as directory:
    checkpoint.save(f"{directory}/state", state)
    restored = checkpoint.restore(f"{directory}/state", template)
  for got, want, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(state),
                                 jax.tree.leaves(shardings)):
    if got.size:  # zero-size placeholders are re-created, not restored
      assert got.sharding.is_equivalent_to(sharding, got.ndim), (got.sharding, sharding)
  for got, want in zip(_numpy_leaves(restored), _numpy_leaves(state)):
    np.testing.assert_array_equal(got, want)
  return "ok"


if __name__ == "__main__":
  assert jax.device_count() == 4, (
      f"needs XLA_FLAGS=--xla_force_host_platform_device_count=4, got {jax.devices()}")
  result = {"data_parallel": data_parallel, "model_sharded": model_sharded}[sys.argv[1]]()
  print(json.dumps(result))
