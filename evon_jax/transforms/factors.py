"""The Kronecker-factor EMA: per Kronecker axis k of every leaf, an EMA of G_(k) G_(k)ᵀ
(or KL-Shampoo's weighted statistic), the `factors` piece of `eigenbasis_refresh`."""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from evon_jax.maths.gates import ema_coefficients
from evon_jax.maths.layout import state_dtype, tree_layouts
from evon_jax.maths.kronecker import (
    bases_to_storage, empty_bases, ema, factor_statistics, mean_factor_statistics, num_slots,
    rotate_out, storage_to_bases)
from evon_jax import _validation as check
from evon_jax.transforms import _protocol as protocol
from evon_jax.transforms._common import (
    join_hyperparams, replica_mean, split_hyperparams, widest_float, zero_unless)


def _full_layouts(tree):
  """Layouts of a factor EMA used on its own: every axis its own factor (the defaults)."""
  return tree_layouts(tree, max_precond_dim=10000, precondition_1d=False)


def _storage_dtypes(tree, requested):
  """Per leaf, the dtype its factors and bases are kept in (float32 for frozen leaves)."""
  return [state_dtype(jnp.result_type(leaf), requested) for leaf in jax.tree.leaves(tree)]


def _stored_dtypes(stored: tuple, reference, requested):
  """The per-leaf dtypes a state already stores its axis slots in (so an update never changes
  them, e.g. with float32 gradients of float64 params and no `params`); from `reference`
  when there are no slots."""
  if stored:
    return [x.dtype for x in jax.tree.leaves(stored[0])]
  return _storage_dtypes(reference, requested)


# ----------------------------------------------------------------------------- factor EMA


class FactorHyperparams(NamedTuple):
  decay: Any
  regularization: Any


class KroneckerFactorState(NamedTuple):
  """State of `kronecker_factor_ema`.

  Attributes:
    factors: one params-shaped tree per axis slot (see `evon_jax.kronecker`): tree k holds
      every leaf's k-th axis factor (ones((n,)) on identity axes, ones((1,)) past a leaf's
      last axis).
  """

  factors: tuple


@dataclasses.dataclass(frozen=True)
class FactorSpec(protocol.Spec):
  static_hp: tuple
  statistic: str = "mean_gradient"
  dtype: Any = None
  bias_correction: bool = False
  kl_shampoo: bool = False
  kl_eps: float = 1e-8
  kl_scaled: bool = False
  prior_gradient: bool = False

  def init(self, params, traced, layouts=None):
    layouts = layouts or _full_layouts(params)
    dtypes = _storage_dtypes(params, self.dtype)
    zeros = [empty_bases(l, d, "zeros") if l.trainable else ()
             for l, d in zip(layouts, dtypes)]
    return KroneckerFactorState(bases_to_storage(
        zeros, layouts, jax.tree.structure(params), num_slots(layouts), dtypes))

  def leaf_statistic(self, record, layout, traced, active, replica_axis, factors=None,
                     bases=None):
    """Per axis the statistic of one leaf's step: of the mean (regularized) gradient, or the
    mean of per-sample statistics (KL-Shampoo's, from the leaf's current `factors` and
    `bases`, when `kl_shampoo`); zero on an inactive call."""
    hp = join_hyperparams(FactorHyperparams, self.static_hp, traced)
    grads = record.grads
    if not (isinstance(hp.regularization, (int, float)) and hp.regularization == 0):
      grads = grads + hp.regularization * record.thetas  # the gradient of loss + δ/2 |θ|²
    if self.kl_shampoo:
      statistic = kl_shampoo_statistics(
          replica_mean(jnp.mean(grads, axis=0), replica_axis), layout, factors, bases,
          self.kl_eps, self.kl_scaled)
    elif self.statistic == "per_sample":
      statistic = replica_mean(mean_factor_statistics(grads, layout), replica_axis)
    else:
      statistic = factor_statistics(replica_mean(jnp.mean(grads, axis=0), replica_axis),
                                    layout)
    return zero_unless(active, statistic)

  def leaf_update(self, factors, statistic, on, traced, count=None):
    """The EMA of one leaf's factors; (1, 0) coefficients when `on` is False (exact no-op).
    With `bias_correction`, `count` is this update's 1-based index t and the decay is
    ``1 - (1-β)/(1-βᵗ)``: the factor is the normalised weighted mean of the statistics so
    far (the first update takes the statistic whole)."""
    hp = join_hyperparams(FactorHyperparams, self.static_hp, traced)
    decay = hp.decay
    if self.bias_correction:
      if count is None:
        raise ValueError("kronecker_factor_ema(bias_correction=True) counts its updates "
                         "through eigenbasis_refresh; use it as that piece's `factors`.")
      decay = 1 - (1 - decay) / (1 - decay ** count.astype(widest_float()))
    new = ema(factors, statistic, *ema_coefficients(decay, on))
    return jax.tree.map(lambda n, o: n.astype(o.dtype), new, factors)

  def apply(self, updates, state, params, traced):
    if self.kl_shampoo or self.bias_correction:
      raise ValueError("kronecker_factor_ema with kl_shampoo or bias_correction reads the "
                       "bases and the step count of an eigenbasis_refresh: use it as that "
                       "piece's `factors`, not on its own.")
    reference = updates if params is None else params
    dtypes = _stored_dtypes(state.factors, reference, self.dtype)
    like = jax.tree.structure(reference).unflatten(  # shapes and dtypes only: dead code
        [jnp.zeros(jnp.shape(x), d) for x, d in zip(jax.tree.leaves(reference), dtypes)])
    message, plain = protocol.as_message(updates, params, _full_layouts, like)
    treedef = jax.tree.structure(reference)
    layouts = message.layouts
    per_leaf = storage_to_bases(state.factors, treedef, layouts)
    new = []
    for record, layout, factors in zip(message.leaves, layouts, per_leaf):
      if record is None or not layout.any_rotated:
        new.append(factors)
        continue
      statistic = self.leaf_statistic(record, layout, traced, message.gates.active,
                                      message.replica_axis)
      new.append(self.leaf_update(factors, statistic, message.gates.active, traced))
    stored = bases_to_storage(new, layouts, treedef, len(state.factors), dtypes)
    return updates, KroneckerFactorState(stored)


