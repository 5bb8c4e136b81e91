"""EVON: IVON in the Kronecker eigenbasis, as one optax transformation (IVON is its special case).

Cost model (per m x n leaf and step, mc_samples = 1): the mean is kept in eigen coordinates,
so a step needs exactly SOAP's three product pairs — the gradient rotated in, the factor
statistics, and one rotation out that produces the next posterior sample directly,
W = Q_L (M° + sqrt(V) z) Q_Rᵀ. The noise is never stored: z is regenerated from the key
that drew it. Refresh steps additionally re-express the momentum and the mean in the new basis.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from evon_jax import eigenbasis, ivon_step, noise, whitening
from evon_jax._gating import ema_coefficients, scale_if
from evon_jax._layout import (
    LeafLayout, as_view, from_view, state_dtype, tree_layouts)
from evon_jax.transforms._common import (
    all_finite, as_typed_key as _as_typed_key, check_tree as _check_tree,
    frozen_placeholder as _frozen_placeholder, join_hyperparams, leaf_names as _leaf_names,
    replica_mean as _replica_mean, sample_seeds as _sample_seeds, split_hyperparams,
    widest_float as _widest_float, zero_unless as _zero_unless)
from evon_jax.kronecker import (
    AxisBases, bases_to_storage, empty_bases, ema, factor_statistics, mean_factor_statistics,
    num_slots, rotate_in, rotate_out, storage_to_bases, stored_layouts_of)

FactorGradient = Literal["loss", "regularized"]
FactorStatistic = Literal["mean_gradient", "per_sample"]
ReplicaNoise = Literal["shared", "independent"]


class SampleStatistics(NamedTuple):
  """Monte-Carlo statistics of one leaf, averaged (or summed, while accumulating) over samples.

  Attributes:
    rotated_grad: g° = mean_s Q_Lᵀ G_s Q_R.
    normal_times_grad: mean_s z_s ⊙ G°_s (z_s the standard normal draw of sample s).
    factor_grad: mean gradient for the factor statistics (`factor_statistic='mean_gradient'`).
    factor_outer: mean per-sample statistics (`factor_statistic='per_sample'`), one per
      Kronecker axis.
  """

  rotated_grad: jax.Array
  normal_times_grad: jax.Array
  factor_grad: Optional[jax.Array]
  factor_outer: Optional[AxisBases]


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
    factors: Kronecker factors, one per axis: a tuple of params-shaped trees, tree k holding
      every leaf's k-th axis factor (ones((n,)) on identity axes, ones((1,)) past a leaf's
      last axis; see `kronecker`); `posterior.bases` gives the bases per leaf.
    bases: eigenbases Q_1, Q_2, … of the axes, stored like `factors`.
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
  momentum_dtype: Any = None
  rotation_precision: Any = "highest"
  axis_name: Any = None
  replica_noise: ReplicaNoise = "shared"
  stacked_dims: Any = None
  dimension_numbers: Any = None
  merge_dims: bool = False

  def layouts(self, tree) -> list[LeafLayout]:
    return tree_layouts(tree, max_precond_dim=self.max_precond_dim,
                        precondition_1d=self.precondition_1d, use_bases=self.use_bases,
                        stacked_dims=self.stacked_dims,
                        dimension_numbers=self.dimension_numbers, merge_dims=self.merge_dims)

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




def _standard_normal(seeds, leaf_index, layout: LeafLayout, dtype):
  """The draw z of one sample and leaf, reproducible from (key, sample, leaf).

  Always the fast 'hash' generator: `update` and `training_samples` must agree on it. The
  seeds come from one threefry call per sample, shared by all leaves (compile time grows
  with the number of threefry calls; ~4x on a 54-leaf model with one per leaf).
  """
  return noise.standard_normal_from_seeds(seeds, leaf_index, layout.view_shape, dtype)


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


class StepGates(NamedTuple):
  """Scalars that shape one call's step of every leaf (see `_gating`).

  Attributes:
    step: real-step index t (0 on the first call), for the bias correction.
    moments_on: momentum and mean move (not on the first call or a skipped one).
    hessian_on: H moves (also off in clean phases: no noise, no Price estimate).
    factors_on: the Kronecker factors take this call's statistics.
    refresh_kind: KEEP / POWER_QR / EIGH for this leaf.
    learning_rate: the step's learning rate.
    finite: the call's gradients are finite (else its factor statistic is zeroed).
  """

  step: jax.Array
  moments_on: jax.Array
  hessian_on: jax.Array
  factors_on: jax.Array
  refresh_kind: jax.Array
  learning_rate: Any
  finite: jax.Array


def _leaf_step(leaf, stats: SampleStatistics, layout, config, hp, gates: StepGates):
  """One real step of one leaf: eigenspace IVON, factor EMA, maybe a basis refresh.

  Every buffer is gated by scalar coefficients, never by an array select, so a gated-off
  buffer comes back bit-identical and the whole update stays one fused pass.
  """
  mean, momentum, hessian, factors, basis = leaf
  b1_keep, b1_take = ema_coefficients(hp.b1, gates.moments_on)
  b2_keep, b2_take = ema_coefficients(hp.b2, gates.hessian_on)

  estimate = ivon_step.price_hessian_estimate(
      stats.normal_times_grad, hessian, hp.ess, hp.weight_decay)
  if config.clip_hessian:
    estimate = ivon_step.clip_hessian_estimate(estimate, hessian, hp.hess_clip_ratio, hp.eps)
  new_hessian = ivon_step.ivon_hessian_update(
      hessian, estimate, b2_keep, hp.weight_decay, one_minus_b2=b2_take)
  new_momentum = b1_keep * momentum + b1_take * stats.rotated_grad
  bias_correction = 1 - hp.b1 ** jnp.maximum(gates.step, 1)
  direction = ivon_step.ivon_direction(
      new_momentum, bias_correction, mean, new_hessian, hp.weight_decay, hp.eps)
  if config.clip_update:
    direction = jnp.clip(direction, -hp.clip_radius, hp.clip_radius)
  if config.whiten:
    direction = whitening.whiten(direction, layout)
  new_mean = mean - scale_if(gates.learning_rate, gates.moments_on) * direction
  mean, momentum, hessian = (new.astype(old.dtype) for new, old in (
      (new_mean, mean), (new_momentum, momentum), (new_hessian, hessian)))

  if stats.factor_outer is not None:
    statistic = stats.factor_outer
  else:
    statistic = _zero_unless(gates.finite, factor_statistics(stats.factor_grad, layout))
  factors = ema(factors, statistic, *ema_coefficients(hp.shampoo_b, gates.factors_on))
  factors = jax.tree.map(lambda new, old: new.astype(old.dtype), factors, leaf[3])
  basis, (momentum, mean) = eigenbasis.refresh(
      gates.refresh_kind, factors, basis, (momentum, mean))
  return mean, momentum, hessian, factors, basis


# ----------------------------------------------------------------------------- the transformation


def _validate_grads_shape(grad, layout, config, leaf_name):
  """Grads are (k, *shape) in explicit mode (k = mc_samples), else the leaf's own shape."""
  expected = layout.shape
  if not config.drop_in:
    stacked = (config.mc_samples,) + layout.shape
    if tuple(grad.shape) == stacked:
      return jnp.reshape(grad, (config.mc_samples,) + layout.view_shape)
    if config.mc_samples == 1 and tuple(grad.shape) == expected:
      return jnp.reshape(grad, (1,) + layout.view_shape)
    raise ValueError(
        f"Leaf {leaf_name}: explicit mode (drop_in=False) expects gradients of shape "
        f"{stacked} (one per training sample), got {tuple(grad.shape)}.")
  if tuple(grad.shape) != expected:
    raise ValueError(
        f"Leaf {leaf_name}: gradient shape {tuple(grad.shape)} does not match the parameter "
        f"shape {expected} the optimizer was initialised with.")
  return jnp.reshape(grad, (1,) + layout.view_shape)


