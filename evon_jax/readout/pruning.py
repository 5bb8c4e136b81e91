"""Pruning by posterior signal-to-noise: drop what the posterior says is indistinguishable
from zero.

A weight whose posterior mean is small against its posterior standard deviation,
|m| / σ, can be set to zero at little cost in likelihood (Graves 2011; Blundell et al. 2015
prune Bayes-by-backprop weights this way). For a SOAP-Bubble the marginal σ of each weight is
closed form (`posterior.marginal_stddev`); in eigen coordinates the posterior is diagonal, so
the signal-to-noise of each eigen-direction, |M°| / √V, is exact and `prune_eigen_mean`
removes whole directions instead of weights (a dense matrix of lower "eigen-rank", not a
sparse one). Magnitude pruning is `prune(tree, magnitude(tree), ...)`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from evon_jax.readout import posterior

__all__ = ["signal_to_noise", "magnitude", "prune", "prune_eigen_mean", "weight_matrices"]


def weight_matrices(path, leaf) -> bool:
  """The default `include` of `prune`: leaves with two or more dims (weights, not biases)."""
  del path
  return jnp.ndim(leaf) >= 2 and jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def signal_to_noise(opt_state, coordinates: str = "weights", params=None) -> Any:
  """|mean| / std per weight (`coordinates='weights'`, the marginal std of the SOAP-Bubble),
  or per eigen coordinate (`'eigen'`: |M°| / √V, params-shaped in eigen coordinates).

  Frozen leaves (and, under `optax.partition` with `params` given, leaves another optimizer
  owns) get +inf: never pruned by this score.
  """
  if coordinates not in ("weights", "eigen"):
    raise ValueError(f"coordinates must be 'weights' or 'eigen', got {coordinates!r}.")
  state = posterior.bubble(opt_state)
  if coordinates == "eigen":
    std = jax.tree.map(jnp.sqrt, posterior.variance_eigen(state))
    means = state.mean
  else:
    std = posterior.marginal_stddev(state, params=params)
    means = posterior.mean(state, params=params)
  return jax.tree.map(
      lambda m, s: jnp.where(s > 0, jnp.abs(m) / jnp.where(s > 0, s, 1), jnp.inf)
      if jnp.issubdtype(jnp.result_type(m), jnp.inexact) else jnp.full(jnp.shape(m), jnp.inf),
      means, std)


def magnitude(tree) -> Any:
  """|θ| per entry: the score of magnitude pruning."""
  return jax.tree.map(jnp.abs, tree)


def _threshold_masks(scores: list, sparsity: float, scope: str) -> list:
  """Keep-masks dropping the `sparsity` fraction of lowest scores (globally, or per leaf);
  exactly round(sparsity · n) entries, ties broken by position."""
  def masks_of(group: list) -> list:
    flat = jnp.concatenate([jnp.ravel(s) for s in group])
    drop = int(round(sparsity * flat.size))
    keep = jnp.ones(flat.size, bool)
    if drop:
      order = jnp.argsort(flat, stable=True)
      keep = keep.at[order[:drop]].set(False)
    out, start = [], 0
    for s in group:
      out.append(jnp.reshape(keep[start:start + s.size], jnp.shape(s)))
      start += s.size
    return out

  if scope == "global":
    return masks_of(scores)
  return [masks_of([s])[0] for s in scores]


def prune(tree, scores, sparsity: float, *, scope: str = "global",
          include: Optional[Callable] = weight_matrices) -> tuple[Any, Any]:
  """Zeroes the `sparsity` fraction of entries with the lowest `scores`.

  Args:
    tree: the parameters to prune (e.g. `posterior.mean(state)`).
    scores: a tree like `tree`: `signal_to_noise(state)`, `magnitude(tree)`, ...
    sparsity: fraction in [0, 1] of the included entries set to zero.
    scope: 'global' (one threshold over all included leaves) or 'per_leaf'.
    include: `(path, leaf) -> bool`, which leaves take part (default: matrices and higher,
      `weight_matrices`); None: every floating leaf.

  Returns:
    (pruned tree, keep-mask tree): the mask is True where an entry is kept (all True on
    excluded leaves).

  Example:
    >>> import jax.numpy as jnp, evon_jax
    >>> w = {"w": jnp.array([[0.1, -2.0], [0.5, 3.0]])}
    >>> pruned, mask = evon_jax.pruning.prune(w, evon_jax.pruning.magnitude(w), 0.5)
    >>> pruned["w"].tolist()
    [[0.0, -2.0], [0.0, 3.0]]
  """
  if not 0.0 <= float(sparsity) <= 1.0:
    raise ValueError(f"sparsity must be in [0, 1], got {sparsity}.")
  if scope not in ("global", "per_leaf"):
    raise ValueError(f"scope must be 'global' or 'per_leaf', got {scope!r}.")
  include = include or (lambda path, leaf: jnp.issubdtype(jnp.result_type(leaf), jnp.inexact))
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  score_leaves = treedef.flatten_up_to(scores)
  chosen = [i for i, (path, leaf) in enumerate(paths_leaves) if include(path, leaf)]
  for i in chosen:
    if jnp.shape(score_leaves[i]) != jnp.shape(paths_leaves[i][1]):
      raise ValueError(f"scores of {jax.tree_util.keystr(paths_leaves[i][0])} have shape "
                       f"{jnp.shape(score_leaves[i])}, the leaf {jnp.shape(paths_leaves[i][1])}.")
  masks = [jnp.ones(jnp.shape(leaf), bool) for _, leaf in paths_leaves]
  if chosen:
    for i, mask in zip(chosen, _threshold_masks([jnp.asarray(score_leaves[i]) for i in chosen],
                                                float(sparsity), scope)):
      masks[i] = mask
  pruned = [jnp.where(mask, leaf, jnp.zeros_like(leaf)) for (_, leaf), mask in
            zip(paths_leaves, masks)]
  return treedef.unflatten(pruned), treedef.unflatten(masks)


def prune_eigen_mean(opt_state, sparsity: float, *, scope: str = "global",
                     include: Optional[Callable] = weight_matrices) -> Any:
  """The posterior mean with its lowest-SNR eigen-directions removed (|M°| / √V, the exact
  per-direction signal-to-noise), rotated back to parameter coordinates.

  The result is dense: it has fewer nonzero eigen coordinates, not fewer nonzero weights
  (storage shrinks only if the bases are kept). `include` and `scope` as in `prune`
  (a leaf without bases is pruned per weight, which is the same thing there).
  """
  state = posterior.bubble(opt_state)
  kept, _ = prune(state.mean, signal_to_noise(state, "eigen"), sparsity, scope=scope,
                  include=include)
  return posterior.mean(state._replace(mean=kept))
