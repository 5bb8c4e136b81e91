"""evon_jax: structured weight uncertainty (SOAP-Bubbles) as optax transformations.

Optimizers: `evon` (IVON in SOAP's eigenbasis), `ivon` (diagonal), `soap` (deterministic
baseline) and the `scale_by_soap` piece. The four composable pieces they are made of
(`evon_jax.transforms`, docs/composition.md): `kronecker_factor_ema`, `eigenbasis_refresh`,
`eigenspace_ivon` / `eigenspace_adam` and `inject_noise`. `evon_jax.posterior` reads the posterior out of an
optimizer state; `training_samples` serves explicit (mean-in-the-loop) training.

Other structured posteriors, for comparison and for models trained without EVON:
`laplace` (post-hoc SOAP-Bubble Laplace from any trained model; returns a `SoapBubble`),
`lowrank` (layers W = A Bᵀ, so a posterior on the factors lives on the rank-r manifold),
`meanfield` (Bayes-by-backprop mean-field VI on any pytree) and `viking` (a Gaussian split
by the kernel and image of the network Jacobian).
"""

import sys as _sys

# The package by role: maths/ (Kronecker views and products, eigenbases, whitening, normal
# draws, IVON's elementwise update), transforms/ (the four composable pieces), readout/ (the
# SoapBubble, posterior read-outs, predictive, metrics), structured/ (the seed papers' other
# posteriors: Laplace, low-rank, mean-field, VIKING).
from evon_jax.maths import eigenbasis, kronecker, whitening
from evon_jax.maths import ivon_update, normal_draws
from evon_jax.readout import bubble, merging, metrics, plots, posterior, predictive, pruning
from evon_jax import transforms
from evon_jax.transforms import (
    eigenbasis_refresh, eigenspace_adam, eigenspace_ivon, inject_noise, kronecker_factor_ema)
from evon_jax.readout.bubble import SoapBubble
from evon_jax.transforms import InjectNoiseState as EvonState  # the state of evon and ivon
from evon_jax.transforms import training_samples
from evon_jax._optimizers import evon, ivon
from evon_jax.structured import laplace, lowrank, meanfield, viking
from evon_jax._soap import (
    ScaleBySoapState, clip_update_rms, scale_by_reference_soap, scale_by_soap, soap)
from evon_jax.maths.layout import matrix_view
from evon_jax import checkpoint

# The module paths of releases before the package was grouped by role keep importing
# (`import evon_jax.kronecker`, `from evon_jax.noise import ...`): the same module objects.
ivon_step, noise = ivon_update, normal_draws
for _old, _module in {
    "kronecker": kronecker, "eigenbasis": eigenbasis, "whitening": whitening,
    "noise": normal_draws, "ivon_step": ivon_update, "bubble": bubble, "metrics": metrics,
    "posterior": posterior, "predictive": predictive, "plots": plots, "laplace": laplace,
    "lowrank": lowrank,
    "meanfield": meanfield, "viking": viking,
}.items():
  _sys.modules[f"evon_jax.{_old}"] = _module

# Arguments that fix shapes or branches: pass them as `static_args` to optax.inject_hyperparams
# (e.g. `optax.inject_hyperparams(evon_jax.evon, static_args=evon_jax.STATIC_ARGS)`).
# `stacked_dims` may be a callable, which inject_hyperparams would otherwise take for a schedule.
STATIC_ARGS = ("precondition_frequency", "max_precond_dim", "mc_samples", "key", "stacked_dims",
               "dimension_numbers", "merge_dims", "power_iter_steps",
               "adaptive_update_tolerance")
IVON_STATIC_ARGS = ("mc_samples", "key")
SOAP_STATIC_ARGS = ("precondition_frequency", "max_precond_dim", "stacked_dims",
                    "dimension_numbers", "merge_dims", "weight_decay_method", "nesterov",
                    "adam_warmup_steps", "correct_bias", "fp32_matmul_prec", "use_eigh",
                    "qr_fp32_matmul_prec", "use_adaptive_criteria",
                    "adaptive_update_tolerance", "power_iter_steps", "max_update_rms",
                    "use_kl_shampoo", "correct_shampoo_beta_bias")

__version__ = "0.1.0"

__all__ = [
    "EvonState", "IVON_STATIC_ARGS", "SOAP_STATIC_ARGS", "SoapBubble",
    "ScaleBySoapState", "STATIC_ARGS", "checkpoint", "metrics", "noise", "predictive",
    "eigenbasis", "eigenbasis_refresh", "merging", "pruning", "eigenspace_adam", "eigenspace_ivon", "evon",
    "inject_noise", "kronecker_factor_ema", "transforms", "ivon", "ivon_step", "kronecker", "laplace", "lowrank", "matrix_view",
    "meanfield",
    "posterior", "clip_update_rms", "scale_by_reference_soap", "scale_by_soap", "viking",
    "soap", "training_samples", "whitening",
]