class _Leaf(NamedTuple):
  """One trainable leaf's posterior in its Kronecker view (eigen coordinates)."""

  mean: jax.Array
  momentum: jax.Array
  hessian: jax.Array
  factors: AxisBases
  basis: AxisBases








# ----------------------------------------------------------------------------- state <-> leaves


def _unpack(state: EvonState, treedef, layouts) -> list[Optional[_Leaf]]:
  """Per-leaf Kronecker views of the state; None for frozen leaves."""
  columns = zip(
      treedef.flatten_up_to(state.mean), treedef.flatten_up_to(state.momentum),
      treedef.flatten_up_to(state.hessian), storage_to_bases(state.factors, treedef, layouts),
      storage_to_bases(state.bases, treedef, layouts))
  return [
      _Leaf(as_view(m, layout), as_view(g, layout), as_view(h, layout), f, q)
      if layout.trainable else None
      for layout, (m, g, h, f, q) in zip(layouts, columns)]


def _statistics_dtypes(leaves, config) -> list:
  """Per leaf, the dtype of its statistics (the frozen leaves' placeholders included)."""
  fallback = state_dtype(jnp.float32, config.dtype)
  return [fallback if leaf is None else leaf.hessian.dtype for leaf in leaves]


def _pack(leaves, frozen_means, treedef, layouts, config):
  """The state fields (mean, momentum, hessian, factors, bases) from per-leaf views."""
  dtypes = _statistics_dtypes(leaves, config)

  def field(get, frozen):
    return treedef.unflatten([
        from_view(get(leaf), layout) if layout.trainable else frozen(i)
        for i, (leaf, layout) in enumerate(zip(leaves, layouts))])

  slots = num_slots(layouts)
  per_axis = lambda get: bases_to_storage(
      [get(leaf) if leaf is not None else () for leaf in leaves], layouts, treedef, slots,
      dtypes)
  return dict(
      mean=field(lambda l: l.mean, lambda i: frozen_means[i]),
      momentum=field(lambda l: l.momentum, lambda i: _frozen_placeholder(dtypes[i])),
      hessian=field(lambda l: l.hessian, lambda i: _frozen_placeholder(dtypes[i])),
      factors=per_axis(lambda l: l.factors),
      bases=per_axis(lambda l: l.basis))


