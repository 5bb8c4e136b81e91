"""Hyperparameter sweep of EVON on small shipped datasets, against IVON and AdamW.

    python -m benchmarks.hyperparameters             # ~10 min on 2 CPU cores
    python -m benchmarks.hyperparameters --quick     # one dataset, two configs (smoke test)
    python -m benchmarks.hyperparameters --defaults  # the defaults vs IVON, AdamW: 4 seeds, ~11 min

Per dataset (scikit-learn's iris, wine, breast cancer, digits and two moons; standardised,
a fixed 60/40 split), an MLP (in-64-64-classes, ReLU) is trained for 1,500 minibatch steps
(batch 32, or the whole set when smaller) with every config, and the test set is scored by
the Bayesian model average of 32 posterior samples (the mean network for AdamW): accuracy,
NLL, ECE (15 bins). ess is the number of training rows. Seeds 0 and 1 (model init, noise,
minibatches, split); the table reports their mean. Results go to
`benchmarks/results/hyperparameters.{json,md}`; `docs/hyperparameters.md` reads them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import evon_jax
from evon_jax import metrics, predictive
from evon_jax._progress import progress

STEPS, BATCH, HIDDEN, SAMPLES = 1500, 32, 64, 32


def datasets() -> dict:
  from sklearn import datasets as sk

  moons = sk.make_moons(n_samples=300, noise=0.25, random_state=0)
  return {
      "iris": sk.load_iris(return_X_y=True),
      "wine": sk.load_wine(return_X_y=True),
      "breast_cancer": sk.load_breast_cancer(return_X_y=True),
      "digits": sk.load_digits(return_X_y=True),
      "moons": moons,
  }


def split(x, y, seed):
  order = np.random.default_rng(seed).permutation(len(y))
  cut = int(0.6 * len(y))
  train, test = order[:cut], order[cut:]
  mean, std = x[train].mean(0), x[train].std(0) + 1e-8
  scale = lambda a: jnp.asarray((a - mean) / std, jnp.float32)
  return (scale(x[train]), jnp.asarray(y[train])), (scale(x[test]), jnp.asarray(y[test]))


def init_mlp(key, sizes):
  params = []
  for k, (m, n) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
    params.append({"w": jax.random.normal(k, (m, n)) * np.sqrt(2.0 / m), "b": jnp.zeros(n)})
  return params


def mlp(params, x):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"][None])
  return x @ params[-1]["w"] + params[-1]["b"][None]


def configs(n: int) -> dict:
  """name -> optimizer for a training set of n rows (ess = n)."""
  out = {
      "AdamW": lambda: optax.adamw(1e-3, weight_decay=1e-2),
      "IVON (defaults, lr 0.1)": lambda: evon_jax.ivon(0.1, ess=float(n), key=0),
  }
  for whiten, b2, hess_init in itertools.product((True, False), (0.9999, 0.99999), (0.1, 1.0)):
    lrs = (0.01, 0.03) if whiten else (0.05, 0.2)
    for lr in lrs:
      name = f"EVON whiten={whiten} b2={b2} h0={hess_init} lr={lr}"
      out[name] = (lambda whiten=whiten, b2=b2, hess_init=hess_init, lr=lr: evon_jax.evon(
          lr, ess=float(n), hess_init=hess_init, b2=b2, whiten=whiten, weight_decay=1e-4,
          key=0))
  return out


def default_configs(n: int) -> dict:
  """`evon`'s defaults (only lr given) against the candidates they were chosen from."""
  n = float(n)
  return {
      "AdamW": lambda: optax.adamw(1e-3, weight_decay=1e-2),
      "IVON (defaults, lr 0.1)": lambda: evon_jax.ivon(0.1, ess=n, key=0),
      "EVON defaults, lr 0.05": lambda: evon_jax.evon(0.05, ess=n, key=0),
      "EVON whiten=True, lr 0.01 (h0 0.1)": lambda: evon_jax.evon(0.01, ess=n, whiten=True,
                                                                    key=0),
      "EVON whiten=True, lr 0.01, h0 0.1, δ 1e-6 (old defaults)": lambda: evon_jax.evon(
          0.01, ess=n, whiten=True, hess_init=0.1, weight_decay=1e-6, key=0),
      "EVON whiten=True, lr 0.01, b2 0.99999": lambda: evon_jax.evon(
          0.01, ess=n, whiten=True, b2=0.99999, key=0),
  }