def kl_shampoo_statistics(grad: jax.Array, layout, factors, bases, eps: float,
                          scaled: bool = False):
  r"""KL-Shampoo's factor statistics of one gradient (Lin et al., arXiv 2509.03378).

  Per rotated axis k: ``G_(k) (⊗_{j≠k} C_j) G_(k)ᵀ`` with
  ``C_j = Q_j diag(1 / (n_j max(λ_j, eps))) Q_jᵀ``, where ``λ_j = diag(Q_jᵀ F_j Q_j)`` are
  the other axes' eigenvalues as their current bases see them (`factors` F_j and `bases`
  Q_j before this step's update) and n_j their sizes. For a matrix: ``L ← G C_R Gᵀ`` and
  ``R ← Gᵀ C_L G``, the statistics the NVIDIA reference's `use_kl_shampoo` uses. Axes without
  a basis contribute the identity.

  `scaled=True` (evon_jax's variant, not the reference's): a factor that is still zero (the
  first update) is read as the isotropic ``(‖G‖²/n_j) I`` of this gradient, and eigenvalues
  are floored at `eps` times their mean instead of at `eps`. With the reference's rule the
  first statistic weights G by 1/(n eps), ~10⁸ times the later ones, and the factors keep
  the first gradient's directions (docs/composition.md).
  """
  from evon_jax.maths.eigenbasis import approximate_eigenvalues
  batch = len(layout.batch)
  squared_norm = jnp.sum(jnp.square(grad), axis=tuple(range(batch, grad.ndim)))
  inverses = []
  for size, factor, basis in zip(layout.axes, factors, bases):
    if basis is None:
      inverses.append(None)
      continue
    eigenvalues = approximate_eigenvalues(factor, basis)
    if scaled:
      empty = jnp.all(factor == 0, axis=(-2, -1))[..., None]
      eigenvalues = jnp.where(empty, (squared_norm / size)[..., None], eigenvalues)
      floor = eps * jnp.mean(eigenvalues, axis=-1, keepdims=True)
    else:
      floor = eps
    scale = 1.0 / (size * jnp.maximum(eigenvalues, floor))
    inverses.append(jnp.matmul(basis * scale[..., None, :], jnp.matrix_transpose(basis),
                               precision=jax.lax.Precision.HIGHEST))
  out = []
  for k, rotated in enumerate(layout.rotated):
    if not rotated:
      out.append(None)
      continue
    # C_j symmetric, so rotate_out's G ×_j C_j is G ×_j C_jᵀ: every axis but k weighted.
    weighted = rotate_out(grad, tuple(None if j == k else c for j, c in enumerate(inverses)),
                          jax.lax.Precision.HIGHEST)
    contract = tuple(d for d in range(grad.ndim) if d != batch + k and d >= batch)
    out.append(jax.lax.dot_general(
        grad, weighted, ((contract, contract), (tuple(range(batch)), tuple(range(batch)))),
        precision=jax.lax.Precision.HIGHEST))
  return tuple(out)


