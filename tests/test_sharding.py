"""EVON under `jax.jit` with shardings: the sharded run equals the single-device run.

XLA_FLAGS must be set before JAX initialises, so each case runs `_sharding_worker.py` in a
fresh interpreter with 4 forced host (CPU) devices; the worker asserts and prints the largest
differences it measured, which are checked again here. What is checked (see the worker):

* data parallel: params and state replicated, the batch sharded 4 ways over 'data';
* FSDP-style: on a (2 data) x (2 model) mesh every state array with an even dimension
  (Kronecker factors, bases, mean, momentum, Hessian) sharded over 'model';

in both, 13 update calls (the first-call eigh, power-QR refreshes at real steps 4, 8, 12)
through one ahead-of-time compiled executable (it raises if a returned state had other
shardings or types, so the state's placement is stable and nothing recompiles), every state
leaf's sharding checked at every step, and params, posterior mean and the whole state compared
with the same jitted step on one device, same key (so the same noise), integer leaves (counts,
key data) exactly. The FSDP case also saves the sharded state with `evon_jax.checkpoint` and
restores it into a template carrying the shardings: same placements, same bits.

Tolerances: the only difference between the programs is the order of the batch reduction in
the gradient (four partial sums plus an all-reduce instead of one sum), a relative 1e-7 per
step, carried through 13 steps of whitening and refreshes: measured 3e-6 on params and mean
and 2e-5 on the state (whose Hessian and factor entries are larger than the weights). The
bounds are 10x those. The leaves are square (8 x 8): a non-square gradient's Kronecker factor
is rank-deficient, its null space a degenerate eigenspace whose eigh basis depends on the
last bit of the factor, and since the noise is drawn in eigen coordinates the two runs then
draw the same z along different directions (equal in distribution, not pathwise; measured
0.2 apart on params after 13 calls with (8, 16) and (16, 4) layers).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

_WORKER = pathlib.Path(__file__).with_name("_sharding_worker.py")
_PARAMS_ATOL = 3e-5
_STATE_ATOL = 2e-4


def _run_worker(case: str) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      " --xla_force_host_platform_device_count=4").strip()
  env["JAX_PLATFORMS"] = "cpu"
  result = subprocess.run(
      [sys.executable, "-W", "error", str(_WORKER), case], env=env, capture_output=True,
      text=True, timeout=300, check=False)
  if result.returncode != 0:
    pytest.fail(f"worker {case} failed:\n{result.stdout}\n{result.stderr[-5000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["data_parallel", "model_sharded"])
def test_sharded_run_equals_single_device_run(case):
  diffs = _run_worker(case)
  assert diffs["params"] < _PARAMS_ATOL, diffs
  assert diffs["mean"] < _PARAMS_ATOL, diffs
  assert diffs["state"] < _STATE_ATOL, diffs
  if case == "model_sharded":
    # factors, bases (two sides each for w1, w2), mean/momentum/hessian of the 4 leaves.
    assert diffs["num_sharded_state_leaves"] >= 16, diffs
    assert diffs["checkpoint"] in ("ok", "skipped (no orbax)"), diffs
