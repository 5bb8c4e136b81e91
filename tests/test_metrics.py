"""evon_jax.metrics against values derived by hand (derivations in the comments) and, for the
OOD scores, against scikit-learn as an independent reference.

Tolerances: the metrics run in float32 on inputs of a few entries, so the only error is
float32 rounding of sums of O(1) terms (~1e-7 relative); we use rtol/atol 1e-6.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from evon_jax import metrics

TOL = dict(rtol=1e-6, atol=1e-6)


def test_nll_hand():
  # -(log 0.5 + log 0.75) / 2
  probs = jnp.array([[0.5, 0.5], [0.25, 0.75]])
  expected = (math.log(2.0) + math.log(4.0 / 3.0)) / 2
  np.testing.assert_allclose(metrics.nll(probs, jnp.array([0, 1])), expected, **TOL)


def test_nll_of_zero_probability_is_finite():
  value = metrics.nll(jnp.array([[1.0, 0.0]]), jnp.array([1]))
  assert np.isfinite(value) and value > 50


def test_accuracy_hand_ties_go_to_first_class():
  # argmax = [0, 1, 0 (tie), 1] vs labels [0, 0, 0, 1]: 3 of 4 correct.
  probs = jnp.array([[0.7, 0.3], [0.4, 0.6], [0.5, 0.5], [0.2, 0.8]])
  np.testing.assert_allclose(metrics.accuracy(probs, jnp.array([0, 0, 0, 1])), 0.75, **TOL)


# Four binary predictions: confidence (max prob) and whether argmax == label.
#   0.95 correct, 0.92 wrong, 0.65 correct (argmax 1, label 1), 0.55 wrong (argmax 0, label 1)
ECE_PROBS = jnp.array([[0.95, 0.05], [0.92, 0.08], [0.35, 0.65], [0.55, 0.45]])
ECE_LABELS = jnp.array([0, 1, 1, 1])


@pytest.mark.parametrize("num_bins, expected", [
    # One bin: |mean accuracy - mean confidence| = |0.5 - 3.07/4| = 0.2675.
    (1, 0.2675),
    # Ten bins: (0.9, 1] holds 0.95 and 0.92: weight 1/2, |0.5 - 0.935| = 0.435 -> 0.2175;
    # (0.6, 0.7]: 1/4 * |1 - 0.65| = 0.0875; (0.5, 0.6]: 1/4 * |0 - 0.55| = 0.1375.
    (10, 0.2175 + 0.0875 + 0.1375),
    # Fifteen bins (width 1/15): 0.95 -> (14/15, 1], 0.92 -> (13/15, 14/15], so the two top
    # predictions separate: 1/4 (|1 - 0.95| + |0 - 0.92| + |1 - 0.65| + |0 - 0.55|).
    (15, (0.05 + 0.92 + 0.35 + 0.55) / 4),
])
def test_ece_hand(num_bins, expected):
  value = metrics.expected_calibration_error(ECE_PROBS, ECE_LABELS, num_bins=num_bins)
  np.testing.assert_allclose(value, expected, **TOL)


def test_ece_default_is_fifteen_bins():
  np.testing.assert_allclose(metrics.expected_calibration_error(ECE_PROBS, ECE_LABELS),
                             (0.05 + 0.92 + 0.35 + 0.55) / 4, **TOL)


def test_ece_perfectly_calibrated_is_zero():
  # Confidence 0.75 throughout and 3 of 4 correct.
  probs = jnp.tile(jnp.array([[0.75, 0.25]]), (4, 1))
  np.testing.assert_allclose(
      metrics.expected_calibration_error(probs, jnp.array([0, 0, 0, 1])), 0.0, **TOL)


def _ece_loop(probs, labels, num_bins):
  """Plain-Python ECE: bins (lo, hi], the sum over bins of weight * |acc - conf|."""
  probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
  confidence, correct = probs.max(-1), probs.argmax(-1) == labels
  total = 0.0
  for b in range(num_bins):
    lo, hi = b / num_bins, (b + 1) / num_bins
    in_bin = (confidence > lo) & (confidence <= hi)
    if in_bin.any():
      total += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
  return total


def test_ece_matches_loop_on_random_predictions():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((500, 10)) * 3
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  labels = rng.integers(0, 10, 500)
  value = metrics.expected_calibration_error(jnp.asarray(probs, jnp.float32),
                                             jnp.asarray(labels))
  np.testing.assert_allclose(value, _ece_loop(probs, labels, 15), rtol=1e-5, atol=1e-6)


def test_reliability_bins_hand():
  # Ten bins, ECE_PROBS: (0.9, 1] holds 0.95 (correct) and 0.92 (wrong): confidence 0.935,
  # accuracy 1/2; (0.6, 0.7] holds 0.65 (correct); (0.5, 0.6] holds 0.55 (wrong).
  confidence, acc, count = map(np.asarray,
                               metrics.reliability_bins(ECE_PROBS, ECE_LABELS, num_bins=10))
  expected_count = np.zeros(10, int)
  expected_count[[9, 6, 5]] = [2, 1, 1]
  np.testing.assert_array_equal(count, expected_count)
  np.testing.assert_allclose(confidence[[9, 6, 5]], [0.935, 0.65, 0.55], **TOL)
  np.testing.assert_allclose(acc[[9, 6, 5]], [0.5, 1.0, 0.0], **TOL)
  np.testing.assert_array_equal(confidence[count == 0], 0.0)
  # The ECE is the count-weighted gap.
  np.testing.assert_allclose(np.sum(count * np.abs(acc - confidence)) / 4,
                             metrics.expected_calibration_error(ECE_PROBS, ECE_LABELS, 10),
                             **TOL)


def test_brier_hand():
  # Row 1: (0.7-1)² + 0.3² = 0.18; row 2: (0.4-1)² + 0.6² = 0.72; row 3 (label 2):
  # 0.2² + 0.5² + (0.3-1)² = 0.78.
  probs = jnp.array([[0.7, 0.3, 0.0], [0.4, 0.6, 0.0], [0.2, 0.5, 0.3]])
  np.testing.assert_allclose(metrics.brier_score(probs, jnp.array([0, 0, 2])),
                             (0.18 + 0.72 + 0.78) / 3, **TOL)


def test_predictive_entropy_hand():
  probs = jnp.array([[0.25] * 4, [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
  np.testing.assert_allclose(metrics.predictive_entropy(probs),
                             [math.log(4.0), 0.0, math.log(2.0)], **TOL)


def test_mutual_information_hand():
  # Input 0: two confident samples that disagree: H(mean) = log 2, mean H = 0 -> log 2.
  # Input 1: two identical samples: no epistemic uncertainty -> 0.
  sample_probs = jnp.array([[[1.0, 0.0], [0.3, 0.7]],
                            [[0.0, 1.0], [0.3, 0.7]]])
  np.testing.assert_allclose(metrics.mutual_information(sample_probs), [math.log(2.0), 0.0],
                             **TOL)


# OOD example: higher score = more OOD.
IN_SCORES = jnp.array([0.1, 0.4, 0.35, 0.8])
OUT_SCORES = jnp.array([0.9, 0.4, 0.5])


def test_auroc_hand():
  # Pairs (out beats in): 0.9 beats all 4; 0.4 beats 0.1, 0.35 and ties 0.4 (1/2) -> 2.5;
  # 0.5 beats 0.1, 0.4, 0.35 -> 3. AUROC = 9.5 / 12.
  np.testing.assert_allclose(metrics.ood_auroc(IN_SCORES, OUT_SCORES), 9.5 / 12, **TOL)


def test_aupr_hand():
  # Precision at each OOD score s: #out>=s / (#out>=s + #in>=s):
  # 0.9 -> 1/1, 0.5 -> 2/3 (0.8 is above), 0.4 -> 3/5 (0.4 and 0.8). AP = mean = 34/45.
  np.testing.assert_allclose(metrics.ood_aupr(IN_SCORES, OUT_SCORES), 34 / 45, **TOL)


def test_fpr_at_95_tpr_hand():
  # 3 OOD inputs: 95% TPR needs all 3, threshold 0.4; in-scores >= 0.4: 0.4, 0.8 -> 1/2.
  np.testing.assert_allclose(metrics.fpr_at_95_tpr(IN_SCORES, OUT_SCORES), 0.5, **TOL)
  # 20 OOD inputs 1..20: 19 of them (95%) are >= 2; in-scores >= 2: 2, 3, 10 -> 3/5.
  out = jnp.arange(1.0, 21.0)
  in_ = jnp.array([0.0, 1.5, 2.0, 3.0, 10.0])
  np.testing.assert_allclose(metrics.fpr_at_95_tpr(in_, out), 0.6, **TOL)


def test_perfect_and_reversed_separation():
  in_, out = jnp.array([0.0, 1.0, 2.0]), jnp.array([3.0, 4.0])
  assert metrics.ood_auroc(in_, out) == 1.0
  assert metrics.ood_aupr(in_, out) == 1.0
  assert metrics.fpr_at_95_tpr(in_, out) == 0.0
  assert metrics.ood_auroc(out, in_) == 0.0


def _sklearn_fpr_at_95(in_scores, out_scores):
  y = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
  fpr, tpr, _ = skm.roc_curve(y, np.r_[in_scores, out_scores], drop_intermediate=False)
  return fpr[np.argmax(tpr >= 0.95)]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ties", [False, True])
def test_ood_scores_match_sklearn(seed, ties):
  rng = np.random.default_rng(seed)
  in_scores = rng.standard_normal(37)
  out_scores = rng.standard_normal(23) + 0.8
  if ties:  # few distinct values: many ties inside and across the two groups
    in_scores, out_scores = np.round(in_scores), np.round(out_scores)
  y = np.r_[np.zeros(37), np.ones(23)]
  s = np.r_[in_scores, out_scores]
  args = jnp.asarray(in_scores, jnp.float32), jnp.asarray(out_scores, jnp.float32)
  np.testing.assert_allclose(metrics.ood_auroc(*args), skm.roc_auc_score(y, s), **TOL)
  np.testing.assert_allclose(metrics.ood_aupr(*args), skm.average_precision_score(y, s), **TOL)
  np.testing.assert_allclose(metrics.fpr_at_95_tpr(*args),
                             _sklearn_fpr_at_95(in_scores, out_scores), **TOL)
  # AUPR-In: in-distribution positive, lower score = more in-distribution.
  np.testing.assert_allclose(metrics.ood_aupr(-args[1], -args[0]),
                             skm.average_precision_score(1 - y, -s), **TOL)


def test_metrics_jit():
  probs = jax.nn.softmax(jax.random.normal(jax.random.key(0), (50, 5)))
  labels = jnp.arange(50) % 5
  for fn in (metrics.nll, metrics.accuracy, metrics.brier_score,
             functools.partial(metrics.expected_calibration_error, num_bins=7)):
    np.testing.assert_allclose(jax.jit(fn)(probs, labels), fn(probs, labels), **TOL)
  for fn in (metrics.ood_auroc, metrics.ood_aupr, metrics.fpr_at_95_tpr):
    np.testing.assert_allclose(jax.jit(fn)(probs[:, 0], probs[:20, 1]),
                               fn(probs[:, 0], probs[:20, 1]), **TOL)


def test_metrics_reject_logits_one_hot_and_float_labels():
  probs = jnp.array([[0.2, 0.8], [0.6, 0.4]])
  labels = jnp.array([1, 0])
  logits = jnp.array([[-1.0, 2.0], [0.5, -0.3]])
  for fn in (metrics.nll, metrics.accuracy, metrics.expected_calibration_error,
             metrics.brier_score):
    with pytest.raises(ValueError, match="Logits"):
      fn(logits, labels)
    with pytest.raises(ValueError, match="One-hot"):
      fn(probs, jax.nn.one_hot(labels, 2))
    with pytest.raises(ValueError, match="integer class indices"):
      fn(probs, labels.astype(jnp.float32))
    with pytest.raises(ValueError, match="rows of probs"):
      fn(probs, labels[:1])
    # Valid inputs pass, also under jit (where only shapes are checked).
    np.testing.assert_allclose(jax.jit(fn)(probs, labels), fn(probs, labels), rtol=1e-6)


def test_reliability_diagram_draws_the_non_empty_bins():
  """The one plotting helper (demo and classify use it): the bins it draws are the non-empty
  ones of `reliability_bins`, in both styles."""
  from matplotlib.figure import Figure
  from evon_jax import plots

  rng = np.random.default_rng(0)
  probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(200, 3)) * 2.0), axis=-1)
  labels = jnp.asarray(rng.integers(0, 3, size=200))
  confidence, accuracy, count = (np.asarray(a) for a in metrics.reliability_bins(
      probs, labels, 10))
  for style, artists in (("line", "lines"), ("bars", "patches")):
    ax = Figure().add_subplot()
    got = plots.reliability_diagram(ax, probs, labels, num_bins=10, style=style)
    keep = count > 0
    for a, b in zip(got, (confidence[keep], accuracy[keep], count[keep])):
      np.testing.assert_allclose(a, b)
    assert len(getattr(ax, artists)) >= (1 if style == "line" else int(keep.sum()))
  with pytest.raises(ValueError, match="style"):
    plots.reliability_diagram(Figure().add_subplot(), probs, labels, style="pie")
