"""SOAP: Adam in the Kronecker eigenbasis — the deterministic cost and quality baseline.

Shares the layout, factor, rotation and refresh machinery with EVON. Momentum is kept in
eigen coordinates and re-expressed on refresh (the same parameter-space value SOAP's own
formulation keeps), so a step costs three product pairs: rotate in, factor statistics,
rotate out.
"""


import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from evon_jax import eigenbasis
from evon_jax.transforms._common import join_hyperparams, split_hyperparams
from evon_jax._gating import ema_coefficients, scale_if
from evon_jax._layout import LeafLayout, as_view, from_view, state_dtype, tree_layouts
from evon_jax.kronecker import (
    bases_to_storage, empty_bases, ema, factor_statistics, num_slots, rotate_in, rotate_out,
    storage_to_bases)


class ScaleBySoapState(NamedTuple):
  """State of `scale_by_soap`.

  Attributes:
    count: number of update calls (the first only initialises factors and bases).
    mu: first moment in eigen coordinates.
    nu: second moment in eigen coordinates (left in place on refresh, as SOAP does).
    factors: Kronecker factors, one per axis, stored as in `EvonState.factors` (a tuple of
      params-shaped trees, one per axis slot).
    bases: eigenbases of the axes, stored like `factors`.
  """

  count: jax.Array
  mu: Any
  nu: Any
  factors: Any
  bases: Any


@dataclasses.dataclass(frozen=True)
class SoapConfig:
  precondition_frequency: int = 10
  max_precond_dim: int = 10000
  precondition_1d: bool = False
  dtype: Any = None
  rotation_precision: Any = "highest"
  stacked_dims: Any = None
  dimension_numbers: Any = None
  merge_dims: bool = False

  def layouts(self, tree) -> list[LeafLayout]:
    return tree_layouts(tree, max_precond_dim=self.max_precond_dim,
                        precondition_1d=self.precondition_1d, stacked_dims=self.stacked_dims,
                        dimension_numbers=self.dimension_numbers, merge_dims=self.merge_dims)


def _soap_leaf(grad, mu, nu, factors, basis, layout, config, b1, b2, shampoo_b, eps, count):
  is_first = count == 0
  moves = ~is_first  # the first call only initialises factors and bases (gated by scalars)
  b1_keep, b1_take = ema_coefficients(b1, moves)
  b2_keep, b2_take = ema_coefficients(b2, moves)
  rotated = rotate_in(grad, basis, config.rotation_precision)
  new_mu = (b1_keep * mu + b1_take * rotated).astype(mu.dtype)
  new_nu = (b2_keep * nu + b2_take * rotated * rotated).astype(nu.dtype)
  t = jnp.maximum(count, 1)
  scale = scale_if(jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t), moves)
  # On the first call mu = nu = 0: the +1 in the denominator keeps 0 / 0 out even with eps=0.
  direction = scale * new_mu / (jnp.sqrt(new_nu) + eps + is_first.astype(new_nu.dtype))
  # SOAP rotates its direction out with the basis it was computed in (before any refresh).
  direction = rotate_out(direction, basis, config.rotation_precision)
  factors = ema(factors, factor_statistics(grad, layout), shampoo_b)
  kind = eigenbasis.refresh_kind(is_first, count, config.precondition_frequency, 0, "power_qr")
  basis, (mu,) = eigenbasis.refresh(kind, factors, basis, (new_mu,), in_place=False)
  return direction, mu, new_nu, factors, basis


@functools.partial(jax.jit, static_argnames=("config", "static_hp"))
def _compiled_soap_update(updates, state, traced_hp, *, config, static_hp):
  """One `scale_by_soap` call, compiled once per (settings, static hyperparameters, shapes)
  module-wide, so an eager or `inject_hyperparams` loop compiles nothing after its first
  call (see `_evon._compiled_update`)."""
  b1, b2, factor_decay, eps = join_hyperparams(tuple, static_hp, traced_hp)
  treedef = jax.tree.structure(state.mu)
  layouts = config.layouts(treedef.unflatten(treedef.flatten_up_to(updates)))
  outs, mus, nus, factors, bases = [], [], [], [], []
  for i, (layout, grad, mu, nu, factor, basis) in enumerate(zip(
      layouts, treedef.flatten_up_to(updates), treedef.flatten_up_to(state.mu),
      treedef.flatten_up_to(state.nu), storage_to_bases(state.factors, treedef, layouts),
      storage_to_bases(state.bases, treedef, layouts))):
    if layout.trainable and mu.shape != layout.shape:
      raise ValueError(f"Leaf {i}: gradient shape {layout.shape} does not match the "
                       f"parameter shape {mu.shape} the optimizer was initialised with.")
    if not layout.trainable:
      outs.append(jnp.zeros_like(grad))
      mus.append(mu), nus.append(nu), factors.append(factor), bases.append(basis)
      continue
    view = lambda x: as_view(x, layout)
    direction, mu, nu, factor, basis = _soap_leaf(
        view(grad).astype(mu.dtype), view(mu), view(nu), factor, basis, layout,
        config, b1, b2, factor_decay, eps, state.count)
    outs.append(from_view(direction, layout).astype(grad.dtype))
    mus.append(from_view(mu, layout)), nus.append(from_view(nu, layout))
    factors.append(factor), bases.append(basis)
  slots, dtypes = len(state.bases), [mu.dtype for mu in mus]
  new_state = ScaleBySoapState(
      state.count + 1, treedef.unflatten(mus), treedef.unflatten(nus),
      bases_to_storage(factors, layouts, treedef, slots, dtypes),
      bases_to_storage(bases, layouts, treedef, slots, dtypes))
  return treedef.unflatten(outs), new_state


