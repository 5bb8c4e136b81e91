"""evon_jax.lowrank: rank-r layers W = A Bᵀ, checked against dense NumPy float64 computations."""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import evon_jax
from evon_jax import lowrank, posterior


def _as64(x):
  return np.asarray(x, np.float64)


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("x_shape", [(5, 12), (2, 3, 12)])
def test_forward_equals_dense_product_in_float64(use_bias, x_shape):
  params = lowrank.init_low_rank_dense(jax.random.key(0), 12, 7, 3, use_bias=use_bias)
  if use_bias:
    params["bias"] = jax.random.normal(jax.random.key(1), (7,))
  x = jax.random.normal(jax.random.key(2), x_shape)
  w = _as64(params["a"]) @ _as64(params["b"]).T
  expected = _as64(x) @ w + (_as64(params["bias"]) if use_bias else 0.0)
  out = lowrank.low_rank_dense(params, x)
  assert out.shape == x_shape[:-1] + (7,)
  # float32 products of O(1) numbers summed over 12 + 3 terms: ~1e-6 relative rounding.
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lowrank.low_rank_weight(params), w, rtol=1e-5, atol=1e-6)


def test_parameter_count_is_rank_times_in_plus_out_plus_bias():
  params = lowrank.init_low_rank_dense(jax.random.key(0), 64, 32, 4)
  assert {k: v.shape for k, v in params.items()} == {"a": (64, 4), "b": (32, 4),
                                                     "bias": (32,)}
  assert lowrank.num_parameters(params) == 4 * (64 + 32) + 32
  assert lowrank.num_parameters(
      lowrank.init_low_rank_dense(jax.random.key(0), 64, 32, 4, use_bias=False)) == 4 * 96
  mlp = lowrank.init_low_rank_mlp(jax.random.key(0), [10, 20, 3], rank=5)
  # Ranks min(5, 10, 20) = 5 and min(5, 20, 3) = 3 (the output layer is capped).
  assert [layer["a"].shape[1] for layer in mlp] == [5, 3]
  assert lowrank.num_parameters(mlp) == 5 * (10 + 20) + 20 + 3 * (20 + 3) + 3


@pytest.mark.parametrize("rank", [1, 4, 16])
def test_initial_weight_variance_matches_lecun(rank):
  # Var(W_ij) = r Var(a) Var(b) should be 1/in. The diagonal entries W_ii = Σ_k a_ik b_ik of
  # one draw use disjoint rows of A and B, so over 400 draws they are 400·24 independent
  # samples; tolerance: 5 standard errors of the sample variance (SE = std(W²)/√N).
  in_features, out_features, draws = 32, 24, 400
  keys = jax.random.split(jax.random.key(rank), draws)
  weights = jax.vmap(lambda k: lowrank.low_rank_weight(
      lowrank.init_low_rank_dense(k, in_features, out_features, rank)))(keys)
  diagonal = _as64(jnp.diagonal(weights, axis1=1, axis2=2)).ravel()
  squares = diagonal ** 2
  standard_error = squares.std(ddof=1) / np.sqrt(squares.size)
  assert abs(squares.mean() - 1.0 / in_features) < 5 * standard_error
  assert abs(diagonal.mean()) < 5 * diagonal.std() / np.sqrt(diagonal.size)


@pytest.mark.parametrize("rank", [0, -1, 9, 2.0, True, "2"])
def test_bad_rank_raises(rank):
  with pytest.raises(ValueError, match="rank"):
    lowrank.init_low_rank_dense(jax.random.key(0), 8, 12, rank)
  with pytest.raises(ValueError, match="rank"):
    lowrank.LowRankLinear(8, 12, rank, rngs=nnx.Rngs(0))


def test_bad_mlp_arguments_raise():
  with pytest.raises(ValueError, match="rank"):
    lowrank.init_low_rank_mlp(jax.random.key(0), [4, 8, 2], 0)
  with pytest.raises(ValueError, match="sizes"):
    lowrank.init_low_rank_mlp(jax.random.key(0), [4], 2)


def test_nnx_layer_matches_functional_layer():
  params = lowrank.init_low_rank_dense(jax.random.key(3), 10, 6, 2)
  params["bias"] = jax.random.normal(jax.random.key(4), (6,))
  layer = lowrank.LowRankLinear(10, 6, 2, rngs=nnx.Rngs(0))
  layer.a[...] = params["a"]
  layer.b[...] = params["b"]
  layer.bias[...] = params["bias"]
  x = jax.random.normal(jax.random.key(5), (4, 10))
  np.testing.assert_allclose(layer(x), lowrank.low_rank_dense(params, x), rtol=1e-6)
  np.testing.assert_allclose(layer.weight(), lowrank.low_rank_weight(params), rtol=1e-6)
  _, state = nnx.split(layer, nnx.Param)
  assert lowrank.num_parameters(state) == 2 * (10 + 6) + 6
  no_bias = lowrank.LowRankLinear(10, 6, 2, use_bias=False, rngs=nnx.Rngs(0))
  assert no_bias(x).shape == (4, 6)
  assert lowrank.num_parameters(nnx.split(no_bias, nnx.Param)[1]) == 2 * 16


