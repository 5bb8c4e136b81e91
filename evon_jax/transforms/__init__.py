"""The four composable pieces EVON, IVON and SOAP are made of (see docs/composition.md).

    tx = inject_noise(                               # per call: skip, replicas, noise, sample
        eigenbasis_refresh(                          # owns the bases; refresh when due
            eigenspace_ivon(lr, ess=..., hess_init=...),   # IVON in eigen coordinates
            factors=kronecker_factor_ema(0.9999)),         # the Kronecker-factor EMA
        key=0)
"""

from evon_jax.transforms.diagonal import (
    EigenspaceAdamState, EigenspaceIvonState, eigenspace_adam, eigenspace_ivon)
from evon_jax.transforms.noise_injection import InjectNoiseState, inject_noise, training_samples
from evon_jax.transforms.factors import KroneckerFactorState, kronecker_factor_ema
from evon_jax.transforms.refresh import EigenbasisRefreshState, eigenbasis_refresh

__all__ = [
    "EigenbasisRefreshState", "EigenspaceAdamState", "EigenspaceIvonState", "InjectNoiseState",
    "KroneckerFactorState", "eigenbasis_refresh", "eigenspace_adam", "eigenspace_ivon",
    "inject_noise", "kronecker_factor_ema", "training_samples",
]
