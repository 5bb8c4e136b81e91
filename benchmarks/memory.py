"""Memory: optimizer-state bytes per parameter byte, XLA's buffer plan of a step, peak RSS.

* State bytes come from the state pytree (`jax.eval_shape` of init: nothing is allocated),
  broken down by state field.
* `compiled.memory_analysis()` of the jitted step gives XLA's temporary buffers.
* Peak RSS is measured in a fresh subprocess per optimizer (`python -m benchmarks.memory
  --child ...`): RSS with the params alone, then the high-water mark over the compile and
  the first step, then (after resetting the mark through /proc/self/clear_refs where Linux
  allows it) the high-water mark over the timed steps alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Sequence

import jax
import numpy as np

from benchmarks import common


def _bytes_of(struct) -> int:
  if jax.dtypes.issubdtype(struct.dtype, jax.dtypes.prng_key):
    struct = jax.eval_shape(jax.random.key_data, struct)
  return int(np.prod(struct.shape)) * np.dtype(struct.dtype).itemsize


def _field_bytes(state) -> dict:
  """Bytes per field of the NamedTuple states inside a (possibly chained) optax state."""
  out = {}

  def visit(node):
    if isinstance(node, tuple) and hasattr(node, "_fields"):
      for field in node._fields:
        size = sum(_bytes_of(x) for x in jax.tree.leaves(getattr(node, field)))
        out[field] = out.get(field, 0) + size
    elif isinstance(node, (tuple, list)):
      for item in node:
        visit(item)

  visit(state)
  return out


def state_bytes(optimizers: Sequence[str], d_values: Sequence[int], *,
                layers: int = 4) -> list[dict]:
  """Optimizer state bytes (total and per field) relative to the parameter bytes."""
  out = []
  for d in d_values:
    shapes = common.transformer_shapes(d, layers)
    params = jax.eval_shape(lambda: common.make_params(shapes))
    param_bytes = sum(_bytes_of(x) for x in jax.tree.leaves(params))
    for name in optimizers:
      state = jax.eval_shape(common.make_optimizer(name).init, params)
      total = sum(_bytes_of(x) for x in jax.tree.leaves(state))
      out.append({
          "optimizer": name, "d": d, "layers": layers, "param_bytes": param_bytes,
          "state_bytes": total, "state_per_param_byte": total / param_bytes,
          "fields": _field_bytes(state)})
  return out


# Leaves whose shape a merged matrix view would blow up: an attention kernel, a conv
# kernel and 12 stacked (nnx.scan) MLP kernels.
SHAPED_LEAVES = {
    "attention (768, 12, 64)": ((768, 12, 64), None),
    "conv (3, 3, 256, 256)": ((3, 3, 256, 256), None),
    "stacked (12, 768, 3072)": ((12, 768, 3072), 1),
}


def shaped_leaf_state_bytes() -> list[dict]:
  """State bytes of single N-D leaves: EVON and SOAP with their per-axis factors, EVON with
  the merged matrix view (`dimension_numbers=evon_jax.matrix_view`), and AdamW."""
  import evon_jax
  import optax
  out = []
  for label, (shape, stacked) in SHAPED_LEAVES.items():
    params = {"kernel": jax.ShapeDtypeStruct(shape, np.float32)}
    param_bytes = 4 * int(np.prod(shape))
    kw = dict(stacked_dims=stacked)
    optimizers = {
        "evon (per axis)": evon_jax.evon(1e-3, ess=1e4, hess_init=0.1, **kw),
        "evon (matrix view)": evon_jax.evon(1e-3, ess=1e4, hess_init=0.1,
                                            dimension_numbers=evon_jax.matrix_view, **kw),
        "soap (per axis)": evon_jax.soap(1e-3, **kw),
        "adamw": optax.adamw(1e-3)}
    for name, tx in optimizers.items():
      state = jax.eval_shape(tx.init, params)
      total = sum(_bytes_of(x) for x in jax.tree.leaves(state))
      out.append({"leaf": label, "optimizer": name, "param_bytes": param_bytes,
                  "state_bytes": total, "state_per_param_byte": total / param_bytes})
  return out


def step_buffer_plan(optimizers: Sequence[str], d: int, *, layers: int = 4) -> dict:
  """XLA's memory analysis of each optimizer's compiled step (bytes)."""
  shapes = common.transformer_shapes(d, layers)
  params = common.make_params(shapes)
  direction = common.make_params(shapes, 1, scale=1.0)
  out = {}
  for name in optimizers:
    runner = common.StepRunner(name, common.make_optimizer(name), params, direction)
    analysis = runner.compiled.memory_analysis()
    out[name] = {key: int(getattr(analysis, key)) for key in (
        "temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
        "alias_size_in_bytes", "generated_code_size_in_bytes")
                 if analysis is not None and hasattr(analysis, key)}
  return out


def _status_bytes(field: str) -> int:
  with open("/proc/self/status") as status:
    for line in status:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  return 0


def _reset_peak() -> bool:
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _child(name: str, d: int, layers: int, steps: int) -> dict:
  shapes = common.transformer_shapes(d, layers)
  params = common.make_params(shapes)
  direction = common.make_params(shapes, 1, scale=1.0)
  jax.block_until_ready((params, direction))
  baseline = _status_bytes("VmRSS")
  runner = common.StepRunner(name, common.make_optimizer(name), params, direction)
  runner.step()
  compile_peak = _status_bytes("VmHWM")
  before_steps = _status_bytes("VmRSS")
  reset = _reset_peak()
  for _ in range(steps):
    runner.step()
  step_peak = _status_bytes("VmHWM") if reset else compile_peak
  return {"optimizer": name, "d": d, "layers": layers, "baseline_rss": baseline,
          "compile_and_first_step_peak_rss": compile_peak, "rss_before_steps": before_steps,
          "steps_peak_rss": step_peak, "peak_reset_worked": reset,
          "compile_peak_minus_baseline": compile_peak - baseline,
          "steps_peak_minus_baseline": step_peak - baseline,
          "steps_peak_minus_rss_before_steps": step_peak - before_steps}


def peak_rss(optimizers: Sequence[str], d: int, *, layers: int = 4, steps: int = 12,
             timeout_s: float = 600) -> list[dict]:
  """Peak RSS of each optimizer's steps, one fresh subprocess per optimizer."""
  out = []
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for name in optimizers:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", "--child", name, str(d), str(layers),
         str(steps)], capture_output=True, text=True, timeout=timeout_s, cwd=root)
    if proc.returncode != 0:
      out.append({"optimizer": name, "error": proc.stderr[-2000:]})
      continue
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    param_bytes = 4 * sum(int(np.prod(s)) for s in jax.tree.leaves(
        common.transformer_shapes(d, layers), is_leaf=lambda x: isinstance(x, tuple)))
    record["param_bytes"] = param_bytes
    record["steps_peak_minus_baseline_per_param_byte"] = (
        record["steps_peak_minus_baseline"] / param_bytes)
    out.append(record)
  return out


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--child", nargs=4, metavar=("OPTIMIZER", "D", "LAYERS", "STEPS"))
  args = parser.parse_args()
  name, d, layers, steps = args.child
  print(json.dumps(_child(name, int(d), int(layers), int(steps))))
