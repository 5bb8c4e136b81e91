"""User-facing EVON and IVON optimizers: validated compositions of the pieces in
`evon_jax.transforms` (docs/composition.md)."""


import math
from typing import Optional

import jax.numpy as jnp
import optax

from evon_jax import _validation as check
from evon_jax.transforms import (
    eigenbasis_refresh, eigenspace_ivon, inject_noise, kronecker_factor_ema, _prior)
from evon_jax.transforms.diagonal import default_weight_decay


def _dtype_or_none(dtype):
  """A floating dtype, or None; a clear error for anything else."""
  if dtype is None:
    return None
  try:
    resolved = jnp.dtype(dtype)
  except TypeError as error:
    raise ValueError(f"momentum_dtype: {dtype!r} is not a dtype.") from error
  if not jnp.issubdtype(resolved, jnp.floating):
    raise ValueError(f"momentum_dtype must be a floating dtype, got {resolved}.")
  return resolved


def evon(
    learning_rate: optax.ScalarOrSchedule,
    *,
    ess: float,
    hess_init: Optional[float] = None,
    b1: float = 0.95,
    b2: float = 0.9999,
    shampoo_b: Optional[float] = None,
    eps: float = 1e-10,
    weight_decay: Optional[float] = None,
    precondition_frequency: int = 10,
    max_precond_dim: int = 10000,
    precondition_1d: bool = False,
    hess_clip_ratio: Optional[float] = None,
    hessian_baseline: Optional[str] = "momentum",
    whiten: bool = False,
    phasing: bool = False,
    mc_samples: int = 1,
    key=0,
    drop_in: bool = True,
    refresh_method: str = "power_qr",
    factor_gradient: str = "regularized",
    factor_statistic: str = "mean_gradient",
    stagger_refresh: bool = False,
    clip_radius: float = math.inf,
    dtype=None,
    momentum_dtype=None,
    rotation_precision="highest",
    axis_name=None,
    replica_noise: str = "shared",
    stacked_dims=None,
    dimension_numbers=None,
    merge_dims: bool = False,
    power_iter_steps: int = 1,
    adaptive_update_tolerance: Optional[float] = None,
    use_kl_shampoo: bool = False,
    prior=None,
    noise_basis: str = "eigen",
) -> optax.GradientTransformationExtraArgs:
  r"""Eigenspace Variational Online Newton: IVON in SOAP's eigenbasis (a SOAP-Bubble).

  The posterior of a matrix leaf is ``W = M + Q_L E Q_Rᵀ`` with ``E_ij ~ N(0, V_ij)``,
  ``V = 1 / (ess (H + weight_decay))``: a non-diagonal Gaussian stored with SOAP's memory.
  A leaf with more dims gets one factor and basis per dim, ``W = M + E ×₁ Q₁ ×₂ Q₂ …``.
  Each real step (docs/algorithm.md): rotate the gradient in, ``ĥ = E ⊙ G° / V`` (Price),
  ``Ḡ ← b1 Ḡ + (1-b1) G°``, IVON's positive Hessian update, ``M ← M - lr Q_L U Q_Rᵀ`` with
  ``U = (Ḡ/(1-b1ᵗ) + δ M°) / (H + δ + eps)`` (Newton–Schulz whitened when ``whiten``),
  Kronecker-factor EMAs of the gradient, and a power-iteration + QR basis refresh every
  ``precondition_frequency`` steps (full ``eigh`` on the first call).

  **Drop-in mode** (default): in a plain optax loop the params the loop holds are the current
  posterior sample; ``update`` needs them (``tx.update(grads, state, params)``) and returns
  the move to the next sample. The mean lives in the state: ``evon_jax.posterior.mean``.
  The first call (gradient at the mean) only initialises factors and bases. With
  ``mc_samples=k`` every k calls (fresh noise each) make one step.

  **Explicit mode** (``drop_in=False``): the loop holds the mean; take gradients at
  ``evon_jax.training_samples(state, mc_samples)`` (a leading sample axis, e.g. with
  ``jax.vmap``) and ``update`` returns the move of the mean.

  Args:
    learning_rate: a float or an optax schedule (evaluated at the real-step index).
    ess: effective sample size, usually the number of training examples.
    hess_init: initial value of H; default 1.0, or 0.1 with ``whiten=True`` (the better
      of the two in the sweep of docs/hyperparameters.md for each setting).
    b1: momentum decay (bias-corrected).
    b2: Hessian EMA decay.
    shampoo_b: Kronecker-factor EMA decay (default: b2; tuned runs use 0.995).
    eps: added to H + weight_decay in the update's denominator.
    weight_decay: prior precision per example δ (prior N(0, 1/(ess δ) I)); default 1e-4
      (IVON's; the authors' EVON used 1e-6, an almost flat prior on small data), or 0 when
      a `prior` is given.
    precondition_frequency: real steps between basis refreshes (static): an int, or a
      schedule ``step -> int`` of the traced step (write it with `jnp`).
    max_precond_dim: an axis longer than this keeps the identity basis (static).
    precondition_1d: give 1-D leaves a full basis (else plain IVON on them).
    hess_clip_ratio: clip ĥ to ±ratio (H + eps); None disables.
    hessian_baseline: 'momentum' (default): the Price estimate uses ``G° - b`` with ``b``
      the bias-corrected momentum of the earlier steps — unbiased (the draw is independent
      of b) and without the ``g(M)² ess (H+δ)`` variance that inflates H far from an optimum
      at a large ess (see `eigenspace_ivon`); None: the reference's estimate.
    whiten: Newton–Schulz orthogonalise matrix updates, L2-normalise vector updates (the
      authors' default; off by default here: the Newton-like step ``lr (Ḡ + δM)/(H + δ)``
      gave a better posterior predictive on four of five small datasets at lower cost, see
      docs/hyperparameters.md; with whitening start at lr 0.01).
    phasing: alternate clean steps (no noise; factors updated; H kept) and noisy steps
      (noise; H updated; factors updated only on refresh steps). Odd real steps are clean.
    mc_samples: Monte-Carlo samples per step (static).
    key: int seed or a PRNG key for the noise.
    drop_in: see above.
    refresh_method: 'power_qr' (reference) or 'eigh' (exact; tracks close eigenvalues).
    factor_gradient: 'regularized' (default) — the factor statistics use g + δ θ at the
      sample, the gradient of the regularised objective, whose outer product has the
      Hessian's eigenvectors at the optimum (one axpy; removes the rank-one bias that keeps
      the reference from the exact covariance) — or 'loss' (the reference's g alone).
    factor_statistic: 'mean_gradient' (reference: outer product of the averaged gradient) or
      'per_sample' (average of per-sample outer products; no 1/mc_samples dilution).
    stagger_refresh: spread refreshes of different leaves over the period (flattens spikes).
    clip_radius: clip U elementwise to ±clip_radius (IVON's option); inf disables.
    dtype: dtype of all statistics (default float32, or wider params' dtype).
    momentum_dtype: dtype in which the momentum Ḡ is stored (like optax's `mu_dtype`), e.g.
      'bfloat16' to save half a parameter buffer; arithmetic stays in `dtype`. The mean,
      Hessian, factors and bases always keep `dtype` (the posterior lives in them).
    rotation_precision: `jax.lax.Precision` of the per-step rotations. Default 'highest'
      (full float32, as the PyTorch reference computes): on GPUs/TPUs the default precision
      (TF32/bf16) perturbs the sample by ~1e-3 of the weights, which can exceed a narrow
      posterior's width. Pass 'default' to trade that for speed. Refresh and change of basis
      always use full precision.
    axis_name: name (or tuple of names) of a mapped axis (`shard_map`, `pmap`) over which
      the Monte-Carlo statistics (g°, z ⊙ g°, the factor gradient) are averaged, so every
      replica keeps the same posterior. Not needed under plain `jit` with sharded arrays
      (there XLA inserts the reductions itself). Call `update` inside the mapped function.
    replica_noise: with `axis_name`, 'shared' (one sample for all replicas: the run equals
      the single-device run on the global batch) or 'independent' (each replica evaluates
      its own sample on its shard: MC samples for free, as the PyTorch reference's
      distributed mode does; the params then differ across replicas, so keep them
      device-varying). Either way `ess` is the size of the whole training set.
    stacked_dims: leading dims of a leaf that index stacked, independent matrices — e.g. 1
      for the (layers, m, n) kernels of blocks stacked by `nnx.scan`, so each layer gets its
      own factors and bases instead of one (layers·m) x n matrix view. An int for every
      leaf (capped at each leaf's rank) or a callable `(path, leaf) -> int`, e.g.
      ``lambda path, leaf: 1 if "blocks" in jax.tree_util.keystr(path) else 0``.
      Default None: no stacked dims.
    dimension_numbers: how a leaf's (non-stacked) dims form Kronecker axes: None (default)
      gives every dim its own factor and basis (an attention kernel (768, 12, 64) gets
      768², 12² and 64² factors); a callable `(path, leaf) -> groups` may merge neighbouring
      dims, e.g. ``((0, 1), (2,))`` views a (768, 12, 64) kernel as 768·12 x 64, and
      `evon_jax.matrix_view` merges all but the last dim of every leaf (one rows x cols pair;
      the layout of evon_jax before 0.2). Returning None keeps a leaf's default.
    merge_dims: merge neighbouring dims greedily while their product stays within
      `max_precond_dim` (the reference SOAP's `merge_dims`); exclusive with
      `dimension_numbers`.
    power_iter_steps: power iterations (each followed by a QR) per power-QR refresh (the
      reference SOAP's option of that name).
    adaptive_update_tolerance: if set, a due refresh of a side is skipped while its basis
      still diagonalises its factor: ‖diag(Qᵀ F Q)‖ ≥ (1 - tolerance) ‖F‖_F (the reference
      SOAP's adaptive criterion, judged per side; see `eigenbasis_refresh`).
    use_kl_shampoo: KL-Shampoo factor statistics (Lin et al., arXiv 2509.03378): each side's
      outer product weighted by the other side's inverse eigenvalues (`kl_shampoo_statistics`
      with `scaled=True`: the first update reads the empty factors as the gradient's
      isotropic scale, the eigenvalues are floored at 1e-6 of their mean).
    prior: a Gaussian prior N(m₀, P₀⁻¹) given as a `SoapBubble` or an EVON/IVON state —
      typically the posterior of the previous task (continual learning): initialise at its
      mean, ``tx.init(evon_jax.posterior.mean(previous))``, and set `ess` to the new
      task's size. P₀ enters the step exactly through its gradient and, per coordinate of
      the current basis, through diag(Qᵀ P₀ Q)/ess where the isotropic prior has δ (see
      `eigenspace_ivon`; with `factor_gradient='regularized'` the factors take the
      gradient of the whole regularised objective). `weight_decay` then defaults to 0.
    noise_basis: 'eigen' (default) draws the noise in eigen coordinates, as the reference;
      'parameter' draws it in parameter coordinates and rotates it in (the sample
      ``M + Σ^{1/2} ξ``, the same posterior): the run is then a continuous function of its
      inputs even where the eigenbasis is ill-determined — a 1e-7 input change moved the
      weights by ≤ 6e-5 after 48 steps instead of up to 0.19 — at 1.18–1.26x the mean step
      time (see `inject_noise`, benchmarks/results/sensitivity.md).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, evon_jax
    >>> params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    >>> loss = lambda p: jnp.sum((p["w"] - 1.0) ** 2) + jnp.sum(p["b"] ** 2)
    >>> tx = evon_jax.evon(1e-2, ess=100.0, hess_init=1.0)
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> mean = evon_jax.posterior.mean(state)

  References:
    Minut et al., SOAP-Bubbles: Structured Weight Uncertainty for Neural Networks,
    arXiv 2606.23357, 2026. Shen et al., Variational Learning is Effective for Large Deep
    Networks, arXiv 2402.17641, 2024.
  """
  # The pieces validate their own arguments (learning rate, ess, betas, mc_samples, ...).
  if shampoo_b is not None:
    check.check_beta("shampoo_b", shampoo_b)
  check.check_non_negative("eps", eps)
  if hess_clip_ratio is not None:
    check.check_positive("hess_clip_ratio", hess_clip_ratio)
  if not callable(precondition_frequency):
    check.check_static_int("precondition_frequency", precondition_frequency, 1)
  check.check_static_int("max_precond_dim", max_precond_dim, 0)
  check.check_choice("refresh_method", refresh_method, ("power_qr", "eigh"))
  check.check_choice("factor_gradient", factor_gradient, ("loss", "regularized"))
  check.check_choice("factor_statistic", factor_statistic, ("mean_gradient", "per_sample"))
  check.check_replicas(axis_name, replica_noise)
  check.check_stacked_dims(stacked_dims)
  check.check_dimension_numbers(dimension_numbers, merge_dims)
  if hess_init is None:
    hess_init = 0.1 if whiten else 1.0
  if prior is not None:
    prior = _prior.as_bubble(prior)
  weight_decay = default_weight_decay(weight_decay, prior)
  regularization = weight_decay if factor_gradient == "regularized" else 0.0
  return inject_noise(
      eigenbasis_refresh(
          eigenspace_ivon(
              learning_rate, ess=ess, hess_init=hess_init, b1=b1, b2=b2, eps=eps,
              weight_decay=weight_decay, hess_clip_ratio=hess_clip_ratio,
              clip_radius=clip_radius, whiten=whiten, hessian_baseline=hessian_baseline,
              dtype=dtype,
              momentum_dtype=_dtype_or_none(momentum_dtype), prior=prior),
          factors=kronecker_factor_ema(b2 if shampoo_b is None else shampoo_b,
                                       statistic=factor_statistic,
                                       regularization=regularization,
                                       prior_gradient=factor_gradient == "regularized",
                                       kl_shampoo=bool(use_kl_shampoo), kl_eps=1e-6,
                                       kl_scaled=True, dtype=dtype),
          precondition_frequency=precondition_frequency, max_precond_dim=max_precond_dim,
          precondition_1d=precondition_1d, refresh_method=refresh_method,
          stagger_refresh=stagger_refresh, stacked_dims=stacked_dims,
          dimension_numbers=dimension_numbers, merge_dims=merge_dims, dtype=dtype,
          rotation_precision=rotation_precision, power_iter_steps=power_iter_steps,
          adaptive_tolerance=adaptive_update_tolerance, adaptive_per_side=True),
      key=key, mc_samples=mc_samples, drop_in=drop_in, phasing=phasing, axis_name=axis_name,
      replica_noise=replica_noise, noise_basis=noise_basis)


