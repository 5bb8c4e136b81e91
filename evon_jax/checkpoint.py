"""Saving and restoring optimizer states with orbax-checkpoint.

Every evon_jax state is a pytree of non-empty arrays, so orbax's own
`StandardCheckpointer` and `CheckpointManager` save and restore it as it is (typed PRNG keys
included), also inside `flax.nnx.Optimizer`. These two functions are a convenience on top:

    evon_jax.checkpoint.save(path, {"params": params, "opt_state": opt_state})
    restored = evon_jax.checkpoint.restore(path, {"params": params, "opt_state": opt_state})

`save` waits until the write is finished; `restore` takes a template of arrays or
`jax.ShapeDtypeStruct`s (e.g. `jax.eval_shape(tx.init, params)`) and restores into its
shardings; and both handle zero-size *parameters* (e.g. a (3, 0) leaf), which orbax refuses
for any optimizer ("Cannot save arrays with zero size"): they are left out of the checkpoint
and re-created from the template. orbax-checkpoint is imported lazily.
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
