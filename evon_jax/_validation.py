"""Construction-time checks with messages that say what is allowed.

Float hyperparameters are checked only when they are concrete numbers: under
`optax.inject_hyperparams` they arrive as arrays (possibly traced) and must stay traceable.
"""

from __future__ import annotations

import math
import numbers

import jax
import numpy as np


def _concrete(value):
  if isinstance(value, (numbers.Number, np.number)) and not isinstance(value, bool):
    return float(value)
  if isinstance(value, (np.ndarray, jax.Array)) and not isinstance(value, jax.core.Tracer):
    if np.ndim(value) == 0:
      return float(np.asarray(value))
  return None


def check_positive(name, value):
  v = _concrete(value)
  if v is not None and not (v > 0 and math.isfinite(v)):
    raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")


def check_non_negative(name, value, allow_inf=False):
  v = _concrete(value)
  if v is not None and not (v >= 0 and (allow_inf or math.isfinite(v))):
    raise ValueError(f"{name} must be a {'' if allow_inf else 'finite '}number >= 0, "
                     f"got {value!r}.")


def check_beta(name, value):
  v = _concrete(value)
  if v is not None and not 0 <= v < 1:
    raise ValueError(f"{name} must lie in [0, 1), got {value!r}.")


def check_learning_rate(value):
  if callable(value):
    return
  is_number = isinstance(value, (numbers.Real, np.number)) and not isinstance(value, bool)
  is_array = isinstance(value, (np.ndarray, jax.Array))
  if not (is_number or is_array):
    raise ValueError("learning_rate must be a number, a scalar array or an optax schedule "
                     f"(a callable step -> rate), got {value!r} of type "
                     f"{type(value).__name__}.")
  check_non_negative("learning_rate", value)


def check_static_int(name, value, minimum):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(
        f"{name} must be a Python int >= {minimum} (it fixes shapes or branches); got "
        f"{value!r}. With optax.inject_hyperparams pass static_args=({name!r}, ...).")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}.")


def check_choice(name, value, choices):
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}.")


def check_stacked_dims(stacked_dims):
  if stacked_dims is None or callable(stacked_dims):
    return
  if isinstance(stacked_dims, bool) or not isinstance(stacked_dims, int) or stacked_dims < 0:
    raise ValueError("stacked_dims must be None, a non-negative int or a callable "
                     f"(path, leaf) -> int, got {stacked_dims!r}.")


def check_dimension_numbers(dimension_numbers, merge_dims):
  if not isinstance(merge_dims, (bool, np.bool_)):
    raise ValueError(f"merge_dims must be True or False, got {merge_dims!r}.")
  if dimension_numbers is not None and not callable(dimension_numbers):
    raise ValueError("dimension_numbers must be None or a callable (path, leaf) -> groups "
                     "of neighbouring dims (None for one Kronecker axis per dim), e.g. "
                     f"evon_jax.matrix_view; got {dimension_numbers!r}.")
  if dimension_numbers is not None and merge_dims:
    raise ValueError("Pass either dimension_numbers or merge_dims=True, not both.")


def check_replicas(axis_name, replica_noise):
  check_choice("replica_noise", replica_noise, ("shared", "independent"))
  if axis_name is not None and not isinstance(axis_name, (str, tuple)):
    raise ValueError(f"axis_name must be a string or a tuple of strings, got {axis_name!r}.")
  if replica_noise == "independent" and axis_name is None:
    raise ValueError("replica_noise='independent' needs an axis_name to tell replicas apart.")
