"""Checkpointing with orbax-checkpoint: save/restore params + optimizer state bit for bit, and a
run resumed from a checkpoint at call k continues exactly as the uninterrupted run.

Plain `orbax.checkpoint.StandardCheckpointer` / `CheckpointManager` save the states as they
are (typed PRNG keys included; no state holds a zero-size array). `evon_jax.checkpoint` is a
convenience on top (waits for the save, restores into a template's shardings, and handles
zero-size *parameters*, which orbax refuses for any optimizer). All comparisons are exact: a
checkpoint stores the bits, and the resumed run executes the same compiled step on the same
inputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

ocp = pytest.importorskip("orbax.checkpoint")

import evon_jax  # noqa: E402
from evon_jax import checkpoint, posterior  # noqa: E402


def _params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"w": jax.random.normal(k1, (4, 3)), "b": jnp.zeros(3),
          "v": jax.random.normal(k2, (2, 2, 3)), "steps": jnp.arange(3, dtype=jnp.int32)}


def _loss(params):
  w_target = jnp.arange(12.0).reshape(4, 3) / 10
  return (jnp.sum((params["w"] - w_target) ** 2) + jnp.sum((params["b"] - 1.0) ** 2)
          + jnp.sum(jnp.sin(params["v"]) ** 2))


def _grads(params):
  floats = {k: v for k, v in params.items() if k != "steps"}
  grads = jax.grad(lambda f: _loss({**params, **f}))(floats)
  return {**grads, "steps": jnp.zeros_like(params["steps"])}


def _bits(tree):
  """Leaves as NumPy arrays, typed keys as their key data, for exact comparison."""
  out = []
  for leaf in jax.tree.leaves(tree):
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    out.append(np.asarray(leaf))
  return out


def _assert_bit_identical(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
  assert [x.dtype for x in got_leaves] == [x.dtype for x in want_leaves]
  for g, w in zip(_bits(got), _bits(want)):
    assert g.shape == w.shape
    np.testing.assert_array_equal(g, w)


_CONFIGS = {
    "evon": dict(precondition_frequency=3),
    # Resumed mid-step: the accumulator holds one of the two samples' statistics.
    "evon_mc2": dict(precondition_frequency=3, mc_samples=2, factor_statistic="per_sample"),
}


@functools.lru_cache(maxsize=None)
def _tx(name):
  return evon_jax.evon(0.05, ess=1e3, hess_init=0.5, key=3, **_CONFIGS[name])


@functools.lru_cache(maxsize=None)  # one compilation per config, shared by the tests
def _step_fn(tx):
  @jax.jit
  def step(params, state):
    updates, state = tx.update(_grads(params), state, params)
    return optax.apply_updates(params, updates), state
  return step


def test_round_trip_is_bit_identical_and_keeps_typed_key(tmp_path):
  tx = _tx("evon")
  params = _params()
  step = _step_fn(tx)
  p, s = params, tx.init(params)
  for _ in range(4):
    p, s = step(p, s)
  tree = {"params": p, "opt_state": s}
  checkpoint.save(tmp_path / "ckpt", tree)
  restored = checkpoint.restore(tmp_path / "ckpt", {"params": params, "opt_state": tx.init(params)})
  _assert_bit_identical(restored, tree)
  key = restored["opt_state"].key
  assert jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  assert jax.random.key_impl(key) == jax.random.key_impl(s.key)
  # An abstract template (no arrays allocated) restores the same.
  abstract = jax.eval_shape(lambda: {"params": params, "opt_state": tx.init(params)})
  _assert_bit_identical(checkpoint.restore(tmp_path / "ckpt", abstract), tree)


def _plain_tx(kind):
  if kind == "evon":
    return _tx("evon")
  if kind == "evon_mc2":
    return _tx("evon_mc2")
  if kind == "ivon":
    return evon_jax.ivon(0.05, ess=1e3, key=3)
  if kind == "composed_evon_mc2":  # the pieces: nested states, typed keys of the pending step
    return evon_jax.inject_noise(
        evon_jax.eigenbasis_refresh(
            evon_jax.eigenspace_ivon(0.05, ess=1e3, hess_init=1.0),
            factors=evon_jax.kronecker_factor_ema(0.99), precondition_frequency=3),
        key=5, mc_samples=2)
  if kind == "evon_parameter_noise":  # the state's marker (a bool scalar) round trips
    return evon_jax.evon(0.05, ess=1e3, hess_init=0.5, key=3, precondition_frequency=3,
                         noise_basis="parameter")
  if kind == "evon_prior":  # a structured prior in the state (continual learning)
    return evon_jax.evon(0.05, ess=1e3, hess_init=0.5, key=3, precondition_frequency=3,
                         prior=_run(_tx("evon"), 4)[1])
  return evon_jax.soap(0.05, precondition_frequency=3)


def _run(tx, calls):
  step = _step_fn(tx)
  p, s = _params(), tx.init(_params())
  for _ in range(calls):
    p, s = step(p, s)
  return p, s


# The two-sample states have the same leaves as `evon`'s with a sample axis (their
# round trips are marked slow, 35 s each: compiling two-sample optimizers).
@pytest.mark.parametrize("kind", ["evon", pytest.param("evon_mc2", marks=pytest.mark.slow),
                                  "ivon", "soap", "evon_prior", "evon_parameter_noise",
                                  pytest.param("composed_evon_mc2", marks=pytest.mark.slow)])
def test_plain_orbax_round_trips_every_state(tmp_path, kind):
  """No zero-size arrays anywhere in a state (so no wrapper is needed): orbax's own
  StandardCheckpointer and CheckpointManager save and restore EVON, IVON and SOAP states
  (an integer leaf and a 3-D leaf included), bit for bit, typed key included, and the
  restored run continues exactly as the uninterrupted one."""
  tx = _plain_tx(kind)
  params = _params()
  assert all(x.size > 0 for x in jax.tree.leaves(tx.init(params)))
  p, s = _run(tx, 4)
  tree = {"params": p, "opt_state": s}
  abstract = jax.eval_shape(lambda: {"params": params, "opt_state": tx.init(params)})

  ckptr = ocp.StandardCheckpointer()
  ckptr.save(tmp_path / "plain", tree)
  ckptr.wait_until_finished()
  _assert_bit_identical(ckptr.restore(tmp_path / "plain", abstract), tree)

  manager = ocp.CheckpointManager(tmp_path / "managed")
  manager.save(4, args=ocp.args.StandardSave(tree))
  manager.wait_until_finished()
  restored = manager.restore(4, args=ocp.args.StandardRestore(abstract))
  _assert_bit_identical(restored, tree)
  manager.close()

  step = _step_fn(tx)
  resumed = (restored["params"], restored["opt_state"])
  for _ in range(3):
    resumed = step(*resumed)
  _assert_bit_identical(resumed, _run(tx, 7))


def test_plain_orbax_saves_an_nnx_optimizer(tmp_path):
  """`nnx.state(optimizer)` of an EVON nnx.Optimizer goes through plain orbax as well."""
  from flax import nnx

  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  tx = evon_jax.evon(0.05, ess=1e3, hess_init=0.5, precondition_frequency=3, key=3)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (8, 3))

  @nnx.jit
  def step(model, optimizer):
    optimizer.update(model, nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model))

  for _ in range(4):
    step(model, optimizer)
  state = nnx.state(optimizer)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(tmp_path / "nnx", state)
  ckptr.wait_until_finished()
  restored = ckptr.restore(tmp_path / "nnx", jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                                          state))
  _assert_bit_identical(restored, state)


@pytest.mark.parametrize("name", list(_CONFIGS))
def test_resume_is_bit_identical_to_uninterrupted_run(tmp_path, name):
  total, resume_at = 11, 5  # refreshes at real steps 3, 6, 9 on both sides of the break
  tx = _tx(name)
  step = _step_fn(tx)
  params = _params()

  p, s = params, tx.init(params)
  for _ in range(total):
    p, s = step(p, s)
  uninterrupted = (p, s)

  p, s = params, tx.init(params)
  for _ in range(resume_at):
    p, s = step(p, s)
  checkpoint.save(tmp_path / "step5", {"params": p, "opt_state": s})
  del p, s
  # A fresh process would rebuild the template from the config: init on other params.
  template_params = jax.tree.map(jnp.zeros_like, params)
  restored = checkpoint.restore(
      tmp_path / "step5",
      {"params": template_params, "opt_state": tx.init(template_params)})
  p, s = restored["params"], restored["opt_state"]
  for _ in range(total - resume_at):
    p, s = step(p, s)
  _assert_bit_identical((p, s), uninterrupted)
  assert int(s.count) > resume_at


def test_resume_through_flax_nnx_optimizer(tmp_path):
  from flax import nnx

  x = jax.random.normal(jax.random.key(1), (16, 3))
  y = jnp.sin(x @ jnp.array([[1.0, -1.0], [0.5, 2.0], [-1.0, 0.0]]))

  def make(seed):
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(seed))
    tx = evon_jax.evon(0.05, ess=1e3, hess_init=0.5, precondition_frequency=3, key=3)
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  def loss_fn(model):
    return jnp.mean((model(x) - y) ** 2)

  @nnx.jit
  def step(model, optimizer):
    optimizer.update(model, nnx.grad(loss_fn)(model))

  def snapshot(model, optimizer):
    return nnx.state(model), nnx.state(optimizer)

  model, optimizer = make(0)
  for _ in range(9):
    step(model, optimizer)
  uninterrupted = snapshot(model, optimizer)

  model, optimizer = make(0)
  for _ in range(4):
    step(model, optimizer)
  checkpoint.save(tmp_path / "nnx", {"model": nnx.state(model),
                                      "optimizer": nnx.state(optimizer)})
  model, optimizer = make(1)  # other initial weights: the restore must overwrite them
  restored = checkpoint.restore(tmp_path / "nnx", {"model": nnx.state(model),
                                                   "optimizer": nnx.state(optimizer)})
  nnx.update(model, restored["model"])
  nnx.update(optimizer, restored["optimizer"])
  for _ in range(5):
    step(model, optimizer)
  got = snapshot(model, optimizer)
  _assert_bit_identical(got, uninterrupted)
  evon_state = posterior.find_evon_state(nnx.as_pure(optimizer.opt_state))
  assert int(evon_state.count) == 9
  assert jnp.issubdtype(evon_state.key.dtype, jax.dtypes.prng_key)
