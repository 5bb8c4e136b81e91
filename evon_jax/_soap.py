"""SOAP: Adam in the Kronecker eigenbasis — the deterministic cost and quality baseline.

`eigenbasis_refresh(eigenspace_adam(...))`: the same pieces as EVON. Momentum is kept in
eigen coordinates and re-expressed on refresh (the same parameter-space value SOAP's own
formulation keeps), so a step costs three product pairs: rotate in, factor statistics,
rotate out.
"""


import optax

from evon_jax.transforms import eigenbasis_refresh, eigenspace_adam, kronecker_factor_ema

# The state of `scale_by_soap` (the refresh piece's, with Adam's mu and nu in `.inner`).
from evon_jax.transforms.refresh import EigenbasisRefreshState as ScaleBySoapState  # noqa: F401


def scale_by_soap(
    b1: float = 0.95,
    b2: float = 0.95,
    shampoo_b: float | None = None,
    eps: float = 1e-8,
    *,
    relative_eps: float = 0.0,
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
    relative_eps: also added to √nu, times the leaf's rms √nu (default 0: the reference's
      absolute eps only). 1e-2 to 3e-2 stop SOAP from turning float noise in the null
      space of rank-deficient factors into full-size steps (see `evon_jax.eigenspace_adam`;
      measured in benchmarks/results/sensitivity.md).
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
  return eigenbasis_refresh(
      eigenspace_adam(b1, b2, eps, relative_eps=relative_eps, dtype=dtype),
      factors=kronecker_factor_ema(b2 if shampoo_b is None else shampoo_b, dtype=dtype),
      precondition_frequency=precondition_frequency, max_precond_dim=max_precond_dim,
      precondition_1d=precondition_1d, stacked_dims=stacked_dims,
      dimension_numbers=dimension_numbers, merge_dims=merge_dims, dtype=dtype,
      rotation_precision=rotation_precision)


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
    relative_eps: float = 0.0,
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
      scale_by_soap(b1, b2, shampoo_b, eps, relative_eps=relative_eps,
                    precondition_frequency=precondition_frequency,
                    max_precond_dim=max_precond_dim, precondition_1d=precondition_1d,
                    stacked_dims=stacked_dims, dimension_numbers=dimension_numbers,
                    merge_dims=merge_dims),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  )
