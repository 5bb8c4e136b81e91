"""Shared pieces of the benchmarks: shapes, optimizers, a cheap gradient, interleaved timing.

Timing protocol (used by every step benchmark): each optimizer gets its own jitted,
ahead-of-time compiled step with donated buffers; after the first call (the `eigh` warm
start, reported separately) and one warm-up period, the optimizers take turns, one
refresh period (`precondition_frequency` steps) each, in an order rotated every round. Each
step is timed on its own (`block_until_ready`), so the mean includes the refresh steps in
their true proportion and every optimizer sees the same machine load. Ratios are reported
both as ratios of the overall means and as the median over rounds of per-round ratios (the
latter is robust to load that changes between rounds).
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import evon_jax

# Optimizer names used across the benchmarks, in plotting order.
OPTIMIZERS = ("adamw", "soap", "ivon", "evon", "evon_whiten", "evon_stagger")


# ----------------------------------------------------------------------------- problem


def transformer_shapes(d: int, layers: int) -> dict:
  """Matrix shapes of `layers` transformer blocks of width d: qkv, attention out, MLP in/out."""
  return {
      f"layer{i:02d}": {
          "attn_qkv": (d, 3 * d), "attn_out": (d, d), "mlp_in": (d, 4 * d),
          "mlp_out": (4 * d, d)}
      for i in range(layers)}


def make_params(shapes: dict, seed: int = 0, scale: float = 0.02) -> dict:
  """Random float32 parameters with the given (nested dict of) shapes."""
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([
      scale * jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, leaves)])


def cheap_gradient(params, direction, t):
  """A gradient linear in the params whose value depends on the traced step scalar t.

  g = 0.01 θ + sin(t) B: costs one elementwise pass, cannot be constant-folded, and keeps
  the Kronecker factors full rank (B is a fixed random direction).
  """
  wave = jnp.sin(t)
  return jax.tree.map(lambda p, b: 0.01 * p + wave * b, params, direction)


def num_bytes(tree) -> int:
  """Bytes held by the arrays of a pytree (PRNG keys counted by their key data)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    total += int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
  return total


# ----------------------------------------------------------------------------- optimizers


def make_optimizer(name: str, *, precondition_frequency: int = 10,
                   max_precond_dim: int = 10000) -> optax.GradientTransformation:
  """The benchmarked optimizers; hyperparameters only matter for keeping values finite."""
  common = dict(precondition_frequency=precondition_frequency,
                max_precond_dim=max_precond_dim)
  evon_args = dict(ess=1e6, hess_init=0.1, **common)
  if name == "adamw":
    return optax.adamw(1e-3)
  if name == "soap":
    return evon_jax.soap(3e-3, **common)
  if name == "ivon":
    return evon_jax.ivon(0.1, ess=1e6)
  if name == "evon":
    return evon_jax.evon(3e-3, whiten=False, **evon_args)
  if name == "evon_whiten":
    return evon_jax.evon(3e-3, whiten=True, **evon_args)
  if name == "evon_stagger":
    return evon_jax.evon(3e-3, whiten=False, stagger_refresh=True, **evon_args)
  if name == "evon_whiten_stagger":
    return evon_jax.evon(3e-3, whiten=True, stagger_refresh=True, **evon_args)
  raise ValueError(f"unknown optimizer {name!r}")


def _copy_tree(tree):
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


class StepRunner:
  """One optimizer on one problem: a compiled step with its own params and state."""

  def __init__(self, name: str, tx, params, direction, step_fn: Optional[Callable] = None):
    self.name = name
    self.params = _copy_tree(params)
    # A fresh copy: evon/ivon's init keeps the float32 params themselves as the mean, and a
    # buffer may be donated only once per call.
    self.state = _copy_tree(tx.init(self.params))
    self.direction = direction
    self.count = 0

    def step(params, opt_state, direction, t):
      grads = cheap_gradient(params, direction, t)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    start = time.perf_counter()
    lowered = jax.jit(step_fn or step, donate_argnums=(0, 1)).lower(
        self.params, self.state, direction, np.float32(0))
    self.compiled = lowered.compile()
    self.compile_s = time.perf_counter() - start

  def step(self) -> float:
    """Runs one step; returns its wall time in seconds."""
    t = np.float32(self.count)
    start = time.perf_counter()
    self.params, self.state = self.compiled(self.params, self.state, self.direction, t)
    jax.block_until_ready((self.params, self.state))
    elapsed = time.perf_counter() - start
    self.count += 1
    return elapsed

  def all_finite(self) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(self.params))


