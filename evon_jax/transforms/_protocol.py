"""How the pieces talk to each other.

A piece is described by a *spec*: a frozen, hashable dataclass of its static settings (with
`None` where a hyperparameter is an array, e.g. under `optax.inject_hyperparams`) plus the
spec of the piece it wraps. `transformation(spec, traced)` turns it into an optax
transformation whose `update` runs one module-wide compiled function keyed on the spec, so
rebuilding a composition (a notebook cell, `inject_hyperparams`) never recompiles.

Inside a composition the pieces call each other's `apply` directly (one trace, one compiled
program) and exchange a `Message` in place of the gradient tree: per-leaf records in the
leaf's Kronecker view, plus the call's gates and the layouts. Given a plain gradient tree
instead, a piece makes the message itself (`plain_message`), so every piece also works on its
own in an ordinary optax chain.

Records, top to bottom:
  SampledGradients  inject_noise -> eigenbasis_refresh: per-sample gradients in parameter
                    coordinates, the normal draws z (eigen coordinates) and the sampled points.
  EigenGradients    eigenbasis_refresh -> eigenspace_ivon / eigenspace_adam: the gradients
                    rotated into the eigenbasis, with the same draws.
Back up, every piece returns its update (the move of the mean, or SOAP's direction) in the
coordinates it was handed: eigen coordinates below the refresh, parameter space above it.
The noise-injecting wrapper reads the posterior from its inner state (`bubble()`, a
`SoapBubble`) and draws the next sample with `evon_jax.bubble.draw`, the one sampler.
"""

import dataclasses
import functools
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from evon_jax.maths.layout import LeafLayout, as_view, from_view
from evon_jax.transforms._common import check_tree, leaf_names
from evon_jax.readout.bubble import EigenPosterior, draw  # noqa: F401  (re-exported for the pieces)


class Gates(NamedTuple):
  """Scalars that shape one call of every piece.

  Attributes:
    active: the call is a step (gradients finite and, for drop-in Monte Carlo, the step's
      last sample). An inactive call leaves every state bit-identical.
    first: the first call of the composition: it only initialises factors and bases.
    noisy: the step's samples carry noise, so the Hessian may move (off on the first call
      and in the clean phases of `phasing`).
    factors_free: the factors may take this step's statistics even when no refresh is due
      (False in noisy phases under `phasing`, where only a due refresh updates them).
  """

  active: jax.Array
  first: jax.Array
  noisy: jax.Array
  factors_free: jax.Array


class SampledGradients(NamedTuple):
  """Per leaf, parameter coordinates; leading axis: the step's k samples. `inject_noise`
  hands them over in each leaf's own shape (a message without layouts); the piece below
  views them in its Kronecker layout."""

  grads: jax.Array
  normals: jax.Array   # z_s in eigen coordinates, already zero where the sample is the mean
  thetas: jax.Array    # the points the gradients were taken at


class EigenGradients(NamedTuple):
  """Per leaf, Kronecker view, eigen coordinates; leading axis: the step's k samples."""

  grads: jax.Array     # Q_Lᵀ G_s Q_R, or its mode-product form
  normals: jax.Array


class Message(NamedTuple):
  """What a piece hands the piece it wraps, in place of a gradient tree.

  Attributes:
    leaves: per leaf a record, or None for a frozen (integer or empty) leaf.
    gates: the call's `Gates`.
    layouts: per leaf its `LeafLayout` (static).
    replica_axis: when replicas evaluate samples of their own, the axis name over which
      each piece averages the statistics it forms; else None.
  """

  leaves: list
  gates: Gates
  layouts: tuple
  replica_axis: Any = None


def plain_gates() -> Gates:
  """The gates of a plain call: a step, not the first of a composition, no noise."""
  on = jnp.asarray(True)
  return Gates(active=on, first=jnp.asarray(False), noisy=jnp.asarray(False), factors_free=on)


def plain_message(grads, layouts: Sequence[LeafLayout], dtypes: Sequence,
                  gates: Optional[Gates] = None) -> Message:
  """A gradient tree as a one-sample message: no noise, the gradient's own point unknown
  (thetas zero: only `factor_gradient='regularized'` reads them, through inject_noise)."""
  leaves = []
  for grad, layout, dtype in zip(jax.tree.leaves(grads), layouts, dtypes):
    if not layout.trainable:
      leaves.append(None)
      continue
    stack = as_view(jnp.asarray(grad), layout).astype(dtype)[None]
    leaves.append(SampledGradients(stack, jnp.zeros_like(stack), jnp.zeros_like(stack)))
  return Message(leaves, gates if gates is not None else plain_gates(), tuple(layouts))


