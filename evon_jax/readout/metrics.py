"""Evaluation metrics for probabilistic classifiers and out-of-distribution detection.

Pure `jax.numpy` functions (jit- and vmap-friendly). Conventions:

* ``probs`` are predictive probabilities of shape ``(n, num_classes)`` (rows sum to one), e.g.
  a Bayesian model average; ``labels`` are integer class indices of shape ``(n,)``.
* ``sample_probs`` carry a leading Monte-Carlo sample axis: ``(num_samples, n, num_classes)``.
* OOD detection takes a score per input, **higher score = more out-of-distribution** (e.g. the
  predictive entropy), for in-distribution inputs ``in_scores`` and out-of-distribution inputs
  ``out_scores``; the OOD inputs are the positive class.

Logarithms are natural (entropies in nats).
"""

from __future__ import annotations

import jax
import jax.scipy.special
import jax.numpy as jnp

__all__ = [
    "nll", "accuracy", "expected_calibration_error", "reliability_bins", "brier_score",
    "predictive_entropy", "mutual_information", "ood_auroc", "ood_aupr", "fpr_at_95_tpr",
]


def _safe_log(probs: jax.Array) -> jax.Array:
  """log p, finite at p = 0 (p clipped to the dtype's smallest normal: log ≈ -87 in float32).

  A zero probability of the true class then costs a large finite NLL, and 0 log 0 = 0.
  """
  return jnp.log(jnp.clip(probs, jnp.finfo(probs.dtype).tiny, 1.0))


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_classification(probs, labels, where: str):
  """Clear errors for what these metrics are most often handed by mistake: one-hot or float
  labels, mismatched lengths, and logits or unnormalised scores instead of probabilities
  (checked on concrete inputs; under `jit` only the shapes are)."""
  probs, labels = jnp.asarray(probs), jnp.asarray(labels)
  if probs.ndim != 2:
    raise ValueError(f"{where}: probs must be (n, num_classes), got shape {probs.shape}.")
  if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
    hint = (" One-hot labels? Pass labels.argmax(-1)." if labels.ndim == 2 else "")
    raise ValueError(f"{where}: labels must be integer class indices of shape (n,), got "
                     f"shape {labels.shape} and dtype {labels.dtype}.{hint}")
  if labels.shape[0] != probs.shape[0]:
    raise ValueError(f"{where}: {probs.shape[0]} rows of probs but {labels.shape[0]} labels.")
  if _is_concrete(probs) and probs.size:
    low, high = float(jnp.min(probs)), float(jnp.max(probs))
    row_error = float(jnp.max(jnp.abs(jnp.sum(probs, axis=-1) - 1.0)))
    if low < 0.0 or high > 1.0 or row_error > 1e-3:
      raise ValueError(
          f"{where}: probs must be probabilities (entries in [0, 1], rows summing to 1); got "
          f"entries in [{low:.3g}, {high:.3g}], rows off by up to {row_error:.3g}. Logits? "
          "Pass jax.nn.softmax(logits, axis=-1).")
  return probs, labels


def _label_probs(probs: jax.Array, labels: jax.Array) -> jax.Array:
  """p(label_i | x_i), shape (n,)."""
  return jnp.take_along_axis(probs, labels[:, None], axis=-1)[:, 0]


