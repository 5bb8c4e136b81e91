r"""VIKING: a Gaussian posterior split into the data's image and the model's kernel.

For a small model with parameters ``θ`` (any pytree, flattened with
`jax.flatten_util.ravel_pytree` into a vector of dimension ``P``) and training inputs
``x_1..x_n``, stack the outputs ``f(x_i; θ) ∈ R^K`` into one vector of length ``m = n·K``. Its
Jacobian at the mean ``θ̂`` is ``J ∈ R^{m×P}``; it is never formed, only used through
Jacobian–vector products ``J v`` (`jax.linearize`) and vector–Jacobian products ``Jᵀ u``
(`jax.linear_transpose` of the same linearisation).

**The family.** Parameter space splits into the image (row space) of ``J`` — the directions that
change the predictions on the data, the same subspace as the image of the Gauss–Newton /
Fisher matrix ``Jᵀ Λ J`` for a positive definite output Hessian ``Λ`` — and its orthogonal
complement, the kernel of ``J``, which the training predictions do not see (to first order).
With orthogonal projectors ``P_im`` and ``P_ker = I − P_im``::

  q(θ) = N(θ̂, Σ),   Σ = σ_ker² P_ker + σ_im² P_im.

It has ``P + 2`` free numbers: the mean and two scales (`VikingParams`).

**Projection.** ``P_im = J⁺ J = Jᵀ (J Jᵀ)⁺ J``. Applying it to ``v`` means finding the
coefficients ``z ∈ R^m`` of the point ``Jᵀ z`` of the image closest to ``v``:
``min_z ‖Jᵀ z − v‖²``, whose normal equations are ``J Jᵀ z = J v``; then ``P_im v = Jᵀ z``. Two
matrix-free solvers (`image_projection`):

* ``"cg"``: conjugate gradients on the ``m × m`` normal equations, matvec ``u ↦ J (Jᵀ u)``.
  ``J v`` lies in the range of ``J Jᵀ``, so the system is consistent even when ``J Jᵀ`` is
  singular, and CG started at zero stays in that range. Its convergence depends on
  ``cond(J)²``.
* ``"lsqr"``: LSQR (Golub–Kahan bidiagonalisation of ``Jᵀ`` started from ``v``, then
  Givens-rotation QR of the bidiagonal matrix, as in Paige & Saunders 1982) on the
  least-squares problem directly. Mathematically the same iterates as CG on the normal
  equations but more stable in float32 (it works with ``cond(J)``).

``damping = λ > 0`` solves ``(J Jᵀ + λ I) z = J v`` instead, giving the soft projection
``(JᵀJ + λ I)⁻¹ JᵀJ v``: directions with singular value ``s`` are kept with weight
``s²/(s² + λ)``. The default ``λ = 0`` is the exact projector; a tiny ``λ`` tames
near-singular Jacobians.

**Softmax logits.** Adding the same constant to every logit of one example leaves its softmax
unchanged, so for a classifier the parameter direction that does only this (e.g. shifting all
output biases together) changes nothing the likelihood sees, yet it lies in the image of the
raw logit Jacobian. ``center_outputs=True`` uses the Jacobian of the per-example zero-sum
logits ``f − mean_k f_k`` instead, whose image excludes such directions (they go to the kernel,
and the rank drops by at most ``n``). The default, ``False``, is the plain Jacobian of whatever
``apply_fn`` returns (right for regression); pass the same choice to every function (the
keyword is one of ``**projection_options``).

**Sampling** (reparameterised). With ``ε ~ N(0, I_P)``::

  θ = θ̂ + σ_ker (ε − P_im ε) + σ_im P_im ε,

whose covariance is ``σ_ker² P_ker + σ_im² P_im`` because the projectors are symmetric,
idempotent and mutually orthogonal.

**KL to the prior** ``N(0, α⁻¹ I)``. With ``k = rank(J) = tr(P_im)``,
``tr Σ = σ_ker² (P − k) + σ_im² k`` and ``log det Σ = (P − k) log σ_ker² + k log σ_im²``, so the
Gaussian KL ``½[α tr Σ + α ‖θ̂‖² − P − log det(α Σ)]`` becomes (`kl_divergence`)::

  KL = ½[α(σ_ker² (P − k) + σ_im² k) + α ‖θ̂‖² − P − (P − k) log(α σ_ker²) − k log(α σ_im²)].

The rank is an exact number (pass ``rank=``, e.g. ``min(n·K, P)`` for a generic network) or a
Hutchinson estimate ``k ≈ 1/M Σ_j r_jᵀ P_im r_j`` with Rademacher probes ``r_j``
(`estimate_rank`), unbiased because ``E[r rᵀ] = I``.

**Objective** (`elbo_loss`): the negative ELBO per datum,
``E_q[mean_i nll_i(θ)] + KL / num_data``, with the expectation a Monte-Carlo average over
reparameterised samples, differentiable in ``θ̂``, ``log σ_ker`` and ``log σ_im``. The KL is
linear in ``k``, so a Hutchinson rank keeps it unbiased.

**What is held fixed.** The projector depends on ``θ̂`` through ``J``; the gradient does not
follow that dependence (the projector and the rank are built from ``stop_gradient(θ̂)``). At each
step the family is the one whose subspaces are fixed at the current mean, and the ELBO is
maximised within it; the subspaces then move with the mean from step to step. The Jacobian is
that of the current minibatch's inputs, so the image is the one that minibatch sees (rank at
most ``batch·K``); pass ``projection_inputs`` (e.g. a fixed subset of the training inputs) to
use the same subspace at every step.

Scope: matrix-free but with ``O(iterations)`` JVP/VJP passes per projected vector and the
parameters held as one flat vector — meant for small models.

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> from evon_jax import viking
  >>> apply_fn = lambda p, x: x @ p["w"] + p["b"][None, :]
  >>> x, y = jnp.ones((4, 3)), jnp.array([0, 1, 2, 0])
  >>> nll_fn = lambda logits, labels: optax.softmax_cross_entropy_with_integer_labels(
  ...     logits, labels).mean()
  >>> q = viking.init({"w": jnp.zeros((3, 3)), "b": jnp.zeros(3)}, sigma_ker=0.3, sigma_im=0.1)
  >>> loss = viking.elbo_loss(jax.random.key(0), nll_fn, apply_fn, q, (x, y), num_data=4,
  ...                         prior_precision=1.0, center_outputs=True)
  >>> loss.shape
  ()

References:
  VIKING: deep variational inference with stochastic projections (arXiv:2510.23684).
  C. C. Paige and M. A. Saunders, LSQR: an algorithm for sparse linear equations and sparse
  least squares, ACM TOMS 8(1), 1982.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import jax.scipy.sparse.linalg
import optax
from jax.flatten_util import ravel_pytree

from evon_jax._validation import check_positive
from evon_jax._validation import check_static_int
from evon_jax.readout import predictive
from evon_jax.structured.viking_projections import (  # noqa: F401  (re-exported)
    SOLVERS, ApplyFn, _flat_image_projector, _rademacher, estimate_rank, image_projection,
    kernel_projection)

__all__ = [
    "VikingParams", "init", "image_projection", "kernel_projection", "estimate_rank",
    "kl_divergence", "elbo_loss", "sample", "sample_predictive", "SOLVERS",
]

NllFn = Callable[[jax.Array, Any], jax.Array]


class VikingParams(NamedTuple):
  """Variational parameters of ``N(mean, σ_ker² P_ker + σ_im² P_im)``.

  Attributes:
    mean: the mean ``θ̂``, a pytree with the model's parameter structure.
    log_sigma_ker: scalar ``log σ_ker``, the standard deviation in the kernel of ``J``.
    log_sigma_im: scalar ``log σ_im``, the standard deviation in the image of ``Jᵀ``.
  """
  mean: Any
  log_sigma_ker: jax.Array
  log_sigma_im: jax.Array


def init(params, *, sigma_ker: float = 0.1, sigma_im: float = 0.01) -> VikingParams:
  """VIKING parameters with mean ``params`` and the given scales (both must be > 0).

  Training usually pulls ``σ_ker`` up toward the prior scale ``α^{-1/2}`` (the kernel is
  unconstrained by the data) and ``σ_im`` down; starting both small keeps the first samples
  close to ``params``.
  """
  check_positive("sigma_ker", sigma_ker)
  check_positive("sigma_im", sigma_im)
  return VikingParams(params, jnp.log(jnp.asarray(sigma_ker, jnp.float32)),
                      jnp.log(jnp.asarray(sigma_im, jnp.float32)))


# ----------------------------------------------------------------------------------------------
# KL, ELBO and samples.


def _num_parameters(tree) -> int:
  return int(optax.tree_utils.tree_size(tree))


def kl_divergence(q: VikingParams, rank, prior_precision,
                  num_parameters: Optional[int] = None) -> jax.Array:
  r"""``KL(q ‖ N(0, α⁻¹ I))`` in closed form given ``k = rank(P_im)``.

  ``½[α(σ_ker² (P − k) + σ_im² k) + α ‖θ̂‖² − P − (P − k) log(α σ_ker²) − k log(α σ_im²)]``.

  Args:
    q: the variational parameters.
    rank: ``k``, exact or estimated (a float is fine; the KL is linear in it).
    prior_precision: ``α > 0``.
    num_parameters: ``P``; ``None`` counts the entries of ``q.mean``.
  """
  check_positive("prior_precision", prior_precision)
  total = _num_parameters(q.mean) if num_parameters is None else num_parameters
  flat_mean, _ = ravel_pytree(q.mean)
  log_alpha = jnp.log(prior_precision)
  var_ker, var_im = jnp.exp(2 * q.log_sigma_ker), jnp.exp(2 * q.log_sigma_im)
  kernel_dim = total - rank
  return 0.5 * (prior_precision * (var_ker * kernel_dim + var_im * rank)
                + prior_precision * jnp.sum(flat_mean**2) - total
                - kernel_dim * (log_alpha + 2 * q.log_sigma_ker)
                - rank * (log_alpha + 2 * q.log_sigma_im))


def _deviations(q: VikingParams, noise, projected_noise):
  """``σ_ker (ε − P_im ε) + σ_im P_im ε`` row by row (flat)."""
  return (jnp.exp(q.log_sigma_ker) * (noise - projected_noise)
          + jnp.exp(q.log_sigma_im) * projected_noise)


def _flat_samples(key, apply_fn, q: VikingParams, inputs, num_samples, projection_options):
  """``(num_samples, P)`` flat samples and the mean's ``unravel``."""
  check_static_int("num_samples", num_samples, 1)
  flat_mean, unravel = ravel_pytree(q.mean)
  project = _flat_image_projector(apply_fn, q.mean, inputs, **projection_options)
  noise = jax.random.normal(key, (num_samples, flat_mean.shape[0]), flat_mean.dtype)
  flat = flat_mean[None, :] + _deviations(q, noise, jax.vmap(project)(noise))
  return flat, unravel