def train_mlp(tx, params, x, y, steps: int, seed: int):
  """`steps` minibatch steps (batch `BATCH`, or all rows when fewer) of cross-entropy under
  one jitted scan; minibatches drawn from `jax.random.key(seed)`. Returns (params, state)."""
  batch = min(BATCH, x.shape[0])

  def loss(p, xb, yb):
    return optax.softmax_cross_entropy_with_integer_labels(mlp(p, xb), yb).mean()

  def step(carry, key):
    p, s = carry
    idx = jax.random.choice(key, x.shape[0], (batch,), replace=False)
    updates, s = tx.update(jax.grad(loss)(p, x[idx], y[idx]), s, p)
    return (optax.apply_updates(p, updates), s), None

  (params, state), _ = jax.jit(lambda p, k: jax.lax.scan(
      step, (p, tx.init(p)), jax.random.split(k, steps)))(params, jax.random.key(seed))
  return params, state


def run(make_tx, train, test, seed):
  (x, y), (x_test, y_test) = train, test
  classes = int(max(int(y.max()), int(y_test.max())) + 1)
  params = init_mlp(jax.random.key(seed), [x.shape[1], HIDDEN, HIDDEN, classes])
  params, state = train_mlp(make_tx(), params, x, y, STEPS, seed + 1)
  try:
    probs = predictive.bayesian_model_average(seed, mlp, state, x_test, SAMPLES)
  except ValueError:  # AdamW: no posterior
    probs = jax.nn.softmax(mlp(params, x_test), axis=-1)
  return {"accuracy": float(metrics.accuracy(probs, y_test)),
          "nll": float(metrics.nll(probs, y_test)),
          "ece": float(metrics.expected_calibration_error(probs, y_test))}


def sweep(names=None, seeds=(0, 1), only=None, make_configs=None) -> dict:
  out = {}
  for dataset, (x, y) in datasets().items():
    if names and dataset not in names:
      continue
    for seed in seeds:
      train, test = split(np.asarray(x, np.float64), np.asarray(y), seed)
      chosen = (make_configs or configs)(int(train[1].shape[0]))
      if only:
        chosen = {k: v for k, v in chosen.items() if k in only}
      for name, make in progress(chosen.items(), f"{dataset} seed {seed}", total=len(chosen)):
        out.setdefault(dataset, {}).setdefault(name, []).append(run(make, train, test, seed))
  return out


def table(results: dict) -> str:
  lines = []
  for dataset, by_config in results.items():
    lines += [f"\n### {dataset}\n", "| config | accuracy | NLL | ECE |", "| --- | --- | --- | --- |"]
    rows = {name: {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
            for name, runs in by_config.items()}
    for name, r in sorted(rows.items(), key=lambda kv: kv[1]["nll"]):
      lines.append(f"| {name} | {r['accuracy']:.3f} | {r['nll']:.3f} | {r['ece']:.3f} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--defaults", action="store_true",
                      help="evon's defaults against IVON and AdamW, seeds 0-3")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = parser.parse_args()
  start = time.time()
  seeds = (0, 1, 2, 3) if args.defaults else (0, 1)
  if args.quick:
    results = sweep(["iris"], seeds=(0,), only={"AdamW", "IVON (defaults, lr 0.1)"})
  else:
    results = sweep(seeds=seeds, make_configs=default_configs if args.defaults else None)
  md = table(results)
  print(md)
  if not args.quick:
    stem = "hyperparameters_defaults" if args.defaults else "hyperparameters"
    with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
      json.dump(results, f, indent=1)
    with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
      f.write(f"# EVON hyperparameter {'defaults' if args.defaults else 'sweep'}\n\n"
              f"    python -m benchmarks.hyperparameters{' --defaults' * args.defaults}"
              f"   # {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(start))}, "
              f"{time.time() - start:.0f} s\n\nMean over seeds "
              f"{', '.join(map(str, seeds))}; sorted by NLL "
              f"(BMA of {SAMPLES} samples; AdamW: the network itself).\n{md}\n")


if __name__ == "__main__":
  main()
