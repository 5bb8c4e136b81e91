"""Data-parallel EVON under `shard_map` on 4 (forced host) devices, against one device.

Run as a script with XLA_FLAGS=--xla_force_host_platform_device_count=4 (`test_replicas.py`
does); prints one JSON object of maximum differences.
  shared:      replicas evaluate one shared sample on their shard of the batch; the run must
               equal the single-device run on the whole batch.
  independent: replica r evaluates its own sample; the run must equal a single-device
               explicit-mode run with mc_samples = 4 whose sample r sees shard r.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

import evon_jax

REPLICAS, STEPS = 4, 12
SETTINGS = dict(ess=64.0, hess_init=0.5, weight_decay=1e-2, precondition_frequency=5,
                whiten=False, b2=0.99)


def problem(seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(REPLICAS * 16, 4)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 4, size=REPLICAS * 16))
  # Square weights: the first call's factors (1-b) g gᵀ are then full rank on both sides.
  # A rank-deficient factor has a degenerate null space whose eigenvectors are arbitrary,
  # so runs whose gradients differ by rounding would draw different (equally valid) samples.
  params = {"w": jnp.asarray(0.3 * rng.normal(size=(4, 4)), jnp.float32),
            "b": jnp.zeros(4, jnp.float32)}
  return params, x, y


def loss(params, x, y):
  logits = x @ params["w"] + params["b"]
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def max_diff(a, b):
  return max(float(jnp.max(jnp.abs(u - v), initial=0.0))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def shared_run(mesh, params, x, y, check_vma, **extra):
  """With check_vma (shard_map's default) the loss is the global mean (a pmean of the
  local ones) and autodiff reduces the gradient; without it, each replica passes the
  gradient of its own shard's loss and the optimizer averages the statistics."""
  tx = evon_jax.evon(0.05, axis_name="data", **SETTINGS, **extra)

  def global_loss(params, x, y):
    local = loss(params, x, y)
    return jax.lax.pmean(local, "data") if check_vma else local

  def step(params, state, x, y):
    updates, state = tx.update(jax.grad(global_loss)(params, x, y), state, params)
    return jax.tree.map(jnp.add, params, updates), state

  mapped = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
                                 out_specs=(P(), P()), check_vma=check_vma))
  state = tx.init(params)
  for _ in range(STEPS):
    params, state = mapped(params, state, x, y)
  return params, state


def single_run(params, x, y, **extra):
  tx = evon_jax.evon(0.05, **SETTINGS, **extra)
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p, x, y), s, p))
  for _ in range(STEPS):
    updates, state = step(params, state)
    params = jax.tree.map(jnp.add, params, updates)
  return params, state


def independent_run(mesh, params, x, y):
  tx = evon_jax.evon(0.05, axis_name="data", replica_noise="independent", **SETTINGS)

  def step(params, state, x, y):
    params = jax.tree.map(lambda p: p[0], params)  # this replica's own sample
    updates, state = tx.update(jax.grad(loss)(params, x, y), state, params)
    return jax.tree.map(lambda p, u: (p + u)[None], params, updates), state

  mapped = jax.jit(jax.shard_map(
      step, mesh=mesh, in_specs=(P("data"), P(), P("data"), P("data")),
      out_specs=(P("data"), P())))
  state = tx.init(params)
  stacked = jax.tree.map(lambda p: jnp.broadcast_to(p, (REPLICAS,) + p.shape), params)
  for _ in range(STEPS):
    stacked, state = mapped(stacked, state, x, y)
  return stacked, state


def explicit_run(params, x, y):
  tx = evon_jax.evon(0.05, drop_in=False, mc_samples=REPLICAS, **SETTINGS)
  shards_x, shards_y = x.reshape(REPLICAS, -1, x.shape[1]), y.reshape(REPLICAS, -1)
  per_sample_grads = jax.vmap(jax.grad(loss))

  @jax.jit
  def step(params, state):
    samples = evon_jax.training_samples(state, REPLICAS)
    updates, state = tx.update(per_sample_grads(samples, shards_x, shards_y), state, params)
    return jax.tree.map(jnp.add, params, updates), state

  state = tx.init(params)
  for _ in range(STEPS):
    params, state = step(params, state)
  return state, evon_jax.training_samples(state, REPLICAS)


def one_replica_nan(mesh, params, x, y):
  """A non-finite gradient on replica 0 alone must skip the call on every replica."""
  tx = evon_jax.evon(0.05, axis_name="data", **SETTINGS)

  def step(params, state, x, y, bad):
    grads = jax.grad(loss)(params, x, y)
    poison = jnp.where(bad & (jax.lax.axis_index("data") == 0), jnp.nan, 0.0)
    updates, state = tx.update(jax.tree.map(lambda g: g + poison, grads), state, params)
    return updates, jax.tree.map(lambda v: v[None], state)  # per-replica copies, to compare

  mapped = jax.jit(jax.shard_map(
      step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data"), P()),
      out_specs=(P("data"), P("data")), check_vma=False))
  first = lambda tree: jax.tree.map(lambda v: v[0], tree)
  state = first(mapped(params, tx.init(params), x, y, jnp.asarray(False))[1])  # clean call
  updates, states = mapped(params, state, x, y, jnp.asarray(True))
  unchanged = all(
      bool(jnp.all(after == before[None]))
      for after, before in zip(jax.tree.leaves(states.mean), jax.tree.leaves(state.mean)))
  return {"nan_skipped": [int(c) for c in states.skipped],
          "nan_counts": [int(c) for c in states.count],
          "nan_mean_unchanged": unchanged,
          "nan_updates_zero": all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))}


def main():
  assert jax.device_count() == REPLICAS, jax.devices()
  mesh = Mesh(np.array(jax.devices()), ("data",))
  params, x, y = problem()
  shared_params, shared_state = shared_run(mesh, params, x, y, check_vma=True)
  unchecked_params, unchecked_state = shared_run(mesh, params, x, y, check_vma=False)
  single_params, single_state = single_run(params, x, y)
  ind_params, ind_state = independent_run(mesh, params, x, y)
  explicit_state, explicit_samples = explicit_run(params, x, y)
  mean = evon_jax.posterior.mean
  out = {
      "shared_vs_single_params": max_diff(shared_params, single_params),
      "shared_vs_single_mean": max_diff(mean(shared_state), mean(single_state)),
      "unchecked_vs_single_params": max_diff(unchecked_params, single_params),
      "unchecked_vs_single_mean": max_diff(mean(unchecked_state), mean(single_state)),
      "shared_count": int(shared_state.count),
      "independent_vs_explicit_mean": max_diff(mean(ind_state), mean(explicit_state)),
      "independent_vs_explicit_samples": max_diff(ind_params, explicit_samples),
      "independent_spread": float(jnp.max(jnp.std(ind_params["w"], axis=0))),
      "mean_moved": max_diff(mean(ind_state), params),
  }
  # Per-sample factor statistics of the one shared sample are those of the global gradient.
  per_sample = dict(factor_statistic="per_sample", factor_gradient="regularized")
  out["per_sample_shared_vs_single_mean"] = max_diff(
      mean(shared_run(mesh, params, x, y, check_vma=False, **per_sample)[1]),
      mean(single_run(params, x, y, **per_sample)[1]))
  out.update(one_replica_nan(mesh, params, x, y))
  json.dump(out, sys.stdout)


if __name__ == "__main__":
  main()
