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

from evon_jax import (
    checkpoint, eigenbasis, ivon_step, kronecker, metrics, noise, posterior, predictive,
    whitening)
from evon_jax.bubble import SoapBubble
from evon_jax.transforms import InjectNoiseState as EvonState  # the state of evon and ivon
from evon_jax.transforms import training_samples
from evon_jax._optimizers import evon, ivon
from evon_jax import laplace, lowrank, meanfield, viking  # noqa: E402  (after the optimizers)
from evon_jax._soap import ScaleBySoapState, scale_by_soap, soap
from evon_jax._layout import matrix_view
from evon_jax import transforms
from evon_jax.transforms import (
    eigenbasis_refresh, eigenspace_adam, eigenspace_ivon, inject_noise, kronecker_factor_ema)

# Arguments that fix shapes or branches: pass them as `static_args` to optax.inject_hyperparams
# (e.g. `optax.inject_hyperparams(evon_jax.evon, static_args=evon_jax.STATIC_ARGS)`).
# `stacked_dims` may be a callable, which inject_hyperparams would otherwise take for a schedule.
STATIC_ARGS = ("precondition_frequency", "max_precond_dim", "mc_samples", "key", "stacked_dims",
               "dimension_numbers", "merge_dims")
IVON_STATIC_ARGS = ("mc_samples", "key")
SOAP_STATIC_ARGS = ("precondition_frequency", "max_precond_dim", "stacked_dims",
                    "dimension_numbers", "merge_dims")

__version__ = "0.1.0"

__all__ = [
    "EvonState", "IVON_STATIC_ARGS", "SOAP_STATIC_ARGS", "SoapBubble",
    "ScaleBySoapState", "STATIC_ARGS", "checkpoint", "metrics", "noise", "predictive",
    "eigenbasis", "eigenbasis_refresh", "eigenspace_adam", "eigenspace_ivon", "evon",
    "inject_noise", "kronecker_factor_ema", "transforms", "ivon", "ivon_step", "kronecker", "laplace", "lowrank", "matrix_view",
    "meanfield",
    "posterior", "scale_by_soap", "viking",
    "soap", "training_samples", "whitening",
]
