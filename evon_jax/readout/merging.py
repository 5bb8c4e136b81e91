"""Posterior-weighted model merging: the mean of the product of several SOAP-Bubbles.

K models fine-tuned from one starting point, each with a Gaussian posterior
N(θ_k, P_k⁻¹), are merged into the mode of the product of those Gaussians:

    θ = (Σ_k λ_k P_k)⁻¹ Σ_k λ_k P_k θ_k

(Fisher merging, Matena & Raffel 2022, with each posterior's own precision in place of a
diagonal Fisher). For a SOAP-Bubble, per leaf ``P_k = ess_k · Q_k diag(H_k + δ_k) Q_kᵀ``
with Q_k the Kronecker product of the leaf's eigenbases: dense, but applied matrix-free in
the leaf's own basis (rotate in, scale, rotate out). The posteriors factorise over leaves,
so the linear system is block diagonal, solved for all leaves at once by conjugate
gradients (`jax.scipy.sparse.linalg.cg`) preconditioned with the diagonal of Σ λ_k P_k
(closed form: ``(Q∘Q) p``) and started from the diagonal merge.

`merge(..., diagonal=True)` keeps only each precision's diagonal in parameter space (what a
diagonal posterior, IVON's or a diagonal Fisher, gives); for IVON's bubbles (no bases) both
are the same elementwise average. `task_arithmetic` is the unweighted baseline
(Ilharco et al. 2023): θ_0 + α Σ_k (θ_k − θ_0).

Each precision includes its prior δ: a product of K posteriors that share a prior counts it K
times. For merging fine-tuned models that is the usual choice (it keeps directions no task
determined at the weighted average of the models rather than at zero).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import jax.scipy.sparse.linalg

from evon_jax.maths.kronecker import rotate_in
from evon_jax.maths.layout import as_view, from_view
from evon_jax.readout import posterior

_EXACT = jax.lax.Precision.HIGHEST

__all__ = ["MergeResult", "merge", "precision_times", "precision_diagonal",
           "task_arithmetic"]


class MergeResult(NamedTuple):
  """What `merge` returns.

  Attributes:
    params: the merged parameters (params-shaped, in parameter coordinates).
    relative_residual: ‖b − A θ‖ / ‖b‖ of the solved system A θ = b (A = Σ λ_k P_k,
      b = Σ λ_k P_k θ_k); 0 up to rounding for `diagonal=True`.
  """

  params: Any
  relative_residual: jax.Array


def _leaves(opt_state):
  """Per leaf (layout, mean°, precision° = 1/V, bases), layout None for frozen leaves."""
  state = posterior.bubble(opt_state)
  treedef = jax.tree.structure(state.mean)
  return treedef, [(layout, m, None if v is None else 1.0 / v, q)
                   for layout, m, v, q in posterior._per_leaf(state)]


def _apply_precision(leaf, x):
  layout, _, precision, bases = leaf
  eigen = from_view(rotate_in(as_view(jnp.asarray(x, precision.dtype), layout), bases,
                              _EXACT), layout)
  return posterior.to_parameters(layout, precision * eigen, bases)


def _diagonal(leaf):
  layout, _, precision, bases = leaf
  return posterior.to_parameters(layout, precision, jax.tree.map(jnp.square, bases))


def precision_times(opt_state, tree) -> Any:
  """P x per leaf, matrix-free: ``Q (ess (H + δ) ⊙ (Qᵀ x))`` (zero on frozen leaves)."""
  treedef, leaves = _leaves(opt_state)
  return treedef.unflatten([
      jnp.zeros(jnp.shape(leaf[1]), jnp.result_type(leaf[1])) if leaf[0] is None
      else _apply_precision(leaf, x) for leaf, x in zip(leaves, treedef.flatten_up_to(tree))])


def precision_diagonal(opt_state) -> Any:
  """diag P per leaf in parameter coordinates: ``(Q∘Q) ess (H + δ)`` (zero on frozen leaves)."""
  treedef, leaves = _leaves(opt_state)
  return treedef.unflatten([
      jnp.zeros(jnp.shape(leaf[1]), jnp.result_type(leaf[1])) if leaf[0] is None
      else _diagonal(leaf) for leaf in leaves])


def _check_inputs(bubbles, weights):
  if not bubbles:
    raise ValueError("merge needs at least one posterior.")
  structures = [jax.tree.structure(b.mean) for b in bubbles]
  if any(s != structures[0] for s in structures[1:]):
    raise ValueError("merge: the posteriors do not share one parameter tree (they must be "
                     "posteriors of the same model).")
  for b in bubbles[1:]:
    for x, y in zip(jax.tree.leaves(b.mean), jax.tree.leaves(bubbles[0].mean)):
      if jnp.shape(x) != jnp.shape(y):
        raise ValueError(f"merge: leaf shapes differ ({jnp.shape(x)} vs {jnp.shape(y)}).")
  if weights is None:
    return [1.0] * len(bubbles)
  weights = list(weights)
  if len(weights) != len(bubbles):
    raise ValueError(f"merge: {len(weights)} weights for {len(bubbles)} posteriors.")
  if any(not float(w) > 0 for w in weights):  # also rejects NaN
    raise ValueError(f"merge: weights must be positive, got {weights}.")
  return weights


def _safe_divide(x, d):
  return jnp.where(d > 0, x / jnp.where(d > 0, d, 1), 0)


def _dot(a: list, b: list):
  return sum(jnp.vdot(x, y) for x, y in zip(a, b))


def merge(posteriors: Sequence, weights: Optional[Sequence[float]] = None, *,
          diagonal: bool = False, tol: float = 1e-6, maxiter: int = 500,
          params=None) -> MergeResult:
  r"""Merges K posteriors into the mean of their (weighted) product.

  ``θ = (Σ_k λ_k P_k)⁻¹ Σ_k λ_k P_k θ_k`` with θ_k each posterior's mean and P_k its
  precision (see the module docstring).

  Args:
    posteriors: SOAP-Bubbles (`evon_jax.posterior.bubble(opt_state)`, a Laplace fit) or
      optimizer states holding one, all of the same parameter tree.
    weights: λ_k > 0 (default all 1).
    diagonal: use only each precision's diagonal in parameter coordinates (a diagonal
      posterior's merge, for comparison); closed form, no solve.
    tol, maxiter: the conjugate-gradient solve's relative tolerance and iteration cap.
    params: under `optax.partition` / `masked` the leaves no posterior owns come back as
      `optax.MaskedNode`; pass a params tree to take those leaves from it instead (e.g.
      `task_arithmetic` of the fine-tuned models, for leaves another optimizer trained).

  Returns:
    `MergeResult(params, relative_residual)`. Frozen (integer) leaves are taken from the
    first posterior.

  Example:
    >>> import jax.numpy as jnp, evon_jax
    >>> params = {"w": jnp.ones((3, 2))}
    >>> tx = evon_jax.evon(1e-2, ess=10.0)
    >>> state = tx.init(params)
    >>> merged = evon_jax.merging.merge([state, state]).params  # equal posteriors: their mean
  """
  bubbles = [posterior.bubble(p) for p in posteriors]
  weights = _check_inputs(bubbles, weights)
  treedef = jax.tree.structure(bubbles[0].mean)
  per_model = [_leaves(b)[1] for b in bubbles]
  means = [treedef.flatten_up_to(posterior.mean(b)) for b in bubbles]
  trainable = [i for i, leaf in enumerate(per_model[0]) if leaf[0] is not None]
  # The system on the trainable leaves (a list: one pytree for CG), block diagonal over them.
  diagonals = [{i: w * _diagonal(leaves[i]) for i in trainable}
               for leaves, w in zip(per_model, weights)]  # λ_k diag P_k
  diagonal_sum = [sum(d[i] for d in diagonals) for i in trainable]

  def operator(x: list) -> list:
    return [sum(w * _apply_precision(leaves[i], xi) for leaves, w in zip(per_model, weights))
            for i, xi in zip(trainable, x)]

  # The diagonal merge: exact for diagonal posteriors, the solve's start otherwise.
  start = [_safe_divide(sum(d[i] * m[i] for d, m in zip(diagonals, means)), total)
           for i, total in zip(trainable, diagonal_sum)]
  if diagonal:
    solution, relative = start, jnp.zeros([], jnp.float32)
  else:
    rhs = [sum(w * _apply_precision(leaves[i], m[i])
               for leaves, m, w in zip(per_model, means, weights)) for i in trainable]
    jacobi = lambda x: [_safe_divide(xi, d) for xi, d in zip(x, diagonal_sum)]
    solution, _ = jax.scipy.sparse.linalg.cg(operator, rhs, x0=start, tol=tol,
                                             maxiter=maxiter, M=jacobi)
    residual = [b - a for b, a in zip(rhs, operator(solution))]
    relative = jnp.sqrt(_dot(residual, residual) / _dot(rhs, rhs))
  out = list(means[0])
  for i, x in zip(trainable, solution):
    out[i] = x
  return MergeResult(posterior._fill_masked(treedef.unflatten(out), params, lambda p: p),
                     relative)


def task_arithmetic(base, finetuned: Sequence, scale: float = 1.0) -> Any:
  """``θ_0 + scale · Σ_k (θ_k − θ_0)``: task vectors added to the base (scale 1/K: the
  plain average of the fine-tuned models). `base` and `finetuned` are params trees."""
  if not finetuned:
    raise ValueError("task_arithmetic needs at least one fine-tuned model.")
  return jax.tree.map(lambda b, *ts: b + scale * sum(t - b for t in ts), base, *finetuned)
