"""VIKING's matrix-free projections onto the image and kernel of the network Jacobian,
and the Hutchinson estimate of its rank (re-exported by `evon_jax.viking`)."""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional

import jax
import jax.numpy as jnp
import jax.scipy.sparse.linalg
from jax.flatten_util import ravel_pytree

from evon_jax._validation import check_choice, check_non_negative, check_positive
from evon_jax._validation import check_static_int

ApplyFn = Callable[[Any, jax.Array], jax.Array]
Solver = Literal["cg", "lsqr"]
SOLVERS = ("cg", "lsqr")


def _check_projection_options(solver, maxiter, tol, damping):
  check_choice("solver", solver, SOLVERS)
  if maxiter is not None:
    check_static_int("maxiter", maxiter, 1)
  check_positive("tol", tol)
  check_non_negative("damping", damping)


def _center(outputs: jax.Array) -> jax.Array:
  """Per-example zero-sum outputs (removes the softmax-invariant shift of the logits)."""
  return outputs - jnp.mean(outputs, axis=-1, keepdims=True)


def _flat_model(apply_fn: ApplyFn, unravel, inputs, center_outputs: bool):
  """``θ_flat ↦ vec f(inputs; θ)``, the function whose Jacobian is ``J``."""
  def model(flat_params):
    outputs = apply_fn(unravel(flat_params), inputs)
    if center_outputs:
      outputs = _center(outputs)
    return jnp.ravel(outputs)
  return model


def _cg_coefficients(jvp, vjp, jv, *, damping, tol, maxiter):
  """``z`` with ``(J Jᵀ + λ) z = J v`` by conjugate gradients."""
  def normal_matvec(z):
    return jvp(vjp(z)) + damping * z
  z, _ = jax.scipy.sparse.linalg.cg(normal_matvec, jv, tol=tol, atol=0.0, maxiter=maxiter)
  return z


def _safe_divide(numerator, denominator):
  positive = denominator > 0
  return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)


def _lsqr_coefficients(jvp, vjp, v, num_outputs, dtype, *, damping, tol, maxiter):
  r"""``z`` minimising ``‖Jᵀ z − v‖² + λ ‖z‖²`` by LSQR on the operator ``A = Jᵀ``.

  Golub–Kahan bidiagonalisation: ``β₁ u₁ = v``, ``α₁ w₁ = Aᵀ u₁ = J u₁``, then
  ``β u ← A w − α u``, ``α w ← Aᵀ u − β w`` (``u`` in parameter space, ``w`` in output space).
  A Givens rotation per step turns the lower-bidiagonal least-squares problem into an
  upper-triangular one and updates the solution along the search direction ``d``; a second
  rotation per step folds in the damping row ``√λ I``. Stops when the residual is small
  relative to ``‖v‖`` (``v`` in the image), when the normal-equation residual
  ``‖Aᵀ r‖ = |φ̄| α |c|`` is small relative to ``‖A‖ ‖r‖`` (the least-squares optimum, ``v`` has a
  kernel part), on breakdown (``α = 0`` or ``β = 0``: the Krylov space is exhausted) or after
  ``maxiter`` steps.
  """
  damp = jnp.sqrt(jnp.asarray(damping, dtype))
  beta1 = jnp.linalg.norm(v)
  u = _safe_divide(v, beta1)
  w = jvp(u)
  alpha = jnp.linalg.norm(w)
  w = _safe_divide(w, alpha)
  init_state = dict(
      step=jnp.zeros((), jnp.int32), z=jnp.zeros((num_outputs,), dtype), u=u, w=w,
      direction=w, alpha=alpha, phibar=beta1, rhobar=alpha, anorm_sq=alpha**2,
      done=(alpha == 0) | (beta1 == 0))

  def cond(state):
    return ~state["done"] & (state["step"] < maxiter)

  def body(state):
    alpha, phibar = state["alpha"], state["phibar"]
    u = vjp(state["w"]) - alpha * state["u"]
    beta = jnp.linalg.norm(u)
    u = _safe_divide(u, beta)
    w = jvp(u) - beta * state["w"]
    alpha_next = jnp.linalg.norm(w)
    w = _safe_divide(w, alpha_next)
    # Rotate the damping row away (identity when λ = 0).
    rhobar_damped = jnp.sqrt(state["rhobar"]**2 + damp**2)
    phibar = _safe_divide(state["rhobar"], rhobar_damped) * phibar
    # Rotate the subdiagonal β away.
    rho = jnp.sqrt(rhobar_damped**2 + beta**2)
    c = _safe_divide(rhobar_damped, rho)
    s = _safe_divide(beta, rho)
    theta = s * alpha_next
    phi = c * phibar
    z = state["z"] + _safe_divide(phi, rho) * state["direction"]
    direction = w - _safe_divide(theta, rho) * state["direction"]
    phibar = s * phibar
    anorm_sq = state["anorm_sq"] + beta**2 + alpha_next**2 + damp**2
    # φ̄ carries the sign of the rotations; |φ̄| is the residual norm ‖r‖.
    residual = jnp.abs(phibar)
    normal_residual = residual * alpha_next * jnp.abs(c)
    done = ((residual <= tol * beta1) | (normal_residual <= tol * jnp.sqrt(anorm_sq) * residual)
            | (alpha_next == 0) | (beta == 0))
    return dict(step=state["step"] + 1, z=z, u=u, w=w, direction=direction, alpha=alpha_next,
                phibar=phibar, rhobar=-c * alpha_next, anorm_sq=anorm_sq, done=done)

  return jax.lax.while_loop(cond, body, init_state)["z"]


