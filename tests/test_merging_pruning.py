"""Posterior-weighted merging and posterior signal-to-noise pruning on SOAP-Bubbles, against
dense NumPy re-derivations: each leaf's precision P = R diag(ess (H + δ)) Rᵀ with R the
Kronecker product of its bases (row-major vec), the merge θ = (Σ λ P_k)⁻¹ Σ λ P_k θ_k by a
dense solve."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import evon_jax
from evon_jax import merging, pruning, posterior

SHAPES = {"w": (3, 4), "b": (4,), "k": (2, 3, 2)}


def _orthogonal(rng, n):
  q, r = np.linalg.qr(rng.standard_normal((n, n)))
  return q * np.sign(np.diag(r))


def _random_bubble(seed, shared_bases=None, with_bases=True, ess=50.0, weight_decay=0.1):
  """A SoapBubble on SHAPES with random mean, H and (unless `with_bases` is False, IVON's
  case) random orthogonal bases in every dense slot."""
  rng = np.random.default_rng(seed)
  params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
  tx = evon_jax.evon(1e-2, ess=ess, weight_decay=weight_decay) if with_bases else \
      evon_jax.ivon(1e-2, ess=ess, weight_decay=weight_decay)
  bubble = posterior.bubble(tx.init(params))
  def basis(x):
    if x.ndim == 2 and x.shape[0] == x.shape[1] and x.shape[0] > 1:
      return jnp.asarray(_orthogonal(rng, x.shape[0]), jnp.float32)
    return x
  bases = shared_bases if shared_bases is not None else jax.tree.map(basis, bubble.bases)
  return bubble._replace(
      mean=jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32),
                        bubble.mean),
      hessian=jax.tree.map(lambda x: jnp.asarray(rng.uniform(0.05, 5.0, x.shape), jnp.float32),
                           bubble.hessian),
      bases=bases)


def _dense_rotation(bubble, name):
  """R with vec(W) = R vec(E) (row-major), from the leaf's stored bases."""
  rotation = np.ones((1, 1))
  for slot, size in zip(bubble.bases, SHAPES[name] if len(SHAPES[name]) > 1 else (4,)):
    q = np.asarray(slot[name], np.float64)
    side = q if q.ndim == 2 else np.eye(size)
    rotation = np.kron(rotation, side)
  return rotation


def _dense(bubble, name):
  """(θ, P) of one leaf, dense float64."""
  r = _dense_rotation(bubble, name)
  precision = float(bubble.ess) * (np.ravel(np.asarray(bubble.hessian[name], np.float64))
                                   + float(bubble.weight_decay))
  theta = r @ np.ravel(np.asarray(bubble.mean[name], np.float64))
  return theta, r @ np.diag(precision) @ r.T


@functools.lru_cache(maxsize=None)
def _bubbles():
  return tuple(_random_bubble(s) for s in range(3))


