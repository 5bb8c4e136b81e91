"""How much an optimizer amplifies float noise: perturb the inputs by 1e-7, train 12 steps.

A data-parallel run on N devices differs from the one-device run by float noise (another
reduction order). An optimizer whose trajectory is a continuous function of its inputs
keeps that difference near the noise; one whose basis jumps inside a degenerate eigenspace
turns it into a different run. This measures it on a small tanh MLP whose first steps
have rank-deficient Kronecker factors (batch 24 < width 48):

    python -m benchmarks.sensitivity                 # max weight change after 12 and 48 steps
    python -m benchmarks.sensitivity --json out.json

The weight compared is the posterior mean for EVON and IVON (the params the loop holds are
a sample) and the params for AdamW and SOAP.
"""

from __future__ import annotations

import argparse
import json
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import evon_jax

STEPS = 12
RELATIVE_NOISE = 1e-7


def mlp_problem(seed: int = 0, batch: int = 24, features: int = 12, width: int = 48,
                outputs: int = 3):
  """A tanh MLP regression: params, inputs, targets and a loss `(params, x, y) -> scalar`."""
  rng = np.random.default_rng(seed)
  sizes = [features, width, width, outputs]
  params = {}
  for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:])):
    params[f"layer{i}"] = {
        "kernel": jnp.asarray(rng.normal(size=(m, n)) / np.sqrt(m), jnp.float32),
        "bias": jnp.zeros(n, jnp.float32)}
  inputs = jnp.asarray(rng.normal(size=(batch, features)), jnp.float32)
  targets = jnp.asarray(rng.normal(size=(batch, outputs)), jnp.float32)

  def loss(params, x, y):
    h = x
    for i in range(len(sizes) - 1):
      layer = params[f"layer{i}"]
      h = h @ layer["kernel"] + layer["bias"][None]
      if i < len(sizes) - 2:
        h = jnp.tanh(h)
    return jnp.mean((h - y) ** 2)

  return params, inputs, targets, loss


def optimizers(ess: float = 24.0) -> dict[str, Callable[[], optax.GradientTransformation]]:
  """The optimizers compared, each with a short learning rate suited to 12 steps."""
  return {
      "optax.adamw": lambda: optax.adamw(1e-2),
      "IVON": lambda: evon_jax.ivon(1e-2, ess=ess, hess_init=1.0, key=0),
      "SOAP": lambda: evon_jax.soap(1e-2, precondition_frequency=3),
      "SOAP (relative_eps=1e-2)": lambda: evon_jax.soap(
          1e-2, precondition_frequency=3, relative_eps=1e-2),
      "SOAP (relative_eps=3e-2)": lambda: evon_jax.soap(
          1e-2, precondition_frequency=3, relative_eps=3e-2),
      "EVON (whitening)": lambda: evon_jax.evon(
          1e-2, ess=ess, hess_init=1.0, precondition_frequency=3, whiten=True, key=0),
      "EVON (whiten=False)": lambda: evon_jax.evon(
          1e-2, ess=ess, hess_init=1.0, precondition_frequency=3, whiten=False, key=0),
      # Whitening's default hess_init 0.1 at ess 24 (posterior std 0.65 on weights ~0.15):
      # with the noise drawn in eigen coordinates EVON amplifies here (the samples follow
      # an ill-determined basis); drawn in parameter coordinates it does not.
      "EVON (whitening, hess_init 0.1)": lambda: evon_jax.evon(
          1e-2, ess=ess, precondition_frequency=3, whiten=True, key=0),
      "EVON (whiten=False, hess_init 0.1)": lambda: evon_jax.evon(
          1e-2, ess=ess, hess_init=0.1, precondition_frequency=3, whiten=False, key=0),
      "IVON (hess_init 0.1)": lambda: evon_jax.ivon(1e-2, ess=ess, hess_init=0.1, key=0),
      "EVON (whitening), noise_basis='parameter'": lambda: evon_jax.evon(
          1e-2, ess=ess, hess_init=1.0, precondition_frequency=3, whiten=True, key=0,
          noise_basis="parameter"),
      "EVON (whiten=False), noise_basis='parameter'": lambda: evon_jax.evon(
          1e-2, ess=ess, hess_init=1.0, precondition_frequency=3, whiten=False, key=0,
          noise_basis="parameter"),
      "EVON (whitening, hess_init 0.1), noise_basis='parameter'": lambda: evon_jax.evon(
          1e-2, ess=ess, precondition_frequency=3, whiten=True, key=0,
          noise_basis="parameter"),
      "EVON (whiten=False, hess_init 0.1), noise_basis='parameter'": lambda: evon_jax.evon(
          1e-2, ess=ess, hess_init=0.1, precondition_frequency=3, whiten=False, key=0,
          noise_basis="parameter"),
  }


