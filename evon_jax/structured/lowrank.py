"""Low-rank dense layers W = A Bᵀ: a Bayesian posterior on the factors lives on rank-r matrices.

A layer stores ``a`` (in x r) and ``b`` (out x r) instead of a full (in x out) kernel, and maps
``x ↦ (x a) bᵀ + bias``. Any posterior on the factors — IVON's diagonal Gaussian, EVON's
SOAP-Bubble, mean-field VI (`evon_jax.meanfield`) — then puts every weight sample
``W = A Bᵀ`` on the manifold of rank-r matrices (the Singular Bayesian Neural Network of the
reference below), with ``r (in + out)`` parameters (+ ``out`` for the bias) instead of
``in · out``.

Two interfaces over the same parameters:

* functional: `init_low_rank_dense` / `low_rank_dense` (one layer, a dict of arrays) and
  `init_low_rank_mlp` / `low_rank_mlp` (a list of such dicts), for plain optax loops;
* Flax NNX: `LowRankLinear` (defined only when flax is installed; flax is optional).

References:
  Singular Bayesian Neural Networks, arXiv 2602.00387, 2026.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

try:
  from flax import nnx
except ImportError:  # flax is optional: the functional API below does not need it.
  nnx = None

__all__ = [
    "init_low_rank_dense", "low_rank_dense", "low_rank_weight", "num_parameters",
    "init_low_rank_mlp", "low_rank_mlp",
] + (["LowRankLinear"] if nnx is not None else [])


def _check_rank(rank, in_features: int, out_features: int) -> None:
  for name, size in (("in_features", in_features), ("out_features", out_features)):
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
      raise ValueError(f"{name} must be a Python int >= 1, got {size!r}.")
  largest = min(in_features, out_features)
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
    raise ValueError(f"rank must be a Python int in [1, min(in_features, out_features)] = "
                     f"[1, {largest}], got {rank!r}.")
  if not 1 <= rank <= largest:
    raise ValueError(f"rank must lie in [1, min(in_features, out_features)] = [1, {largest}] "
                     f"for a {in_features} -> {out_features} layer, got {rank}.")


def _factor_stddevs(in_features: int, rank: int) -> tuple[float, float]:
  """Standard deviations of the factor entries that give W = A Bᵀ LeCun's variance 1/in.

  With independent zero-mean entries, W_ij = Σ_k a_ik b_jk has
  Var(W_ij) = r · Var(a) · Var(b). Var(a) = 1/in and Var(b) = 1/r make this 1/in (LeCun
  normal, the fan-in scaling of a dense layer), and each factor is then itself a LeCun
  initialised map (in -> r, r -> out): the r bottleneck features x a keep the scale of the
  inputs instead of shrinking or growing with in and r.
  """
  return 1.0 / math.sqrt(in_features), 1.0 / math.sqrt(rank)


def init_low_rank_dense(key: jax.Array, in_features: int, out_features: int, rank: int, *,
                        use_bias: bool = True, dtype=jnp.float32) -> dict:
  """Parameters of a rank-r dense layer: ``{"a": (in, r), "b": (out, r), "bias": (out,)}``.

  Factor entries are Gaussian with Var(a) = 1/in and Var(b) = 1/r, so the entries of
  W = A Bᵀ have variance r · (1/in) · (1/r) = 1/in, that of a LeCun-normal dense kernel.
  The bias starts at zero.

  Args:
    key: PRNG key.
    in_features: input width.
    out_features: output width.
    rank: r, an int in [1, min(in_features, out_features)].
    use_bias: include a bias of shape (out_features,).
    dtype: dtype of the parameters.

  Returns:
    A dict of arrays (a pytree for any optax optimizer).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from evon_jax import lowrank
    >>> layer = lowrank.init_low_rank_dense(jax.random.key(0), 64, 32, 4)
    >>> lowrank.low_rank_dense(layer, jnp.ones((8, 64))).shape
    (8, 32)
    >>> lowrank.num_parameters(layer)  # 4 * (64 + 32) + 32 instead of 64 * 32 + 32
    416
  """
  _check_rank(rank, in_features, out_features)
  std_a, std_b = _factor_stddevs(in_features, rank)
  key_a, key_b = jax.random.split(key)
  params = {
      "a": std_a * jax.random.normal(key_a, (in_features, rank), dtype),
      "b": std_b * jax.random.normal(key_b, (out_features, rank), dtype),
  }
  if use_bias:
    params["bias"] = jnp.zeros((out_features,), dtype)
  return params


def _dense(x: jax.Array, a: jax.Array, b: jax.Array, bias) -> jax.Array:
  # Through the r-dimensional bottleneck: O(r (in + out)) per example; W is never formed.
  y = (x @ a) @ jnp.matrix_transpose(b)
  if bias is None:
    return y
  return y + jnp.reshape(bias, (1,) * (y.ndim - 1) + bias.shape)


def low_rank_dense(params: dict, x: jax.Array) -> jax.Array:
  """``x A Bᵀ + bias`` computed as ``(x A) Bᵀ``; ``x`` has shape (..., in_features)."""
  return _dense(x, params["a"], params["b"], params.get("bias"))


def low_rank_weight(params: dict) -> jax.Array:
  """The dense kernel ``W = A Bᵀ`` (in x out), e.g. to inspect a posterior sample.

  Leading axes of the factors (a sample axis from `evon_jax.posterior.sample(...,
  num_samples)`) are kept: ``(S, in, r), (S, out, r) -> (S, in, out)``.
  """
  return params["a"] @ jnp.matrix_transpose(params["b"])


def num_parameters(tree: Any) -> int:
  """Total number of scalar entries in a pytree of arrays (e.g. r(in + out) + out per layer)."""
  return int(optax.tree_utils.tree_size(tree))


def init_low_rank_mlp(key: jax.Array, sizes: Sequence[int], rank: int, *,
                      dtype=jnp.float32) -> list[dict]:
  """A multilayer perceptron whose every layer (the output layer too) is low rank.

  Layer l maps sizes[l] -> sizes[l+1] with rank min(rank, sizes[l], sizes[l+1]), so a narrow
  layer (e.g. the few output classes) is capped at its full rank instead of raising.

  Args:
    key: PRNG key.
    sizes: widths [input, hidden..., output], at least two entries.
    rank: the rank r of the wide layers, an int >= 1.
    dtype: dtype of the parameters.

  Returns:
    A list with one `init_low_rank_dense` dict per layer (biases included).
  """
  sizes = list(sizes)
  if len(sizes) < 2:
    raise ValueError(f"sizes must list at least an input and an output width, got {sizes}.")
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
    raise ValueError(f"rank must be a Python int >= 1, got {rank!r}.")
  keys = jax.random.split(key, len(sizes) - 1)
  return [init_low_rank_dense(k, n_in, n_out, min(rank, n_in, n_out), dtype=dtype)
          for k, n_in, n_out in zip(keys, sizes[:-1], sizes[1:])]


def low_rank_mlp(params: Sequence[dict], x: jax.Array,
                 activation: Callable[[jax.Array], jax.Array] = jax.nn.gelu) -> jax.Array:
  """Applies `activation` after every layer but the last; returns the last layer's logits."""
  for layer in params[:-1]:
    x = activation(low_rank_dense(layer, x))
  return low_rank_dense(params[-1], x)


