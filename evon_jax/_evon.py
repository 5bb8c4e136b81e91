"""EVON: IVON in the Kronecker eigenbasis, as one optax transformation (IVON is its special case).

Cost model (per m x n leaf and step, mc_samples = 1): the mean is kept in eigen coordinates,
so a step needs exactly SOAP's three product pairs — the gradient rotated in, the factor
statistics, and one rotation out that produces the next posterior sample directly,
W = Q_L (M° + sqrt(V) z) Q_Rᵀ. The noise is never stored: z is regenerated from the key
that drew it. Refresh steps additionally re-express the momentum and the mean in the new basis.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from evon_jax import eigenbasis, ivon_step, noise, whitening
from evon_jax._layout import LeafLayout, as_matrix, from_matrix, leaf_layout, state_dtype
from evon_jax.kronecker import (
    KroneckerPair, empty_pair, ema, factor_statistics, mean_factor_statistics,
    pairs_to_storage, rotate_in, rotate_out, storage_to_pairs)

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
    factors: Kronecker factors as KroneckerPair(left=tree, right=tree) of params-shaped
      trees (zero-size arrays on identity sides); `kronecker.leaf_pairs` gives them per leaf.
    bases: eigenbases (Q_L, Q_R), stored like `factors`.
    ess: effective sample size used by the last call (read by `evon_jax.posterior`).
    weight_decay: prior precision per example delta used by the last call.
    accumulator: SampleStatistics of params-shaped trees summing the calls of a step
      (mc_samples > 1 in drop-in mode), else None.
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
  rotation_precision: Any = "highest"

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


class _Leaf(NamedTuple):
  """One trainable leaf's posterior in matrix views (eigen coordinates)."""

  mean: jax.Array
  momentum: jax.Array
  hessian: jax.Array
  factors: KroneckerPair
  basis: KroneckerPair


_FROZEN = jnp.zeros((0,), jnp.float32)  # placeholder for integer / empty leaves


def _empty_side():
  return jnp.zeros((0, 0), jnp.float32)


# ----------------------------------------------------------------------------- state <-> leaves


def _unpack(state: EvonState, treedef, layouts) -> list[Optional[_Leaf]]:
  """Per-leaf matrix views of the state; None for frozen leaves."""
  columns = zip(
      treedef.flatten_up_to(state.mean), treedef.flatten_up_to(state.momentum),
      treedef.flatten_up_to(state.hessian), storage_to_pairs(state.factors, treedef),
      storage_to_pairs(state.bases, treedef))
  return [
      _Leaf(as_matrix(m, layout), as_matrix(g, layout), as_matrix(h, layout), f, q)
      if layout.trainable else None
      for layout, (m, g, h, f, q) in zip(layouts, columns)]


def _pack(leaves, frozen_means, treedef, layouts):
  """The state fields (mean, momentum, hessian, factors, bases) from per-leaf views."""
  def field(get, frozen):
    return treedef.unflatten([
        from_matrix(get(leaf), layout) if layout.trainable else frozen(i)
        for i, (leaf, layout) in enumerate(zip(leaves, layouts))])

  pairs = lambda get: pairs_to_storage(
      [get(leaf) if leaf is not None else KroneckerPair(None, None) for leaf in leaves],
      treedef)
  return dict(
      mean=field(lambda l: l.mean, lambda i: frozen_means[i]),
      momentum=field(lambda l: l.momentum, lambda i: _FROZEN),
      hessian=field(lambda l: l.hessian, lambda i: _FROZEN),
      factors=pairs(lambda l: l.factors),
      bases=pairs(lambda l: l.basis))


def _statistics_to_storage(stats, treedef) -> SampleStatistics:
  """Per-leaf SampleStatistics (None for frozen leaves) -> SampleStatistics of trees."""
  first = next(s for s in stats if s is not None)
  arrays = lambda get: treedef.unflatten(
      [_empty_side() if s is None else get(s) for s in stats])
  return SampleStatistics(
      rotated_grad=arrays(lambda s: s.rotated_grad),
      normal_times_grad=arrays(lambda s: s.normal_times_grad),
      factor_grad=None if first.factor_grad is None else arrays(lambda s: s.factor_grad),
      factor_outer=None if first.factor_outer is None else pairs_to_storage(
          [KroneckerPair(None, None) if s is None else s.factor_outer for s in stats],
          treedef))


def _storage_to_statistics(stored: SampleStatistics, treedef, layouts):
  columns = [treedef.flatten_up_to(stored.rotated_grad),
             treedef.flatten_up_to(stored.normal_times_grad)]
  factor_grads = (treedef.flatten_up_to(stored.factor_grad)
                  if stored.factor_grad is not None else [None] * len(layouts))
  outers = (storage_to_pairs(stored.factor_outer, treedef)
            if stored.factor_outer is not None else [None] * len(layouts))
  return [SampleStatistics(r, z, g, o) if layout.trainable else None
          for layout, r, z, g, o in zip(layouts, *columns, factor_grads, outers)]


# ----------------------------------------------------------------------------- init