def scale_by_soap(
    b1: float = 0.95,
    b2: float = 0.95,
    shampoo_b: float | None = None,
    eps: float = 1e-8,
    *,
    precondition_frequency: int = 10,
    max_precond_dim: int = 10000,
    precondition_1d: bool = False,
    dtype=None,
    rotation_precision="highest",
    stacked_dims=None,
    dimension_numbers=None,
    merge_dims: bool = False,
) -> optax.GradientTransformation:
  """Rescales updates with Adam run in the eigenbasis of Shampoo's Kronecker factors.

  The first call initialises the factors from the gradient (EMA from zero) and the bases by
  `eigh`, and returns a zero update. Afterwards, with G° = Q_Lᵀ G Q_R:
  mu ← b1 mu + (1-b1) G°; nu ← b2 nu + (1-b2) G°²; D = Q_L [√(1-b2ᵗ)/(1-b1ᵗ) mu/(√nu+eps)] Q_Rᵀ;
  the factors are EMAs (decay `shampoo_b`, default b2) of G Gᵀ and Gᵀ G; every
  `precondition_frequency` steps the bases are refreshed by power iteration + QR and mu is
  re-expressed in the new basis (nu stays).

  Args:
    b1, b2: Adam's decay rates in the eigenbasis.
    shampoo_b: decay of the Kronecker factors (default: b2).
    eps: added to √nu.
    precondition_frequency: steps between basis refreshes.
    max_precond_dim: sides longer than this keep the identity basis.
    precondition_1d: give 1-D leaves a full basis too (else plain Adam on them).
    dtype: dtype of statistics (default float32, wider if params are wider).
    rotation_precision: `jax.lax.Precision` of the per-step rotations.
    stacked_dims: leading dims that index stacked, independent matrices (see `evon`).
    dimension_numbers: per-leaf grouping of dims into Kronecker axes (see `evon`).
    merge_dims: merge neighbouring dims while their product fits `max_precond_dim` (the
      reference SOAP's option; exclusive with `dimension_numbers`).

  Returns:
    An optax transformation; chain `add_decayed_weights` and a learning rate (see `soap`).

  References:
    Vyas et al., SOAP: Improving and Stabilizing Shampoo using Adam, arXiv 2409.11321, 2024.
  """
  from evon_jax import _validation as check
  check.check_beta("b1", b1)
  check.check_beta("b2", b2)
  if shampoo_b is not None:
    check.check_beta("shampoo_b", shampoo_b)
  check.check_non_negative("eps", eps)
  check.check_static_int("precondition_frequency", precondition_frequency, 1)
  check.check_static_int("max_precond_dim", max_precond_dim, 0)
  check.check_stacked_dims(stacked_dims)
  check.check_dimension_numbers(dimension_numbers, merge_dims)
  config = SoapConfig(precondition_frequency, max_precond_dim, precondition_1d, dtype,
                      rotation_precision, stacked_dims, dimension_numbers, bool(merge_dims))
  factor_decay = b2 if shampoo_b is None else shampoo_b
  static_hp, traced_hp = split_hyperparams((b1, b2, factor_decay, eps))

  def init_fn(params):
    mus, nus, factors, bases = [], [], [], []
    leaves, treedef = jax.tree.flatten(params)
    layouts = config.layouts(params)
    for leaf, layout in zip(leaves, layouts):
      sd = state_dtype(leaf.dtype, config.dtype)
      # integer / empty leaves: one scalar each (orbax refuses zero-size arrays)
      shape = layout.shape if layout.trainable else ()
      mus.append(jnp.zeros(shape, sd))
      nus.append(jnp.zeros(shape, sd))
      factors.append(empty_bases(layout, sd, "zeros"))
      bases.append(empty_bases(layout, sd, "eye"))
    slots, dtypes = num_slots(layouts), [mu.dtype for mu in mus]
    return ScaleBySoapState(
        jnp.zeros([], jnp.int32), treedef.unflatten(mus), treedef.unflatten(nus),
        bases_to_storage(factors, layouts, treedef, slots, dtypes),
        bases_to_storage(bases, layouts, treedef, slots, dtypes))

  def update_fn(updates, state, params=None):
    del params
    return _compiled_soap_update(updates, state, traced_hp, config=config,
                                 static_hp=static_hp)

  return optax.GradientTransformation(init_fn, update_fn)


def soap(
    learning_rate: optax.ScalarOrSchedule = 3e-3,
    b1: float = 0.95,
    b2: float = 0.95,
    shampoo_b: float | None = None,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    precondition_frequency: int = 10,
    max_precond_dim: int = 10000,
    precondition_1d: bool = False,
    stacked_dims=None,
    dimension_numbers=None,
    merge_dims: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """SOAP with decoupled weight decay: chain(scale_by_soap, add_decayed_weights, -lr).

  Example:
    >>> import jax.numpy as jnp, optax, evon_jax
    >>> params = {"w": jnp.ones((3, 2))}
    >>> tx = evon_jax.soap(1e-2)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
  """
  from evon_jax import _validation as check
  check.check_learning_rate(learning_rate)
  check.check_non_negative("weight_decay", weight_decay)
  return optax.chain(
      scale_by_soap(b1, b2, shampoo_b, eps, precondition_frequency=precondition_frequency,
                    max_precond_dim=max_precond_dim, precondition_1d=precondition_1d,
                    stacked_dims=stacked_dims, dimension_numbers=dimension_numbers,
                    merge_dims=merge_dims),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  )