def nll(probs: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean negative log-likelihood ``-1/n Σ_i log p_i[y_i]`` (nats).

  Example:
    >>> import jax.numpy as jnp
    >>> float(nll(jnp.array([[0.5, 0.5], [0.25, 0.75]]), jnp.array([0, 1])))  # doctest: +ELLIPSIS
    0.490...
  """
  probs, labels = _check_classification(probs, labels, "nll")
  return -jnp.mean(_safe_log(_label_probs(probs, labels)))


def accuracy(probs: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of inputs whose most probable class (first one on ties) is the label."""
  probs, labels = _check_classification(probs, labels, "accuracy")
  return jnp.mean(jnp.argmax(probs, axis=-1) == labels)


def expected_calibration_error(probs: jax.Array, labels: jax.Array,
                               num_bins: int = 15) -> jax.Array:
  r"""Expected calibration error with ``num_bins`` equal-width bins on the confidence.

  The confidence of input ``i`` is ``c_i = max_k p_ik``, its prediction is correct when
  ``argmax_k p_ik = y_i``. Bin ``b`` holds the inputs with ``c_i ∈ (b/B, (b+1)/B]`` (a
  confidence of exactly 0 goes to the first bin), and

  .. math:: \mathrm{ECE} = \sum_b \frac{|B_b|}{n} \left| \mathrm{acc}(B_b) - \mathrm{conf}(B_b) \right|
            = \frac{1}{n} \sum_b \Big| \sum_{i \in B_b} (\mathbb{1}[\text{correct}_i] - c_i) \Big|.

  Args:
    probs: ``(n, num_classes)`` predictive probabilities.
    labels: ``(n,)`` integer labels.
    num_bins: number of bins (static).

  Returns:
    A scalar in ``[0, 1]``.
  """
  probs, labels = _check_classification(probs, labels, "expected_calibration_error")
  confidence = jnp.max(probs, axis=-1)
  correct = (jnp.argmax(probs, axis=-1) == labels).astype(confidence.dtype)
  bins = jnp.clip(jnp.ceil(confidence * num_bins).astype(jnp.int32) - 1, 0, num_bins - 1)
  gap_per_bin = jax.ops.segment_sum(correct - confidence, bins, num_segments=num_bins)
  return jnp.sum(jnp.abs(gap_per_bin)) / confidence.shape[0]


def reliability_bins(probs: jax.Array, labels: jax.Array,
                     num_bins: int = 15) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-bin statistics of a reliability diagram, binned as `expected_calibration_error`.

  Returns:
    ``(confidence, accuracy, count)``, each of shape ``(num_bins,)``: the mean confidence and
    the accuracy of the inputs in bin ``(b/B, (b+1)/B]`` and their number. Empty bins have
    count 0 and confidence = accuracy = 0 (mask them with ``count > 0`` when plotting).
    ``sum(count * |accuracy - confidence|) / n`` is the ECE.
  """
  probs, labels = _check_classification(probs, labels, "reliability_bins")
  confidence = jnp.max(probs, axis=-1)
  correct = (jnp.argmax(probs, axis=-1) == labels).astype(confidence.dtype)
  bins = jnp.clip(jnp.ceil(confidence * num_bins).astype(jnp.int32) - 1, 0, num_bins - 1)
  count = jax.ops.segment_sum(jnp.ones_like(confidence), bins, num_segments=num_bins)
  safe = jnp.maximum(count, 1.0)
  return (jax.ops.segment_sum(confidence, bins, num_segments=num_bins) / safe,
          jax.ops.segment_sum(correct, bins, num_segments=num_bins) / safe,
          count.astype(jnp.int32))


def brier_score(probs: jax.Array, labels: jax.Array) -> jax.Array:
  """Multi-class Brier score ``1/n Σ_i Σ_k (p_ik - 1[k = y_i])²`` (in ``[0, 2]``, lower is better)."""
  probs, labels = _check_classification(probs, labels, "brier_score")
  one_hot = jax.nn.one_hot(labels, probs.shape[-1], dtype=probs.dtype)
  return jnp.mean(jnp.sum(jnp.square(probs - one_hot), axis=-1))


def _entropy(probs: jax.Array) -> jax.Array:
  return jnp.sum(jax.scipy.special.entr(probs), axis=-1)  # entr(0) = 0


def predictive_entropy(probs: jax.Array) -> jax.Array:
  """Per-input entropy ``H[p] = -Σ_k p_k log p_k`` of the last axis (shape ``probs.shape[:-1]``)."""
  return _entropy(probs)


def mutual_information(sample_probs: jax.Array) -> jax.Array:
  r"""Per-input mutual information between the label and the weights (epistemic uncertainty).

  From per-sample probabilities ``sample_probs`` of shape ``(num_samples, n, num_classes)``:
  ``I = H[mean_s p_s] - mean_s H[p_s] ≥ 0`` (the BALD score), shape ``(n,)``.
  """
  total = _entropy(jnp.mean(sample_probs, axis=0))
  aleatoric = jnp.mean(_entropy(sample_probs), axis=0)
  return jnp.maximum(total - aleatoric, 0.0)


def _count_at_least(sorted_values: jax.Array, thresholds: jax.Array) -> jax.Array:
  """#{v ∈ sorted_values : v >= t} for each threshold t."""
  return sorted_values.shape[0] - jnp.searchsorted(sorted_values, thresholds, side="left")


def ood_auroc(in_scores: jax.Array, out_scores: jax.Array) -> jax.Array:
  """Area under the ROC curve for telling OOD (positive) from in-distribution inputs.

  The Mann–Whitney statistic ``P(s_out > s_in) + ½ P(s_out = s_in)`` over all pairs (ties count
  one half, as in ``sklearn.metrics.roc_auc_score``); 0.5 is chance, 1 perfect separation.
  Costs O((n_in + n_out) log n_in).
  """
  sorted_in = jnp.sort(in_scores)
  below = jnp.searchsorted(sorted_in, out_scores, side="left")
  not_above = jnp.searchsorted(sorted_in, out_scores, side="right")
  # Per OOD input, the fraction of in-distribution inputs it beats (no integer overflow).
  wins = (below + 0.5 * (not_above - below)) / in_scores.shape[0]
  return jnp.mean(wins)


def ood_aupr(in_scores: jax.Array, out_scores: jax.Array) -> jax.Array:
  """Area under the precision–recall curve with OOD inputs as positives ("AUPR-Out").

  Computed as average precision, the precision at each positive's score averaged over the
  positives (``Σ_t (R_t - R_{t-1}) P_t`` over distinct thresholds, exactly what
  ``sklearn.metrics.average_precision_score`` computes). For "AUPR-In" (in-distribution
  positive) call ``ood_aupr(-out_scores, -in_scores)``.
  """
  sorted_in, sorted_out = jnp.sort(in_scores), jnp.sort(out_scores)
  true_positives = _count_at_least(sorted_out, out_scores)
  false_positives = _count_at_least(sorted_in, out_scores)
  return jnp.mean(true_positives / (true_positives + false_positives))


def fpr_at_95_tpr(in_scores: jax.Array, out_scores: jax.Array) -> jax.Array:
  """False-positive rate on in-distribution inputs when 95% of OOD inputs are detected.

  Uses the largest threshold ``t`` with TPR = ``#{s_out >= t} / n_out >= 0.95`` (the first
  point of the ROC curve reaching 95% TPR) and returns ``#{s_in >= t} / n_in``. Lower is
  better.
  """
  num_out = out_scores.shape[0]
  # The k-th largest OOD score, k = ceil(0.95 n_out) in exact integer arithmetic.
  k = -(-95 * num_out // 100)
  threshold = jnp.sort(out_scores)[num_out - k]
  return jnp.mean(in_scores >= threshold)
