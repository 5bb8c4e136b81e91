"""optax composition beyond tests/test_optax_battery.py: EVON on the weight matrices and AdamW
on biases and embeddings (optax.partition, and chain of masked), MultiSteps over EVON
(equals EVON on the averaged gradient), clipping chained before EVON (bounds what the
Kronecker factors see), inject_hyperparams with a learning-rate schedule (the call-count
offset), and linen's TrainState driving a partitioned optimizer.

The battery already covers MultiSteps over IVON, clip_by_global_norm + EVON convergence,
inject_hyperparams with constant hyperparameters, a constant schedule, nnx.Optimizer and a
plain linen TrainState.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import evon_jax
from evon_jax import posterior

# Float32-exact hyperparameters with exact 1 - b (see test_optax_battery): the plain and the
# inject_hyperparams programs then do the same float32 arithmetic.
_B1, _B2 = 1 - 2.0**-4, 1 - 2.0**-13
_EVON = dict(ess=1e4, hess_init=1.0, b1=_B1, b2=_B2, weight_decay=2.0**-20,
             precondition_frequency=4, whiten=True, key=5)

# ----------------------------------------------------------------------------------------------
# A tiny token model: embedding (AdamW), two dense kernels (EVON), biases (AdamW)

_VOCAB, _DIM, _HIDDEN = 12, 4, 6


def _model_params():
  k = jax.random.split(jax.random.key(0), 3)
  return {"embed": 0.5 * jax.random.normal(k[0], (_VOCAB, _DIM)),
          "hidden": {"kernel": 0.5 * jax.random.normal(k[1], (_DIM, _HIDDEN)),
                     "bias": jnp.zeros(_HIDDEN)},
          "out": {"kernel": 0.5 * jax.random.normal(k[2], (_HIDDEN, _VOCAB)),
                  "bias": jnp.zeros(_VOCAB)}}


_TOKENS = jnp.arange(64) % _VOCAB
_TARGETS = (5 * _TOKENS + 1) % _VOCAB


def _model_loss(params):
  h = jnp.tanh(params["embed"][_TOKENS] @ params["hidden"]["kernel"]
               + params["hidden"]["bias"][None])
  logits = h @ params["out"]["kernel"] + params["out"]["bias"][None]
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, _TARGETS))


_LABELS = {"embed": "adamw", "hidden": {"kernel": "evon", "bias": "adamw"},
           "out": {"kernel": "evon", "bias": "adamw"}}
_EVON_MASK = jax.tree.map(lambda label: label == "evon", _LABELS)
_ADAMW_MASK = jax.tree.map(lambda label: label == "adamw", _LABELS)


def _evon():
  return evon_jax.evon(0.05, **_EVON)


def _adamw():
  return optax.adamw(0.05, weight_decay=1e-4)


_SPLITS = {
    "partition": lambda: optax.partition({"evon": _evon(), "adamw": _adamw()}, _LABELS),
    "masked_chain": lambda: optax.chain(optax.masked(_evon(), _EVON_MASK),
                                        optax.masked(_adamw(), _ADAMW_MASK)),
}


def _estimate(params, opt_state):
  """The posterior mean on EVON's leaves, the params elsewhere."""
  mean = posterior.mean(opt_state)
  return jax.tree.map(lambda p, m, on: m if on else p, params, mean, _EVON_MASK,
                      is_leaf=lambda x: isinstance(x, optax.MaskedNode))


@functools.lru_cache(maxsize=None)
def _split_run(name, num_calls=60):
  tx = _SPLITS[name]()

  @jax.jit
  def run(params):
    def body(carry, _):
      params, state = carry
      updates, state = tx.update(jax.grad(_model_loss)(params), state, params)
      return (optax.apply_updates(params, updates), state), None
    return jax.lax.scan(body, (params, tx.init(params)), None, length=num_calls)[0]

  return run(_model_params())


# `masked_chain` is the same split written with optax.masked (slow: 20 s).
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow)
                                  if n == "masked_chain" else n for n in _SPLITS])
