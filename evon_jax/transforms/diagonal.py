"""The diagonal methods in eigen coordinates: IVON (a Gaussian posterior) here, Adam in
`transforms.adam`.

Given the gradients rotated into an eigenbasis (by `eigenbasis_refresh`), or plain gradients
(identity basis), each keeps its buffers in those coordinates and returns the move of its
mean (IVON) or its direction (Adam) in the same coordinates. `eigen_fields` names the state
buffers whose parameter-space value must survive a change of basis (the refresh re-expresses
them); the second moments (H, nu) stay in place, as SOAP does.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from evon_jax.maths import ivon_update as ivon_step, prior as prior_maths, whitening
from evon_jax.readout.bubble import SoapBubble
from evon_jax.maths.gates import ema_coefficients, scale_if
from evon_jax.maths.layout import (
    as_view, diagonal_layouts as _diagonal_layouts, elementwise_layout, from_view, state_dtype)
from evon_jax import _validation as check
from evon_jax.transforms import _protocol as protocol, _prior
from evon_jax.transforms._common import (
    frozen_placeholder, join_hyperparams, replica_mean, split_hyperparams, widest_float,
    zero_unless)


# ----------------------------------------------------------------------------- IVON


class IvonHyperparams(NamedTuple):
  learning_rate: Any
  ess: Any
  hess_init: Any
  b1: Any
  b2: Any
  eps: Any
  weight_decay: Any
  hess_clip_ratio: Any
  clip_radius: Any


class EigenspaceIvonState(NamedTuple):
  """State of `eigenspace_ivon`: a diagonal Gaussian in the coordinates it is handed.

  Attributes:
    count: steps taken (the mean moved).
    mean: posterior mean M° (parameter shapes; a frozen leaf keeps its value).
    momentum: gradient momentum Ḡ.
    hessian: diagonal Hessian estimate H.
    ess: effective sample size of the last call (read by the posterior).
    weight_decay: the isotropic prior precision per example δ of the last call.
    prior: the structured prior N(m₀, P₀⁻¹) (`eigenspace_ivon(prior=...)`, a
      `maths.prior.PriorState` in the prior's own eigen coordinates), or None.
  """

  count: jax.Array
  mean: Any
  momentum: Any
  hessian: Any
  ess: jax.Array
  weight_decay: jax.Array
  prior: Any = None

  def bubble(self, bases: tuple = ()) -> SoapBubble:
    """The posterior in the coordinates it was handed: `bases` (stored per axis slot, as
    `eigenbasis_refresh` keeps them), or () for the parameters' own.

    Without a structured prior its δ is the scalar weight decay; with one, δ is per
    coordinate: ``diag(Qᵀ P₀ Q)/ess + weight_decay`` in these bases (`maths.prior`)."""
    weight_decay = self.weight_decay
    if self.prior is not None:
      weight_decay = self._prior_precision()
    return SoapBubble(self.mean, self.hessian, (), bases, self.ess, weight_decay)

  def _prior_precision(self):
    """δ per coordinate: the cached diag(Qᵀ P₀ Q) over ess, plus the weight decay."""
    treedef = jax.tree.structure(self.mean)
    out = []
    for mean, hessian, seen in zip(treedef.flatten_up_to(self.mean),
                                   treedef.flatten_up_to(self.hessian),
                                   treedef.flatten_up_to(self.prior.seen)):
      if not elementwise_layout(jnp.shape(mean), jnp.result_type(mean)).trainable:
        out.append(self.weight_decay)
        continue
      out.append((seen / self.ess + self.weight_decay).astype(hessian.dtype))
    return treedef.unflatten(out)


# The buffers `eigenbasis_refresh` re-expresses when the basis changes (a NamedTuple cannot
# declare a class attribute in its body).
EigenspaceIvonState.eigen_fields = ("mean", "momentum")
# Per-coordinate buffers a sorting refresh permutes with the basis columns.
EigenspaceIvonState.sorted_fields = ("hessian",)


@dataclasses.dataclass(frozen=True)
class IvonSpec(protocol.Spec):
  diagonal = True   # class attributes (not fields): what may wrap this piece
  posterior = True
  static_hp: tuple
  whiten: bool = False
  rescale_lr: bool = False
  clip_hessian: bool = False
  clip_update: bool = False
  hessian_baseline: Any = "momentum"
  dtype: Any = None
  momentum_dtype: Any = None
  has_prior: bool = False
  # The prior's arrays, read by `init` only (the state keeps them from then on): left out
  # of the spec's hash and equality, so a new prior of the same shapes compiles nothing new.
  prior: Any = dataclasses.field(default=None, compare=False, hash=False, repr=False)

  def hyperparams(self, traced) -> IvonHyperparams:
    return join_hyperparams(IvonHyperparams, self.static_hp, traced)

  def for_apply(self):
    return dataclasses.replace(self, prior=None) if self.prior is not None else self

  def prior_leaves(self, state, layouts, treedef) -> list:
    """Per leaf the structured prior in the view of `layouts` (None without one)."""
    return prior_maths.leaf_priors(state.prior, layouts, treedef)

  def rebase(self, state, layouts, treedef, bases, changed):
    """The state with its prior's cache recomputed where a leaf's bases `changed`
    (`eigenbasis_refresh` calls it after a refresh; nothing without a prior)."""
    if state.prior is None:
      return state
    return state._replace(prior=prior_maths.rebased(state.prior, layouts, treedef, bases,
                                                    changed))

  def init(self, params, traced, layouts=None):
    hp = self.hyperparams(traced)
    leaves, treedef = jax.tree.flatten(params)
    leaves = [jnp.asarray(leaf) for leaf in leaves]
    layouts = layouts or _diagonal_layouts(treedef.unflatten(leaves))
    means, momenta, hessians = [], [], []
    for leaf, layout in zip(leaves, layouts):
      dtype = state_dtype(leaf.dtype, self.dtype)
      if not layout.trainable:
        means.append(jnp.array(leaf, copy=True))  # never the params' own buffer (donation)
        momenta.append(frozen_placeholder(dtype))
        hessians.append(frozen_placeholder(dtype))
        continue
      # A copy: a mean that aliased the params buffer would break buffer donation.
      means.append(jnp.array(leaf, dtype=dtype, copy=True))
      momenta.append(jnp.zeros(leaf.shape, self.momentum_dtype or dtype))
      hessians.append(jnp.full(leaf.shape, hp.hess_init, dtype))
    params = treedef.unflatten(leaves)
    return EigenspaceIvonState(
        count=jnp.zeros([], jnp.int32), mean=treedef.unflatten(means),
        momentum=treedef.unflatten(momenta), hessian=treedef.unflatten(hessians),
        ess=jnp.asarray(hp.ess, widest_float()),
        weight_decay=jnp.asarray(hp.weight_decay, widest_float()),
        prior=_prior.prior_state(self.prior, params, layouts, self.dtype)
        if self.has_prior else None)

  def _learning_rate(self, hp, t):
    lr = hp.learning_rate(t - 1) if callable(hp.learning_rate) else hp.learning_rate
    if self.rescale_lr:
      lr = lr * (hp.hess_init + hp.weight_decay)
    return lr

  def _prior_terms(self, mean, prior, hp):
    """(δ, the prior's gradient) per example in these coordinates: the isotropic δ and δ M°,
    plus a structured prior's diag(Qᵀ P₀ Q)/ess and Qᵀ P₀ (M − m₀)/ess (`maths.prior`)."""
    precision, gradient = hp.weight_decay, hp.weight_decay * mean
    if prior is None:
      return precision, gradient
    diagonal, structured = prior_maths.leaf_terms(mean, prior, hp.ess)
    return diagonal + precision, structured + gradient

  def _leaf(self, record, mean, momentum, hessian, layout, hp, gates, lr, t, replica_axis,
            prior=None):
    """One leaf's IVON step; every buffer gated by scalar coefficients (see `maths.gates`)."""
    prior_precision, prior_gradient = self._prior_terms(mean, prior, hp)
    grad = jnp.mean(record.grads, axis=0)
    normal_times_grad = jnp.mean(record.normals * record.grads, axis=0)
    if self.hessian_baseline == "momentum":
      # Control variate: z is independent of the momentum (earlier steps' gradients), so
      # mean_s(z_s (G_s - b)) has the same mean as mean_s(z_s G_s) without its g(M)² term.
      baseline = ivon_step.momentum_baseline(momentum, hp.b1, t)
      normal_times_grad = normal_times_grad - jnp.mean(record.normals, axis=0) * baseline
    grad, normal_times_grad = zero_unless(
        gates.active, replica_mean((grad, normal_times_grad), replica_axis))
    moments_on = gates.active & ~gates.first
    b1_keep, b1_take = ema_coefficients(hp.b1, moments_on)
    b2_keep, b2_take = ema_coefficients(hp.b2, moments_on & gates.noisy)
    estimate = ivon_step.price_hessian_estimate(
        normal_times_grad, hessian, hp.ess, prior_precision)
    if self.clip_hessian:
      estimate = ivon_step.clip_hessian_estimate(estimate, hessian, hp.hess_clip_ratio, hp.eps)
    new_hessian = ivon_step.ivon_hessian_update(
        hessian, estimate, b2_keep, prior_precision, one_minus_b2=b2_take)
    new_momentum = b1_keep * momentum + b1_take * grad
    direction = ivon_step.ivon_direction(
        new_momentum, 1 - hp.b1 ** t, mean, new_hessian, prior_precision, hp.eps,
        prior_gradient=prior_gradient)
    if self.clip_update:
      direction = jnp.clip(direction, -hp.clip_radius, hp.clip_radius)
    if self.whiten:
      direction = whitening.whiten(direction, layout)
    new_mean = (mean - scale_if(lr, moments_on) * direction).astype(mean.dtype)
    return (new_mean - mean, new_mean, new_momentum.astype(momentum.dtype),
            new_hessian.astype(hessian.dtype))

  def apply(self, updates, state, params, traced):
    hp = self.hyperparams(traced)
    message, plain = protocol.as_message(updates, params, _diagonal_layouts, state.mean)
    treedef = jax.tree.structure(state.mean)
    gates = message.gates
    t = state.count + 1
    lr = self._learning_rate(hp, t)
    outs, means, momenta, hessians = [], [], [], []
    priors = self.prior_leaves(state, message.layouts, treedef)
    for record, layout, mean, momentum, hessian, prior in zip(
        message.leaves, message.layouts, *protocol.fields(state, ("mean", "momentum", "hessian"),
                                                  treedef), priors):
      if record is None:
        outs.append(None), means.append(mean), momenta.append(momentum)
        hessians.append(hessian)
        continue
      view = lambda x: as_view(x, layout)
      move, mean, momentum, hessian = self._leaf(
          record, view(mean), view(momentum), view(hessian), layout, hp, gates, lr, t,
          message.replica_axis, prior)
      outs.append(move)
      means.append(from_view(mean, layout)), momenta.append(from_view(momentum, layout))
      hessians.append(from_view(hessian, layout))
    moved = gates.active & ~gates.first
    new_state = EigenspaceIvonState(
        count=state.count + moved.astype(state.count.dtype), mean=treedef.unflatten(means),
        momentum=treedef.unflatten(momenta), hessian=treedef.unflatten(hessians),
        ess=jnp.asarray(hp.ess, widest_float()),
        weight_decay=jnp.asarray(hp.weight_decay, widest_float()), prior=state.prior)
    return protocol.outputs(outs, updates, message.layouts, plain), new_state


def eigenspace_ivon(
    learning_rate,
    *,
    ess,
    hess_init: float = 1.0,
    b1: float = 0.95,
    b2: float = 0.9999,
    eps: float = 1e-10,
    weight_decay=None,
    hess_clip_ratio=None,
    clip_radius: float = float("inf"),
    whiten: bool = False,
    rescale_lr: bool = False,
    hessian_baseline="momentum",
    dtype=None,
    momentum_dtype=None,
    prior=None,
) -> protocol.PieceTransformation:
  r"""IVON's update of a diagonal Gaussian, in whatever coordinates it is handed.

  Per coordinate, with the gradients G_s of the step's samples and their draws z_s:
  ``ĥ = mean_s(z_s (G_s - b)) sqrt(ess (H+δ))`` (Price, with the baseline ``b`` the
  bias-corrected momentum of the earlier steps, or 0), ``Ḡ ← b1 Ḡ + (1-b1) mean_s G_s``,
  ``H ← b2 H + (1-b2) ĥ + ½(1-b2)²(H-ĥ)²/(H+δ)``,
  ``M ← M - lr (Ḡ/(1-b1ᵗ) + δ M)/(H + δ + eps)`` (the direction clipped to ``clip_radius``,
  Newton–Schulz whitened per leaf when ``whiten``). The posterior is
  ``N(M, 1/(ess (H + δ)))``. The first call of a composition (gates.first) and calls whose
  samples carry no noise leave H alone.

  Inside `eigenbasis_refresh` the coordinates are the eigenbasis (EVON); inside
  `inject_noise` alone they are the parameters' own (IVON). Used on its own, with plain
  gradients, it is a noise-free natural-gradient step at the mean (H stays at ``hess_init``).

  Args:
    learning_rate: a float or a schedule ``step -> lr`` (step counts from 0).
    ess: effective sample size (the training-set size for a tempered-free posterior).
    hess_init: initial H (default 1.0).
    b1, b2: momentum and Hessian decay.
    eps: added to the denominator of the direction.
    weight_decay: δ, the isotropic prior precision per example (prior N(0, 1/(ess δ) I));
      default 1e-4, or 0 with a `prior` (which then is the whole prior).
    hess_clip_ratio: if set, ĥ is clipped to ±ratio (H + eps).
    clip_radius: elementwise clipping of the direction (inf: none).
    whiten: Newton–Schulz-whiten the direction of matrix leaves (L2 for vectors).
    rescale_lr: multiply the learning rate by ``hess_init + weight_decay`` (IVON's
      convention; the scalar weight decay only, not a structured prior's precision).
    hessian_baseline: 'momentum' (default) subtracts ``b = Ḡ/(1-b1^(t-1))`` from the
      gradients in the Price estimate. The draw z is independent of the earlier steps, so ĥ
      keeps its mean (the expected Hessian) and loses the ``g(M)² ess (H+δ)`` part of its
      variance, which far from an optimum, at a large ess, drives IVON's correction
      ``½(1-b2)²(H-ĥ)²/(H+δ)`` to inflate H until the step stalls. None: the reference's
      estimate ``mean_s(z_s G_s) sqrt(ess (H+δ))``.
    dtype, momentum_dtype: dtypes of the statistics and of the momentum (see `evon`).
    prior: a Gaussian prior N(m₀, P₀⁻¹) given as a `SoapBubble` (or an EVON/IVON state,
      whose posterior it takes), e.g. the posterior of the previous task:
      ``P₀ = Q₀ diag(ess₀ (H₀ + δ₀)) Q₀ᵀ``, ``m₀ = Q₀ m₀°`` in its own bases Q₀. It enters
      the step exactly through its gradient, ``(Ḡ/(1-b1ᵗ) + Qᵀ P₀ (M − m₀)/ess + δ M°)``
      in the numerator, and through its diagonal in the current basis,
      ``δ° = diag(Qᵀ P₀ Q)/ess + δ``, wherever the isotropic case has δ (the denominator,
      the Price estimate, H's update and the posterior ``1/(ess (H + δ°))``): exact when Q
      diagonalises the whole posterior precision, and ``ess₀ (H₀+δ₀)/ess`` when Q = Q₀
      (docs/algorithm.md, "A structured prior"). A non-zero `weight_decay` multiplies in
      the isotropic prior as well. The prior's arrays are copied into the state at `init`;
      its axes must match this run's (or either side have no bases). Memory: the state
      gains three params-shaped buffers (m₀°, π₀ and the cached diagonal) and two sets of
      Kronecker matrices (Q₀ and the transitions Qᵀ Q₀).

  Returns:
    An optax transformation (`PieceTransformation`) whose update is the move of the mean.
  """
  check.check_learning_rate(learning_rate)
  check.check_positive("ess", ess)
  check.check_positive("hess_init", hess_init)
  check.check_beta("b1", b1)
  check.check_beta("b2", b2)
  check.check_non_negative("eps", eps)
  if prior is not None:
    prior = _prior.as_bubble(prior)
  weight_decay = default_weight_decay(weight_decay, prior)
  check.check_non_negative("weight_decay", weight_decay)
  if hess_clip_ratio is not None:
    check.check_positive("hess_clip_ratio", hess_clip_ratio)
  check.check_non_negative("clip_radius", clip_radius, allow_inf=True)
  check.check_choice("hessian_baseline", hessian_baseline, ("momentum", None))
  if check._concrete(clip_radius) == 0:
    raise ValueError("clip_radius must be > 0 (use math.inf for no clipping).")
  hp = IvonHyperparams(learning_rate, ess, hess_init, b1, b2, eps, weight_decay,
                       hess_clip_ratio, clip_radius)
  static_hp, traced_hp = split_hyperparams(hp)
  clip_update = not (isinstance(clip_radius, (int, float)) and clip_radius == float("inf"))
  spec = IvonSpec(static_hp, whiten=bool(whiten), rescale_lr=bool(rescale_lr),
                  clip_hessian=hess_clip_ratio is not None, clip_update=clip_update,
                  hessian_baseline=hessian_baseline, dtype=dtype, momentum_dtype=momentum_dtype,
                  has_prior=prior is not None, prior=prior)
  return protocol.transformation(spec, traced_hp)


def default_weight_decay(weight_decay, prior):
  """δ when not given: 1e-4 (IVON's) without a structured prior, 0 with one (the prior is
  then the whole prior; adding δ would count the first task's prior again)."""
  if weight_decay is not None:
    return weight_decay
  return 0.0 if prior is not None else 1e-4


# Adam, the other diagonal method, lives in its own module (re-exported here).
from evon_jax.transforms.adam import (  # noqa: E402,F401
    AdamHyperparams, AdamSpec, EigenspaceAdamState, eigenspace_adam)