def _statistics_to_storage(stats, treedef, layouts) -> SampleStatistics:
  """Per-leaf SampleStatistics (None for frozen leaves) -> SampleStatistics of trees."""
  first = next(s for s in stats if s is not None)
  dtypes = [first.rotated_grad.dtype if s is None else s.rotated_grad.dtype for s in stats]
  arrays = lambda get: treedef.unflatten(
      [_frozen_placeholder(d) if s is None else get(s) for s, d in zip(stats, dtypes)])
  return SampleStatistics(
      rotated_grad=arrays(lambda s: s.rotated_grad),
      normal_times_grad=arrays(lambda s: s.normal_times_grad),
      factor_grad=None if first.factor_grad is None else arrays(lambda s: s.factor_grad),
      factor_outer=None if first.factor_outer is None else bases_to_storage(
          [() if s is None else s.factor_outer for s in stats], layouts, treedef,
          num_slots(layouts), dtypes))


def _storage_to_statistics(stored: SampleStatistics, treedef, layouts):
  columns = [treedef.flatten_up_to(stored.rotated_grad),
             treedef.flatten_up_to(stored.normal_times_grad)]
  factor_grads = (treedef.flatten_up_to(stored.factor_grad)
                  if stored.factor_grad is not None else [None] * len(layouts))
  outers = (storage_to_bases(stored.factor_outer, treedef, layouts)
            if stored.factor_outer is not None else [None] * len(layouts))
  return [SampleStatistics(r, z, g, o) if layout.trainable else None
          for layout, r, z, g, o in zip(layouts, *columns, factor_grads, outers)]


# ----------------------------------------------------------------------------- init


def _init_state(params, config: EvonConfig, hp: EvonHyperparams, key) -> EvonState:
  leaves, treedef = jax.tree.flatten(params)
  leaves = [jnp.asarray(leaf) for leaf in leaves]
  layouts = config.layouts(treedef.unflatten(leaves))
  views, accumulators = [], []
  for leaf, layout in zip(leaves, layouts):
    if not layout.trainable:
      views.append(None)
      accumulators.append(None)
      continue
    dtype = state_dtype(leaf.dtype, config.dtype)
    zeros = jnp.zeros(layout.view_shape, dtype)
    views.append(_Leaf(
        # A copy: a mean that aliased the params buffer would break buffer donation.
        mean=jnp.array(as_view(leaf, layout), dtype=dtype, copy=True),
        momentum=zeros if config.momentum_dtype is None else zeros.astype(
            config.momentum_dtype),
        hessian=jnp.full(layout.view_shape, hp.hess_init, dtype),
        factors=empty_bases(layout, dtype, "zeros"),
        basis=empty_bases(layout, dtype, "eye")))
    per_sample = config.factor_statistic == "per_sample"
    accumulators.append(SampleStatistics(
        rotated_grad=zeros, normal_times_grad=zeros,
        factor_grad=None if per_sample else zeros,
        factor_outer=empty_bases(layout, dtype, "zeros") if per_sample else None))
  accumulate = config.drop_in and config.mc_samples > 1 and any(l.trainable for l in layouts)
  return EvonState(
      count=jnp.zeros([], jnp.int32),
      skipped=jnp.zeros([], jnp.int32),
      key=_as_typed_key(key),
      sample_noise=jnp.zeros([], jnp.float32),
      ess=jnp.asarray(hp.ess, _widest_float()),
      weight_decay=jnp.asarray(hp.weight_decay, _widest_float()),
      accumulator=(_statistics_to_storage(accumulators, treedef, layouts) if accumulate
                   else None),
      **_pack(views, leaves, treedef, layouts, config))




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