def test_evon_on_matrices_adamw_on_vectors_and_embeddings(name):
  params, state = _split_run(name)
  evon_state = posterior.find_evon_state(state)
  evon_leaves = [x.shape for x in jax.tree.leaves(evon_state.mean)]
  assert evon_leaves == [(_DIM, _HIDDEN), (_HIDDEN, _VOCAB)]  # the two kernels, nothing else
  assert int(evon_state.count) == 60 and int(evon_state.skipped) == 0
  initial = _model_params()
  before = float(_model_loss(initial))
  after = float(jax.jit(lambda p, s: _model_loss(_estimate(p, s)))(params, state))
  assert after < 0.25 * before, (before, after)
  # The embedding and the biases moved (AdamW), and the EVON kernels hold posterior samples:
  # within 6 marginal standard deviations of the mean (drop-in semantics through the wrapper).
  assert not np.allclose(params["embed"], initial["embed"])
  assert not np.allclose(params["out"]["bias"], initial["out"]["bias"])
  # Jitted: posterior functions run eagerly compile every primitive on first use (seconds).
  mean, stddev, samples, kl = jax.jit(lambda s: (
      posterior.mean(s), posterior.marginal_stddev(s),
      posterior.sample(jax.random.key(1), s, num_samples=3), posterior.kl_to_prior(s)))(state)
  for layer in ("hidden", "out"):
    deviation = np.abs(np.asarray(params[layer]["kernel"]) - np.asarray(mean[layer]["kernel"]))
    assert np.all(deviation <= 6 * np.asarray(stddev[layer]["kernel"])), layer
    assert np.any(deviation > 0), layer
  assert isinstance(samples["embed"], optax.MaskedNode)
  assert samples["out"]["kernel"].shape == (3, _HIDDEN, _VOCAB)
  assert np.isfinite(float(kl))


def test_partition_and_masked_chain_are_the_same_optimizer():
  """The two spellings hand EVON the same masked tree (same leaf order, so the same noise per
  leaf) and AdamW the same leaves: bit-identical runs."""
  (p1, s1), (p2, s2) = _split_run("partition"), _split_run("masked_chain")
  mean_fn = jax.jit(posterior.mean)
  for a, b in zip(jax.tree.leaves((p1, mean_fn(s1))), jax.tree.leaves((p2, mean_fn(s2)))):
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------------
# MultiSteps over EVON


def _regression():
  """Linear regression with a square (5, 5) weight: full-rank gradients, so the Kronecker
  factors have no degenerate eigenspace whose eigh basis (and so the direction of the noise)
  would depend on the last bit of the gradient."""
  k = jax.random.split(jax.random.key(2), 3)
  x = jax.random.normal(k[0], (32, 5))
  y = x @ jax.random.normal(k[1], (5, 5)) + 0.1 * jax.random.normal(k[2], (32, 5))
  return {"w": jnp.zeros((5, 5)), "b": jnp.zeros(5)}, x, y


def _regression_loss(params, x, y):
  return jnp.mean((x @ params["w"] + params["b"][None] - y) ** 2)


