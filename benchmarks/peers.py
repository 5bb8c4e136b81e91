"""PyTorch peers on the same shapes and thread count: ivon-opt's IVON, pytorch-optimizer's
SOAP and torch's AdamW (a framework reference). Optional: skipped when torch is absent.

Install with ``pip install torch ivon-opt pytorch-optimizer`` (or ``.[peers]``).
The step protocol matches `benchmarks.common`: the same cheap linear gradient, one step per
call including IVON's sampling (`sampled_params(train=True)` draws and restores the noise).
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from typing import Optional, Sequence

import jax
import numpy as np

from benchmarks import common

PEERS = ("torch_adamw", "ivon_opt", "pytorch_optimizer_soap")


def available() -> dict:
  """Which peer packages are importable."""
  return {name: importlib.util.find_spec(module) is not None for name, module in (
      ("torch", "torch"), ("ivon_opt", "ivon"), ("pytorch_optimizer", "pytorch_optimizer"))}


class TorchRunner:
  """A PyTorch optimizer on torch copies of the benchmark's params; same interface as
  `common.StepRunner`."""

  def __init__(self, name: str, params: dict, direction: dict, precondition_frequency: int):
    import torch
    self.name = name
    self.compile_s = 0.0
    self.count = 0
    self._torch = torch
    to_tensor = lambda x: torch.from_numpy(np.array(x, dtype=np.float32))
    self.params = [torch.nn.Parameter(to_tensor(x)) for x in jax.tree.leaves(params)]
    self.direction = [to_tensor(x) for x in jax.tree.leaves(direction)]
    if name == "torch_adamw":
      self.opt = torch.optim.AdamW(self.params, lr=1e-3)
    elif name == "ivon_opt":
      import ivon
      self.opt = ivon.IVON(self.params, lr=0.1, ess=1e6)
    elif name == "pytorch_optimizer_soap":
      import pytorch_optimizer
      self.opt = pytorch_optimizer.SOAP(
          self.params, lr=3e-3, precondition_frequency=precondition_frequency)
    else:
      raise ValueError(f"unknown peer {name!r}")

  def _set_grads(self):
    wave = math.sin(float(self.count))
    with self._torch.no_grad():
      for p, b in zip(self.params, self.direction):
        p.grad = 0.01 * p.detach() + wave * b

  def step(self) -> float:
    start = time.perf_counter()
    if self.name == "ivon_opt":
      with self.opt.sampled_params(train=True):
        self._set_grads()
    else:
      self._set_grads()
    self.opt.step()
    elapsed = time.perf_counter() - start
    self.count += 1
    return elapsed

  def all_finite(self) -> bool:
    return all(bool(self._torch.isfinite(p).all()) for p in self.params)


def peer_step_sweep(d_values: Sequence[int], *, layers: int = 4,
                    precondition_frequency: int = 10,
                    jax_optimizers: Sequence[str] = ("adamw", "soap", "ivon", "evon"),
                    peers: Sequence[str] = PEERS, rounds: int = 5,
                    budget_s: Optional[float] = None) -> dict:
  """Peers and evon_jax interleaved in one timing run per d; {} entries when torch is absent.

  torch uses `os.cpu_count()` intra-op threads, as XLA's CPU client does.
  """
  have = available()
  if not have["torch"]:
    return {"skipped": "torch is not installed", "available": have}
  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  wanted = [p for p in peers if p == "torch_adamw" or have.get(
      "ivon_opt" if p == "ivon_opt" else "pytorch_optimizer")]
  records = []
  for d in d_values:
    shapes = common.transformer_shapes(d, layers)
    params = common.make_params(shapes, 0)
    direction = common.make_params(shapes, 1, scale=1.0)
    runners = [common.StepRunner(name, common.make_optimizer(
        name, precondition_frequency=precondition_frequency), params, direction)
               for name in jax_optimizers]
    runners += [TorchRunner(name, params, direction, precondition_frequency)
                for name in wanted]
    results = common.time_interleaved(
        runners, rounds=rounds, steps_per_round=precondition_frequency, budget_s=budget_s)
    record = {"d": d, "layers": layers, "results": results}
    pairs = {"ivon_vs_ivon_opt": ("ivon", "ivon_opt"),
             "soap_vs_pytorch_optimizer_soap": ("soap", "pytorch_optimizer_soap"),
             "evon_vs_pytorch_optimizer_soap": ("evon", "pytorch_optimizer_soap"),
             "adamw_vs_torch_adamw": ("adamw", "torch_adamw")}
    record["ratios"] = {
        key: common.ratios({a: results[a], b: results[b]}, b)[a]
        for key, (a, b) in pairs.items() if a in results and b in results}
    records.append(record)
  return {"available": have, "torch": torch.__version__,
          "torch_threads": torch.get_num_threads(), "records": records}