def _first_sample(config: EvonConfig, per_call: int):
  """Index of this replica's first sample under the key: replica r of an 'independent' run
  draws samples r·k … r·k+k-1 (k per call), which are exactly the samples a single-device
  explicit-mode run with mc_samples = replicas·k draws; otherwise 0 (shared samples)."""
  if config.axis_name is not None and config.replica_noise == "independent":
    return jax.lax.axis_index(config.axis_name) * per_call
  return 0


def _call_statistics(grads, params, state, views, layouts, config, hp, finite):
  """Monte-Carlo statistics of this call's gradient(s), per leaf (None when frozen).

  The statistics of a call that is skipped (`finite` False) are replaced by zeros, so that
  the gated-off step multiplies finite numbers by zero and leaves the state exact. The
  select is applied to the statistics, not to the gradient: there it fuses into the
  elementwise update that reads them, while a select on the gradient would be a pass of
  its own (its consumer is a matrix product, which XLA does not fuse into).
  """
  treedef = jax.tree.structure(state.mean)
  per_call = 1 if config.drop_in else config.mc_samples
  shared = config.axis_name is not None and config.replica_noise == "shared"
  if shared:
    # One sample on every replica: every statistic is linear in the gradient (the factor
    # outer products are those of the global gradient, as on one device), so averaging the
    # gradient once costs a third of the traffic of averaging the three statistics.
    grads = _replica_mean(grads, config.axis_name)
  seeds = _sample_seeds(state.key, per_call, _first_sample(config, per_call))
  names = _leaf_names(state.mean)
  stats = []
  for i, (layout, view, grad, param) in enumerate(zip(
      layouts, views, treedef.flatten_up_to(grads), treedef.flatten_up_to(params))):
    if view is None:
      stats.append(None)
      continue
    dtype = view.mean.dtype
    grad_stack = _validate_grads_shape(
        jnp.asarray(grad), layout, config, names[i]).astype(dtype)
    normals = jnp.stack([
        _standard_normal(seeds[s], i, layout, dtype) for s in range(grad_stack.shape[0])
    ]) * state.sample_noise.astype(dtype)
    thetas = None
    if config.factor_gradient == "regularized":
      if config.drop_in:  # the loop holds the sample itself
        thetas = as_view(jnp.asarray(param), layout).astype(dtype)[None]
      else:
        thetas = rotate_out(
            sample_eigen(view.mean, view.hessian, normals, 1.0, hp.ess, hp.weight_decay),
            view.basis, config.rotation_precision)
    stats.append(_leaf_statistics(
        grad_stack, thetas, normals, view.basis, layout, config, hp.weight_decay))
  if config.axis_name is not None and not shared:  # each replica's own sample
    stats = _replica_mean(stats, config.axis_name)
  # The factor gradient feeds a product (G Gᵀ): its statistic is cleaned in `_leaf_step`.
  return [None if st is None else st._replace(
      rotated_grad=_zero_unless(finite, st.rotated_grad),
      normal_times_grad=_zero_unless(finite, st.normal_times_grad),
      factor_outer=_zero_unless(finite, st.factor_outer)) for st in stats]








def _accumulate(stats, state, treedef, layouts, config, finite):
  """Adds this call's statistics to the step's running sums (drop-in, mc_samples > 1).

  Returns the statistics to step with (sums / k), whether this call completes a step, and
  the accumulator to carry (zeroed after a completed step). The first call stands alone.
  A skipped call (`finite` False) adds nothing and completes nothing.
  """
  k = config.mc_samples
  previous = _storage_to_statistics(state.accumulator, treedef, layouts)
  sums = [None if s is None else jax.tree.map(jnp.add, a, _zero_unless(finite, s))
          for s, a in zip(stats, previous)]
  is_first = state.count == 0
  complete = finite & (is_first | ((state.count - 1) % k == k - 1))
  divisor = jnp.where(is_first, 1.0, float(k))
  averaged = [None if s is None else jax.tree.map(lambda x: x / divisor, s) for s in sums]
  keep = 1.0 - complete.astype(jnp.float32)
  carried = [None if s is None else jax.tree.map(lambda x: keep.astype(x.dtype) * x, s)
             for s in sums]
  return averaged, complete, _statistics_to_storage(carried, treedef, layouts)