def _init_state(params, config: EvonConfig, hp: EvonHyperparams, key) -> EvonState:
  leaves, treedef = jax.tree.flatten(params)
  leaves = [jnp.asarray(leaf) for leaf in leaves]
  layouts = [config.layout(leaf) for leaf in leaves]
  views, accumulators = [], []
  for leaf, layout in zip(leaves, layouts):
    if not layout.trainable:
      views.append(None)
      accumulators.append(None)
      continue
    dtype = state_dtype(leaf.dtype, config.dtype)
    zeros = jnp.zeros((layout.rows, layout.cols), dtype)
    views.append(_Leaf(
        mean=as_matrix(leaf, layout).astype(dtype),
        momentum=zeros,
        hessian=jnp.full((layout.rows, layout.cols), hp.hess_init, dtype),
        factors=empty_pair(layout, dtype, "zeros"),
        basis=empty_pair(layout, dtype, "eye")))
    per_sample = config.factor_statistic == "per_sample"
    accumulators.append(SampleStatistics(
        rotated_grad=zeros, normal_times_grad=zeros,
        factor_grad=None if per_sample else zeros,
        factor_outer=empty_pair(layout, dtype, "zeros") if per_sample else None))
  accumulate = config.drop_in and config.mc_samples > 1 and any(l.trainable for l in layouts)
  return EvonState(
      count=jnp.zeros([], jnp.int32),
      skipped=jnp.zeros([], jnp.int32),
      key=_as_typed_key(key),
      sample_noise=jnp.zeros([], jnp.float32),
      ess=jnp.asarray(hp.ess, jnp.float32),
      weight_decay=jnp.asarray(hp.weight_decay, jnp.float32),
      accumulator=_statistics_to_storage(accumulators, treedef) if accumulate else None,
      **_pack(views, leaves, treedef, layouts))


def _as_typed_key(key):
  """An int seed, a typed key, or legacy uint32 key data -> a typed PRNG key."""
  key = jnp.asarray(key)
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  if key.dtype == jnp.uint32 and key.shape == (2,):
    return jax.random.wrap_key_data(key)
  return jax.random.key(key)


# ----------------------------------------------------------------------------- update


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


def _call_statistics(grads, params, state, views, layouts, config, hp):
  """Monte-Carlo statistics of this call's gradient(s), per leaf (None when frozen)."""
  treedef = jax.tree.structure(state.mean)
  stats = []
  for i, (layout, view, grad, param) in enumerate(zip(
      layouts, views, treedef.flatten_up_to(grads), treedef.flatten_up_to(params))):
    if view is None:
      stats.append(None)
      continue
    dtype = view.mean.dtype
    grad_stack = _validate_grads_shape(jnp.asarray(grad), layout, config, i).astype(dtype)
    normals = jnp.stack([
        _standard_normal(state.key, s, i, layout, dtype) for s in range(grad_stack.shape[0])
    ]) * state.sample_noise.astype(dtype)
    thetas = None
    if config.factor_gradient == "regularized":
      if config.drop_in:  # the loop holds the sample itself
        thetas = as_matrix(jnp.asarray(param), layout).astype(dtype)[None]
      else:
        thetas = rotate_out(
            sample_eigen(view.mean, view.hessian, normals, 1.0, hp.ess, hp.weight_decay),
            view.basis, config.rotation_precision)
    stats.append(_leaf_statistics(
        grad_stack, thetas, normals, view.basis, layout, config, hp.weight_decay))
  return stats


def _accumulate(stats, state, treedef, layouts, config):
  """Adds this call's statistics to the step's running sums (drop-in, mc_samples > 1).

  Returns the statistics to step with (sums / k), whether this call completes a step, and
  the accumulator to carry (zeroed after a completed step). The first call stands alone.
  """
  k = config.mc_samples
  previous = _storage_to_statistics(state.accumulator, treedef, layouts)
  sums = [None if s is None else jax.tree.map(jnp.add, a, s)
          for s, a in zip(stats, previous)]
  is_first = state.count == 0
  complete = is_first | ((state.count - 1) % k == k - 1)
  divisor = jnp.where(is_first, 1.0, float(k))
  averaged = [None if s is None else jax.tree.map(lambda x: x / divisor, s) for s in sums]
  carried = [None if s is None else jax.tree.map(
      lambda x: jnp.where(complete, jnp.zeros_like(x), x), s) for s in sums]
  return averaged, complete, _statistics_to_storage(carried, treedef)


def _step_leaves(views, stats, layouts, count, config, hp):
  """One real step for every trainable leaf (the first call only sets factors and bases)."""
  is_first = count == 0
  step = jnp.where(is_first, 0, _real_step(jnp.maximum(count, 1), config))
  noisy_step = _noise_on(count, config)
  lr = _learning_rate(hp, jnp.maximum(step, 1), config)
  hessian_on = (~is_first) & noisy_step
  new_views = []
  for i, (layout, view, s) in enumerate(zip(layouts, views, stats)):
    if view is None:
      new_views.append(None)
      continue
    kind = eigenbasis.refresh_kind(
        is_first, step, config.precondition_frequency, config.refresh_offset(i),
        config.refresh_method)
    factors_on = jnp.asarray(True)
    if config.phasing:  # noisy phases update the factors only when a refresh needs them
      factors_on = is_first | (~noisy_step) | (kind != eigenbasis.KEEP)
    flags = (is_first, step, hessian_on, factors_on, kind, lr)
    new_views.append(_Leaf(*_leaf_step(tuple(view), s, layout, config, hp, flags)))
  return new_views


