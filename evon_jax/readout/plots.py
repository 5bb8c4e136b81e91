"""Plots of the read-outs (matplotlib is only needed by the caller, who passes the Axes)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from evon_jax.readout import metrics

__all__ = ["reliability_diagram", "prior_precision_search"]


def reliability_diagram(ax, probs, labels, *, num_bins: int = 10, style: str = "line",
                        label=None, marker: str = "o", color=None, diagonal: bool = True):
  """Draws a reliability diagram on a matplotlib ``ax``: per confidence bin (binned as
  `evon_jax.metrics.reliability_bins`), the accuracy against the mean confidence.

  ``style='line'``: a line through the non-empty bins whose marker area follows the bin's
  share of the inputs (several predictives on one axes, each with its ``label``);
  ``style='bars'``: one bar per bin at its accuracy, a tick at its mean confidence and its
  count above it (one predictive per axes). ``diagonal`` adds perfect calibration.

  Returns:
    ``(confidence, accuracy, count)`` of the non-empty bins, as NumPy arrays.
  """
  if style not in ("line", "bars"):
    raise ValueError(f"style must be 'line' or 'bars', got {style!r}.")
  confidence, accuracy, count = (np.asarray(a) for a in metrics.reliability_bins(
      jnp.asarray(probs), jnp.asarray(labels), num_bins))
  keep = count > 0
  confidence, accuracy, count = confidence[keep], accuracy[keep], count[keep]
  if diagonal:
    ax.plot([0, 1], [0, 1], color="0.5", lw=0.8, ls="--")
  if style == "line":
    line, = ax.plot(confidence, accuracy, lw=1, marker=marker, ms=3, label=label, color=color)
    ax.scatter(confidence, accuracy, s=8 + 300 * count / count.sum(), marker=marker,
               alpha=0.6, color=line.get_color())
  else:
    width = 1.0 / num_bins
    centers = (np.flatnonzero(keep) + 0.5) * width
    ax.bar(centers, accuracy, width=width * 0.9, color=color or "C0", alpha=0.8,
           label="accuracy" if label is None else label)
    ax.scatter(centers, confidence, marker="_", s=120, color="C3", lw=2, zorder=3,
               label="mean confidence")
    for x, y, n in zip(centers, accuracy, count):
      ax.text(x, min(y + 0.02, 0.93), str(int(n)), ha="center", fontsize=6)
  return confidence, accuracy, count


def prior_precision_search(ax, search, *, label=None):
  """Plots what `evon_jax.laplace.tune_prior_precision` evaluated: its objective (the log
  evidence or the validation NLL) against λ on a log axis, with the chosen λ marked.

  ``search`` is the `PriorPrecisionSearch` the tuning returns.
  """
  grid, objective = np.asarray(search.grid), np.asarray(search.objective)
  order = np.argsort(grid)
  line, = ax.plot(grid[order], objective[order], marker="o", ms=3, lw=1, label=label)
  ax.axvline(float(search.prior_precision), color=line.get_color(), ls=":", lw=1)
  ax.set_xscale("log")
  ax.set_xlabel("prior precision λ")
  return line