def _step_leaves(views, stats, layouts, count, active, config, hp):
  """One real step for every trainable leaf, gated by `active` (False: a skipped call).

  The first call only sets factors and bases.
  """
  is_first = count == 0
  step = jnp.where(is_first, 0, _real_step(jnp.maximum(count, 1), config))
  noisy_step = _noise_on(count, config)
  lr = _learning_rate(hp, jnp.maximum(step, 1), config)
  moments_on = active & ~is_first
  new_views = []
  for i, (layout, view, s) in enumerate(zip(layouts, views, stats)):
    if view is None:
      new_views.append(None)
      continue
    kind = eigenbasis.refresh_kind(
        is_first, step, config.precondition_frequency, config.refresh_offset(i),
        config.refresh_method)
    kind = jnp.where(active, kind, eigenbasis.KEEP)
    factors_on = active
    if config.phasing:  # noisy phases update the factors only when a refresh needs them
      factors_on = active & (is_first | (~noisy_step) | (kind != eigenbasis.KEEP))
    gates = StepGates(step=step, moments_on=moments_on, hessian_on=moments_on & noisy_step,
                      factors_on=factors_on, refresh_kind=kind, learning_rate=lr,
                      finite=active)
    new_views.append(_Leaf(*_leaf_step(tuple(view), s, layout, config, hp, gates)))
  return new_views


def _next_parameters(views, layouts, params, key, noise_scale, config, hp, treedef, moved):
  """Updates that move the loop's params to the next sample (drop-in) or to the mean.

  `moved` (0 or 1) scales the updates: a skipped call returns exact zeros.
  """
  seeds = _sample_seeds(key, 1, _first_sample(config, 1))[0]
  updates = []
  for i, (layout, view, param) in enumerate(zip(
      layouts, views, treedef.flatten_up_to(params))):
    param = jnp.asarray(param)
    if view is None:
      updates.append(jnp.zeros_like(param))
      continue
    eigen = view.mean
    if config.drop_in:
      normal = _standard_normal(seeds, i, layout, eigen.dtype)
      eigen = sample_eigen(eigen, view.hessian, normal, noise_scale.astype(eigen.dtype),
                           hp.ess, hp.weight_decay)
    target = from_view(rotate_out(eigen, view.basis, config.rotation_precision), layout)
    updates.append((target.astype(param.dtype) - param) * moved.astype(param.dtype))
  return treedef.unflatten(updates)




def _update(grads, state: EvonState, params, config: EvonConfig, hp: EvonHyperparams):
  """One call. A non-finite gradient skips it: state and mean bit-identical, the updates
  exactly zero, `skipped` counted. The skip is gated by scalars, not a `lax.cond` around
  the step, which would make XLA copy the whole state on every call."""
  treedef = jax.tree.structure(state.mean)
  frozen_means = treedef.flatten_up_to(state.mean)
  layouts = config.layouts(state.mean)
  views = _unpack(state, treedef, layouts)
  finite = all_finite(grads, config.axis_name)
  stats = _call_statistics(grads, params, state, views, layouts, config, hp, finite)

  accumulator = None
  if config.drop_in and config.mc_samples > 1 and state.accumulator is not None:
    stats, complete, accumulator = _accumulate(stats, state, treedef, layouts, config, finite)
    # Only one call in mc_samples steps: a cond here saves the step's work on the others.
    views = jax.lax.cond(
        complete, lambda v: _step_leaves(v, stats, layouts, state.count, complete, config, hp),
        lambda v: v, views)
  else:
    views = _step_leaves(views, stats, layouts, state.count, finite, config, hp)

  count = state.count + finite.astype(state.count.dtype)
  key = jax.lax.select(finite, jax.random.split(state.key)[0], state.key)
  # Noise flag of the next call's sample; in explicit mode the loop holds the mean while
  # `training_samples` draws the noisy samples from the same flag and key.
  sample_noise = jnp.where(finite, _noise_on(count, config).astype(jnp.float32),
                           state.sample_noise)
  updates = _next_parameters(views, layouts, params, key, sample_noise, config, hp, treedef,
                             finite.astype(jnp.float32))
  new_state = EvonState(
      count=count,
      skipped=state.skipped + (~finite).astype(state.skipped.dtype),
      key=key,
      sample_noise=sample_noise,
      ess=jnp.asarray(hp.ess, _widest_float()),
      weight_decay=jnp.asarray(hp.weight_decay, _widest_float()),
      accumulator=accumulator,
      **_pack(views, frozen_means, treedef, layouts, config))
  return updates, new_state