def _flat_image_projector(apply_fn: ApplyFn, params, inputs, *, solver: Solver = "cg",
                          maxiter: Optional[int] = None, tol: float = 1e-6,
                          damping: float = 0.0, center_outputs: bool = False):
  """Linearises the model once at ``params`` and returns ``v_flat ↦ P_im v_flat``.

  The projector is built from ``stop_gradient(params)``: it is a fixed linear map, and no
  gradient flows through the solver.
  """
  _check_projection_options(solver, maxiter, tol, damping)
  flat_params, unravel = ravel_pytree(jax.lax.stop_gradient(params))
  model = _flat_model(apply_fn, unravel, inputs, center_outputs)
  outputs, jvp = jax.linearize(model, flat_params)
  vjp_tuple = jax.linear_transpose(jvp, flat_params)
  num_outputs = outputs.shape[0]
  # Krylov methods are exact after rank(J) ≤ num_outputs steps in exact arithmetic; twice that
  # leaves room for float32 loss of orthogonality.
  steps = 2 * num_outputs if maxiter is None else maxiter

  def vjp(u):
    return vjp_tuple(u)[0]

  def project(vector):
    vector = jax.lax.stop_gradient(vector)
    if solver == "cg":
      z = _cg_coefficients(jvp, vjp, jvp(vector), damping=damping, tol=tol, maxiter=steps)
    else:
      z = _lsqr_coefficients(jvp, vjp, vector, num_outputs, outputs.dtype, damping=damping,
                             tol=tol, maxiter=steps)
    return vjp(z)

  return project


def image_projection(apply_fn: ApplyFn, params, inputs, vector, *, solver: Solver = "cg",
                     maxiter: Optional[int] = None, tol: float = 1e-6, damping: float = 0.0,
                     center_outputs: bool = False):
  r"""``P_im v = Jᵀ (J Jᵀ)⁺ J v``: the part of ``v`` that changes the predictions on ``inputs``.

  ``J`` is the Jacobian of ``apply_fn(params, inputs)`` (all outputs, flattened) with respect
  to ``params``. See the module docstring for the two solvers.

  Args:
    apply_fn: ``apply_fn(params, inputs) -> outputs`` (e.g. ``(n, K)`` logits).
    params: the linearisation point (a pytree).
    inputs: the inputs defining ``J`` (typically training inputs or a subset).
    vector: a pytree with the structure of ``params``.
    solver: ``"cg"`` (normal equations ``J Jᵀ z = J v``) or ``"lsqr"`` (``min ‖Jᵀ z − v‖``).
    maxiter: solver iterations; ``None`` means twice the number of outputs.
    tol: relative residual tolerance of the solver.
    damping: ``λ ≥ 0``; ``λ > 0`` gives the soft projection ``(JᵀJ + λ)⁻¹ JᵀJ v``.
    center_outputs: differentiate the per-example zero-sum outputs (softmax logits; see the
      module docstring).

  Returns:
    ``P_im v``, a pytree with the structure of ``vector``.
  """
  project = _flat_image_projector(apply_fn, params, inputs, solver=solver, maxiter=maxiter,
                                  tol=tol, damping=damping, center_outputs=center_outputs)
  flat_vector, unravel = ravel_pytree(vector)
  return unravel(project(flat_vector))


def kernel_projection(apply_fn: ApplyFn, params, inputs, vector, **projection_options):
  """``P_ker v = v − P_im v``: the part of ``v`` the predictions on ``inputs`` do not see.

  ``projection_options`` are the keyword options of `image_projection`.
  """
  image = image_projection(apply_fn, params, inputs, vector, **projection_options)
  return jax.tree.map(jnp.subtract, vector, image)


def _rademacher(key, shape, dtype):
  return jax.random.rademacher(key, shape, dtype=dtype)


def estimate_rank(key: jax.Array, apply_fn: ApplyFn, params, inputs, *, num_probes: int = 16,
                  **projection_options) -> jax.Array:
  r"""Hutchinson estimate ``k ≈ 1/M Σ_j r_jᵀ P_im r_j`` of ``rank(J) = tr(P_im)``.

  Rademacher probes ``r_j``; the estimator is unbiased with variance
  ``2(k − Σ_i (P_im)_ii²) / M``. ``projection_options`` are those of `image_projection`.

  Returns:
    A float scalar.
  """
  check_static_int("num_probes", num_probes, 1)
  project = _flat_image_projector(apply_fn, params, inputs, **projection_options)
  flat_params, _ = ravel_pytree(params)
  probes = _rademacher(key, (num_probes, flat_params.shape[0]), flat_params.dtype)
  return jnp.mean(jnp.sum(probes * jax.vmap(project)(probes), axis=-1))
