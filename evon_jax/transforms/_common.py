"""Helpers every piece shares: hyperparameter splitting, replica averaging, finiteness, keys,
tree checks."""

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from evon_jax.maths import normal_draws as noise


# ----------------------------------------------------------------------------- hyperparameters


def _is_static(value) -> bool:
  """Python numbers, callables (schedules) and None are compile-time constants of the update;
  arrays (e.g. from `optax.inject_hyperparams`) are traced, so new values do not recompile."""
  if value is None or callable(value):
    return True
  return isinstance(value, numbers.Number) and not isinstance(value, (jax.Array, np.ndarray))


def split_hyperparams(hp: NamedTuple) -> tuple[tuple, tuple]:
  """(static, traced) halves of a hyperparameter tuple; `join_hyperparams` undoes it."""
  static = tuple(v if _is_static(v) else None for v in hp)
  traced = tuple(None if _is_static(v) else v for v in hp)
  return static, traced


def join_hyperparams(kind, static: tuple, traced: tuple):
  """The hyperparameters `split_hyperparams` split, as `kind` (a NamedTuple or `tuple`)."""
  values = [s if t is None else t for s, t in zip(static, traced)]
  return tuple(values) if kind is tuple else kind(*values)


# ----------------------------------------------------------------------------- gates and values


def zero_unless(on, tree):
  """`tree` where `on`, else exact zeros (a select on statistics, where it fuses into the
  elementwise pass that reads them)."""
  return jax.tree.map(lambda x: jnp.where(on, x, jnp.zeros((), x.dtype)), tree)


def frozen_placeholder(dtype=jnp.float32):
  """The statistics entry of an integer or empty leaf: one scalar (not a zero-size array,
  which orbax refuses to save)."""
  return jnp.zeros((), dtype)


def widest_float():
  """float64 under jax_enable_x64, else float32 (ess and δ as the update used them)."""
  return jax.dtypes.canonicalize_dtype(jnp.float64)


def as_typed_key(key):
  """An int seed, a typed key, or legacy uint32 key data -> a typed PRNG key."""
  key = jnp.asarray(key)
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  if key.dtype == jnp.uint32 and key.shape == (2,):
    return jax.random.wrap_key_data(key)
  return jax.random.key(key)


def sample_seeds(key, num_samples: int, first=0) -> list[jax.Array]:
  """Noise seeds of samples first … first+num_samples-1 of a key; every leaf draws its own
  stream from them (one threefry call per sample, shared by all leaves: compile time grows
  with the number of threefry calls)."""
  return [noise.stream_seeds(jax.random.fold_in(key, first + s)) for s in range(num_samples)]


def standard_normals(seeds, requests) -> list:
  """The draws z of one sample, per leaf reproducible from (key, sample, leaf):
  `requests[i]` is (leaf_index, shape, dtype) or None. Drawn by flat element index, so a
  leaf's draw is the same in its own shape and in any Kronecker view; leaves of one shape
  share one computation (compile time grows with the number of shapes, not of leaves)."""
  return noise.standard_normals_from_seeds(seeds, requests)


# ----------------------------------------------------------------------------- replicas


def _varying_axes(x) -> frozenset:
  """The mapped axes a value varies over, as `shard_map`'s type check tracks them."""
  aval = jax.typeof(x)
  vma = getattr(aval, "vma", None)
  if vma is None:
    vma = getattr(getattr(aval, "manual_axis_type", None), "varying", frozenset())
  return frozenset(vma)


def replica_mean(tree, axis_name):
  """Averages per-replica values over `axis_name`.

  Under `shard_map`'s type check (check_vma, the default) a value already equal on all
  replicas is left alone: autodiff has already reduced the gradient of replicated params
  (it is the gradient of whatever global loss the user wrote, e.g. a `pmean` of the local
  losses). Values that still vary — gradients of each replica's own loss, under `pmap` or
  `check_vma=False` — are averaged, as the optimizer's statistics of the global batch.
  """
  if axis_name is None:
    return tree
  names = frozenset(axis_name if isinstance(axis_name, tuple) else (axis_name,))
  checked = bool(names & _varying_axes(jax.lax.axis_index(axis_name)))

  def mean(x):
    if checked and not names & _varying_axes(x):
      return x
    return jax.lax.pmean(x, axis_name)

  return jax.tree.map(mean, tree)


def all_finite(grads, axis_name=None) -> jax.Array:
  """Whether every floating gradient is finite (on every replica, under `axis_name`)."""
  leaves = [jnp.asarray(g) for g in jax.tree.leaves(grads)]
  checks = [jnp.all(jnp.isfinite(g)) for g in leaves if jnp.issubdtype(g.dtype, jnp.inexact)]
  finite = jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)
  if axis_name is not None:  # replicas must agree, or their states would drift apart
    finite = jax.lax.pmin(finite.astype(jnp.int32), axis_name) > 0
  return finite


# ----------------------------------------------------------------------------- tree checks


def leaf_names(tree) -> list[str]:
  """Readable paths of a tree's leaves, e.g. "['layer']['kernel']"."""
  return [jax.tree_util.keystr(path) or "<root>"
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def check_tree(what: str, tree, reference, compare_shapes: bool = False):
  """A clear error when `tree` is not shaped like the params the optimizer was built for."""
  if jax.tree.structure(tree) != jax.tree.structure(reference):
    given, expected = leaf_names(tree), leaf_names(reference)
    missing = [n for n in expected if n not in given]
    unexpected = [n for n in given if n not in expected]
    detail = (f"missing leaves {missing}, unexpected leaves {unexpected}"
              if missing or unexpected else
              f"expected structure {jax.tree.structure(reference)}, got "
              f"{jax.tree.structure(tree)}")
    hint = ""
    if missing and jax.tree.structure(tree, is_leaf=lambda x: x is None).num_leaves == len(
        expected):
      hint = (" A None gradient (e.g. of a frozen leaf) is not a gradient: keep such leaves "
              "out with optax.masked / optax.partition, or give them zeros "
              "(optax.set_to_zero on that group).")
    raise ValueError(f"The {what} tree does not match the parameter tree the optimizer was "
                     f"initialised with: {detail}.{hint}")
  if compare_shapes:
    for name, leaf, ref in zip(leaf_names(reference), jax.tree.leaves(tree),
                               jax.tree.leaves(reference)):
      if tuple(jnp.shape(leaf)) != tuple(ref.shape):
        raise ValueError(f"Leaf {name}: {what} shape {tuple(jnp.shape(leaf))} does not match "
                         f"the shape {tuple(ref.shape)} the optimizer was initialised with.")
