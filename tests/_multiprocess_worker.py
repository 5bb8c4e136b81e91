"""Two `jax.distributed` processes against one (see test_multiprocess.py).

    python tests/_multiprocess_worker.py CASES single OUT             # one process, 4 devices
    python tests/_multiprocess_worker.py CASES multi OUT RANK PORT    # rank 0 or 1 of two
                                                                      # processes, 2 devices each

CASES is a comma-separated list of `way/optimizer` (e.g. `jit/EVON,shard_map/SOAP`) or `all`.

XLA_FLAGS must force the host device count before JAX starts (the test sets it). Either
way the global mesh has 4 CPU devices on one 'data' axis. Each optimizer trains the
sensitivity benchmark's tanh MLP (batch 24, rank-deficient first Kronecker factors) for 12
steps in two ways: under `jit` with the batch sharded over the mesh, and under `shard_map`
(the loss a `pmean` of the shards' losses; EVON also names `axis_name='data'`).
Rank 0 (or the single process) writes {way: {optimizer: [leaf values]}} to OUT as JSON:
the posterior mean for EVON, the params for SOAP.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_numpy_rank_promotion", "raise")

import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import evon_jax  # noqa: E402
from benchmarks.sensitivity import STEPS, mlp_problem  # noqa: E402

AXIS = "data"


def optimizers(axis_name=None):
  """The sensitivity benchmark's settings (SOAP with its reproducible `relative_eps`)."""
  evon = lambda **kw: evon_jax.evon(1e-2, ess=24.0, hess_init=1.0, precondition_frequency=3,
                                    key=0, axis_name=axis_name, **kw)
  return {
      "EVON": lambda: evon(),
      "EVON (whitening)": lambda: evon(whiten=True),
      "SOAP": lambda: evon_jax.soap(1e-2, precondition_frequency=3, relative_eps=3e-2),
      # Whitening's default hess_init 0.1, where eigen-coordinate noise amplifies (issue 16):
      # the noise drawn in parameter coordinates.
      "EVON (whitening, hess_init 0.1, noise_basis='parameter')": lambda: evon_jax.evon(
          1e-2, ess=24.0, precondition_frequency=3, key=0, axis_name=axis_name, whiten=True,
          noise_basis="parameter"),
  }


def _global(tree, sharding):
  """Host values (the same in every process) as global arrays with `sharding`."""
  return jax.tree.map(
      lambda v: jax.make_array_from_callback(np.shape(v), sharding,
                                             lambda index: np.asarray(v)[index]), tree)


def _host(tree):
  """A replicated global array's value, read from this process's first shard."""
  return [np.asarray(leaf.addressable_data(0)).ravel().tolist()
          for leaf in jax.tree.leaves(tree)]


def _weights(name, params, state):
  if name.startswith("EVON"):
    return jax.jit(evon_jax.posterior.mean)(state)
  return params


def train_jit(name, params, x, y, loss, mesh):
  tx = optimizers()[name]()
  replicated = NamedSharding(mesh, P())
  params = _global(params, replicated)
  x, y = _global((x, y), NamedSharding(mesh, P(AXIS)))
  state = jax.jit(tx.init, out_shardings=replicated)(params)

  @jax.jit
  def step(params, state, x, y):
    updates, state = tx.update(jax.grad(loss)(params, x, y), state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(STEPS):
    params, state = step(params, state, x, y)
  return _weights(name, params, state)


def train_shard_map(name, params, x, y, loss, mesh):
  tx = optimizers(AXIS if name.startswith("EVON") else None)[name]()
  replicated = NamedSharding(mesh, P())
  params = _global(params, replicated)
  x, y = _global((x, y), NamedSharding(mesh, P(AXIS)))
  state = jax.jit(tx.init, out_shardings=replicated)(params)

  def global_loss(params, x, y):
    # The mean of the shards' means: under shard_map's replication checks the gradient of
    # the local loss with respect to replicated params would be summed over the axis.
    return jax.lax.pmean(loss(params, x, y), AXIS)

  def local_step(params, state, x, y):
    updates, state = tx.update(jax.grad(global_loss)(params, x, y), state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(jax.shard_map(local_step, mesh=mesh, in_specs=(P(), P(), P(AXIS), P(AXIS)),
                               out_specs=(P(), P())))
  for _ in range(STEPS):
    params, state = step(params, state, x, y)
  return _weights(name, params, state)


WAYS = {"jit": train_jit, "shard_map": train_shard_map}


def _cases(spec: str):
  if spec == "all":
    return [(way, name) for way in WAYS for name in optimizers()]
  cases = [tuple(case.split("/", 1)) for case in spec.split(",")]
  unknown = [c for c in cases if len(c) != 2 or c[0] not in WAYS or c[1] not in optimizers()]
  assert not unknown, f"unknown cases {unknown}"
  return cases


def main():
  cases, mode, out = _cases(sys.argv[1]), sys.argv[2], sys.argv[3]
  if mode == "multi":
    rank, port = int(sys.argv[4]), int(sys.argv[5])
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=rank,
                               initialization_timeout=120)
    assert jax.process_count() == 2 and jax.local_device_count() == 2
  assert jax.device_count() == 4, jax.devices()
  mesh = Mesh(np.array(jax.devices()), (AXIS,))
  params, x, y, loss = mlp_problem(0)
  params, x, y = jax.tree.map(np.asarray, (params, x, y))
  results = {}
  for way, name in cases:
    results.setdefault(way, {})[name] = _host(WAYS[way](name, params, x, y, loss, mesh))
  if jax.process_index() == 0:
    pathlib.Path(out).write_text(json.dumps(results))
  if mode == "multi":
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