def sample(key: jax.Array, apply_fn: ApplyFn, q: VikingParams, inputs, num_samples: int,
           **projection_options):
  """``num_samples`` parameter draws ``θ̂ + σ_ker P_ker ε + σ_im P_im ε``.

  Args:
    key: PRNG key.
    apply_fn: the model.
    q: the variational parameters.
    inputs: inputs defining the projection (typically the training inputs or a subset).
    num_samples: number of draws.
    **projection_options: keyword options of `image_projection`.

  Returns:
    A pytree like ``q.mean`` with a leading ``num_samples`` axis.
  """
  flat, unravel = _flat_samples(key, apply_fn, q, inputs, num_samples, projection_options)
  return jax.vmap(unravel)(flat)


def sample_predictive(key: jax.Array, apply_fn: ApplyFn, q: VikingParams, projection_inputs,
                      inputs, num_samples: int, **projection_options) -> jax.Array:
  """Softmax probabilities ``(num_samples, n, K)`` on ``inputs`` under VIKING samples.

  The subspaces are those of ``projection_inputs`` (the training inputs or a subset); the
  predictions are on ``inputs`` (e.g. test points). ``mean(axis=0)`` is the Bayesian model
  average; `evon_jax.metrics` takes the result directly.
  """
  weights = sample(key, apply_fn, q, projection_inputs, num_samples, **projection_options)
  return predictive.probabilities_of_samples(apply_fn, weights, inputs)


