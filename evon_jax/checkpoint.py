"""Saving and restoring optimizer states with orbax-checkpoint.

An evon_jax state is a pytree of arrays, so `orbax.checkpoint.StandardCheckpointer` handles it
almost as is: typed PRNG keys (`EvonState.key`) are saved and restored as keys by orbax itself.
What orbax refuses are zero-size arrays ("Cannot save arrays with zero size"), and the state
has some: identity sides of the Kronecker factors and bases are stored as (0, 0) arrays, and
integer or empty parameters get (0,) placeholders. `save` leaves them out of the checkpoint
and `restore` puts them back from the template (their content is their shape), so

    evon_jax.checkpoint.save(path, {"params": params, "opt_state": opt_state})
    restored = evon_jax.checkpoint.restore(path, {"params": params, "opt_state": opt_state})

round-trips bit for bit, and a run resumed from `restored` continues exactly as the
uninterrupted run. The template may hold arrays or `jax.ShapeDtypeStruct`s (e.g. from
`jax.eval_shape(tx.init, params)`); restored arrays take the template's shardings where it has
them. The same works for `flax.nnx` states (`nnx.state(optimizer)`), whose leaves are arrays
too. orbax-checkpoint is imported lazily: it is needed only when these functions are called.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

__all__ = ["save", "restore", "strip_empty", "fill_empty"]


def _is_empty(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype") and 0 in tuple(x.shape)


def strip_empty(tree) -> Any:
  """`tree` with every zero-size array replaced by None (an empty subtree)."""
  return jax.tree.map(lambda x: None if _is_empty(x) else x, tree)


def fill_empty(stripped, like) -> Any:
  """Inverse of `strip_empty`: `like`'s structure, its zero-size leaves re-created as zeros
  (of their shape and dtype) and every other leaf taken, in order, from `stripped`."""
  template, treedef = jax.tree.flatten(like)
  values = iter(jax.tree.leaves(stripped))
  out = [jnp.zeros(x.shape, x.dtype) if _is_empty(x) else next(values) for x in template]
  leftover = next(values, None)
  if leftover is not None:
    raise ValueError("fill_empty: `stripped` has more non-empty leaves than `like`.")
  return treedef.unflatten(out)


def _abstract(x):
  """An array or ShapeDtypeStruct -> ShapeDtypeStruct keeping dtype (typed keys included)
  and sharding."""
  sharding = getattr(x, "sharding", None)
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _checkpointer(checkpointer):
  if checkpointer is not None:
    return checkpointer
  import orbax.checkpoint as ocp  # lazy: an optional dependency
  return ocp.StandardCheckpointer()


def save(path, tree, *, checkpointer: Optional[Any] = None, force: bool = False) -> None:
  """Saves a pytree of arrays (params, optimizer state, ...) to the directory `path`.

  `path` must not exist unless `force`. Uses `checkpointer` (default: a new
  `orbax.checkpoint.StandardCheckpointer`) and waits until the save is finished.
  """
  ckptr = _checkpointer(checkpointer)
  ckptr.save(path, strip_empty(tree), force=force)
  ckptr.wait_until_finished()


def restore(path, like, *, checkpointer: Optional[Any] = None) -> Any:
  """Restores what `save` wrote to `path`, with the structure, dtypes and shardings of `like`
  (a pytree of arrays or ShapeDtypeStructs: e.g. the state `tx.init(params)` returns)."""
  ckptr = _checkpointer(checkpointer)
  abstract = strip_empty(jax.tree.map(_abstract, like))
  return fill_empty(ckptr.restore(path, abstract), like)
