"""Reading the SOAP-Bubble posterior out of an EVON or IVON optimizer state.

Every function accepts the whole optimizer state (the EVON/IVON state is found inside
optax.chain, masked, partition, inject_hyperparams and MultiSteps wrappers). For a leaf viewed
as an m x n matrix the posterior is W = M + Q_L E Q_Rᵀ, E_ij ~ N(0, V_ij),
V = 1 / (ess (H + δ)); identity bases give IVON's diagonal Gaussian.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

from evon_jax._evon import EvonState, sample_eigen
from evon_jax._layout import LeafLayout, as_matrix, from_matrix, leaf_layout
from evon_jax._state_search import find_state
from evon_jax.kronecker import KroneckerPair, leaf_pairs, rotate_out, storage_to_pairs

# Posterior read-outs are off the training hot path: always use full float32 matmuls (the
# default precision is TF32/bf16 on GPUs and TPUs, which would blur covariances and means).
_EXACT = jax.lax.Precision.HIGHEST

__all__ = [
    "mean", "sample", "marginal_stddev", "covariance", "entropy", "kl_to_prior", "bases",
    "variance_eigen", "find_evon_state",
]


def find_evon_state(opt_state) -> EvonState:
  """The EVON/IVON state inside any optax state pytree."""
  return find_state(opt_state, EvonState)


def _per_leaf(state: EvonState):
  """Yields (layout, mean°, hessian, basis) per leaf; layout is None for frozen leaves."""
  treedef = jax.tree.structure(state.mean)
  for mean_eigen, hessian, basis in zip(
      treedef.flatten_up_to(state.mean), treedef.flatten_up_to(state.hessian),
      storage_to_pairs(state.bases, treedef)):
    layout = leaf_layout(mean_eigen.shape, mean_eigen.dtype, max_precond_dim=0,
                         precondition_1d=False)
    yield (layout if layout.trainable else None), mean_eigen, hessian, basis


def _map_leaves(state: EvonState, trainable_fn, frozen_fn):
  treedef = jax.tree.structure(state.mean)
  out = [frozen_fn(m) if layout is None else trainable_fn(layout, m, h, q)
         for layout, m, h, q in _per_leaf(state)]
  return treedef.unflatten(out)


def _variance(state, hessian):
  return 1.0 / (state.ess * (hessian + state.weight_decay))


def mean(opt_state) -> Any:
  """Posterior mean M in parameter space (params-shaped; float32 or the state's dtype)."""
  state = find_evon_state(opt_state)
  return _map_leaves(
      state,
      lambda layout, m, h, q: from_matrix(
          rotate_out(as_matrix(m, layout), q, _EXACT), layout),
      lambda m: m)


def variance_eigen(opt_state) -> Any:
  """V = 1 / (ess (H + δ)), the variances in eigen coordinates (params-shaped)."""
  state = find_evon_state(opt_state)
  return _map_leaves(state, lambda layout, m, h, q: _variance(state, h),
                     lambda m: jnp.zeros(m.shape, jnp.float32))


def bases(opt_state) -> Any:
  """Per leaf, the `KroneckerPair(Q_L, Q_R)` eigenbases (`None` marks an identity side)."""
  return leaf_pairs(find_evon_state(opt_state).bases)


def sample(key: jax.Array, opt_state, num_samples: Optional[int] = None) -> Any:
  """Draws posterior samples; a leading axis of `num_samples` when it is given."""
  state = find_evon_state(opt_state)
  count = 1 if num_samples is None else num_samples
  leaf_keys = iter(jax.random.split(key, len(jax.tree.leaves(state.mean))))

  def draw(layout, m, h, q):
    z = jax.random.normal(next(leaf_keys), (count, layout.rows, layout.cols), m.dtype)
    eigen = sample_eigen(as_matrix(m, layout), as_matrix(h, layout), z, 1.0, state.ess,
                         state.weight_decay)
    out = jnp.reshape(rotate_out(eigen, q, _EXACT), (count,) + layout.shape)
    return out[0] if num_samples is None else out

  def frozen(m):
    next(leaf_keys)
    return m if num_samples is None else jnp.broadcast_to(m, (num_samples,) + m.shape)

  return _map_leaves(state, draw, frozen)


def _squared(basis: KroneckerPair) -> KroneckerPair:
  return jax.tree.map(jnp.square, basis)


def marginal_stddev(opt_state) -> Any:
  """Closed-form marginal standard deviations: sqrt((Q_L∘Q_L) V (Q_R∘Q_R)ᵀ), params-shaped."""
  state = find_evon_state(opt_state)

  def stddev(layout, m, h, q):
    variance = rotate_out(as_matrix(_variance(state, h), layout), _squared(q), _EXACT)
    return from_matrix(jnp.sqrt(variance), layout)

  return _map_leaves(state, stddev, lambda m: jnp.zeros(m.shape, jnp.float32))


def _dense_rotation(layout: LeafLayout, q: KroneckerPair, dtype):
  """Q_L ⊗ Q_R: maps row-major vec(E) to row-major vec(W)."""
  left = q.left if q.left is not None else jnp.eye(layout.rows, dtype=dtype)
  right = q.right if q.right is not None else jnp.eye(layout.cols, dtype=dtype)
  return jnp.kron(left, right)


def covariance(opt_state, max_size: int = 4096) -> Any:
  """Dense covariance of each leaf's row-major flattening, (size, size) per leaf.

  Cov(vec W) = (Q_L ⊗ Q_R) diag(vec V) (Q_L ⊗ Q_R)ᵀ. Meant for small leaves: raises if a
  leaf has more than `max_size` entries.
  """
  state = find_evon_state(opt_state)

  def dense(layout, m, h, q):
    size = layout.rows * layout.cols
    if size > max_size:
      raise ValueError(f"covariance: a leaf of shape {layout.shape} has {size} entries, "
                       f"more than max_size={max_size}; use marginal_stddev or sample.")
    rotation = _dense_rotation(layout, q, m.dtype)
    v = jnp.reshape(_variance(state, h), (-1,))
    return jnp.matmul(rotation * v[None, :], rotation.T, precision=_EXACT)

  return _map_leaves(state, dense, lambda m: jnp.zeros((m.size, m.size), jnp.float32))


def _trainable_variances(state):
  return [_variance(state, h) for layout, _, h, _ in _per_leaf(state) if layout is not None]


def entropy(opt_state) -> jax.Array:
  """Differential entropy of the whole posterior, ½ Σ log(2πe V) (rotations do not change it)."""
  state = find_evon_state(opt_state)
  return sum((0.5 * jnp.sum(jnp.log(2 * math.pi * math.e * v))
              for v in _trainable_variances(state)), jnp.zeros([], jnp.float32))


def kl_to_prior(opt_state) -> jax.Array:
  """KL(q ‖ p) to the prior p = N(0, 1/(ess δ) I) over all trainable entries.

  With s² = 1/(ess δ): ½ Σ [V/s² + M²/s² - 1 + log s² - log V]; ‖M‖ is basis independent.
  With weight_decay = 0 the prior is improper and the KL is infinite.
  """
  state = find_evon_state(opt_state)
  prior_precision = state.ess * state.weight_decay
  total = jnp.zeros([], jnp.float32)
  for layout, m, h, _ in _per_leaf(state):
    if layout is None:
      continue
    v = _variance(state, h)
    total = total + 0.5 * jnp.sum(
        prior_precision * (v + m * m) - 1.0 - jnp.log(prior_precision) - jnp.log(v))
  return total