def summarise(seconds: Sequence[float]) -> dict:
  """Median / mean / max / min / p90 of step times, in milliseconds."""
  ms = np.asarray(seconds) * 1e3
  return {
      "median_ms": float(np.median(ms)), "mean_ms": float(np.mean(ms)),
      "max_ms": float(np.max(ms)), "min_ms": float(np.min(ms)),
      "p90_ms": float(np.percentile(ms, 90)), "steps": int(ms.size)}


def time_interleaved(runners: Sequence, *, rounds: int, steps_per_round: int,
                     warmup_rounds: int = 1, budget_s: Optional[float] = None) -> dict:
  """Times runners in turns of `steps_per_round` steps (see the module docstring).

  Returns {name: summary + first_step_ms + compile_s + round_means_ms}. Stops early (after at
  least two rounds) once `budget_s` seconds of timed rounds have passed.
  """
  first = {r.name: r.step() for r in runners}
  for _ in range(warmup_rounds):
    for r in runners:
      for _ in range(steps_per_round):
        r.step()
  times = {r.name: [] for r in runners}
  round_means = {r.name: [] for r in runners}
  start = time.perf_counter()
  for k in range(rounds):
    shift = k % len(runners)
    for r in list(runners[shift:]) + list(runners[:shift]):
      ts = [r.step() for _ in range(steps_per_round)]
      times[r.name].extend(ts)
      round_means[r.name].append(1e3 * float(np.mean(ts)))
    if budget_s is not None and k >= 1 and time.perf_counter() - start > budget_s:
      break
  out = {}
  for r in runners:
    out[r.name] = dict(
        summarise(times[r.name]), first_step_ms=1e3 * first[r.name], compile_s=r.compile_s,
        round_means_ms=round_means[r.name], finite=r.all_finite())
  return out


def ratios(results: dict, reference: str) -> dict:
  """Per optimizer: mean / reference mean, median / reference median, and the median over
  rounds of the per-round mean ratio."""
  ref = results[reference]
  out = {}
  for name, res in results.items():
    per_round = [a / b for a, b in zip(res["round_means_ms"], ref["round_means_ms"])]
    out[name] = {
        "mean": res["mean_ms"] / ref["mean_ms"],
        "median": res["median_ms"] / ref["median_ms"],
        "round_median": float(statistics.median(per_round)) if per_round else float("nan")}
  return out


# ----------------------------------------------------------------------------- machine


def _ensure_lapack_loaded():
  """jaxlib's CPU LAPACK kernels (QR, eigh, Cholesky) call the OpenBLAS scipy ships, which is
  loaded on the first such call: make one so that threadpoolctl sees the library."""
  jax.block_until_ready(jnp.linalg.qr(jnp.eye(2))[0])


def lapack_threads() -> list[int]:
  """Thread counts of the loaded BLAS libraries (what LAPACK calls in XLA use)."""
  import threadpoolctl
  _ensure_lapack_loaded()
  return [int(info["num_threads"]) for info in threadpoolctl.threadpool_info()
          if info["user_api"] == "blas"]


def set_lapack_threads(n: int) -> list[int]:
  """Sets the thread count of every loaded BLAS library for the rest of the process;
  returns the counts after."""
  import threadpoolctl
  _ensure_lapack_loaded()
  threadpoolctl.threadpool_limits(limits=n, user_api="blas")  # kept: never restored
  return lapack_threads()


def _command(args: Iterable[str]) -> str:
  try:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=10).stdout
  except (OSError, subprocess.SubprocessError):
    return ""


def machine_info() -> dict:
  """What the numbers were measured on (CPU model, cores, load, versions, date)."""
  lscpu = _command(["lscpu"])
  fields = dict(
      (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lscpu.splitlines())
      if v)
  import flax  # optional dependency of the benchmarks only
  return {
      "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "cpu_model": fields.get("Model name", platform.processor()),
      "nproc": os.cpu_count(),
      "lscpu": {k: fields[k] for k in (
          "Architecture", "Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket",
          "L1d cache", "L2 cache", "L3 cache", "Hypervisor vendor") if k in fields},
      "load_average_1_5_15": list(os.getloadavg()),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "optax": optax.__version__,
      "flax": flax.__version__,
      "evon_jax": evon_jax.__version__,
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "lapack_threads": lapack_threads(),
      "env": {k: os.environ[k] for k in (
          "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "XLA_FLAGS") if k in os.environ},
  }