@functools.partial(jax.jit, static_argnames=("config", "static_hp"))
def _compiled_update(grads, state, params, traced_hp, *, config, static_hp):
  """`_update` compiled once per (settings, static hyperparameters, shapes), module-wide.

  The cache is keyed on values, not on a transformation object: `optax.inject_hyperparams`
  rebuilds the transformation on every call and a notebook may rebuild it per cell, and
  neither recompiles (a jit made per transformation would). Inside a user's `jit` this is
  inlined.
  """
  hp = join_hyperparams(EvonHyperparams, static_hp, traced_hp)
  return _update(grads, state, params, config, hp)


def evon_transformation(config: EvonConfig, hp: EvonHyperparams, key) -> (
    optax.GradientTransformationExtraArgs):
  """Builds the EVON engine from validated settings (see `evon_jax.evon` for the user API)."""

  def init_fn(params):
    return _init_state(params, config, hp, key)

  static_hp, traced_hp = split_hyperparams(hp)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(
          "evon_jax optimizers need `params` in update(grads, state, params): drop-in mode "
          "returns (next sample - params), explicit mode returns (new mean - params).")
    _check_tree("gradient", updates, state.mean)
    _check_tree("params", params, state.mean, compare_shapes=True)
    if config.axis_name is not None:  # collectives need the caller's mapped axis: no jit
      return _update(updates, state, params, config, hp)
    return _compiled_update(updates, state, params, traced_hp, config=config,
                            static_hp=static_hp)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)






def stored_layouts(state: EvonState) -> list[LeafLayout]:
  """Leaf layouts as the state records them (see `kronecker.stored_layout`)."""
  treedef = jax.tree.structure(state.mean)
  return stored_layouts_of(treedef.flatten_up_to(state.mean), state.bases, treedef)


def training_samples(opt_state, num_samples: int = 1, *, axis_name=None) -> Any:
  """The parameters at which explicit mode (`drop_in=False`) expects the next gradients.

  Returns a params-shaped pytree with a leading axis of size `num_samples` (pass the
  optimizer's `mc_samples`; `update` checks the gradients' leading axis): the mean on the
  first call (the reference initialises its bases from a gradient at the mean), posterior
  samples afterwards, drawn from the state's key so `update` regenerates the same noise.
  Take gradients with `jax.vmap(jax.grad(loss), in_axes=(0, None))(samples, batch)`.
  With `replica_noise='independent'`, call it inside the mapped computation and pass the
  optimizer's `axis_name`, so each replica draws (and `update` regenerates) its own noise.
  """
  from evon_jax import transforms  # local imports: avoid a cycle at load
  from evon_jax._state_search import find_state
  state = find_state(opt_state, (EvonState, transforms.InjectNoiseState))
  if isinstance(state, transforms.InjectNoiseState):  # a composition of the pieces
    return transforms.training_samples(state, num_samples, axis_name=axis_name)
  treedef = jax.tree.structure(state.mean)
  means = treedef.flatten_up_to(state.mean)
  layouts = stored_layouts(state)
  first = 0
  if axis_name is not None:
    first = _first_sample(
        EvonConfig(axis_name=axis_name, replica_noise="independent"), num_samples)
  seeds = _sample_seeds(state.key, num_samples, first)
  out = []
  for i, (layout, view, mean) in enumerate(zip(
      layouts, _unpack(state, treedef, layouts), means)):
    if view is None:
      out.append(jnp.broadcast_to(mean, (num_samples,) + mean.shape))
      continue
    normals = jnp.stack([_standard_normal(seeds[s], i, layout, view.mean.dtype)
                         for s in range(num_samples)])
    eigen = sample_eigen(view.mean, view.hessian, normals,
                         state.sample_noise.astype(view.mean.dtype), state.ess,
                         state.weight_decay)
    out.append(jnp.reshape(rotate_out(eigen, view.basis, "highest"),
                           (num_samples,) + mean.shape))
  return treedef.unflatten(out)
