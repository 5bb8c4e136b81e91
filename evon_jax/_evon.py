"""EVON: IVON in the Kronecker eigenbasis, as one optax transformation (IVON is its special case).

Cost model (per m x n leaf and step, mc_samples = 1): the mean is kept in eigen coordinates,
so a step needs exactly SOAP's three product pairs — the gradient rotated in, the factor
statistics, and one rotation out that produces the next posterior sample directly,
W = Q_L (M° + sqrt(V) z) Q_Rᵀ. The noise is never stored: z is regenerated from the key
that drew it. Refresh steps additionally re-express the momentum and the mean in the new basis.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from evon_jax import eigenbasis, ivon_step, noise, whitening
from evon_jax._layout import LeafLayout, as_matrix, from_matrix, leaf_layout, state_dtype
from evon_jax.kronecker import (
    KroneckerPair, empty_pair, ema, factor_statistics, mean_factor_statistics, rotate_in,
    rotate_out)

FactorGradient = Literal["loss", "regularized"]
FactorStatistic = Literal["mean_gradient", "per_sample"]


class SampleStatistics(NamedTuple):
  """Monte-Carlo statistics of one leaf, averaged (or summed, while accumulating) over samples.

  Attributes:
    rotated_grad: g° = mean_s Q_Lᵀ G_s Q_R.
    normal_times_grad: mean_s z_s ⊙ G°_s (z_s the standard normal draw of sample s).
    factor_grad: mean gradient for the factor statistics (`factor_statistic='mean_gradient'`).
    factor_outer: mean per-sample statistics (`factor_statistic='per_sample'`).
  """

  rotated_grad: jax.Array
  normal_times_grad: jax.Array
  factor_grad: Optional[jax.Array]
  factor_outer: Optional[KroneckerPair]


class EvonState(NamedTuple):
  """State of `evon` / `ivon`: a Gaussian posterior in a Kronecker eigenbasis.

  Attributes:
    count: number of update calls taken (skipped calls not counted).
    skipped: number of calls skipped because a gradient was not finite.
    key: PRNG key that drew the noise of the sample the loop holds now.
    sample_noise: 1.0 if that sample carries noise, 0.0 if it is the mean (the first call,
      clean phases, explicit mode's output).
    mean: posterior mean M° in eigen coordinates (parameter shapes).
    momentum: gradient momentum Ḡ in eigen coordinates.
    hessian: diagonal Hessian estimate H in eigen coordinates.
    factors: per leaf, the Kronecker factors (L, R); `None` on identity sides.
    bases: per leaf, the eigenbases (Q_L, Q_R); `None` on identity sides.
    ess: effective sample size used by the last call (read by `evon_jax.posterior`).
    weight_decay: prior precision per example delta used by the last call.
    accumulator: sums of sample statistics over the calls of a step (mc_samples > 1 in
      drop-in mode), else None.
  """

  count: jax.Array
  skipped: jax.Array
  key: jax.Array
  sample_noise: jax.Array
  mean: Any
  momentum: Any
  hessian: Any
  factors: Any
  bases: Any
  ess: jax.Array
  weight_decay: jax.Array
  accumulator: Any


@dataclasses.dataclass(frozen=True)
class EvonConfig:
  """Static (shape- and branch-determining) settings of the EVON engine."""

  use_bases: bool = True
  precondition_frequency: int = 10
  max_precond_dim: int = 10000
  precondition_1d: bool = False
  whiten: bool = True
  phasing: bool = False
  mc_samples: int = 1
  drop_in: bool = True
  refresh_method: eigenbasis.RefreshMethod = "power_qr"
  factor_gradient: FactorGradient = "loss"
  factor_statistic: FactorStatistic = "mean_gradient"
  stagger_refresh: bool = False
  rescale_lr: bool = False
  clip_hessian: bool = False
  clip_update: bool = False
  dtype: Any = None
  rotation_precision: Any = None

  def layout(self, leaf) -> LeafLayout:
    return leaf_layout(
        leaf.shape, leaf.dtype, max_precond_dim=self.max_precond_dim,
        precondition_1d=self.precondition_1d, use_bases=self.use_bases)

  def refresh_offset(self, leaf_index: int) -> int:
    return leaf_index % self.precondition_frequency if self.stagger_refresh else 0


class EvonHyperparams(NamedTuple):
  """Traceable (float) hyperparameters; `optax.inject_hyperparams` may make them arrays."""

  learning_rate: Any
  ess: Any
  hess_init: Any
  b1: Any
  b2: Any
  shampoo_b: Any
  eps: Any
  weight_decay: Any
  hess_clip_ratio: Any
  clip_radius: Any


# ----------------------------------------------------------------------------- schedule of calls


def _calls_per_step(config: EvonConfig) -> int:
  """Drop-in mode spreads a step's mc_samples over as many calls; explicit mode takes them
  all in one call."""
  return config.mc_samples if config.drop_in else 1


def _real_step(count, config: EvonConfig):
  """Index (1-based) of the real step that call `count` (>= 1) contributes to."""
  return (count - 1) // _calls_per_step(config) + 1


def _noise_on(count, config: EvonConfig):
  """Whether the sample evaluated at call `count` carries noise (not the mean / clean phase)."""
  noisy = count > 0
  if config.phasing:
    noisy = noisy & (_real_step(count, config) % 2 == 0)
  return noisy


def _standard_normal(key, sample_index, leaf_index, layout: LeafLayout, dtype):
  """The draw z of one sample and leaf, reproducible from (key, sample, leaf).

  Always the fast 'hash' generator: `update` and `training_samples` must agree on it.
  """
  leaf_key = jax.random.fold_in(jax.random.fold_in(key, sample_index), leaf_index)
  return noise.standard_normal(leaf_key, (layout.rows, layout.cols), dtype, "hash")


# ----------------------------------------------------------------------------- per-leaf maths


def _leaf_statistics(grads, thetas, normals, basis, layout, config, weight_decay):
  """SampleStatistics from a stack of per-sample gradients (leading sample axis)."""
  rotated = rotate_in(grads, basis, config.rotation_precision)
  factor_grads = grads + weight_decay * thetas if config.factor_gradient == "regularized" \
      else grads
  per_sample = config.factor_statistic == "per_sample"
  return SampleStatistics(
      rotated_grad=jnp.mean(rotated, axis=0),
      normal_times_grad=jnp.mean(normals * rotated, axis=0),
      factor_grad=None if per_sample else jnp.mean(factor_grads, axis=0),
      factor_outer=mean_factor_statistics(factor_grads, layout) if per_sample else None)


def _leaf_step(leaf, stats: SampleStatistics, layout, config, hp, flags):
  """One real step of one leaf: eigenspace IVON, factor EMA, maybe a basis refresh."""
  mean, momentum, hessian, factors, basis = leaf
  is_first, step, hessian_on, factors_on, refresh_kind, lr = flags

  estimate = ivon_step.price_hessian_estimate(
      stats.normal_times_grad, hessian, hp.ess, hp.weight_decay)
  if config.clip_hessian:
    estimate = ivon_step.clip_hessian_estimate(estimate, hessian, hp.hess_clip_ratio, hp.eps)
  new_hessian = ivon_step.ivon_hessian_update(hessian, estimate, hp.b2, hp.weight_decay)
  new_hessian = jnp.where(hessian_on, new_hessian, hessian)
  new_momentum = hp.b1 * momentum + (1 - hp.b1) * stats.rotated_grad
  bias_correction = 1 - hp.b1 ** jnp.maximum(step, 1)
  direction = ivon_step.ivon_direction(
      new_momentum, bias_correction, mean, new_hessian, hp.weight_decay, hp.eps)
  if config.clip_update:
    direction = jnp.clip(direction, -hp.clip_radius, hp.clip_radius)
  if config.whiten:
    direction = whitening.whiten(direction, layout)
  new_mean = mean - lr * direction

  keep = lambda old, new: jnp.where(is_first, old, new).astype(old.dtype)
  mean, momentum, hessian = keep(mean, new_mean), keep(momentum, new_momentum), keep(
      hessian, new_hessian)

  if stats.factor_outer is not None:
    statistic = stats.factor_outer
  else:
    statistic = factor_statistics(stats.factor_grad, layout)
  updated = ema(factors, statistic, hp.shampoo_b)
  factors = jax.tree.map(lambda new, old: jnp.where(factors_on, new, old), updated, factors)
  basis, (momentum, mean) = eigenbasis.refresh(refresh_kind, factors, basis, (momentum, mean))
  return mean, momentum, hessian, factors, basis


# ----------------------------------------------------------------------------- the transformation


def _validate_grads_shape(grad, layout, config, leaf_index):
  """Grads are (k, *shape) in explicit mode (k = mc_samples), else the leaf's own shape."""
  expected = layout.shape
  if not config.drop_in:
    stacked = (config.mc_samples,) + layout.shape
    if tuple(grad.shape) == stacked:
      return jnp.reshape(grad, (config.mc_samples, layout.rows, layout.cols))
    if config.mc_samples == 1 and tuple(grad.shape) == expected:
      return jnp.reshape(grad, (1, layout.rows, layout.cols))
    raise ValueError(
        f"Leaf {leaf_index}: explicit mode (drop_in=False) expects gradients of shape "
        f"{stacked} (one per training sample), got {tuple(grad.shape)}.")
  if tuple(grad.shape) != expected:
    raise ValueError(
        f"Leaf {leaf_index}: gradient shape {tuple(grad.shape)} does not match the parameter "
        f"shape {expected} the optimizer was initialised with.")
  return jnp.reshape(grad, (1, layout.rows, layout.cols))


def _leaves(tree, treedef):
  return treedef.flatten_up_to(tree)


def _init_state(params, config: EvonConfig, hp: EvonHyperparams, key) -> EvonState:
  leaves, treedef = jax.tree.flatten(params)
  means, momenta, hessians, factors, bases, accumulators = [], [], [], [], [], []
  for leaf in leaves:
    leaf = jnp.asarray(leaf)
    layout = config.layout(leaf)
    if not layout.trainable:
      means.append(leaf)
      momenta.append(jnp.zeros((0,), jnp.float32))
      hessians.append(jnp.zeros((0,), jnp.float32))
      factors.append(KroneckerPair(None, None))
      bases.append(KroneckerPair(None, None))
      accumulators.append(None)
      continue
    dtype = state_dtype(leaf.dtype, config.dtype)
    means.append(leaf.astype(dtype))
    momenta.append(jnp.zeros(layout.shape, dtype))
    hessians.append(jnp.full(layout.shape, hp.hess_init, dtype))
    factors.append(empty_pair(layout, dtype, "zeros"))
    bases.append(empty_pair(layout, dtype, "eye"))
    accumulators.append(_zero_statistics(layout, config, dtype))
  accumulate = config.drop_in and config.mc_samples > 1
  unflatten = treedef.unflatten
  return EvonState(
      count=jnp.zeros([], jnp.int32),
      skipped=jnp.zeros([], jnp.int32),
      key=_as_typed_key(key),
      sample_noise=jnp.zeros([], jnp.float32),
      mean=unflatten(means),
      momentum=unflatten(momenta),
      hessian=unflatten(hessians),
      factors=unflatten(factors),
      bases=unflatten(bases),
      ess=jnp.asarray(hp.ess, jnp.float32),
      weight_decay=jnp.asarray(hp.weight_decay, jnp.float32),
      accumulator=unflatten(accumulators) if accumulate else None)


def _as_typed_key(key):
  """An int seed, a typed key, or legacy uint32 key data -> a typed PRNG key."""
  key = jnp.asarray(key)
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  if key.dtype == jnp.uint32 and key.shape == (2,):
    return jax.random.wrap_key_data(key)
  return jax.random.key(key)


def _zero_statistics(layout, config, dtype):
  zeros = jnp.zeros((layout.rows, layout.cols), dtype)
  per_sample = config.factor_statistic == "per_sample"
  return SampleStatistics(
      rotated_grad=zeros, normal_times_grad=zeros,
      factor_grad=None if per_sample else zeros,
      factor_outer=empty_pair(layout, dtype, "zeros") if per_sample else None)


def _learning_rate(hp: EvonHyperparams, step, config: EvonConfig):
  lr = hp.learning_rate(step - 1) if callable(hp.learning_rate) else hp.learning_rate
  if config.rescale_lr:
    lr = lr * (hp.hess_init + hp.weight_decay)
  return lr


def sample_eigen(mean, hessian, normal, noise_scale, ess, weight_decay):
  """A posterior sample in eigen coordinates: M° + sqrt(V) z (z scaled by 0 or 1).

  `normal` may carry a leading sample axis; the mean and scale are then shared across it.
  """
  std = noise_scale * ivon_step.posterior_std(hessian, ess, weight_decay)
  if normal.ndim > mean.ndim:
    mean, std = mean[None], std[None]
  return mean + std * normal


def _update(grads, state: EvonState, params, config: EvonConfig, hp: EvonHyperparams):
  treedef = jax.tree.structure(state.mean)
  means = _leaves(state.mean, treedef)
  layouts = [config.layout(m) for m in means]
  grad_leaves = _leaves(grads, treedef)
  param_leaves = _leaves(params, treedef)
  count = state.count
  k = config.mc_samples
  is_first = count == 0
  noise_now = state.sample_noise

  # 1. Monte-Carlo statistics of this call, per leaf.
  stats = []
  for i, (layout, grad, param, mean, hessian, basis) in enumerate(zip(
      layouts, grad_leaves, param_leaves, means, _leaves(state.hessian, treedef),
      _leaves(state.bases, treedef))):
    if not layout.trainable:
      stats.append(None)
      continue
    dtype = mean.dtype
    grad_stack = _validate_grads_shape(jnp.asarray(grad), layout, config, i).astype(dtype)
    samples = grad_stack.shape[0]
    normals = jnp.stack([
        _standard_normal(state.key, s, i, layout, dtype) for s in range(samples)
    ]) * noise_now.astype(dtype)
    if config.factor_gradient == "regularized":
      if config.drop_in:
        thetas = as_matrix(jnp.asarray(param), layout).astype(dtype)[None]
      else:
        thetas = rotate_out(
            sample_eigen(as_matrix(mean, layout), as_matrix(hessian, layout), normals, 1.0,
                         hp.ess, hp.weight_decay), basis, config.rotation_precision)
    else:
      thetas = None
    stats.append(_leaf_statistics(
        grad_stack, thetas, normals, basis, layout, config, hp.weight_decay))

  # 2. Decide what this call does.
  accumulate = config.drop_in and k > 1
  if accumulate:
    sums = [None if s is None else jax.tree.map(jnp.add, a, s)
            for s, a in zip(stats, _leaves(state.accumulator, treedef))]
    complete = is_first | ((count - 1) % k == k - 1)
    # The first call stands alone (gradient at the mean); later steps average k calls.
    divisor = jnp.where(is_first, 1.0, float(k))
    stats = [None if s is None else jax.tree.map(lambda x: x / divisor, s) for s in sums]
  else:
    complete = jnp.asarray(True)
  step = jnp.where(is_first, 0, _real_step(jnp.maximum(count, 1), config))
  noisy_step = _noise_on(count, config)
  lr = _learning_rate(hp, jnp.maximum(step, 1), config)
  factors_on = is_first | (~noisy_step if config.phasing else True)
  hessian_on = (~is_first) & noisy_step

  def take_step(_):
    new_leaves = []
    for i, (layout, s, leaf) in enumerate(zip(layouts, stats, zip(
        means, _leaves(state.momentum, treedef), _leaves(state.hessian, treedef),
        _leaves(state.factors, treedef), _leaves(state.bases, treedef)))):
      if not layout.trainable:
        new_leaves.append(leaf)
        continue
      kind = eigenbasis.refresh_kind(
          is_first, step, config.precondition_frequency, config.refresh_offset(i),
          config.refresh_method)
      leaf_factors_on = factors_on
      if config.phasing:
        leaf_factors_on = leaf_factors_on | (kind != eigenbasis.KEEP)
      matrices = (as_matrix(leaf[0], layout), as_matrix(leaf[1], layout),
                  as_matrix(leaf[2], layout), leaf[3], leaf[4])
      flags = (is_first, step, hessian_on, leaf_factors_on, kind, lr)
      mean, momentum, hessian, factors, basis = _leaf_step(
          matrices, s, layout, config, hp, flags)
      new_leaves.append((from_matrix(mean, layout), from_matrix(momentum, layout),
                         from_matrix(hessian, layout), factors, basis))
    return new_leaves

  def keep_state(_):
    return [tuple(leaf) for leaf in zip(
        means, _leaves(state.momentum, treedef), _leaves(state.hessian, treedef),
        _leaves(state.factors, treedef), _leaves(state.bases, treedef))]

  if accumulate:
    new_leaves = jax.lax.cond(complete, take_step, keep_state, None)
    zero = [None if s is None else jax.tree.map(jnp.zeros_like, s) for s in sums]
    accumulator = treedef.unflatten([
        None if s is None else jax.tree.map(lambda z, x: jnp.where(complete, z, x), z, x)
        for s, z, x in zip(stats, zero, sums)])
  else:
    new_leaves = take_step(None)
    accumulator = None

  # 3. The parameters the loop evaluates next: a fresh sample (drop-in) or the mean.
  next_key = jax.random.split(state.key)[0]
  # The noise flag of the next call's sample; in explicit mode the loop holds the mean while
  # `training_samples` draws the noisy samples from the same flag and key.
  noise_next = _noise_on(count + 1, config).astype(jnp.float32)
  updates = []
  for i, (layout, leaf, param) in enumerate(zip(layouts, new_leaves, param_leaves)):
    param = jnp.asarray(param)
    if not layout.trainable:
      updates.append(jnp.zeros_like(param))
      continue
    mean, _, hessian, _, basis = leaf
    eigen = as_matrix(mean, layout)
    if config.drop_in:
      normal = _standard_normal(next_key, 0, i, layout, mean.dtype)
      eigen = sample_eigen(eigen, as_matrix(hessian, layout), normal,
                           noise_next.astype(mean.dtype), hp.ess, hp.weight_decay)
    target = from_matrix(rotate_out(eigen, basis, config.rotation_precision), layout)
    updates.append((target.astype(param.dtype) - param).astype(param.dtype))

  new_state = EvonState(
      count=count + 1,
      skipped=state.skipped,
      key=next_key,
      sample_noise=noise_next,
      mean=treedef.unflatten([leaf[0] for leaf in new_leaves]),
      momentum=treedef.unflatten([leaf[1] for leaf in new_leaves]),
      hessian=treedef.unflatten([leaf[2] for leaf in new_leaves]),
      factors=treedef.unflatten([leaf[3] for leaf in new_leaves]),
      bases=treedef.unflatten([leaf[4] for leaf in new_leaves]),
      ess=jnp.asarray(hp.ess, jnp.float32),
      weight_decay=jnp.asarray(hp.weight_decay, jnp.float32),
      accumulator=accumulator)
  return treedef.unflatten(updates), new_state


def _all_finite(grads) -> jax.Array:
  leaves = [jnp.asarray(g) for g in jax.tree.leaves(grads)]
  checks = [jnp.all(jnp.isfinite(g)) for g in leaves if jnp.issubdtype(g.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def evon_transformation(config: EvonConfig, hp: EvonHyperparams, key) -> (
    optax.GradientTransformationExtraArgs):
  """Builds the EVON engine from validated settings (see `evon_jax.evon` for the user API)."""

  def init_fn(params):
    return _init_state(params, config, hp, key)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(
          "evon_jax optimizers need `params` in update(grads, state, params): drop-in mode "
          "returns (next sample - params), explicit mode returns (new mean - params).")

    def skip(_):
      zeros = jax.tree.map(jnp.zeros_like, params)
      return zeros, state._replace(skipped=state.skipped + 1)

    return jax.lax.cond(
        _all_finite(updates), lambda _: _update(updates, state, params, config, hp), skip, None)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def training_samples(opt_state, num_samples: int = 1) -> Any:
  """The parameters at which explicit mode (`drop_in=False`) expects the next gradients.

  Returns a params-shaped pytree with a leading axis of size `num_samples` (pass the
  optimizer's `mc_samples`; `update` checks the gradients' leading axis): the mean on the
  first call (the reference initialises its bases from a gradient at the mean), posterior
  samples afterwards, drawn from the state's key so `update` regenerates the same noise.
  Take gradients with `jax.vmap(jax.grad(loss), in_axes=(0, None))(samples, batch)`.
  """
  from evon_jax._state_search import find_state  # local import: avoids a cycle at load
  state = find_state(opt_state, EvonState)
  treedef = jax.tree.structure(state.mean)
  out = []
  for i, (mean, hessian, basis) in enumerate(zip(
      _leaves(state.mean, treedef), _leaves(state.hessian, treedef),
      _leaves(state.bases, treedef))):
    layout = leaf_layout(mean.shape, mean.dtype, max_precond_dim=0, precondition_1d=False)
    if not layout.trainable:
      out.append(jnp.broadcast_to(mean, (num_samples,) + mean.shape))
      continue
    normals = jnp.stack([_standard_normal(state.key, s, i, layout, mean.dtype)
                         for s in range(num_samples)])
    eigen = sample_eigen(as_matrix(mean, layout), as_matrix(hessian, layout), normals,
                         state.sample_noise.astype(mean.dtype), state.ess, state.weight_decay)
    out.append(jnp.reshape(rotate_out(eigen, basis), (num_samples,) + mean.shape))
  return treedef.unflatten(out)
