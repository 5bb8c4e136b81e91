"""The diagonal methods in eigen coordinates: IVON (a Gaussian posterior) and Adam.

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

from evon_jax.maths import ivon_update as ivon_step, whitening
from evon_jax.readout.bubble import SoapBubble
from evon_jax.maths.gates import ema_coefficients, scale_if
from evon_jax.maths.layout import as_view, from_view, state_dtype, tree_layouts
from evon_jax import _validation as check
from evon_jax.transforms import _protocol as protocol
from evon_jax.transforms._common import (
    frozen_placeholder, join_hyperparams, replica_mean, split_hyperparams, widest_float,
    zero_unless)


def _diagonal_layouts(tree):
  """Without a refresh around it a diagonal method sees each leaf as itself (the matrix view
  of whitening merges all dims but the last)."""
  return tree_layouts(tree, max_precond_dim=0, precondition_1d=False, use_bases=False)


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
    weight_decay: prior precision per example δ of the last call.
  """

  count: jax.Array
  mean: Any
  momentum: Any
  hessian: Any
  ess: jax.Array
  weight_decay: jax.Array

  def bubble(self) -> SoapBubble:
    """The posterior, without bases (the coordinates it was handed in)."""
    return SoapBubble(self.mean, self.hessian, (), (), self.ess, self.weight_decay)

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

  def hyperparams(self, traced) -> IvonHyperparams:
    return join_hyperparams(IvonHyperparams, self.static_hp, traced)

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
    return EigenspaceIvonState(
        count=jnp.zeros([], jnp.int32), mean=treedef.unflatten(means),
        momentum=treedef.unflatten(momenta), hessian=treedef.unflatten(hessians),
        ess=jnp.asarray(hp.ess, widest_float()),
        weight_decay=jnp.asarray(hp.weight_decay, widest_float()))

  def _learning_rate(self, hp, t):
    lr = hp.learning_rate(t - 1) if callable(hp.learning_rate) else hp.learning_rate
    if self.rescale_lr:
      lr = lr * (hp.hess_init + hp.weight_decay)
    return lr

  def _leaf(self, record, mean, momentum, hessian, layout, hp, gates, lr, t, replica_axis):
    """One leaf's IVON step; every buffer gated by scalar coefficients (see `maths.gates`)."""
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
        normal_times_grad, hessian, hp.ess, hp.weight_decay)
    if self.clip_hessian:
      estimate = ivon_step.clip_hessian_estimate(estimate, hessian, hp.hess_clip_ratio, hp.eps)
    new_hessian = ivon_step.ivon_hessian_update(
        hessian, estimate, b2_keep, hp.weight_decay, one_minus_b2=b2_take)
    new_momentum = b1_keep * momentum + b1_take * grad
    direction = ivon_step.ivon_direction(
        new_momentum, 1 - hp.b1 ** t, mean, new_hessian, hp.weight_decay, hp.eps)
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
    for record, layout, mean, momentum, hessian in zip(
        message.leaves, message.layouts, *protocol.fields(state, ("mean", "momentum", "hessian"),
                                                  treedef)):
      if record is None:
        outs.append(None), means.append(mean), momenta.append(momentum)
        hessians.append(hessian)
        continue
      view = lambda x: as_view(x, layout)
      move, mean, momentum, hessian = self._leaf(
          record, view(mean), view(momentum), view(hessian), layout, hp, gates, lr, t,
          message.replica_axis)
      outs.append(move)
      means.append(from_view(mean, layout)), momenta.append(from_view(momentum, layout))
      hessians.append(from_view(hessian, layout))
    moved = gates.active & ~gates.first
    new_state = EigenspaceIvonState(
        count=state.count + moved.astype(state.count.dtype), mean=treedef.unflatten(means),
        momentum=treedef.unflatten(momenta), hessian=treedef.unflatten(hessians),
        ess=jnp.asarray(hp.ess, widest_float()),
        weight_decay=jnp.asarray(hp.weight_decay, widest_float()))
    return protocol.outputs(outs, updates, message.layouts, plain), new_state