if nnx is not None:

  class LowRankLinear(nnx.Module):
    """Flax NNX linear layer with kernel W = A Bᵀ of rank r (see `init_low_rank_dense`).

    Parameters ``a`` (in, r), ``b`` (out, r) and ``bias`` (out,) are `nnx.Param`s, so
    ``nnx.split(model)`` hands them to `evon_jax.evon`/`ivon` like any other kernel.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from evon_jax.structured.lowrank import LowRankLinear
      >>> layer = LowRankLinear(16, 8, rank=2, rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((4, 16))).shape, layer.weight().shape
      ((4, 8), (16, 8))
    """

    def __init__(self, in_features: int, out_features: int, rank: int, *,
                 use_bias: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
      params = init_low_rank_dense(rngs.params(), in_features, out_features, rank,
                                   use_bias=use_bias, dtype=dtype)
      self.in_features, self.out_features, self.rank = in_features, out_features, rank
      self.a = nnx.Param(params["a"])
      self.b = nnx.Param(params["b"])
      self.bias = nnx.Param(params["bias"]) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
      bias = None if self.bias is None else self.bias[...]
      return _dense(x, self.a[...], self.b[...], bias)

    def weight(self) -> jax.Array:
      """The dense kernel W = A Bᵀ (in x out)."""
      return self.a[...] @ jnp.matrix_transpose(self.b[...])