def test_multi_steps_over_evon_equals_evon_on_the_averaged_gradient():
  """MultiSteps(evon, k=2) fed the two halves of a batch in turn equals evon fed the whole
  batch: in drop-in mode the params do not move while MultiSteps accumulates, so both
  gradients are taken at the same posterior sample. Tolerance: the average (g1 + g2) / 2
  (MultiSteps' running mean) and the gradient of the whole-batch mean loss differ by rounding
  (~1e-7 relative), carried through 12 steps incl. refreshes: bound 1e-5 (measured 3e-7)."""
  params, x, y = _regression()
  halves = ((x[:16], y[:16]), (x[16:], y[16:]))
  plain, multi = _evon(), optax.MultiSteps(_evon(), every_k_schedule=2)

  @jax.jit
  def run(params):
    def plain_body(carry, _):
      p, s = carry
      u, s = plain.update(jax.grad(_regression_loss)(p, x, y), s, p)
      return (optax.apply_updates(p, u), s), None

    def multi_body(carry, _):
      p, s = carry
      for hx, hy in halves:
        u, s = multi.update(jax.grad(_regression_loss)(p, hx, hy), s, p)
        p = optax.apply_updates(p, u)
      return (p, s), None

    a = jax.lax.scan(plain_body, (params, plain.init(params)), None, length=13)[0]
    b = jax.lax.scan(multi_body, (params, multi.init(params)), None, length=13)[0]
    return a, b

  (p_plain, s_plain), (p_multi, s_multi) = run(params)
  assert int(posterior.find_evon_state(s_multi).count) == 13
  for a, b in zip(jax.tree.leaves((p_plain, posterior.mean(s_plain))),
                  jax.tree.leaves((p_multi, posterior.mean(s_multi)))):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Clipping chained before EVON


def test_clipping_before_evon_bounds_the_kronecker_factors():
  """The factors are EMAs of g gᵀ and gᵀ g with weights summing to at most 1, so after
  clip_by_global_norm(c) the traces summed over leaves are <= c²; without the clip (gradients
  x1000 here) they are far above. An inactive clip (huge max_norm) changes nothing, bit for bit."""
  params, x, y = _regression()
  c = 1.0

  def big_loss(p):
    return 1000.0 * _regression_loss(p, x, y)

  def run(tx, num_calls=9):
    step = jax.jit(lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(
        *tx.update(jax.grad(big_loss)(p), s, p)))
    p, s = params, tx.init(params)
    for _ in range(num_calls):
      p, s = step(p, s)
    return p, s

  def factor_trace(state):
    evon_state = posterior.find_evon_state(state)
    return sum(float(jnp.trace(f)) for f in jax.tree.leaves(evon_state.factors[0])
               if f.ndim == 2)  # 1-D entries mark identity axes

  _, clipped = run(optax.chain(optax.clip_by_global_norm(c), _evon()))
  p_plain, unclipped = run(_evon())
  p_inactive, inactive = run(optax.chain(optax.clip_by_global_norm(1e30), _evon()))
  assert factor_trace(clipped) <= c**2 * (1 + 1e-5), factor_trace(clipped)
  assert factor_trace(unclipped) > 100 * c**2, factor_trace(unclipped)
  for a, b in zip(jax.tree.leaves((p_plain, posterior.mean(unclipped))),
                  jax.tree.leaves((p_inactive, posterior.mean(inactive)))):
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------------
# inject_hyperparams with a learning-rate schedule


