"""`eigenspace_ivon(prior=...)`: turning a SOAP-Bubble (or a state holding one) into the
`PriorState` the optimizer keeps, with the checks a user needs (the maths: `maths.prior`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from evon_jax.maths import prior as prior_maths
from evon_jax.maths.kronecker import empty_bases, stored_layout
from evon_jax.maths.layout import state_dtype
from evon_jax.readout.bubble import SoapBubble, per_leaf_scalar
from evon_jax.transforms._common import frozen_placeholder, leaf_names


def as_bubble(prior) -> SoapBubble:
  """The prior as a `SoapBubble`: a bubble itself, or the posterior an EVON/IVON optimizer
  state (or a Laplace fit) holds."""
  if isinstance(prior, SoapBubble):
    return prior
  from evon_jax.readout import posterior  # the read-outs import the pieces
  try:
    return posterior.bubble(prior)
  except ValueError as error:
    raise TypeError(
        "prior must be a SoapBubble (e.g. evon_jax.posterior.bubble(previous_state)) or an "
        f"EVON/IVON optimizer state holding one; got {type(prior).__name__}.") from error


def _check_tree(bubble: SoapBubble, params) -> None:
  # optax.MaskedNode (a leaf another optimizer of an optax.partition owns) is a node without
  # leaves: the structures match when the prior and the run share the same partition.
  if jax.tree.structure(bubble.mean) != jax.tree.structure(params):
    raise ValueError(
        "The prior's tree does not match the parameters: "
        f"{jax.tree.structure(bubble.mean)} vs {jax.tree.structure(params)}. Under "
        "optax.partition give each group's optimizer the prior of that group.")
  for name, m, p in zip(leaf_names(params), jax.tree.leaves(bubble.mean),
                        jax.tree.leaves(params)):
    if jnp.shape(m) != jnp.shape(p):
      raise ValueError(f"Leaf {name}: the prior's shape {jnp.shape(m)} differs from the "
                       f"parameter's {jnp.shape(p)}.")


def prior_state(bubble: SoapBubble, params, layouts, dtype=None,
                current=None) -> prior_maths.PriorState:
  """The prior N(m₀, P₀⁻¹) of `bubble` as the optimizer stores it: its mean in its own
  eigen coordinates, its total precision π₀ = ess₀ (H₀ + δ₀) there, its bases, and the
  cache for the run's `current` bases (per leaf; default: the identity bases a refresh
  starts from)."""
  _check_tree(bubble, params)
  treedef = jax.tree.structure(params)
  names = leaf_names(params)
  ess = per_leaf_scalar(bubble.ess, treedef)
  weight_decay = per_leaf_scalar(bubble.weight_decay, treedef)
  columns = [treedef.flatten_up_to(tree) for tree in bubble.bases]
  means, precisions, dtypes = [], [], []
  for i, (name, param, layout, mean, hessian) in enumerate(zip(
      names, jax.tree.leaves(params), layouts, treedef.flatten_up_to(bubble.mean),
      treedef.flatten_up_to(bubble.hessian))):
    leaf_dtype = state_dtype(jnp.result_type(param), dtype)
    dtypes.append(leaf_dtype)
    if not layout.trainable:
      means.append(jnp.array(mean, copy=True))
      precisions.append(frozen_placeholder(leaf_dtype))
      continue
    if jnp.shape(hessian) != jnp.shape(param):
      raise ValueError(f"Leaf {name}: the prior has no Gaussian for it (its H is a "
                       "placeholder of a frozen leaf).")
    slots = [column[i] for column in columns]
    prior_maths.check_compatible(stored_layout(mean, slots), layout, name)
    precision = jnp.asarray(ess[i], leaf_dtype) * (
        jnp.asarray(hessian, leaf_dtype) + jnp.asarray(weight_decay[i], leaf_dtype))
    means.append(jnp.array(mean, dtype=leaf_dtype, copy=True))
    precisions.append(precision)
  bases = tuple(jax.tree.map(lambda b: jnp.array(b, copy=True), tree) for tree in bubble.bases)
  if current is None:
    current = [empty_bases(l, d, "eye") if l.trainable else () for l, d in zip(layouts, dtypes)]
  return prior_maths.new_state(treedef.unflatten(means), treedef.unflatten(precisions), bases,
                               layouts, treedef, current)
