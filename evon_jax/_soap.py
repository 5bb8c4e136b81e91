"""SOAP: Adam in the Kronecker eigenbasis — the deterministic cost and quality baseline.

`eigenbasis_refresh(eigenspace_adam(...))`: the same pieces as EVON. Momentum is kept in
eigen coordinates and re-expressed on refresh (the same parameter-space value SOAP's own
formulation keeps), so a step costs three product pairs: rotate in, factor statistics,
rotate out.
"""


import jax
import jax.numpy as jnp
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


# The NVIDIA reference SOAP's keyword names (emerging_optimizers.soap.SOAP) that today's
# `soap` does not have: passing any of them (or `lr`) selects the reference's semantics.
REFERENCE_NAMES = (
    "lr", "betas", "shampoo_beta", "weight_decay_method", "nesterov", "adam_warmup_steps",
    "correct_bias", "fp32_matmul_prec", "use_eigh", "qr_fp32_matmul_prec",
    "use_adaptive_criteria", "adaptive_update_tolerance", "power_iter_steps",
    "max_update_rms", "use_kl_shampoo", "correct_shampoo_beta_bias")

_MATMUL_PRECISION = {"highest": "highest", "high": "high", "medium": "default"}


def _matmul_precision(name, value):
  from evon_jax import _validation as check
  check.check_choice(name, value, tuple(_MATMUL_PRECISION))
  return _MATMUL_PRECISION[value]


