"""`axis_name` data parallelism on 4 forced host devices (in a subprocess: XLA_FLAGS must be
set before JAX starts). The script is `tests/replica_checks.py`; see its docstring."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("replica_checks.py")
# Twelve float32 steps whose gradient reductions run in a different order on 4 devices
# than on one: differences are rounding, ~1e-6 here. 2e-5 leaves room for other BLAS
# builds, while any real mismatch (a 4x gradient, a different sample) is >= 1e-2.
TOLERANCE = 2e-5


@pytest.fixture(scope="module")
def results():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True,
                        text=True, timeout=600, cwd=SCRIPT.parent.parent)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_shared_sample_equals_single_device_run(results):
  assert results["shared_count"] == 12
  for name in ("shared_vs_single_params", "shared_vs_single_mean",
               "unchecked_vs_single_params", "unchecked_vs_single_mean",
               "per_sample_shared_vs_single_mean"):
    assert results[name] < TOLERANCE, (name, results[name])


def test_independent_samples_equal_explicit_mc_run(results):
  assert results["independent_vs_explicit_mean"] < TOLERANCE
  assert results["independent_vs_explicit_samples"] < TOLERANCE
  # The replicas really hold different samples, and the mean really moved.
  assert results["independent_spread"] > 0.05
  assert results["mean_moved"] > 0.05


def test_non_finite_gradient_on_one_replica_skips_everywhere(results):
  assert results["nan_skipped"] == [1, 1, 1, 1]
  assert results["nan_counts"] == [1, 1, 1, 1]
  assert results["nan_mean_unchanged"]
  assert results["nan_updates_zero"]
