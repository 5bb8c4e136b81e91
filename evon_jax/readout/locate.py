"""Finds evon_jax's own state inside optax wrappers (chain, masked, partition, MultiSteps, ...)."""

from __future__ import annotations

import jax


def find_state(opt_state, state_type, what: str = "EVON/IVON"):
  """Returns the single `state_type` node (a type or a tuple of types) inside an arbitrary
  optax state pytree (the outermost match: a composition's nested states count once)."""
  if isinstance(opt_state, state_type):
    return opt_state
  found = [
      node for node in jax.tree.leaves(
          opt_state, is_leaf=lambda x: isinstance(x, state_type))
      if isinstance(node, state_type)
  ]
  if not found:
    raise ValueError(
        f"No {what} optimizer state found in {type(opt_state).__name__}; pass the state "
        "returned by an evon_jax optimizer's init/update (wrappers such as optax.chain, "
        "masked, partition, inject_hyperparams and MultiSteps are searched).")
  if len(found) > 1:
    raise ValueError(
        f"Found {len(found)} {what} states; pass the one you mean (e.g. one entry of the "
        "partition's inner states).")
  return found[0]