def weights(opt_state, params):
  """The posterior mean when the state holds one, else the params."""
  try:
    return evon_jax.posterior.mean(opt_state, params=params)
  except (ValueError, TypeError):
    return params


def train(make_tx, inputs, steps: int = STEPS, seed: int = 0):
  params, _, targets, loss = mlp_problem(seed)
  tx = make_tx()
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(params, inputs, targets)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return weights(state, params)


def max_change(a, b) -> float:
  return float(max(jnp.max(jnp.abs(x - y)) for x, y in
                   zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def amplification(make_tx, *, seed: int = 0, noise_seed: int = 1,
                  relative_noise: float = RELATIVE_NOISE, steps: int = STEPS) -> float:
  """Max |Δ weight| after `steps` steps when the inputs change by `relative_noise`."""
  _, inputs, _, _ = mlp_problem(seed)
  direction = jax.random.normal(jax.random.key(noise_seed), inputs.shape, inputs.dtype)
  perturbed = inputs * (1.0 + relative_noise * direction)
  return max_change(train(make_tx, inputs, steps, seed),
                    train(make_tx, perturbed, steps, seed))


def table(seeds=(0, 1, 2), steps: int = STEPS) -> dict[str, list[float]]:
  return {name: [amplification(make, seed=s, noise_seed=s + 100, steps=steps) for s in seeds]
          for name, make in optimizers().items()}


def noise_cost(d: int = 256, layers: int = 4, rounds: int = 6, steps_per_round: int = 10):
  """Step time with the noise drawn in parameter coordinates against eigen coordinates,
  interleaved in one run (`benchmarks.common.time_interleaved`), on `benchmarks.run`'s
  transformer-shaped leaves (refresh every 10 steps)."""
  from benchmarks import common
  shapes = common.transformer_shapes(d, layers)
  params = common.make_params(shapes)
  direction = common.make_params(shapes, seed=1)
  make = lambda whiten, basis: evon_jax.evon(3e-3, ess=1e6, hess_init=0.1, whiten=whiten,
                                             noise_basis=basis)
  runners = [common.StepRunner(f"{'whiten' if w else 'evon'}/{basis}", make(w, basis), params,
                               direction)
             for w in (False, True) for basis in ("eigen", "parameter")]
  timed = common.time_interleaved(runners, rounds=rounds, steps_per_round=steps_per_round)
  ratios = {kind: {stat: timed[f"{kind}/parameter"][stat] / timed[f"{kind}/eigen"][stat]
                   for stat in ("mean_ms", "median_ms")} for kind in ("evon", "whiten")}
  return {"d": d, "layers": layers, "timings": timed, "ratios": ratios}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", default=None)
  parser.add_argument("--long", type=int, default=48,
                      help="a second horizon (steps); 0 to skip")
  args = parser.parse_args()
  results = {"12 steps": table()}
  if args.long:
    results[f"{args.long} steps"] = table(steps=args.long)
  horizons = list(results)
  print("| optimizer | " + " | ".join(f"max weight change, {h} (seeds 0, 1, 2)"
                                       for h in horizons) + " |")
  print("| --- |" + " --- |" * len(horizons))
  for name in results[horizons[0]]:
    print(f"| {name} | " + " | ".join(' / '.join(f'{v:.1e}' for v in results[h][name])
                                      for h in horizons) + " |")
  cost = noise_cost()
  for kind, r in cost["ratios"].items():
    print(f"noise_basis='parameter' / 'eigen', {kind}: mean {r['mean_ms']:.2f}, "
          f"median {r['median_ms']:.2f}")
  results["noise_cost"] = cost
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