def eigenspace_ivon(
    learning_rate,
    *,
    ess,
    hess_init: float = 1.0,
    b1: float = 0.95,
    b2: float = 0.9999,
    eps: float = 1e-10,
    weight_decay: float = 1e-4,
    hess_clip_ratio=None,
    clip_radius: float = float("inf"),
    whiten: bool = False,
    rescale_lr: bool = False,
    hessian_baseline="momentum",
    dtype=None,
    momentum_dtype=None,
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
    weight_decay: δ, the prior precision per example.
    hess_clip_ratio: if set, ĥ is clipped to ±ratio (H + eps).
    clip_radius: elementwise clipping of the direction (inf: none).
    whiten: Newton–Schulz-whiten the direction of matrix leaves (L2 for vectors).
    rescale_lr: multiply the learning rate by ``hess_init + weight_decay`` (IVON's convention).
    hessian_baseline: 'momentum' (default) subtracts ``b = Ḡ/(1-b1^(t-1))`` from the
      gradients in the Price estimate. The draw z is independent of the earlier steps, so ĥ
      keeps its mean (the expected Hessian) and loses the ``g(M)² ess (H+δ)`` part of its
      variance, which far from an optimum, at a large ess, drives IVON's correction
      ``½(1-b2)²(H-ĥ)²/(H+δ)`` to inflate H until the step stalls. None: the reference's
      estimate ``mean_s(z_s G_s) sqrt(ess (H+δ))``.
    dtype, momentum_dtype: dtypes of the statistics and of the momentum (see `evon`).

  Returns:
    An optax transformation (`PieceTransformation`) whose update is the move of the mean.
  """
  check.check_learning_rate(learning_rate)
  check.check_positive("ess", ess)
  check.check_positive("hess_init", hess_init)
  check.check_beta("b1", b1)
  check.check_beta("b2", b2)
  check.check_non_negative("eps", eps)
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
                  hessian_baseline=hessian_baseline, dtype=dtype, momentum_dtype=momentum_dtype)
  return protocol.transformation(spec, traced_hp)


# ----------------------------------------------------------------------------- Adam


class AdamHyperparams(NamedTuple):
  b1: Any
  b2: Any
  eps: Any
  relative_eps: Any


class EigenspaceAdamState(NamedTuple):
  """State of `eigenspace_adam`.

  Attributes:
    count: steps taken.
    mu: first moment (in the coordinates the piece is handed).
    nu: second moment (left in place when the basis changes, as SOAP does).
  """

  count: jax.Array
  mu: Any
  nu: Any


EigenspaceAdamState.eigen_fields = ("mu",)
EigenspaceAdamState.sorted_fields = ("nu",)


@dataclasses.dataclass(frozen=True)
class AdamSpec(protocol.Spec):
  diagonal = True
  static_hp: tuple
  dtype: Any = None
  relative: bool = False
  correct_bias: bool = True
  eps_after_correction: bool = False
  nesterov: bool = False

  def direction(self, new_mu, new_nu, grad, b1, b2, t, floor, moves):
    """Adam's direction from the new moments (this step's `grad` for nesterov); zero
    unless `moves`."""
    if self.correct_bias:
      correction1, correction2 = 1 - b1 ** t, 1 - b2 ** t
    else:
      correction1 = correction2 = 1.0
    if not (self.nesterov or self.eps_after_correction):
      # SOAP's form: one scalar √(1-b2ᵗ)/(1-b1ᵗ) times mu / (√nu + eps).
      scale = scale_if(jnp.sqrt(correction2) / correction1, moves)
      return scale * new_mu / (jnp.sqrt(new_nu) + floor)
    if self.nesterov:
      # m̂ = b1 mu/(1-b1^(t+1)) + (1-b1) g/(1-b1ᵗ): the look-ahead momentum.
      ahead = 1 - b1 ** (t + 1) if self.correct_bias else 1.0
      momentum = b1 * new_mu / ahead + (1 - b1) * grad / correction1
    else:
      momentum = new_mu / correction1
    if self.eps_after_correction:  # eps added to the corrected root (optax.adam's form)
      direction = momentum / (jnp.sqrt(new_nu / correction2) + floor)
    else:
      direction = jnp.sqrt(correction2) * momentum / (jnp.sqrt(new_nu) + floor)
    return scale_if(1.0, moves).astype(direction.dtype) * direction

  def init(self, params, traced, layouts=None):
    leaves, treedef = jax.tree.flatten(params)
    layouts = layouts or _diagonal_layouts(params)
    zeros = lambda: treedef.unflatten([  # mu and nu: two buffers, never one aliased twice
        jnp.zeros(layout.shape if layout.trainable else (),
                  state_dtype(jnp.result_type(leaf), self.dtype))
        for leaf, layout in zip(leaves, layouts)])
    return EigenspaceAdamState(jnp.zeros([], jnp.int32), zeros(), zeros())

  def apply(self, updates, state, params, traced):
    b1, b2, eps, relative_eps = join_hyperparams(tuple, self.static_hp, traced)
    message, plain = protocol.as_message(updates, params, _diagonal_layouts, state.mu)
    gates = message.gates
    moves = gates.active & ~gates.first
    b1_keep, b1_take = ema_coefficients(b1, moves)
    b2_keep, b2_take = ema_coefficients(b2, moves)
    t = state.count + 1
    treedef = jax.tree.structure(state.mu)
    outs, mus, nus = [], [], []
    for record, layout, mu, nu in zip(message.leaves, message.layouts,
                                      *protocol.fields(state, ("mu", "nu"), treedef)):
      if record is None:
        outs.append(None), mus.append(mu), nus.append(nu)
        continue
      grad = zero_unless(gates.active,
                         replica_mean(jnp.mean(record.grads, axis=0), message.replica_axis))
      mu_view, nu_view = as_view(mu, layout), as_view(nu, layout)
      new_mu = (b1_keep * mu_view + b1_take * grad).astype(mu.dtype)
      new_nu = (b2_keep * nu_view + b2_take * grad * grad).astype(nu.dtype)
      # On the first call mu = nu = 0: the +1 keeps 0 / 0 out even with eps = 0.
      floor = eps + gates.first.astype(nu.dtype)
      if self.relative:
        floor = floor + relative_eps * jnp.sqrt(jnp.mean(new_nu))
      outs.append(self.direction(new_mu, new_nu, grad, b1, b2, t, floor, moves))
      mus.append(from_view(new_mu, layout)), nus.append(from_view(new_nu, layout))
    new_state = EigenspaceAdamState(state.count + moves.astype(state.count.dtype),
                                    treedef.unflatten(mus), treedef.unflatten(nus))
    return protocol.outputs(outs, updates, message.layouts, plain), new_state


def eigenspace_adam(b1: float = 0.95, b2: float = 0.95, eps: float = 1e-8, *,
                    relative_eps: float = 0.0, correct_bias: bool = True,
                    eps_after_correction: bool = False, nesterov: bool = False,
                    dtype=None) -> protocol.PieceTransformation:
  r"""Adam in whatever coordinates it is handed (SOAP inside `eigenbasis_refresh`).

  ``mu ← b1 mu + (1-b1) G``, ``nu ← b2 nu + (1-b2) G²``, and the direction
  ``√(1-b2ᵗ)/(1-b1ᵗ) · mu / (√nu + eps + relative_eps · rms(√nu))`` (eps added to the
  uncorrected √nu, as SOAP does; rms over the leaf). The first call of a composition only
  initialises (a zero direction). Chain a learning rate after it
  (`optax.scale_by_learning_rate`).

  `relative_eps` (default 0, the reference's absolute eps only): in an eigenbasis, the
  coordinates of a rank-deficient factor's null space get gradients that are float noise
  (1e-7 of the leaf's scale), and Adam's per-coordinate normalisation turns that noise into
  full-size steps whenever it exceeds `eps`: a 1e-7 change of the inputs then moves SOAP's
  weights by ~0.05 in 12 steps (`benchmarks/sensitivity.py`). A floor proportional to the
  leaf's own scale damps exactly those coordinates, whatever the loss's units: 1e-2 brings
  that to 4-8e-4 and 3e-2 to 1.5-2.9e-4 (benchmarks/results/sensitivity.md).

  The NVIDIA reference SOAP's inner-Adam options: `correct_bias=False` drops both bias
  corrections; `eps_after_correction=True` adds eps to the corrected root,
  ``(mu/(1-b1ᵗ)) / (√(nu/(1-b2ᵗ)) + eps)``; `nesterov=True` uses the look-ahead momentum
  ``b1 mu/(1-b1^(t+1)) + (1-b1) G/(1-b1ᵗ)`` (without the corrections when `correct_bias`
  is False).
  """
  check.check_beta("b1", b1)
  check.check_beta("b2", b2)
  check.check_non_negative("eps", eps)
  check.check_non_negative("relative_eps", relative_eps)
  static_hp, traced_hp = split_hyperparams(AdamHyperparams(b1, b2, eps, relative_eps))
  relative = not (isinstance(relative_eps, (int, float)) and relative_eps == 0)
  return protocol.transformation(
      AdamSpec(static_hp, dtype=dtype, relative=relative, correct_bias=bool(correct_bias),
               eps_after_correction=bool(eps_after_correction), nesterov=bool(nesterov)),
      traced_hp)