def test_inject_hyperparams_schedule_is_evaluated_at_the_call_count():
  """evon(lr=s) evaluates s at the real step t - 1 (t = 1, 2, ...; call 0 makes no step),
  inject_hyperparams evaluates s at optax's call count c = t. So the injected optimizer with
  the shifted schedule c -> s(c - 1) reproduces the plain one; with s itself it does not.
  Tolerance as in the battery's inject_hyperparams test: float32-exact hyperparameters, so the
  programs differ by XLA's fusion choices at most (in practice bit for bit)."""
  params, x, y = _regression()
  schedule = optax.cosine_decay_schedule(0.1, decay_steps=12, alpha=0.1)
  shifted = lambda count: schedule(count - 1)
  injected = optax.inject_hyperparams(evon_jax.evon, static_args=evon_jax.STATIC_ARGS)

  def trajectory(tx, num_calls=12):
    @jax.jit
    def run(params):
      def body(carry, _):
        p, s = carry
        u, s = tx.update(jax.grad(_regression_loss)(p, x, y), s, p)
        p = optax.apply_updates(p, u)
        return (p, s), (p, posterior.mean(s))
      return jax.lax.scan(body, (params, tx.init(params)), None, length=num_calls)
    return run(params)

  (_, plain_state), plain = trajectory(evon_jax.evon(schedule, **_EVON))
  (_, shifted_state), with_shift = trajectory(injected(shifted, **_EVON))
  _, without_shift = trajectory(injected(schedule, **_EVON))
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(with_shift)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  gap = max(float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(without_shift)))
  assert gap > 1e-3, gap  # the unshifted schedule takes visibly different steps
  # The injected state records the rate used by the last call (count 11): s(10).
  np.testing.assert_allclose(shifted_state.hyperparams["learning_rate"], schedule(10),
                             rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# linen TrainState with a partitioned optimizer


def test_linen_train_state_with_partitioned_evon():
  from flax import linen as nn
  from flax.training import train_state

  class Model(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      h = nn.Embed(_VOCAB, _DIM, name="embed")(tokens)
      h = jnp.tanh(nn.Dense(_HIDDEN, name="hidden")(h))
      return nn.Dense(_VOCAB, name="out")(h)

  model = Model()
  params = model.init(jax.random.key(0), _TOKENS)["params"]
  labels = {"embed": {"embedding": "adamw"},
            "hidden": {"kernel": "evon", "bias": "adamw"},
            "out": {"kernel": "evon", "bias": "adamw"}}
  tx = optax.partition({"evon": _evon(), "adamw": _adamw()}, labels)
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  def loss_fn(params):
    logits = state.apply_fn({"params": params}, _TOKENS)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, _TARGETS))

  @jax.jit
  def step(state):
    return state.apply_gradients(grads=jax.grad(loss_fn)(state.params))

  @jax.jit
  def loss_at_mean(state):
    mean = posterior.mean(state.opt_state)
    merged = jax.tree.map(lambda p, m: p if isinstance(m, optax.MaskedNode) else m,
                          state.params, mean,
                          is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    return loss_fn(merged)

  before = float(loss_at_mean(state))
  for _ in range(40):
    state = step(state)
  after = float(loss_at_mean(state))
  assert int(state.step) == 40
  assert int(posterior.find_evon_state(state.opt_state).count) == 40
  assert after < 0.5 * before, (before, after)


def test_posterior_fills_leaves_of_other_optimizers_from_params():
  """Under optax.partition the posterior read-outs return MaskedNode for the AdamW leaves;
  with `params=` they come back filled: the mean and samples take the loop's values there
  (no uncertainty), stddev and deviations are zero; the EVON leaves are unchanged."""
  params = {"kernel": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "bias": jnp.ones(4)}
  tx = optax.partition({"evon": evon_jax.evon(0.1, ess=10.0, hess_init=1.0, whiten=True),
                        "adam": optax.adam(1e-2)},
                       {"kernel": "evon", "bias": "adam"})
  state = tx.init(params)
  for _ in range(3):
    updates, state = tx.update(jax.tree.map(lambda p: 2 * p, params), state, params)
    params = optax.apply_updates(params, updates)
  assert isinstance(evon_jax.posterior.mean(state)["bias"], optax.MaskedNode)
  mean = evon_jax.posterior.mean(state, params=params)
  np.testing.assert_array_equal(mean["bias"], params["bias"])
  np.testing.assert_array_equal(mean["kernel"], evon_jax.posterior.mean(state)["kernel"])
  key = jax.random.key(0)
  samples = evon_jax.posterior.sample(key, state, 5, params=params)
  assert samples["bias"].shape == (5, 4)
  np.testing.assert_array_equal(samples["bias"], jnp.broadcast_to(params["bias"], (5, 4)))
  np.testing.assert_array_equal(samples["kernel"],
                                evon_jax.posterior.sample(key, state, 5)["kernel"])
  deviation = evon_jax.posterior.sample_deviation(key, state, 5, params=params)
  np.testing.assert_array_equal(deviation["bias"], 0.0)
  stddev = evon_jax.posterior.marginal_stddev(state, params=params)
  np.testing.assert_array_equal(stddev["bias"], 0.0)
  assert float(jnp.min(stddev["kernel"])) > 0
  with pytest.raises(ValueError, match="structure"):
    evon_jax.posterior.mean(state, params={"kernel": params["kernel"]})