def kronecker_factor_ema(decay: float = 0.95, *, statistic: str = "mean_gradient",
                         regularization: float = 0.0, bias_correction: bool = False,
                         kl_shampoo: bool = False, kl_eps: float = 1e-8,
                         kl_scaled: bool = False, prior_gradient: bool = False,
                         dtype=None) -> protocol.PieceTransformation:
  r"""EMA of the Kronecker factors: per axis k, ``L_k ← decay L_k + (1-decay) G_(k) G_(k)ᵀ``.

  G_(k) is the gradient's mode-k unfolding (for a matrix: ``G Gᵀ`` and ``Gᵀ G``). Used as the
  `factors` of `eigenbasis_refresh`, which decides which axes get factors; on its own it keeps
  a factor per axis (up to 10000) and passes the updates through unchanged.

  Args:
    decay: the EMA's decay (SOAP's `shampoo_beta`).
    statistic: 'mean_gradient' (the statistic of the step's mean gradient) or 'per_sample'
      (the mean of per-sample statistics, one per Monte-Carlo sample).
    regularization: δ: the statistics of ``G + δ θ`` (the gradient of the regularized loss
      at the sampled point θ), whose outer product has the Hessian's eigenvectors at the
      optimum (EVON's `factor_gradient='regularized'`). The sampled points come from
      `inject_noise`: a factor EMA or refresh used on plain gradients has none, and reads δ
      as 0.
    bias_correction: divide out the EMA's bias: the t-th update uses the decay
      ``1 - (1-decay)/(1-decayᵗ)`` (the reference SOAP's `correct_shampoo_beta_bias`).
      Counted by `eigenbasis_refresh`, which must wrap it.
    kl_shampoo: KL-Shampoo's statistics (`kl_shampoo_statistics`): each axis's outer
      product weighted by the other axes' inverse eigenvalues in their current bases (the
      reference SOAP's `use_kl_shampoo`); `kl_eps` floors those eigenvalues.
      `kl_scaled=True`: an empty factor reads as the gradient's isotropic scale and the
      floor is `kl_eps` times the mean eigenvalue (see `kl_shampoo_statistics`; EVON's).
    prior_gradient: add the structured prior's gradient ``P₀ (θ − m₀)/ess`` at the sampled
      points to the statistics' gradient, when the `eigenspace_ivon` this refresh wraps
      has a `prior` (EVON's `factor_gradient='regularized'`; with `regularization` δ the
      whole regularised gradient ``G + P₀ (θ − m₀)/ess + δ θ``). No effect without one,
      nor on a plain gradient tree (no `inject_noise` around: no sampled points θ).
    dtype: dtype of the factors (default float32, wider if params are wider).
  """
  check.check_beta("decay", decay)
  check.check_non_negative("regularization", regularization)
  check.check_choice("statistic", statistic, ("mean_gradient", "per_sample"))
  check.check_positive("kl_eps", kl_eps)
  if kl_shampoo and statistic != "mean_gradient":
    raise ValueError("kronecker_factor_ema: kl_shampoo=True uses the mean gradient's "
                     "statistics (statistic='mean_gradient').")
  static_hp, traced_hp = split_hyperparams(FactorHyperparams(decay, regularization))
  spec = FactorSpec(static_hp, statistic=statistic, dtype=dtype,
                    bias_correction=bool(bias_correction), kl_shampoo=bool(kl_shampoo),
                    kl_eps=float(kl_eps), kl_scaled=bool(kl_scaled),
                    prior_gradient=bool(prior_gradient))
  return protocol.transformation(spec, traced_hp)
