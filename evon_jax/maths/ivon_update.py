"""IVON's update of a diagonal Gaussian, written for any orthonormal coordinate system.

EVON applies these elementwise in the Kronecker eigenbasis; IVON is the identity-basis case.
All arrays here are in the same (eigen) coordinates. Notation (docs/algorithm.md):
  V = 1 / (ess (H + delta))   posterior variance, z the standard normal draw, E = sqrt(V) z.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def posterior_std(hessian, ess, weight_decay):
  """sqrt(V) = 1 / sqrt(ess (H + delta))."""
  return jax.lax.rsqrt(ess * (hessian + weight_decay))


def price_hessian_estimate(mean_normal_times_grad, hessian, ess, weight_decay):
  """Reparameterisation (Price) estimate ĥ = mean_s(E_s ⊙ G_s) / V.

  With E = sqrt(V) z this is mean_s(z_s ⊙ G_s) / sqrt(V), so the noise never has to be
  rescaled or stored: only the standard normal draw z and the rotated gradient are needed.
  """
  return mean_normal_times_grad * jnp.sqrt(ess * (hessian + weight_decay))


def momentum_baseline(momentum, b1, t):
  """Ḡ/(1 - b1^(t-1)), the bias-corrected momentum of the steps before step t (0 at t = 1):
  the Price estimate's control variate (`hessian_baseline='momentum'`)."""
  seen = t - 1
  scale = jnp.where(seen > 0, 1 / (1 - b1 ** jnp.maximum(seen, 1)), 0.0)  # one scalar
  return momentum.astype(jnp.result_type(momentum, jnp.float32)) * scale


def clip_hessian_estimate(estimate, hessian, ratio, eps):
  """Keeps ĥ within ±ratio (H + eps): damps rare huge estimates (`hess_clip_ratio`)."""
  bound = ratio * (hessian + eps)
  return jnp.clip(estimate, -bound, bound)


def ivon_hessian_update(hessian, estimate, b2, weight_decay, one_minus_b2=None):
  """IVON's Hessian EMA with the second-order correction that keeps H positive.

  `one_minus_b2` may be passed separately (see `maths.gates.ema_coefficients`): (b2, 0) then
  leaves H exactly unchanged.
  """
  take = 1 - b2 if one_minus_b2 is None else one_minus_b2
  correction = 0.5 * take ** 2 * (hessian - estimate) ** 2 / (hessian + weight_decay)
  return b2 * hessian + take * estimate + correction


def ivon_direction(momentum, bias_correction, mean, hessian, weight_decay, eps,
                   prior_gradient=None):
  """Natural-gradient direction with the coupled prior: (m̂ + delta M) / (H + delta + eps).

  A structured prior passes its own gradient per example (`maths.prior.leaf_terms`) as
  `prior_gradient` and its per-coordinate precision as `weight_decay`."""
  if prior_gradient is None:
    prior_gradient = weight_decay * mean
  return (momentum / bias_correction + prior_gradient) / (hessian + weight_decay + eps)