def test_dense_rotation_reproduces_the_posterior_mean():
  """The reference's R is the library's convention (a check of the test itself)."""
  bubble = _bubbles()[0]
  mean = posterior.mean(bubble)
  for name in SHAPES:
    theta, _ = _dense(bubble, name)
    np.testing.assert_allclose(np.ravel(mean[name]), theta, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weights", [None, (1.0, 0.3, 2.5)])
def test_merge_equals_dense_product_of_gaussians(weights):
  """Three bubbles with different random bases: the float32 CG merge (tol 1e-6) against a
  float64 dense solve. Measured on seeds 0-8 (three triples, both weightings): max error
  0.7-2.6e-6, relative residual 4-9e-7; the bounds (2e-5, 1e-5) leave 7x and 10x."""
  bubbles = _bubbles()
  result = merging.merge(bubbles, weights)
  lam = weights or (1.0,) * 3
  for name in SHAPES:
    thetas, precisions = zip(*[_dense(b, name) for b in bubbles])
    total = sum(w * p for w, p in zip(lam, precisions))
    expected = np.linalg.solve(total, sum(w * p @ t for w, p, t in zip(lam, precisions, thetas)))
    np.testing.assert_allclose(np.ravel(result.params[name]), expected, atol=2e-5, rtol=2e-5)
  assert float(result.relative_residual) < 1e-5


def test_merge_of_one_posterior_is_its_mean_and_diagonal_merge_is_dense_diagonal():
  bubbles = _bubbles()
  alone = merging.merge(bubbles[:1]).params
  for name in SHAPES:
    np.testing.assert_allclose(alone[name], posterior.mean(bubbles[0])[name], atol=1e-5)
  diag = merging.merge(bubbles, diagonal=True).params
  for name in SHAPES:
    thetas, precisions = zip(*[_dense(b, name) for b in bubbles])
    d = [np.diag(p) for p in precisions]
    expected = sum(di * t for di, t in zip(d, thetas)) / sum(d)
    np.testing.assert_allclose(np.ravel(diag[name]), expected, rtol=2e-5, atol=2e-5)
    # The exact merge differs from the diagonal one when the bases mix coordinates.
  exact = merging.merge(bubbles).params
  assert max(float(jnp.max(jnp.abs(exact[n] - diag[n]))) for n in SHAPES) > 1e-2


def test_merge_in_one_shared_basis_is_the_elementwise_average_in_eigen_coordinates():
  first = _bubbles()[0]
  others = [_random_bubble(s, shared_bases=first.bases) for s in (5, 6)]
  bubbles = [first] + others
  merged = merging.merge(bubbles).params
  for name in SHAPES:
    p = [float(b.ess) * (np.asarray(b.hessian[name], np.float64) + float(b.weight_decay))
         for b in bubbles]
    eigen = sum(pi * np.asarray(b.mean[name], np.float64) for pi, b in zip(p, bubbles)) / sum(p)
    expected = _dense_rotation(first, name) @ np.ravel(eigen)
    np.testing.assert_allclose(np.ravel(merged[name]), expected, atol=2e-5, rtol=2e-5)


def test_ivon_merge_is_the_precision_weighted_average_and_equals_diagonal_merge():
  bubbles = [_random_bubble(s, with_bases=False) for s in range(3)]
  merged = merging.merge(bubbles).params
  diag = merging.merge(bubbles, diagonal=True).params
  for name in SHAPES:
    p = [np.asarray(b.hessian[name], np.float64) + float(b.weight_decay) for b in bubbles]
    expected = sum(pi * np.asarray(b.mean[name], np.float64) for pi, b in zip(p, bubbles)) / sum(p)
    np.testing.assert_allclose(merged[name], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(diag[name], expected, rtol=1e-5, atol=1e-6)


def test_precision_times_and_diagonal_match_dense():
  bubble = _bubbles()[1]
  rng = np.random.default_rng(9)
  x = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in SHAPES.items()}
  px = merging.precision_times(bubble, x)
  diag = merging.precision_diagonal(bubble)
  for name in SHAPES:
    _, p = _dense(bubble, name)
    np.testing.assert_allclose(np.ravel(px[name]), p @ np.ravel(np.asarray(x[name], np.float64)),
                               rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.ravel(diag[name]), np.diag(p), rtol=1e-5)


def test_task_arithmetic_and_merge_validation():
  base = {"w": jnp.ones(3)}
  tuned = [{"w": jnp.array([2.0, 1.0, 1.0])}, {"w": jnp.array([1.0, 3.0, 1.0])}]
  np.testing.assert_allclose(merging.task_arithmetic(base, tuned)["w"], [2.0, 3.0, 1.0])
  np.testing.assert_allclose(merging.task_arithmetic(base, tuned, 0.5)["w"], [1.5, 2.0, 1.0])
  bubbles = _bubbles()
  with pytest.raises(ValueError, match="at least one"):
    merging.merge([])
  with pytest.raises(ValueError, match="2 weights for 3"):
    merging.merge(bubbles, weights=(1.0, 1.0))
  with pytest.raises(ValueError, match="positive"):
    merging.merge(bubbles, weights=(1.0, -1.0, 1.0))
  other = posterior.bubble(evon_jax.ivon(1e-2, ess=1.0).init({"v": jnp.zeros(2)}))
  with pytest.raises(ValueError, match="same model"):
    merging.merge([bubbles[0], other])


def test_merge_under_partition_fills_unowned_leaves_from_params():
  """Leaves another optimizer owns are MaskedNode in the merge (no posterior to weight
  them) unless `params` supplies them; the owned leaves are the merge of their bubbles."""
  params = {"dense": jnp.full((4, 3), 0.1), "emb": jnp.ones((5, 2))}
  labels = {"dense": "evon", "emb": "adam"}
  tx = optax.partition({"evon": evon_jax.evon(1e-2, ess=10.0), "adam": optax.adam(1e-2)},
                       labels)
  first = tx.init(params)
  _, second = tx.update(jax.tree.map(jnp.ones_like, params), first, params)
  merged = merging.merge([first, second])
  assert isinstance(merged.params["emb"], optax.MaskedNode)
  filled = merging.merge([first, second], params=params).params
  np.testing.assert_array_equal(filled["emb"], params["emb"])
  thetas, precisions = [], []
  for state in (first, second):  # the owned leaf against a dense solve
    bubble = posterior.bubble(state)
    q_left, q_right = (np.eye(n) if q is None else np.asarray(q, np.float64)
                       for q, n in zip(posterior.bases(bubble)["dense"], (4, 3)))
    rotation = np.kron(q_left, q_right)
    p = float(bubble.ess) * (np.ravel(np.asarray(bubble.hessian["dense"], np.float64))
                             + float(bubble.weight_decay))
    precisions.append(rotation @ np.diag(p) @ rotation.T)
    thetas.append(np.ravel(np.asarray(posterior.mean(bubble)["dense"], np.float64)))
  expected = np.linalg.solve(sum(precisions), sum(p @ t for p, t in zip(precisions, thetas)))
  np.testing.assert_allclose(np.ravel(filled["dense"]), expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- pruning


def test_signal_to_noise_matches_dense_marginals():
  bubble = _bubbles()[2]
  snr = pruning.signal_to_noise(bubble)
  snr_eigen = pruning.signal_to_noise(bubble, "eigen")
  for name in SHAPES:
    theta, p = _dense(bubble, name)
    std = np.sqrt(np.diag(np.linalg.inv(p)))
    np.testing.assert_allclose(np.ravel(snr[name]), np.abs(theta) / std, rtol=1e-4)
    eigen_var = 1.0 / (float(bubble.ess) * (np.asarray(bubble.hessian[name], np.float64)
                                            + float(bubble.weight_decay)))
    np.testing.assert_allclose(snr_eigen[name],
                               np.abs(np.asarray(bubble.mean[name])) / np.sqrt(eigen_var),
                               rtol=1e-5)


@pytest.mark.parametrize("scope", ["global", "per_leaf"])
def test_prune_drops_exactly_the_lowest_scores(scope):
  rng = np.random.default_rng(3)
  tree = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in SHAPES.items()}
  scores = {k: jnp.asarray(rng.uniform(size=s), jnp.float32) for k, s in SHAPES.items()}
  pruned, mask = pruning.prune(tree, scores, 0.4, scope=scope)
  np.testing.assert_array_equal(mask["b"], True)  # a vector: excluded by default
  np.testing.assert_array_equal(pruned["b"], tree["b"])
  included = ["k", "w"]  # jax's sorted key order
  if scope == "global":
    flat = np.concatenate([np.ravel(scores[k]) for k in included])
    drop = int(round(0.4 * flat.size))
    threshold = np.sort(flat)[drop - 1]
    for k in included:
      np.testing.assert_array_equal(np.asarray(mask[k]), np.asarray(scores[k]) > threshold)
  else:
    for k in included:
      s = np.ravel(scores[k])
      assert int(np.sum(~np.asarray(mask[k]))) == int(round(0.4 * s.size))
      np.testing.assert_array_equal(np.ravel(mask[k]), s > np.sort(s)[int(round(0.4 * s.size)) - 1])
  for k in included:
    np.testing.assert_array_equal(pruned[k], np.where(mask[k], tree[k], 0.0))
  _, everything = pruning.prune(tree, scores, 1.0, include=None)
  assert not any(bool(jnp.any(m)) for m in jax.tree.leaves(everything))
  with pytest.raises(ValueError, match="sparsity"):
    pruning.prune(tree, scores, 1.5)
  with pytest.raises(ValueError, match="shape"):
    pruning.prune(tree, {**scores, "w": jnp.ones(3)}, 0.5)


def test_prune_eigen_mean_matches_dense_rotation_of_the_kept_coordinates():
  bubble = _bubbles()[0]
  out = pruning.prune_eigen_mean(bubble, 0.5, scope="per_leaf")
  for name in ("w", "k"):
    m = np.asarray(bubble.mean[name], np.float64)
    v = 1.0 / (float(bubble.ess) * (np.asarray(bubble.hessian[name], np.float64)
                                    + float(bubble.weight_decay)))
    snr = np.ravel(np.abs(m) / np.sqrt(v))
    keep = np.ones(snr.size, bool)
    keep[np.argsort(snr, kind="stable")[:int(round(0.5 * snr.size))]] = False
    expected = _dense_rotation(bubble, name) @ np.where(keep, np.ravel(m), 0.0)
    np.testing.assert_allclose(np.ravel(out[name]), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["b"], posterior.mean(bubble)["b"], atol=1e-6)  # excluded
