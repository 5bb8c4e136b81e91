"""Smoke test of benchmarks/posteriors.py: every method of the comparison on the 2-D toy at
tiny sizes (quick mode), checking the table, figure and bookkeeping it writes."""

from __future__ import annotations

import json
import math
import os

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from benchmarks import posteriors  # noqa: E402  (after the optional-dependency checks)

# ~220 s of one core (every method of the comparison fitted): run with -m slow.
pytestmark = pytest.mark.slow

PREDICTIVES = {
    "MAP", "ensemble (5)", "IVON BMA", "EVON BMA", "Laplace BMA", "Laplace linearised",
    "Laplace (val λ) BMA", "Laplace (val λ) linearised",
    "low-rank IVON BMA", "low-rank EVON BMA", "low-rank MFVI BMA", "VIKING BMA"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp("posteriors")
  result = posteriors.main(["--quick", "--datasets", "moons", "--out", str(out)])
  return out, result


def test_every_method_is_evaluated_with_finite_metrics(quick):
  out, _ = quick
  with open(os.path.join(out, "posteriors.json")) as f:
    run = json.load(f)["runs"][0]
  assert set(run["results"]) == PREDICTIVES
  for name, r in run["results"].items():
    assert all(math.isfinite(v) for v in r.values()), (name, r)
    assert 0.0 <= r["auroc[far, entropy]"] <= 1.0
    assert r["nll"] > 0
  # 60 steps on 256 points: the point estimates and the well-conditioned posteriors already
  # separate the moons (measured 0.82-0.89); chance is 0.5. The others (MFVI at init std,
  # Laplace's sampled predictive) are only required to be finite at this size.
  for name in ("MAP", "ensemble (5)", "IVON BMA", "EVON BMA"):
    assert run["results"][name]["accuracy"] > 0.7, name


def test_bookkeeping_counts_parameters_and_time(quick):
  out, _ = quick
  with open(os.path.join(out, "posteriors.json")) as f:
    run = json.load(f)["runs"][0]
  info = run["info"]
  dense = info["MAP"]["weights"]
  # 2-16-16-2 GELU MLP: (2+1)·16 + (16+1)·16 + (16+1)·2 weights and biases.
  assert dense == 3 * 16 + 17 * 16 + 17 * 2
  assert info["ensemble (5)"]["posterior_floats"] == 5 * dense
  assert info["IVON BMA"]["posterior_floats"] == 2 * dense  # mean and Hessian
  assert info["EVON BMA"]["posterior_floats"] > 2 * dense  # plus the eigenbases
  # Laplace stores the same SOAP-Bubble as EVON (mean, H, bases) for the same network.
  assert info["Laplace BMA"]["posterior_floats"] == info["EVON BMA"]["posterior_floats"]
  # Rank 2 factors: r(in + out) + out per layer, fewer than the dense layers.
  assert info["low-rank IVON BMA"]["weights"] == (2 * 18 + 16) + (2 * 32 + 16) + (2 * 18 + 2)
  assert info["low-rank MFVI BMA"]["posterior_floats"] == 2 * info["low-rank MFVI BMA"]["weights"]
  assert info["VIKING BMA"]["posterior_floats"] == dense + 2
  assert info["Laplace BMA"]["train_s"] >= info["Laplace BMA"]["laplace_fit_s"] > 0
  assert all(i["train_s"] > 0 for i in info.values())


def test_table_and_figure_are_written(quick):
  out, _ = quick
  with open(os.path.join(out, "posteriors.md")) as f:
    table = f.read()
  for name in PREDICTIVES:
    assert f"| {name} |" in table
  assert os.path.getsize(os.path.join(out, "posteriors.png")) > 10_000
