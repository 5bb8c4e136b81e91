"""Strict JAX settings for the whole suite (as equinox/optimistix test suites do)."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
