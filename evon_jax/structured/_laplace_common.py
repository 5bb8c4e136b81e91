"""What the Laplace fit and its evidence share: option names, data handling."""

from __future__ import annotations

from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np

Likelihood = Literal["classification", "regression"]
Fisher = Literal["exact", "sampled", "empirical"]
TuningMethod = Literal["marglik", "nll"]
PredictiveKind = Literal["linearized", "sampled"]
ApplyFn = Callable[[Any, Any], jax.Array]

_LIKELIHOODS = ("classification", "regression")
_FISHERS = ("exact", "sampled", "empirical")
_EXACT = jax.lax.Precision.HIGHEST
DEFAULT_GRID = np.logspace(-4, 4, 41)


# ----------------------------------------------------------------------------- data handling


def _split_data(data, name: str = "data"):
  """(inputs, targets, n): inputs any pytree of arrays, all with the same leading axis n."""
  if not isinstance(data, (tuple, list)) or len(data) != 2:
    raise ValueError(f"{name} must be a tuple (inputs, targets) of arrays with a leading "
                     f"example axis, got {type(data).__name__}.")
  inputs, targets = data
  sizes = {int(np.shape(leaf)[0]) if np.ndim(leaf) > 0 else -1
           for leaf in jax.tree.leaves(inputs) + [targets]}
  if len(sizes) != 1 or -1 in sizes:
    raise ValueError(f"{name}: inputs and targets must be arrays sharing one leading example "
                     f"axis, got leading sizes {sorted(sizes)}.")
  n = sizes.pop()
  if n == 0:
    raise ValueError(f"{name} holds no examples.")
  return inputs, targets, n


def is_in_memory(data) -> bool:
  """True for an ``(inputs, targets)`` pair of arrays, False for an iterable of batches."""
  return isinstance(data, tuple) and len(data) == 2 and hasattr(data[1], "shape")


def data_batches(data, name: str = "data"):
  """The ``(inputs, targets, n)`` batches of `data`: the pair itself, or each batch of an
  iterable (a list of batches, a DataLoader-style object, or a function returning a fresh
  iterator: the fit reads the data twice)."""
  if is_in_memory(data):
    yield _split_data(data, name)
    return
  stream = data() if callable(data) else data
  if iter(stream) is stream and not callable(data):
    raise ValueError(f"{name} is a one-shot iterator, but the fit passes over the data twice: "
                     "pass a list of batches, a re-iterable loader, or a function returning a "
                     "fresh iterator.")
  empty = True
  for batch in stream:
    empty = False
    yield _split_data(tuple(batch) if isinstance(batch, list) else batch, f"a batch of {name}")
  if empty:
    raise ValueError(f"{name} yielded no batches.")


def _chunks(n: int, batch_size: int):
  """(indices, mask) per chunk: every chunk has `batch_size` rows (one compilation); the last
  one repeats its final valid example, masked out, so padding never feeds odd inputs."""
  for start in range(0, n, batch_size):
    index = np.arange(start, start + batch_size)
    yield np.minimum(index, n - 1), (index < n).astype(np.float32)


def _take(tree, index):
  return jax.tree.map(lambda a: a[index], tree)


def _check_outputs(apply_fn, params, inputs, targets, likelihood, batch_size):
  """Checks the model's outputs and the targets against the likelihood; returns the number
  of outputs (classes) per example."""
  sample = _take(inputs, np.zeros(min(batch_size, 2), np.int64))
  shape = tuple(jax.eval_shape(apply_fn, params, sample).shape)
  rows = len(jax.tree.leaves(sample)[0])
  target_shape, target_dtype = np.shape(targets), jnp.result_type(targets)
  if likelihood == "classification":
    if len(shape) != 2 or shape[0] != rows or shape[1] < 2:
      raise ValueError(f"likelihood='classification' needs apply_fn to return logits of shape "
                       f"(batch, classes >= 2); it returned {shape} for a batch of {rows}.")
    if len(target_shape) != 1 or not jnp.issubdtype(target_dtype, jnp.integer):
      raise ValueError(f"likelihood='classification' needs integer class labels of shape "
                       f"(n,), got {target_dtype} targets of shape {target_shape}.")
    labels = np.asarray(targets)
    if labels.min() < 0 or labels.max() >= shape[1]:
      raise ValueError(f"class labels must lie in [0, {shape[1]}), got values in "
                       f"[{labels.min()}, {labels.max()}].")
    return shape[1]
  if len(shape) not in (1, 2) or shape[0] != rows:
    raise ValueError(f"likelihood='regression' needs apply_fn to return outputs of shape "
                     f"(batch,) or (batch, outputs); it returned {shape} for a batch of {rows}.")
  if tuple(target_shape[1:]) != shape[1:]:
    raise ValueError(f"regression targets of shape {target_shape} do not match the model's "
                     f"outputs (n,) + {shape[1:]}.")
  return 1 if len(shape) == 1 else shape[1]