def clip_update_rms(max_rms: float, eps: float = 1e-7) -> optax.GradientTransformation:
  """Scales each leaf's update by ``min(1, max_rms / (rms(update) + eps))``; 0: no clipping
  (the reference SOAP's `max_update_rms`, after Adafactor's update clipping)."""
  from evon_jax import _validation as check
  check.check_non_negative("max_rms", max_rms)

  def update_fn(updates, state, params=None):
    del params
    if max_rms == 0:
      return updates, state

    def clip(u):
      rms = jnp.sqrt(jnp.mean(jnp.square(u)))
      return u * jnp.minimum(1.0, max_rms / (rms + eps)).astype(u.dtype)

    return jax.tree.map(clip, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def scale_by_reference_soap(
    betas=(0.9, 0.95),
    shampoo_beta: float = 0.95,
    eps: float = 1e-8,
    *,
    nesterov: bool = False,
    precondition_frequency=1,
    adam_warmup_steps: int = 0,
    correct_bias: bool = True,
    fp32_matmul_prec: str = "high",
    use_eigh: bool = False,
    qr_fp32_matmul_prec: str = "high",
    use_adaptive_criteria: bool = False,
    adaptive_update_tolerance: float = 1e-7,
    power_iter_steps: int = 1,
    use_kl_shampoo: bool = False,
    correct_shampoo_beta_bias=None,
    l2_weight_decay: float = 0.0,
    max_precond_dim: int = 10000,
    precondition_1d: bool = False,
    stacked_dims=None,
    dimension_numbers=None,
    merge_dims: bool = False,
) -> optax.GradientTransformation:
  r"""The NVIDIA reference SOAP's direction, built from the same pieces as `scale_by_soap`.

  Per call (0-based step t, i = t + 1), as `emerging_optimizers.soap.SOAP` does:
  the factors take the gradient first, ``L ← β' L + (1-β') G Gᵀ`` (and R), with
  ``β' = 1 - (1-β)/(1-βⁱ)`` when `correct_shampoo_beta_bias` (default: `correct_bias`), or
  KL-Shampoo's statistics (`use_kl_shampoo`); then, when t ≥ `adam_warmup_steps` and
  t % `precondition_frequency` == 0, the bases are refreshed (`eigh` at
  t == `adam_warmup_steps`; afterwards `eigh` if `use_eigh`, else the columns sorted by
  ``diag(Qᵀ F Q)`` with Adam's nu permuted alongside and `power_iter_steps` rounds of
  ``Q ← qr(F Q)``; skipped while both bases meet the adaptive criterion when
  `use_adaptive_criteria`), the momentum re-expressed in the new bases; then Adam runs on
  ``Q_Lᵀ G Q_R`` (plain G before the warm-up ends):
  ``(mu/(1-b1ⁱ)) / (√(nu/(1-b2ⁱ)) + eps)`` (nesterov's look-ahead momentum if asked, no
  corrections if not `correct_bias`), rotated back out.

  Chain a learning rate (and weight decay) after it, or use `soap(lr=..., ...)`. Leaves
  other than matrices, which the reference refuses, are handled as `scale_by_soap` does
  (vectors get the same Adam in their own coordinates; N-D leaves one factor per axis).

  Args:
    betas: Adam's (b1, b2).
    shampoo_beta: the factors' decay (b2 when negative, as the reference documents).
    eps: Adam's eps (and KL-Shampoo's eigenvalue floor).
    nesterov, adam_warmup_steps, correct_bias, use_eigh, use_adaptive_criteria,
    adaptive_update_tolerance, power_iter_steps, use_kl_shampoo, correct_shampoo_beta_bias:
      the reference's options (see above).
    precondition_frequency: an int, or a schedule ``step -> int`` of the traced 0-based step
      (write it with `jnp`).
    fp32_matmul_prec, qr_fp32_matmul_prec: 'highest', 'high' or 'medium', the precision of
      the rotations and of the power iterations (`jax.lax.Precision` HIGHEST, HIGH,
      DEFAULT; float32 on CPU whatever the choice).
    l2_weight_decay: added to the gradient Adam sees, not the factors' (the reference's
      `weight_decay_method='l2'`).
    max_precond_dim, precondition_1d, stacked_dims, dimension_numbers, merge_dims: as in
      `scale_by_soap` (the reference has no size limit; sides past `max_precond_dim` keep
      the identity here).
  """
  from evon_jax import _validation as check
  if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
    raise ValueError(f"betas must be a pair (b1, b2), got {betas!r}.")
  b1, b2 = betas
  check.check_beta("betas[0]", b1)
  check.check_beta("betas[1]", b2)
  if isinstance(shampoo_beta, (int, float)) and shampoo_beta < 0:
    shampoo_beta = b2
  check.check_beta("shampoo_beta", shampoo_beta)
  check.check_non_negative("eps", eps)
  check.check_static_int("adam_warmup_steps", adam_warmup_steps, 0)
  check.check_static_int("power_iter_steps", power_iter_steps, 1)
  check.check_non_negative("adaptive_update_tolerance", adaptive_update_tolerance)
  if correct_shampoo_beta_bias is None:
    correct_shampoo_beta_bias = correct_bias
  return eigenbasis_refresh(
      eigenspace_adam(b1, b2, eps, correct_bias=bool(correct_bias), eps_after_correction=True,
                      nesterov=bool(nesterov)),
      factors=kronecker_factor_ema(shampoo_beta, bias_correction=bool(correct_shampoo_beta_bias),
                                   kl_shampoo=bool(use_kl_shampoo), kl_eps=max(eps, 1e-30)),
      precondition_frequency=precondition_frequency, max_precond_dim=max_precond_dim,
      precondition_1d=precondition_1d, stacked_dims=stacked_dims,
      dimension_numbers=dimension_numbers, merge_dims=merge_dims,
      refresh_method="eigh" if use_eigh else "power_qr",
      rotation_precision=_matmul_precision("fp32_matmul_prec", fp32_matmul_prec),
      qr_precision=_matmul_precision("qr_fp32_matmul_prec", qr_fp32_matmul_prec),
      timing="before", warmup_steps=adam_warmup_steps,
      adaptive_tolerance=adaptive_update_tolerance if use_adaptive_criteria else None,
      power_iter_steps=power_iter_steps, power_shift=0.0, sort_columns=True,
      inner_l2=l2_weight_decay)


def _reference_soap(learning_rate, *, betas=(0.9, 0.95), shampoo_beta=0.95, eps=1e-8,
                    weight_decay=0.01, weight_decay_method="decoupled", max_update_rms=0.0,
                    **options):
  """`soap` with the reference's names: the direction, RMS clipping, weight decay, -lr."""
  from evon_jax import _validation as check
  check.check_learning_rate(learning_rate)
  check.check_non_negative("weight_decay", weight_decay)
  check.check_choice("weight_decay_method", weight_decay_method,
                     ("decoupled", "independent", "l2"))
  check.check_non_negative("max_update_rms", max_update_rms)
  l2 = weight_decay if weight_decay_method == "l2" else 0.0
  direction = scale_by_reference_soap(betas, shampoo_beta, eps, l2_weight_decay=l2, **options)
  clip = clip_update_rms(max_update_rms)
  lr = optax.scale_by_learning_rate(learning_rate)
  if weight_decay_method == "decoupled":  # p ← p - lr (u + wd p)
    return optax.chain(direction, clip, optax.add_decayed_weights(weight_decay), lr)
  if weight_decay_method == "independent":  # p ← p - lr u - wd p
    return optax.chain(direction, clip, lr, optax.add_decayed_weights(-weight_decay))
  return optax.chain(direction, clip, lr)


class _Default:
  """A default that differs between evon_jax's names and the reference's."""

  def __init__(self, ours, reference):
    self.ours, self.reference = ours, reference

  def __repr__(self):
    return f"{self.ours} (with the reference's names: {self.reference})"


_FREQUENCY = _Default(10, 1)


def soap(
    learning_rate: optax.ScalarOrSchedule = 3e-3,
    b1: float = 0.95,
    b2: float = 0.95,
    shampoo_b: float | None = None,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    precondition_frequency=_FREQUENCY,
    max_precond_dim: int = 10000,
    precondition_1d: bool = False,
    stacked_dims=None,
    dimension_numbers=None,
    merge_dims: bool = False,
    relative_eps: float = 0.0,
    *,
    lr=None,
    betas=None,
    shampoo_beta=None,
    weight_decay_method=None,
    nesterov=None,
    adam_warmup_steps=None,
    correct_bias=None,
    fp32_matmul_prec=None,
    use_eigh=None,
    qr_fp32_matmul_prec=None,
    use_adaptive_criteria=None,
    adaptive_update_tolerance=None,
    power_iter_steps=None,
    max_update_rms=None,
    use_kl_shampoo=None,
    correct_shampoo_beta_bias=None,
) -> optax.GradientTransformationExtraArgs:
  """SOAP with decoupled weight decay: chain(scale_by_soap, add_decayed_weights, -lr).

  Called with any keyword of the NVIDIA reference SOAP (`emerging_optimizers.soap.SOAP`)
  that this signature lacks — `lr`, `betas`, `shampoo_beta`, `weight_decay_method`,
  `nesterov`, `adam_warmup_steps`, `correct_bias`, `fp32_matmul_prec`, `use_eigh`,
  `qr_fp32_matmul_prec`, `use_adaptive_criteria`, `adaptive_update_tolerance`,
  `power_iter_steps`, `max_update_rms`, `use_kl_shampoo`, `correct_shampoo_beta_bias` —
  it follows the reference's semantics and defaults (`scale_by_reference_soap`:
  precondition_frequency 1, betas (0.9, 0.95), factors and refresh before the step, bias
  corrections, eps after the correction, sorted QR), with `learning_rate`/`lr`, `eps`,
  `weight_decay`, `precondition_frequency` and the layout options shared. Otherwise it is
  evon_jax's SOAP (`scale_by_soap`, frequency 10 by default; see docs/composition.md for
  the differences).

  Example:
    >>> import jax.numpy as jnp, optax, evon_jax
    >>> params = {"w": jnp.ones((3, 2))}
    >>> tx = evon_jax.soap(1e-2)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> ref = evon_jax.soap(lr=1e-2, betas=(0.9, 0.95), nesterov=True)  # the reference's
    >>> updates, _ = ref.update(params, ref.init(params), params)
  """
  from evon_jax import _validation as check
  given = locals()
  # None everywhere means "not passed" (each name's default is the reference's, see
  # `scale_by_reference_soap`), except correct_shampoo_beta_bias, whose None is its default.
  reference_options = {name: given[name] for name in REFERENCE_NAMES
                       if given[name] is not None}
  if reference_options:
    if "lr" in reference_options:
      learning_rate = reference_options.pop("lr")
    own = {"b1": b1 != 0.95, "b2": b2 != 0.95, "shampoo_b": shampoo_b is not None,
           "relative_eps": relative_eps != 0.0}
    mixed = sorted(name for name, given in own.items() if given)
    if mixed:
      raise ValueError(f"soap: {mixed} are evon_jax SOAP's names and "
                       f"{sorted(reference_options)} the reference's; use one set "
                       "(the reference's betas=(b1, b2), shampoo_beta).")
    return _reference_soap(
        learning_rate, eps=eps, weight_decay=weight_decay,
        precondition_frequency=(precondition_frequency.reference
                                if isinstance(precondition_frequency, _Default)
                                else precondition_frequency),
        max_precond_dim=max_precond_dim, precondition_1d=precondition_1d,
        stacked_dims=stacked_dims, dimension_numbers=dimension_numbers,
        merge_dims=merge_dims, **reference_options)
  check.check_learning_rate(learning_rate)
  check.check_non_negative("weight_decay", weight_decay)
  return optax.chain(
      scale_by_soap(b1, b2, shampoo_b, eps, relative_eps=relative_eps,
                    precondition_frequency=(precondition_frequency.ours
                                            if isinstance(precondition_frequency, _Default)
                                            else precondition_frequency),
                    max_precond_dim=max_precond_dim, precondition_1d=precondition_1d,
                    stacked_dims=stacked_dims, dimension_numbers=dimension_numbers,
                    merge_dims=merge_dims),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  )