def ivon(
    learning_rate: optax.ScalarOrSchedule,
    *,
    ess: float,
    hess_init: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.99999,
    weight_decay: Optional[float] = None,
    clip_radius: float = math.inf,
    rescale_lr: bool = True,
    hessian_baseline: Optional[str] = "momentum",
    mc_samples: int = 1,
    key=0,
    drop_in: bool = True,
    dtype=None,
    momentum_dtype=None,
    axis_name=None,
    replica_noise: str = "shared",
    prior=None,
) -> optax.GradientTransformationExtraArgs:
  r"""IVON (Improved Variational Online Newton): a diagonal Gaussian posterior.

  Exactly EVON with identity bases, ``eps = 0`` and no whitening: per parameter,
  ``ĥ = E (G - b) / V`` (b: the bias-corrected momentum of the earlier steps; 0 with
  ``hessian_baseline=None``, the reference's estimate; see `evon`), ``m ← b1 m + (1-b1) g``,
  ``h ← b2 h + (1-b2) ĥ + ½(1-b2)²(h-ĥ)²/(h+δ)``,
  ``μ ← μ - lr' clip((m/(1-b1ᵗ) + δ μ)/(h + δ), clip_radius)`` with
  ``lr' = lr (hess_init + δ)`` when ``rescale_lr`` (δ the scalar weight decay, also with a
  `prior`). Posterior ``N(μ, 1/(ess (h + δ)))``.
  Drop-in and explicit modes, ``mc_samples``, ``key``, ``dtype``, ``momentum_dtype``,
  ``axis_name``, ``replica_noise`` and ``prior`` behave as in `evon` (``weight_decay``:
  1e-4, or 0 with a `prior`). With a structured prior (an EVON posterior) IVON keeps its
  diagonal Gaussian: the prior's exact gradient, and its diagonal diag(P₀)/ess per entry.

  Example:
    >>> import jax, jax.numpy as jnp, optax, evon_jax
    >>> params = jnp.zeros(3)
    >>> tx = evon_jax.ivon(0.1, ess=100.0)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(2 * params - 1, state, params)

  References:
    Shen et al., Variational Learning is Effective for Large Deep Networks, ICML 2024.
  """
  # The pieces validate their own arguments (learning rate, ess, betas, mc_samples, ...).
  check.check_replicas(axis_name, replica_noise)
  return inject_noise(
      eigenspace_ivon(
          learning_rate, ess=ess, hess_init=hess_init, b1=b1, b2=b2, eps=0.0,
          weight_decay=weight_decay, clip_radius=clip_radius, rescale_lr=rescale_lr,
          hessian_baseline=hessian_baseline, dtype=dtype,
          momentum_dtype=_dtype_or_none(momentum_dtype), prior=prior),
      key=key, mc_samples=mc_samples, drop_in=drop_in, axis_name=axis_name,
      replica_noise=replica_noise)