def _next_parameters(views, layouts, params, key, noise_scale, config, hp, treedef):
  """Updates that move the loop's params to the next sample (drop-in) or to the mean."""
  updates = []
  for i, (layout, view, param) in enumerate(zip(
      layouts, views, treedef.flatten_up_to(params))):
    param = jnp.asarray(param)
    if view is None:
      updates.append(jnp.zeros_like(param))
      continue
    eigen = view.mean
    if config.drop_in:
      normal = _standard_normal(key, 0, i, layout, eigen.dtype)
      eigen = sample_eigen(eigen, view.hessian, normal, noise_scale.astype(eigen.dtype),
                           hp.ess, hp.weight_decay)
    target = from_matrix(rotate_out(eigen, view.basis, config.rotation_precision), layout)
    updates.append(target.astype(param.dtype) - param)
  return treedef.unflatten(updates)


def _update(grads, state: EvonState, params, config: EvonConfig, hp: EvonHyperparams):
  treedef = jax.tree.structure(state.mean)
  frozen_means = treedef.flatten_up_to(state.mean)
  layouts = [config.layout(m) for m in frozen_means]
  views = _unpack(state, treedef, layouts)
  stats = _call_statistics(grads, params, state, views, layouts, config, hp)

  accumulator = None
  if config.drop_in and config.mc_samples > 1 and state.accumulator is not None:
    stats, complete, accumulator = _accumulate(stats, state, treedef, layouts, config)
    views = jax.lax.cond(
        complete, lambda v: _step_leaves(v, stats, layouts, state.count, config, hp),
        lambda v: v, views)
  else:
    views = _step_leaves(views, stats, layouts, state.count, config, hp)

  next_key = jax.random.split(state.key)[0]
  # Noise flag of the next call's sample; in explicit mode the loop holds the mean while
  # `training_samples` draws the noisy samples from the same flag and key.
  noise_next = _noise_on(state.count + 1, config).astype(jnp.float32)
  updates = _next_parameters(views, layouts, params, next_key, noise_next, config, hp, treedef)
  new_state = EvonState(
      count=state.count + 1,
      skipped=state.skipped,
      key=next_key,
      sample_noise=noise_next,
      ess=jnp.asarray(hp.ess, jnp.float32),
      weight_decay=jnp.asarray(hp.weight_decay, jnp.float32),
      accumulator=accumulator,
      **_pack(views, frozen_means, treedef, layouts))
  return updates, new_state


def _all_finite(grads) -> jax.Array:
  leaves = [jnp.asarray(g) for g in jax.tree.leaves(grads)]
  checks = [jnp.all(jnp.isfinite(g)) for g in leaves if jnp.issubdtype(g.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def evon_transformation(config: EvonConfig, hp: EvonHyperparams, key) -> (
    optax.GradientTransformationExtraArgs):
  """Builds the EVON engine from validated settings (see `evon_jax.evon` for the user API)."""

  def init_fn(params):
    return _init_state(params, config, hp, key)

  def step_or_skip(grads, state, params):
    """A non-finite gradient skips the call: state and mean untouched, `skipped` counted."""

    def skip(operands):
      _, state, params = operands
      return (jax.tree.map(jnp.zeros_like, params),
              state._replace(skipped=state.skipped + 1))

    return jax.lax.cond(_all_finite(grads), lambda ops: _update(*ops, config, hp), skip,
                        (grads, state, params))

  # Compiled once per transformation: called eagerly, the update would otherwise retrace
  # its control flow on every call. Inside a user's jit this nested jit is simply inlined.
  compiled = jax.jit(step_or_skip)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(
          "evon_jax optimizers need `params` in update(grads, state, params): drop-in mode "
          "returns (next sample - params), explicit mode returns (new mean - params).")
    return compiled(updates, state, params)

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
  means = treedef.flatten_up_to(state.mean)
  layouts = [leaf_layout(m.shape, m.dtype, max_precond_dim=0, precondition_1d=False)
             for m in means]
  out = []
  for i, (layout, view, mean) in enumerate(zip(
      layouts, _unpack(state, treedef, layouts), means)):
    if view is None:
      out.append(jnp.broadcast_to(mean, (num_samples,) + mean.shape))
      continue
    normals = jnp.stack([_standard_normal(state.key, s, i, layout, view.mean.dtype)
                         for s in range(num_samples)])
    eigen = sample_eigen(view.mean, view.hessian, normals,
                         state.sample_noise.astype(view.mean.dtype), state.ess,
                         state.weight_decay)
    out.append(jnp.reshape(rotate_out(eigen, view.basis, "highest"),
                           (num_samples,) + mean.shape))
  return treedef.unflatten(out)