def elbo_loss(key: jax.Array, nll_fn: NllFn, apply_fn: ApplyFn, q: VikingParams, batch, *,
              num_data: int, prior_precision, num_samples: int = 1, num_probes: int = 8,
              rank=None, projection_inputs=None, **projection_options) -> jax.Array:
  r"""Negative ELBO per datum: ``E_q[nll_fn(apply_fn(θ, x), y)] + KL(q ‖ prior) / num_data``.

  The expectation is a Monte-Carlo average over ``num_samples`` reparameterised draws, so the
  loss is differentiable in ``q.mean``, ``q.log_sigma_ker`` and ``q.log_sigma_im`` (use
  ``jax.grad`` with respect to ``q`` and any optax optimizer). The projector and the rank are
  taken at ``stop_gradient(q.mean)`` (see the module docstring).

  Args:
    key: PRNG key (sample noise and Hutchinson probes).
    nll_fn: ``nll_fn(outputs, targets) -> scalar``, the *mean* negative log-likelihood over
      the batch (e.g. ``optax.softmax_cross_entropy_with_integer_labels(...).mean()``).
    apply_fn: ``apply_fn(params, inputs) -> outputs``.
    q: the variational parameters.
    batch: ``(inputs, targets)``.
    num_data: size of the training set (the KL is shared over it).
    prior_precision: ``α`` of the prior ``N(0, α⁻¹ I)``.
    num_samples: Monte-Carlo samples of the expected NLL.
    num_probes: Rademacher probes of the rank estimate (unused when ``rank`` is given).
    rank: an exact/fixed ``k``; ``None`` estimates it (`estimate_rank`) at each call.
    projection_inputs: inputs defining ``J``; ``None`` uses the batch inputs.
    **projection_options: keyword options of `image_projection`.

  Returns:
    A scalar.
  """
  check_positive("num_data", num_data)
  check_static_int("num_samples", num_samples, 1)
  inputs, targets = batch
  proj_inputs = inputs if projection_inputs is None else projection_inputs
  flat_mean, unravel = ravel_pytree(q.mean)
  project = jax.vmap(_flat_image_projector(apply_fn, q.mean, proj_inputs,
                                           **projection_options))
  noise_key, probe_key = jax.random.split(key)
  noise = jax.random.normal(noise_key, (num_samples, flat_mean.shape[0]), flat_mean.dtype)
  if rank is None:
    check_static_int("num_probes", num_probes, 1)
    probes = _rademacher(probe_key, (num_probes, flat_mean.shape[0]), flat_mean.dtype)
    # One batched solve for the sample noise and the probes.
    projected = project(jnp.concatenate([noise, probes], axis=0))
    projected_noise, projected_probes = projected[:num_samples], projected[num_samples:]
    rank = jnp.mean(jnp.sum(probes * projected_probes, axis=-1))
  else:
    projected_noise = project(noise)
  flat = flat_mean[None, :] + _deviations(q, noise, projected_noise)
  expected_nll = jnp.mean(
      jax.vmap(lambda theta: nll_fn(apply_fn(unravel(theta), inputs), targets))(flat))
  kl = kl_divergence(q, jax.lax.stop_gradient(rank), prior_precision, flat_mean.shape[0])
  return expected_nll + kl / num_data
