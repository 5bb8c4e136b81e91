"""Adam in eigen coordinates: SOAP's inner method (`eigenspace_adam`).

Like `eigenspace_ivon` (transforms/diagonal.py), it keeps its buffers in the coordinates it
is handed and names the ones a change of basis must re-express (`eigen_fields`).
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from evon_jax.maths.gates import ema_coefficients, scale_if
from evon_jax.maths.layout import (
    as_view, diagonal_layouts as _diagonal_layouts, from_view, state_dtype)
from evon_jax import _validation as check
from evon_jax.transforms import _protocol as protocol
from evon_jax.transforms._common import (
    join_hyperparams, replica_mean, split_hyperparams, zero_unless)


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