def as_message(updates, params, layouts_of, buffers):
  """The message a piece works on, in its Kronecker views, and whether it came as a plain
  gradient tree. A plain tree is checked against `buffers` (a params-shaped tree of the
  state: structure, shapes, and the dtypes the statistics are kept in). A message without
  layouts (from `inject_noise`, whose records are in the leaves' own shapes) is viewed with
  `layouts_of(params)`."""
  reference = updates if params is None else params
  if not isinstance(updates, Message):
    check_tree("gradient", updates, buffers)
    layouts = layouts_of(reference)
    check_shapes(updates, buffers, layouts)
    dtypes = [jnp.result_type(b) for b in jax.tree.leaves(buffers)]
    return plain_message(updates, layouts, dtypes), True
  if updates.layouts is not None:
    return updates, False
  layouts = tuple(layouts_of(reference))
  viewed = [None if record is None else type(record)(*(
      jnp.reshape(x, x.shape[:1] + layout.view_shape) for x in record))
      for record, layout in zip(updates.leaves, layouts)]
  return updates._replace(leaves=viewed, layouts=layouts), False


def check_shapes(updates, buffers, layouts):
  """A clear error when a plain gradient's leaf is not shaped like the state's buffer."""
  for name, grad, buffer, layout in zip(leaf_names(updates), jax.tree.leaves(updates),
                                        jax.tree.leaves(buffers), layouts):
    if layout.trainable and tuple(jnp.shape(grad)) != tuple(jnp.shape(buffer)):
      raise ValueError(f"Leaf {name}: gradient shape {tuple(jnp.shape(grad))} does not match "
                       f"the parameter shape {tuple(jnp.shape(buffer))} the optimizer was "
                       "initialised with.")


def outputs(values, updates, layouts, plain):
  """Per-leaf outputs (view shape, None for frozen) as the caller expects them: a message's
  list, or a tree like the gradients for a plain call."""
  if not plain:
    return values
  treedef = jax.tree.structure(updates)
  grads = treedef.flatten_up_to(updates)
  return treedef.unflatten([
      jnp.zeros_like(g) if v is None else from_view(v, l).astype(jnp.result_type(g))
      for v, l, g in zip(values, layouts, grads)])


def fields(state, names, treedef):
  return [treedef.flatten_up_to(getattr(state, name)) for name in names]


# ----------------------------------------------------------------------------- specs


@dataclasses.dataclass(frozen=True)
class Spec:
  """A piece's static description. Subclasses define `init` and `apply`."""

  def init(self, params, traced, layouts=None):
    raise NotImplementedError

  def apply(self, updates, state, params, traced):
    raise NotImplementedError

  def for_apply(self) -> "Spec":
    """This spec as `apply` needs it: without arrays only `init` reads (the compiled
    update's cache keeps its spec alive, and must not keep those alive with it)."""
    inner = getattr(self, "inner", None)
    return self if inner is None else dataclasses.replace(self, inner=inner.for_apply())

  def without_updates(self) -> "Spec":
    """This spec for a caller that reads the state, not the updates (so a refresh may move
    its buffers in place); the default changes nothing."""
    return self

  @property
  def axis_name(self):
    return None


def is_diagonal(spec) -> bool:
  """A diagonal method: a piece whose state names its eigen-coordinate buffers."""
  return getattr(spec, "diagonal", False)


def holds_posterior(spec) -> bool:
  """eigenspace_ivon, alone or inside eigenbasis_refresh."""
  return getattr(spec, "posterior", False) or getattr(
      getattr(spec, "inner", None), "posterior", False)


class PieceTransformation(optax.GradientTransformationExtraArgs):
  """An optax transformation that also carries its spec and traced hyperparameters, so that
  another piece can wrap it (`inject_noise(eigenbasis_refresh(...))`)."""


def spec_of(transformation, who: str):
  """The (spec, traced) of an evon_jax piece; a clear error for anything else."""
  spec = getattr(transformation, "spec", None)
  if spec is None:
    raise TypeError(
        f"{who} wraps an evon_jax piece (eigenspace_ivon, eigenspace_adam, "
        f"eigenbasis_refresh, ...), got {type(transformation).__name__}. Generic optax "
        "transforms go before (e.g. clipping) or around (masked, partition) the composition.")
  return spec, transformation.traced


@functools.partial(jax.jit, static_argnames=("spec",))
def _compiled_apply(updates, state, params, traced, *, spec):
  """A piece's `apply`, compiled once per (spec, shapes) module-wide; inlined under a user's
  `jit`."""
  return spec.apply(updates, state, params, traced)


def transformation(spec: Spec, traced) -> PieceTransformation:
  """The optax transformation of a spec (traced: its array hyperparameters, nested like the
  specs)."""

  def init_fn(params):
    return spec.init(params, traced)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if spec.axis_name is not None:  # collectives need the caller's mapped axis: no jit
      return spec.apply(updates, state, params, traced)
    return _compiled_apply(updates, state, params, traced, spec=spec.for_apply())

  piece = PieceTransformation(init_fn, update_fn)
  piece.spec, piece.traced = spec, traced
  return piece
