"""A structured Gaussian prior (`evon(..., prior=bubble)`) against dense NumPy re-derivations.

The prior N(m₀, P₀⁻¹) is a random SOAP-Bubble: random orthogonal bases Q₀ per axis (the
vector leaf gets one too, while the run keeps it diagonal), random precisions and means. The
NumPy references (tests/numpy_reference.py, `DensePrior`) see only the dense P₀ (size x size
on the row-major vec of a leaf) and m₀ in parameter space, and apply the rule stated in
`eigenspace_ivon`'s docstring: the prior's gradient P₀ (M − m₀)/ess exactly, and
diag(Kᵀ P₀ K)/ess (K the dense basis of the run) where the isotropic prior has δ.
Tolerances are those of tests/test_equivalence.py (float32 against float64, the same
trajectories): rtol 1e-4 for EVON, 1e-5 for IVON.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import evon_jax
from evon_jax import posterior
from evon_jax.kronecker import per_leaf
import numpy_reference as ref
from test_equivalence import (
    EVON_HYPER, IVON_HYPER, IVON_LR, MATRIX_VIEW, _np, assert_tree_close, drop_in_trajectory,
    make_problem)


def _orthogonal(rng, n):
  q, r = np.linalg.qr(rng.standard_normal((n, n)))
  return q * np.sign(np.diag(r))


# Per leaf of make_problem(with_conv=True) the prior's Kronecker axes: 'w' (3, 4), 'k' in
# the matrix view (4, 3) and 'b' (4,), which the run (without precondition_1d) keeps diagonal.
PRIOR_AXES = {"w": (3, 4), "k": (4, 3), "b": (4,)}


def random_prior(seed, params, ess=30.0, weight_decay=0.05):
  """(SoapBubble, {leaf: DensePrior-ready (m₀, P₀)}) with random bases per axis."""
  rng = np.random.default_rng(seed)
  means, hessians, slots, dense = {}, {}, ([{}, {}]), {}
  for name, axes in PRIOR_AXES.items():
    shape = params[name].shape
    bases = [_orthogonal(rng, n) for n in axes]
    eigen_mean = 0.5 * rng.standard_normal(axes)
    hessian = rng.uniform(0.3, 3.0, axes)
    means[name] = jnp.asarray(eigen_mean.reshape(shape), jnp.float32)
    hessians[name] = jnp.asarray(hessian.reshape(shape), jnp.float32)
    for k in range(2):
      slots[k][name] = (jnp.asarray(bases[k], jnp.float32) if k < len(bases)
                        else jnp.ones((1,), jnp.float32))
    kron = np.ones((1, 1))  # the float32 bases, as the optimizer sees them
    for k in range(len(bases)):
      kron = np.kron(kron, np.asarray(slots[k][name], np.float64))
    precision = ess * (np.asarray(hessians[name], np.float64).reshape(-1) + weight_decay)
    dense[name] = (
        (kron @ np.asarray(means[name], np.float64).reshape(-1)).reshape(shape),
        kron @ np.diag(precision) @ kron.T)
  bubble = evon_jax.SoapBubble(means, hessians, (), tuple(slots), jnp.float32(ess),
                               jnp.float32(weight_decay))
  return bubble, dense


def _standardized_mean_square(values):
  values = np.concatenate([v.ravel() for v in values])
  return np.mean(values ** 2)


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_evon_with_structured_prior_matches_numpy_reference(weight_decay):
  loss, params = make_problem(seed=2, with_conv=True)
  bubble, dense = random_prior(0, params)
  lr = 0.02
  hyper = {**EVON_HYPER, "weight_decay": weight_decay}
  tx = evon_jax.evon(lr, key=11, prior=bubble, **hyper, **MATRIX_VIEW)
  calls = drop_in_trajectory(tx, params, loss, num_calls=26)  # refreshes at 10 and 20
  refs = {k: ref.EvonReference(v, learning_rate=lr, **hyper,
                               prior=ref.DensePrior(*dense[k], hyper["ess"]))
          for k, v in _np(params).items()}
  for name, r in refs.items():
    r.first_call(calls[0].grad[name])
  variance_fn = jax.jit(posterior.variance_eigen)
  standardized = []
  for i, call in enumerate(calls[1:], start=1):
    for name, r in refs.items():
      noise = call.sample[name] - call.mean_before[name]
      noise_eig = r.bases.rotate_in(r.bases.as_matrix(noise))
      standardized.append(noise_eig * np.sqrt(r.ess * (r.hess + r.delta())))
      r.step(call.grad[name], noise)
    assert_tree_close(call.mean_after, {k: r.mean for k, r in refs.items()}, 1e-4, 1e-5,
                      f"call {i}")
    assert_tree_close(
        _np(variance_fn(call.state)),
        {k: r.bases.from_matrix(1 / (r.ess * (r.hess + r.delta()))) for k, r in refs.items()},
        1e-4, 0, f"call {i} variance_eigen")
  # 25 x 28 = 700 standard normals drawn with the prior-aware variance: 1 +- ~0.16.
  assert abs(_standardized_mean_square(standardized) - 1) < 0.17


def test_ivon_with_structured_prior_matches_numpy_reference():
  loss, params = make_problem(seed=0, with_conv=True)
  bubble, dense = random_prior(1, params)
  tx = evon_jax.ivon(IVON_LR, key=3, prior=bubble, **IVON_HYPER)
  calls = drop_in_trajectory(tx, params, loss, num_calls=31)
  refs = {k: ref.IvonReference(v, learning_rate=IVON_LR, **IVON_HYPER,
                               prior=ref.DensePrior(*dense[k], IVON_HYPER["ess"]))
          for k, v in _np(params).items()}
  for i, call in enumerate(calls[1:], start=1):
    for name, r in refs.items():
      r.step(call.grad[name], call.sample[name] - call.mean_before[name])
    assert_tree_close(call.mean_after, {k: r.mean for k, r in refs.items()}, 1e-5, 1e-6,
                      f"call {i}")


def test_prior_moves_the_run():
  """The prior is not a no-op: the same run without it ends elsewhere (the parity tests
  would pass trivially if the prior's terms were zero)."""
  loss, params = make_problem(seed=2, with_conv=True)
  bubble, _ = random_prior(0, params)
  runs = [drop_in_trajectory(evon_jax.evon(0.02, key=11, prior=prior, **EVON_HYPER,
                                           **MATRIX_VIEW), params, loss, 12)[-1].mean_after
          for prior in (bubble, None)]
  assert max(np.max(np.abs(runs[0][k] - runs[1][k])) for k in runs[0]) > 1e-2


def test_isotropic_bubble_prior_equals_weight_decay():
  """A prior N(0, 1/(ess δ) I) given as a bubble without bases (mean 0, H 0) is the
  isotropic prior of weight_decay δ: the two runs agree to float rounding."""
  loss, params = make_problem(seed=2, with_conv=True)
  ess, delta = EVON_HYPER["ess"], 0.03
  bubble = evon_jax.SoapBubble(jax.tree.map(jnp.zeros_like, params),
                               jax.tree.map(jnp.zeros_like, params), (), (),
                               jnp.float32(ess), jnp.float32(delta))
  hyper = {k: v for k, v in EVON_HYPER.items() if k != "weight_decay"}
  with_prior = drop_in_trajectory(evon_jax.evon(0.02, key=4, prior=bubble, **hyper), params,
                                  loss, 14)
  isotropic = drop_in_trajectory(evon_jax.evon(0.02, key=4, weight_decay=delta, **hyper),
                                 params, loss, 14)
  for a, b in zip(with_prior, isotropic):
    assert_tree_close(a.mean_after, b.mean_after, 1e-5, 1e-6)


def _dense_covariances(state):
  return {k: np.asarray(v, np.float64) for k, v in posterior.covariance(state).items()}


def test_kl_and_prior_read_outs_match_dense_formulas():
  """kl_to_prior and posterior.kl against the dense Gaussian KL, with the run's own
  weight_decay multiplied into the structured prior (precision P₀ + ess δ I)."""
  loss, params = make_problem(seed=2, with_conv=True)
  bubble, dense = random_prior(0, params)
  ess, delta = EVON_HYPER["ess"], 1e-2
  tx = evon_jax.evon(0.02, key=11, prior=bubble, **EVON_HYPER, **MATRIX_VIEW)
  state = drop_in_trajectory(tx, params, loss, 12)[-1].state
  means = _np(posterior.mean(state))
  covariances = _dense_covariances(state)

  def dense_kl(m, S, m0, P0):
    n = len(m)
    d = m - m0
    return 0.5 * (np.trace(P0 @ S) + d @ P0 @ d - n - np.linalg.slogdet(P0)[1]
                  - np.linalg.slogdet(S)[1])

  expected = 0.0
  for name, (m0, P0) in dense.items():
    total = P0 + ess * delta * np.eye(len(P0))
    prior_mean = np.linalg.solve(total, P0 @ m0.reshape(-1))
    expected += dense_kl(means[name].reshape(-1), covariances[name], prior_mean, total)
  np.testing.assert_allclose(float(posterior.kl_to_prior(state)), expected, rtol=2e-4)

  # The prior read-out: its mean and covariance in parameter space.
  prior = posterior.prior(state)
  prior_covariances = _dense_covariances(prior)
  for name, (m0, P0) in dense.items():
    total = P0 + ess * delta * np.eye(len(P0))
    np.testing.assert_allclose(prior_covariances[name], np.linalg.inv(total), atol=1e-6)
    np.testing.assert_allclose(np.asarray(posterior.mean(prior)[name]).reshape(-1),
                               np.linalg.solve(total, P0 @ m0.reshape(-1)), atol=1e-5)

  # KL between two bubbles with different bases (the run's posterior and the raw prior).
  expected = sum(dense_kl(means[k].reshape(-1), covariances[k], m0.reshape(-1), P0)
                 for k, (m0, P0) in dense.items())
  np.testing.assert_allclose(float(posterior.kl(state, bubble)), expected, rtol=2e-4)
  assert abs(float(posterior.kl(bubble, bubble))) < 1e-3


def test_new_prior_of_the_same_shapes_compiles_nothing_new():
  """The prior's arrays live in the state, not in the compiled update's key: a second task
  with a new prior of the same shapes reuses the first task's program."""
  loss, params = make_problem(seed=2, with_conv=True)
  grads = jax.grad(loss)(params)
  update = evon_jax.transforms._protocol._compiled_apply
  update.clear_cache()
  for seed in (0, 1):
    bubble, _ = random_prior(seed, params)
    tx = evon_jax.evon(0.02, key=11, prior=bubble, **EVON_HYPER, **MATRIX_VIEW)
    tx.update(grads, tx.init(params), params)
  assert update._cache_size() == 1


def test_prior_errors_are_clear():
  loss, params = make_problem(seed=2, with_conv=True)
  bubble, _ = random_prior(0, params)
  with pytest.raises(TypeError, match="SoapBubble"):
    evon_jax.evon(0.02, ess=10.0, prior={"w": 1.0})
  with pytest.raises(ValueError, match="tree does not match"):
    evon_jax.evon(0.02, ess=10.0, prior=bubble).init({"w": params["w"]})
  # The prior rotates 'k' as a (4, 3) matrix; the run's default layout has axes (2, 2, 3).
  with pytest.raises(ValueError, match="Kronecker axes"):
    evon_jax.evon(0.02, ess=10.0, prior=bubble).init(params)
  with pytest.raises(ValueError, match="per coordinate"):
    tx = evon_jax.evon(0.02, ess=10.0, prior=bubble, **MATRIX_VIEW)
    posterior.kl_to_prior(posterior.bubble(tx.init(params)))


# ----------------------------------------------------------------------------------------------
# The cache of T = Qᵀ Q₀ and diag(Qᵀ P₀ Q) follows the bases under every refresh option


def _dense_basis(state_or_bubble):
  """Per leaf the dense basis of the row-major vec (block diagonal over stacked dims)."""
  import scipy.linalg
  b = posterior.bubble(state_or_bubble)
  bases = posterior.bases(b)
  out = {}
  for name, layout in zip(sorted(b.mean), posterior.stored_layouts(b)):
    if layout.trainable:
      q = bases[name] or (None,) * len(layout.axes)
      blocks = posterior._dense_rotations(layout, q, jnp.float32)
      out[name] = scipy.linalg.block_diag(*np.asarray(blocks, np.float64))
  return out


def _cache_params():
  keys = jax.random.split(jax.random.key(0), 4)
  return {"w": jax.random.normal(keys[0], (4, 3)), "t": jax.random.normal(keys[1], (2, 3, 4)),
          "s": jax.random.normal(keys[2], (2, 3, 3)), "v": jax.random.normal(keys[3], (5,)),
          "n": jnp.asarray(7, jnp.int32)}


def _cache_loss(p):
  return (jnp.sum(jnp.sin(p["w"]) ** 2) + jnp.sum((p["t"] - 0.3) ** 4)
          + jnp.sum(p["s"] ** 2 * p["s"][..., :1]) + jnp.sum(jnp.cos(p["v"]))
          + jnp.sum(p["w"][:3, :] @ p["s"][0]))


def _cache_grads(p):
  floats = {k: v for k, v in p.items() if k != "n"}
  return {**jax.grad(lambda f: _cache_loss({**p, **f}))(floats), "n": jnp.zeros_like(p["n"])}


STACKED = dict(stacked_dims=lambda path, leaf: 1 if "'s'" in jax.tree_util.keystr(path) else 0)


def _composed(prior, *, timing="after", sort_columns=False, mc_samples=1, **refresh):
  return evon_jax.inject_noise(evon_jax.eigenbasis_refresh(
      evon_jax.eigenspace_ivon(0.02, ess=40.0, hess_init=0.5, prior=prior),
      factors=evon_jax.kronecker_factor_ema(0.8, regularization=1e-3, prior_gradient=True),
      precondition_frequency=2, timing=timing, sort_columns=sort_columns, precondition_1d=True,
      **STACKED, **refresh), key=2, mc_samples=mc_samples)


CACHE_CASES = {
    "after": {}, "before": dict(timing="before"), "sorted": dict(sort_columns=True),
    "staggered": dict(stagger_refresh=True), "adaptive_per_side": dict(
        adaptive_tolerance=0.3, adaptive_per_side=True),
    "two_samples": dict(mc_samples=2), "eigh": dict(refresh_method="eigh"),
}


# Three cases in the default suite (~10 s each); the other refresh paths are marked slow.
SLOW_CACHE_CASES = {"sorted", "staggered", "adaptive_per_side", "eigh"}


@pytest.mark.parametrize("case", [
    pytest.param(case, marks=pytest.mark.slow) if case in SLOW_CACHE_CASES else case
    for case in CACHE_CASES])
def test_cached_prior_precision_follows_the_bases(case):
  """After steps with refreshes, the cached diag(Qᵀ P₀ Q) equals the dense
  diag(Kᵀ K₀ diag(π₀) K₀ᵀ K) (K, K₀: block-diagonal Kronecker products of the current and
  the prior's bases), and the posterior variance uses it. Leaves: a matrix, a 3-axis tensor,
  a stack of two matrices (stacked_dims), a vector with a basis, a frozen int scalar."""
  params = _cache_params()
  first = _composed(None)
  state = first.init(params)
  p = params
  step = jax.jit(lambda p, s, tx=first: tx.update(_cache_grads(p), s, p))
  for _ in range(6):
    u, state = step(p, state)
    p = optax.apply_updates(p, u)
  prior = posterior.bubble(state)
  tx = _composed(prior, **CACHE_CASES[case])
  state = tx.init(posterior.mean(prior))
  p = posterior.mean(prior)
  step = jax.jit(lambda p, s: tx.update(_cache_grads(p), s, p))
  for _ in range(9):
    u, state = step(p, state)
    p = optax.apply_updates(p, u)
  current, previous = _dense_basis(state), _dense_basis(prior)
  cached = posterior.bubble(state).weight_decay
  for name in current:
    pi = (40.0 * (np.asarray(prior.hessian[name], np.float64) + float(prior.weight_decay))
          ).reshape(-1)
    transition = current[name].T @ previous[name]
    expected = (transition ** 2) @ pi / 40.0
    assert not np.allclose(np.abs(transition), np.eye(len(pi)), atol=1e-2), name  # moved
    np.testing.assert_allclose(np.asarray(cached[name], np.float64).reshape(-1), expected,
                               rtol=2e-4, atol=1e-6, err_msg=f"{case} leaf {name}")
  np.testing.assert_array_equal(np.asarray(posterior.prior(state).mean["n"]), 7)


# ----------------------------------------------------------------------------------------------
# Read-outs around a prior


def test_partition_with_a_prior_reads_out_per_group():
  """Under optax.partition one group with a structured prior and one without: the combined
  read-outs take each leaf from its group, and kl_to_prior is the sum of the groups'."""
  loss, params = make_problem(seed=2, with_conv=True)
  bubble, dense = random_prior(0, params)
  labels = {"w": "a", "k": "a", "b": "b"}
  group_prior = evon_jax.SoapBubble(
      {k: (v if labels[k] == "a" else optax.MaskedNode()) for k, v in bubble.mean.items()},
      {k: (v if labels[k] == "a" else optax.MaskedNode()) for k, v in bubble.hessian.items()},
      (), tuple({k: (v if labels[k] == "a" else optax.MaskedNode()) for k, v in slot.items()}
                for slot in bubble.bases), bubble.ess, bubble.weight_decay)
  tx = optax.partition({
      "a": evon_jax.evon(0.02, key=11, prior=group_prior, **EVON_HYPER, **MATRIX_VIEW),
      "b": evon_jax.evon(0.02, key=12, **EVON_HYPER)}, labels)
  state = drop_in_trajectory(tx, params, loss, 8)[-1].state
  groups = state.inner_states
  combined = posterior.bubble(state)
  assert jnp.shape(combined.weight_decay["w"]) == (3, 4)   # per coordinate (prior)
  assert jnp.ndim(combined.weight_decay["b"]) == 0          # the isotropic δ
  stddev = posterior.marginal_stddev(state)
  assert all(np.all(np.isfinite(np.asarray(v))) and np.all(np.asarray(v) > 0)
             for v in stddev.values())
  np.testing.assert_allclose(
      float(posterior.kl_to_prior(state)),
      float(posterior.kl_to_prior(groups["a"])) + float(posterior.kl_to_prior(groups["b"])),
      rtol=1e-5)
  assert float(posterior.kl_to_prior(groups["a"])) > 0


def test_prior_is_not_kept_alive_by_the_compiled_update():
  """The compiled update's cache holds the spec it was traced with: the prior's arrays
  (read by init only) must not ride along, or every task's prior would stay in memory."""
  import gc
  import weakref
  loss, params = make_problem(seed=2, with_conv=True)
  bubble, _ = random_prior(3, params)
  watched = weakref.ref(bubble.mean["w"])
  tx = evon_jax.evon(0.02, key=11, prior=bubble, **EVON_HYPER, **MATRIX_VIEW)
  state = tx.init(params)
  tx.update(jax.grad(loss)(params), state, params)
  del bubble, tx, state
  gc.collect()
  assert watched() is None


def test_evidence_refuses_a_structured_prior():
  from evon_jax.structured import laplace_evidence
  loss, params = make_problem(seed=2, with_conv=True)
  bubble, _ = random_prior(0, params)
  state = evon_jax.evon(0.02, prior=bubble, **EVON_HYPER, **MATRIX_VIEW).init(params)
  with pytest.raises(ValueError, match="per coordinate"):
    laplace_evidence.log_marginal_likelihood(state, 0.0)


def test_posterior_module_examples_run():
  """The docstring examples of evon_jax.posterior (prior, tempered) as doctests."""
  import doctest
  from evon_jax.readout import posterior as module
  result = doctest.testmod(module)
  assert result.attempted >= 5 and result.failed == 0
