"""Smoke test of the benchmarks: quick mode end to end at tiny sizes (no timing assertions)."""

import json
import math
import os

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("matplotlib")

from benchmarks import run  # noqa: E402  (after the optional-dependency checks)


def _positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  results = run.main(["--quick", "--out", str(out)])
  return out, results


@pytest.mark.slow  # the quick run takes ~150 s of one core
def test_quick_writes_json_summary_and_plots(quick):
  out, _ = quick
  with open(os.path.join(out, "results.json")) as f:
    results = json.load(f)
  assert set(run.SECTIONS) | {"mode", "machine", "config", "timings_s", "headline"} <= set(
      results)
  assert results["mode"] == "quick"
  assert {"date_utc", "cpu_model", "nproc", "jax", "lapack_threads"} <= set(
      results["machine"])
  assert os.path.getsize(os.path.join(out, "summary.md")) > 0
  for name in ("step_time_vs_d.png", "ratios.png", "memory.png", "growth.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0


@pytest.mark.slow  # the quick run takes ~150 s of one core
def test_step_timings_are_positive_and_finite(quick):
  _, results = quick
  for section in ("step", "growth_d", "layers", "frequency", "max_precond_dim"):
    for record in results[section]:
      for name, res in record["results"].items():
        assert res["finite"], (section, name)
        for key in ("median_ms", "mean_ms", "max_ms", "first_step_ms", "max_over_median"):
          assert _positive(res[key]), (section, name, key)
  step = results["step"][0]
  assert set(step["results"]) == set(run.QUICK["step"].get("optimizers", ())) or set(
      step["results"]) >= {"adamw", "soap", "ivon", "evon", "evon_whiten", "evon_stagger"}
  for ratio in step["ratio_vs_soap"].values():
    assert _positive(ratio["mean"]) and _positive(ratio["round_median"])


@pytest.mark.slow  # the quick run takes ~150 s of one core
def test_headline_train_memory_pieces(quick):
  _, results = quick
  headline = results["headline"]
  assert _positive(headline["evon_over_soap_mean"])
  assert isinstance(headline["target_evon_state_le_soap_plus_1"], bool)
  for key in ("target_evon_mean_le_1.05_soap", "target_evon_median_step_le_1.03_soap",
              "target_refresh_amortised_le_0.25"):
    assert isinstance(headline[key], bool), key
  assert _positive(headline["evon_over_soap_median_step"])
  for record in results["train"]["records"]:
    assert _positive(record["results"]["forward_backward"]["mean_ms"])
    for fraction in record["optimizer_fraction"].values():
      assert 0.0 <= fraction < 1.0
  for record in results["memory"]["state_bytes"]:
    assert _positive(record["state_per_param_byte"])
  for record in results["memory"]["peak_rss"]:
    assert "error" not in record, record.get("error")
    assert _positive(record["steps_peak_rss"])
  pieces = results["pieces"]
  assert all(_positive(v) for k, v in pieces["step_pieces"].items())
  assert all(_positive(rec["qr_ms"]) for rec in pieces["factor_sizes"])


@pytest.mark.slow  # the quick run takes ~150 s of one core
def test_peers_run_or_skip(quick):
  _, results = quick
  peers = results["peers"]
  if "skipped" in peers:
    assert "torch" in peers["skipped"]
    return
  for record in peers["records"]:
    for res in record["results"].values():
      assert res["finite"] and _positive(res["mean_ms"])


@pytest.mark.slow  # 45-60 s; test_sensitivity_and_refresh_cost_run stays in the suite
def test_hyperparameter_sweep_and_sensitivity_run():
  """The two scripts' entry points at tiny sizes: finite scores from every method kind."""
  from benchmarks import hyperparameters, sensitivity

  results = hyperparameters.sweep(["iris"], seeds=(0,), only={
      "AdamW", "IVON (defaults, lr 0.1)", "EVON whiten=True b2=0.9999 h0=0.1 lr=0.01"})
  assert set(results["iris"]) == {"AdamW", "IVON (defaults, lr 0.1)",
                                  "EVON whiten=True b2=0.9999 h0=0.1 lr=0.01"}
  for runs in results["iris"].values():
    assert all(math.isfinite(r["nll"]) and 0 <= r["accuracy"] <= 1 for r in runs)
  assert "| config | accuracy | NLL | ECE |" in hyperparameters.table(results)
  # AdamW does not amplify input noise (measured 2e-7 at 1e-7 relative noise).
  assert sensitivity.amplification(sensitivity.optimizers()["optax.adamw"], steps=3) < 1e-5


@pytest.mark.slow  # trains the LM example for a few steps (~50 s)
def test_lm_posterior_study_runs():
  """Every read-out of the LM posterior study gives finite losses and the decomposition
  BMA - mean = cost - gain holds by construction of its three numbers."""
  from benchmarks import lm_posterior

  result = lm_posterior.main(["--steps", "5", "--windows", "16", "--quick"])
  assert result["readouts"]
  for row in result["readouts"]:
    for split in ("val", "train"):
      r = row[split]
      assert all(math.isfinite(v) for v in r.values())
      assert abs(r["bma_minus_mean"] - (r["perturbation_cost"] - r["averaging_gain"])) < 1e-4
      assert r["averaging_gain"] >= -1e-6  # Jensen: the average predicts at least as well


def test_sensitivity_and_refresh_cost_run():
  """The default suite's benchmark smoke test (a few seconds): issue 16's two scripts."""
  from benchmarks import refresh_cost, sensitivity

  # AdamW does not amplify input noise (measured 2e-7 at 1e-7 relative noise, 12 steps).
  assert sensitivity.amplification(sensitivity.optimizers()["optax.adamw"], steps=3) < 1e-5
  row = refresh_cost.measure(16, 4, rounds=1, calls=3)
  assert set(row) == {"eigh", "power_qr"}
  assert all(math.isfinite(r["ratio"]) and r["plain_ms"] > 0 and r["ours_ms"] > 0
             for r in row.values())


@pytest.mark.slow  # six methods x two streams at 100 steps per task (~60 s of compiling)
def test_continual_learning_benchmark_runs(tmp_path):
  """`python -m benchmarks.continual --quick`: every method scores every stream, and the
  report and plot read its results."""
  from benchmarks import continual

  results = continual.main(["--quick"])
  for per_method in results["streams"].values():
    assert len(per_method) == 6
    for r in per_method.values():
      assert all(0 <= a <= 1 for a in r["accuracy"])
      assert all(-1 <= f <= 1 for f in r["forgetting"])
      assert np.asarray(r["matrices"]).shape == (1, 5, 5)
  assert "| method | average accuracy | forgetting |" in continual.report(results)
  continual.plot(results, str(tmp_path / "continual.png"))
  assert (tmp_path / "continual.png").stat().st_size > 0


@pytest.mark.slow  # seventeen compiled steps (~90 s of compiling at d = 16)
def test_ablations_run_and_the_patches_take_effect():
  """`python -m benchmarks.ablations` at a tiny size: every variant runs, and each patched
  variant is a different program (the caches are cleared between builds, so a patch is not
  hidden behind an unpatched variant's compiled update)."""
  from benchmarks import ablations, common

  shapes = common.transformer_shapes(16, 1)
  texts = {}
  for variant in ablations.PATCHES:
    runner = ablations._runner(variant, "evon_whiten", ablations.PATCHES[variant], shapes, 3)
    texts[variant] = runner.compiled.as_text()
  assert len(set(texts.values())) == len(ablations.PATCHES) == 6
  record = ablations.run(d=16, layers=1, frequency=2, rounds=1)
  assert len(record["rows"]) == 11
  assert all(_positive(r["mean_ms"]) for r in record["rows"])
  assert "| optimizer" in ablations.markdown(record)
