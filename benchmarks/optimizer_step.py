"""One optimizer step (sampling included) on transformer-like shapes, and how it grows.

Every function returns plain JSON-able dicts; `benchmarks.run` collects them.
"""

from __future__ import annotations

from typing import Optional, Sequence

import optax

from benchmarks import common


def _measure(shapes, optimizers, *, precondition_frequency, max_precond_dim=10000,
             rounds, budget_s=None, steps_per_round=None, seed=0):
  params = common.make_params(shapes, seed)
  direction = common.make_params(shapes, seed + 1, scale=1.0)
  runners = [
      common.StepRunner(name, common.make_optimizer(
          name, precondition_frequency=precondition_frequency,
          max_precond_dim=max_precond_dim), params, direction)
      for name in optimizers]
  results = common.time_interleaved(
      runners, rounds=rounds, steps_per_round=steps_per_round or precondition_frequency,
      budget_s=budget_s)
  for res in results.values():
    res["max_over_median"] = res["max_ms"] / res["median_ms"]
  record = {"results": results,
            "num_params": int(optax.tree_utils.tree_size(params))}
  for reference in ("soap", "adamw"):
    if reference in results:
      record[f"ratio_vs_{reference}"] = common.ratios(results, reference)
  return record


def step_sweep(d_values: Sequence[int], *, layers: int = 4, precondition_frequency: int = 10,
               optimizers: Sequence[str] = common.OPTIMIZERS, rounds: int = 10,
               budget_s: Optional[float] = None) -> list[dict]:
  """Step time of each optimizer at each width d (all optimizers interleaved per d)."""
  out = []
  for d in d_values:
    record = _measure(common.transformer_shapes(d, layers), optimizers,
                      precondition_frequency=precondition_frequency, rounds=rounds,
                      budget_s=budget_s)
    out.append({"d": d, "layers": layers, "precondition_frequency": precondition_frequency,
                **record})
  return out


def layers_sweep(layer_values: Sequence[int], *, d: int = 256,
                 precondition_frequency: int = 10,
                 optimizers: Sequence[str] = ("adamw", "soap", "ivon", "evon"),
                 rounds: int = 5, budget_s: Optional[float] = None) -> list[dict]:
  """Step time against the number of layers at fixed width."""
  out = []
  for layers in layer_values:
    record = _measure(common.transformer_shapes(d, layers), optimizers,
                      precondition_frequency=precondition_frequency, rounds=rounds,
                      budget_s=budget_s)
    out.append({"d": d, "layers": layers, **record})
  return out


def frequency_sweep(frequencies: Sequence[int], *, d: int = 256, layers: int = 4,
                    optimizers: Sequence[str] = ("soap", "evon", "evon_stagger"),
                    rounds: int = 3, budget_s: Optional[float] = None) -> list[dict]:
  """Mean / max step time against precondition_frequency (one period per round)."""
  out = []
  for frequency in frequencies:
    record = _measure(common.transformer_shapes(d, layers), optimizers,
                      precondition_frequency=frequency, rounds=rounds, budget_s=budget_s)
    out.append({"d": d, "layers": layers, "precondition_frequency": frequency, **record})
  return out


def max_precond_dim_sweep(dims: Sequence[int], *, d: int = 256, layers: int = 4,
                          precondition_frequency: int = 10,
                          optimizers: Sequence[str] = ("soap", "evon"),
                          rounds: int = 3, budget_s: Optional[float] = None) -> list[dict]:
  """Step time against max_precond_dim (sides longer than it keep the identity basis)."""
  out = []
  for dim in dims:
    record = _measure(common.transformer_shapes(d, layers), optimizers,
                      precondition_frequency=precondition_frequency, max_precond_dim=dim,
                      rounds=rounds, budget_s=budget_s)
    out.append({"d": d, "layers": layers, "max_precond_dim": dim, **record})
  return out