def test_functional_api_imports_without_flax():
  script = textwrap.dedent("""
      import sys
      sys.modules["flax"] = None  # any `import flax` now raises ImportError
      import jax
      from evon_jax import lowrank
      assert not hasattr(lowrank, "LowRankLinear")
      assert "LowRankLinear" not in lowrank.__all__
      params = lowrank.init_low_rank_mlp(jax.random.key(0), [4, 8, 2], 2)
      print(lowrank.low_rank_mlp(params, jax.numpy.ones((3, 4))).shape)
  """)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "(3, 2)"


# ---------------------------------------------------------------------------------------------
# Training with IVON / EVON in drop-in mode: the loop's params are posterior samples.

_SIZES, _RANK = [8, 16, 16, 3], 2


@functools.cache
def _problem():
  key_x, key_w = jax.random.split(jax.random.key(0))
  x = jax.random.normal(key_x, (64, 8))
  y = jnp.argmax(jnp.tanh(x @ jax.random.normal(key_w, (8, 3))), axis=-1)
  return x, y


def _dense_mlp(params, x):
  for layer in params[:-1]:
    x = jax.nn.gelu(x @ layer["w"] + layer["bias"][None, :])
  return x @ params[-1]["w"] + params[-1]["bias"][None, :]


def _loss(params, apply_fn, data):
  x, y = data
  return optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, x), y).mean()


def _train(tx, params, apply_fn, steps):
  """Plain optax drop-in loop: gradient at the held sample, `tx.update(grads, state, params)`."""

  @jax.jit
  def run(params, data):
    def step(carry, _):
      params, state = carry
      updates, state = tx.update(jax.grad(_loss)(params, apply_fn, data), state, params)
      return (optax.apply_updates(params, updates), state), None

    (params, state), _ = jax.lax.scan(step, (params, tx.init(params)), None, steps)
    return state

  return run(params, _problem())


_OPTIMIZERS = {
    "ivon": lambda: evon_jax.ivon(0.1, ess=64.0, hess_init=1.0, weight_decay=1e-3),
    "evon": lambda: evon_jax.evon(0.02, ess=64.0, hess_init=1.0, weight_decay=1e-3,
                                  whiten=True),
}


@functools.cache
def _trained_low_rank(name):
  params = lowrank.init_low_rank_mlp(jax.random.key(1), _SIZES, _RANK)
  return params, _train(_OPTIMIZERS[name](), params, lowrank.low_rank_mlp, 150)


# IVON's low-rank case is EVON's with identity bases (slow: compiles a second optimizer).
@pytest.mark.parametrize("name", [pytest.param("ivon", marks=pytest.mark.slow), "evon"])
def test_low_rank_mlp_trains_with_drop_in_optimizer(name):
  # Observed on this problem: 1.11 -> 0.30 (IVON), 1.11 -> 0.034 (EVON) after 150 steps.
  initial, state = _trained_low_rank(name)
  before = float(_loss(initial, lowrank.low_rank_mlp, _problem()))
  after = float(_loss(posterior.mean(state), lowrank.low_rank_mlp, _problem()))
  assert after < 0.6 * before, (before, after)


# IVON's low-rank case is EVON's with identity bases (slow: compiles a second optimizer).
@pytest.mark.parametrize("name", [pytest.param("ivon", marks=pytest.mark.slow), "evon"])
def test_posterior_weight_samples_have_rank_exactly_r(name):
  _, state = _trained_low_rank(name)
  samples = posterior.sample(jax.random.key(7), state, num_samples=4)
  means = posterior.mean(state)
  for layer, layer_mean in zip(samples, means):
    rank = layer["a"].shape[-1]
    # The sample is a genuinely noisy draw, not the mean.
    assert float(jnp.max(jnp.abs(layer["a"] - layer_mean["a"][None]))) > 1e-4
    for weight in _as64(lowrank.low_rank_weight(layer)):
      singular = np.linalg.svd(weight, compute_uv=False)
      # Rank exactly r: r clearly non-zero singular values, the rest float32 rounding.
      assert singular[rank - 1] > 1e-3 * singular[0]
      assert np.all(singular[rank:] < 1e-5 * singular[0]), singular / singular[0]


def test_dense_evon_posterior_sample_is_full_rank():
  # The contrast: the SOAP-Bubble posterior of a dense kernel puts its samples off any
  # low-rank manifold (observed smallest relative singular values 0.27, 0.059, 0.58).
  keys = jax.random.split(jax.random.key(1), len(_SIZES) - 1)
  params = [{"w": jax.random.normal(k, (n_in, n_out)) / np.sqrt(n_in),
             "bias": jnp.zeros(n_out)}
            for k, n_in, n_out in zip(keys, _SIZES[:-1], _SIZES[1:])]
  state = _train(_OPTIMIZERS["evon"](), params, _dense_mlp, 20)
  for layer in posterior.sample(jax.random.key(7), state):
    singular = np.linalg.svd(_as64(layer["w"]), compute_uv=False)
    assert singular[-1] > 1e-3 * singular[0], singular / singular[0]
