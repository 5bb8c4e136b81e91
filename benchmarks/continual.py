"""Continual learning with a structured prior: each task's posterior is the next task's prior.

    python -m benchmarks.continual            # 3 seeds, both streams (a few minutes, 2 cores)
    python -m benchmarks.continual --quick    # 1 seed, short tasks (smoke test)
    python -m benchmarks.continual --report-only   # the .md and .png from the .json

Data: scikit-learn's digits (1797 8x8 images, 10 classes), standardised, a 60/40 split per
seed, in two streams of five tasks each:
  * permuted digits (domain-incremental): task k sees every image with its 64 pixels permuted
    by a fixed random permutation (task 0: the identity); one 10-way head;
  * split digits (task-incremental): task k has the classes {2k, 2k+1}; predictions are the
    argmax over the task's two classes (the usual multi-head evaluation of Split MNIST) of one
    10-way head.
Every task has the same number of training rows (the smallest task's), so one compiled
program trains them all. Model: MLP 64-100-10 (ReLU), as in `benchmarks.hyperparameters`.

Methods (task 0 the same within each optimizer family; each later task starts from the
previous task's mean):
  * AdamW fine-tuning (a fresh state per task);
  * IVON fine-tuning and EVON fine-tuning (the isotropic prior, weight_decay, every task);
  * IVON with its own posterior as prior (`ivon(..., prior=previous_state)`: diagonal);
  * EVON with its SOAP-Bubble as prior (`evon(..., prior=previous_state)`).
ess is the task's number of training rows. Scored with the posterior mean network after every
task on every task's test rows: average accuracy after the last task, and forgetting (per
earlier task, its best accuracy before the last task minus its final accuracy, averaged).

Results: `benchmarks/results/continual.{json,md}` and `continual.png`.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import evon_jax
from benchmarks.hyperparameters import init_mlp, mlp
from evon_jax import posterior

TASKS = 5
HIDDEN = 100
BATCH = 32


def _digits():
  from sklearn import datasets as sk
  return sk.load_digits(return_X_y=True)


def _standardised_split(x, y, seed):
  order = np.random.default_rng(seed).permutation(len(y))
  cut = int(0.6 * len(y))
  train, test = order[:cut], order[cut:]
  mean, std = x[train].mean(0), x[train].std(0) + 1e-8
  return ((x[train] - mean) / std, y[train]), ((x[test] - mean) / std, y[test])


def permuted_stream(seed):
  """Five (train, test, classes) tasks: the images under five fixed pixel permutations."""
  (xtr, ytr), (xte, yte) = _standardised_split(*_digits(), seed)
  rng = np.random.default_rng(1000 + seed)
  perms = [np.arange(64)] + [rng.permutation(64) for _ in range(TASKS - 1)]
  return [((xtr[:, p], ytr), (xte[:, p], yte), None) for p in perms]


def split_stream(seed):
  """Five tasks of two classes each; every task cut to the smallest task's size."""
  (xtr, ytr), (xte, yte) = _standardised_split(*_digits(), seed)
  pairs = [(2 * k, 2 * k + 1) for k in range(TASKS)]
  size = min(int(np.isin(ytr, pair).sum()) for pair in pairs)
  rng = np.random.default_rng(2000 + seed)
  out = []
  for pair in pairs:
    rows = rng.permutation(np.flatnonzero(np.isin(ytr, pair)))[:size]
    test = np.isin(yte, pair)
    out.append(((xtr[rows], ytr[rows]), (xte[test], yte[test]), pair))
  return out


def _loss(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(mlp(params, x), y).mean()


def _trainer(steps: int):
  """One jitted program per optimizer configuration: `steps` minibatch steps of `tx`,
  starting from (params, state); the state (and with it the prior) is an argument."""

  def train(tx, params, state, x, y, key):
    def step(carry, k):
      p, s = carry
      idx = jax.random.choice(k, x.shape[0], (BATCH,), replace=False)
      updates, s = tx.update(jax.grad(_loss)(p, x[idx], y[idx]), s, p)
      return (optax.apply_updates(p, updates), s), None

    (params, state), _ = jax.lax.scan(step, (params, state), jax.random.split(key, steps))
    return params, state

  return jax.jit(train, static_argnums=0)


def _accuracy(params, test, classes):
  x, y = test
  logits = mlp(params, jnp.asarray(x, jnp.float32))
  if classes is not None:  # task-incremental: the argmax over the task's own classes
    mask = jnp.full((10,), -jnp.inf).at[jnp.asarray(classes)].set(0.0)
    logits = logits + mask[None]
  return float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(y)))


def flattened(state):
  """The control: a prior with the previous posterior's mean and, per leaf, one precision
  (the average of ess (H + δ) over the leaf's coordinates) — the same strength, no shape."""
  if state is None:
    return None
  bubble = posterior.bubble(state)
  precision = lambda h, d: jnp.full_like(h, jnp.mean(h + d))
  wd = bubble.weight_decay
  hessian = (jax.tree.map(precision, bubble.hessian, wd) if jax.tree.structure(wd).num_leaves > 1
             else jax.tree.map(lambda h: precision(h, wd), bubble.hessian))
  return bubble._replace(hessian=hessian, weight_decay=jnp.zeros([], jnp.float32))


def methods(hp: dict) -> dict:
  """name -> (make(n, previous_state) -> tx, reads a posterior). `previous_state` is None on
  the first task. Optimizers are built with static hyperparameters only, so the trainer's
  program (keyed on the spec) is compiled once per method."""
  ivon = lambda n, prior=None: evon_jax.ivon(
      hp["ivon_lr"], ess=float(n), hess_init=hp["hess_init"], b2=hp["b2"], key=0, prior=prior,
      weight_decay=None if prior is not None else hp["weight_decay"])
  evon = lambda n, prior=None: evon_jax.evon(
      hp["evon_lr"], ess=float(n), hess_init=hp["hess_init"], b2=hp["b2"], key=0, prior=prior,
      weight_decay=None if prior is not None else hp["weight_decay"])
  return {
      "AdamW fine-tuning": (lambda n, prev: optax.adamw(1e-3, weight_decay=1e-2), False),
      "EVON, isotropic prior (control)": (lambda n, prev: evon(n, flattened(prev)), True),
      "IVON fine-tuning": (lambda n, prev: ivon(n), True),
      "IVON, posterior as prior": (lambda n, prev: ivon(n, prev), True),
      "EVON fine-tuning": (lambda n, prev: evon(n), True),
      "EVON, SOAP-Bubble as prior": (lambda n, prev: evon(n, prev), True),
  }


def run_stream(stream, make, posterior_kind, steps, seed):
  """Accuracy matrix R[t, j]: after task t, on task j's test rows."""
  train = _trainer(steps)
  params = init_mlp(jax.random.key(seed), [64, HIDDEN, 10])
  state, rows = None, []
  for t, ((x, y), _, _) in enumerate(stream):
    tx = make(len(y), state if t > 0 else None)
    prior_state = state
    state = tx.init(params)
    params, state = train(tx, params, state, jnp.asarray(x, jnp.float32), jnp.asarray(y),
                          jax.random.key(100 * seed + t))
    mean = posterior.mean(state) if posterior_kind else params
    rows.append([_accuracy(mean, test, classes) for _, test, classes in stream])
    if posterior_kind:  # the next task starts from the mean
      params = mean
    del prior_state
  return np.asarray(rows)


def summarise(R):
  final = R[-1]
  forgetting = [R[j:-1, j].max() - final[j] for j in range(len(final) - 1)]
  return float(final.mean()), float(np.mean(forgetting))


HYPER = dict(ivon_lr=0.1, evon_lr=0.05, hess_init=0.1, b2=0.999, weight_decay=1e-2)


def prior_cost(d: int = 256, layers: int = 4, rounds: int = 6, steps_per_round: int = 10):
  """Step time of EVON with a structured prior against EVON without, interleaved in one run
  (`benchmarks.common.time_interleaved`), on the transformer-shaped leaves of
  `benchmarks.run` (d = 256, 4 layers) with a refresh every 10 steps."""
  from benchmarks import common
  shapes = common.transformer_shapes(d, layers)
  params = common.make_params(shapes)
  direction = common.make_params(shapes, seed=1)
  plain = common.make_optimizer("evon")
  state = plain.init(params)
  warm = jax.jit(lambda p, s: plain.update(common.cheap_gradient(p, direction, 0.0), s, p))
  for _ in range(12):  # a posterior with bases that are not the identity
    updates, state = warm(params, state)
    params = optax.apply_updates(params, updates)
  with_prior = evon_jax.evon(3e-3, whiten=False, ess=1e6, hess_init=0.1,
                             prior=posterior.bubble(state))
  runners = [common.StepRunner("evon", plain, params, direction),
             common.StepRunner("evon_with_prior", with_prior, params, direction)]
  timed = common.time_interleaved(runners, rounds=rounds, steps_per_round=steps_per_round)
  return {"d": d, "layers": layers, "timings": timed,
          "ratio_mean": timed["evon_with_prior"]["mean_ms"] / timed["evon"]["mean_ms"],
          "ratio_median": timed["evon_with_prior"]["median_ms"] / timed["evon"]["median_ms"]}


def _mean_std(values):
  return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def report(results) -> str:
  lines = ["# Continual learning with a structured prior", "",
           f"`python -m benchmarks.continual` ({results['seconds']:.0f} s, "
           f"{results['seeds']} seeds, {results['steps_per_task']} steps per task; "
           f"hyperparameters {results['hyperparameters']}). Mean ± std over seeds of the "
           "average accuracy after the fifth task and of the forgetting (best accuracy on an "
           "earlier task before the last, minus the final one). Posterior-mean networks.", ""]
  for stream, per_method in results["streams"].items():
    lines += [f"## {stream}", "", "| method | average accuracy | forgetting |",
              "| --- | --- | --- |"]
    for name, r in per_method.items():
      lines.append(f"| {name} | {_mean_std(r['accuracy'])} | {_mean_std(r['forgetting'])} |")
    ours = np.asarray(per_method["EVON, SOAP-Bubble as prior"]["accuracy"])
    paired = {other: ours - np.asarray(per_method[other]["accuracy"])
              for other in ("EVON, isotropic prior (control)", "IVON, posterior as prior")}
    lines += ["", "Paired by seed, the SOAP-Bubble prior's average accuracy minus: " + "; ".join(
        f"{other} {', '.join(f'{d:+.3f}' for d in diff)}" for other, diff in paired.items())
        + ".", ""]
  cost = results.get("cost")
  if cost:
    t = cost["timings"]
    lines += ["## Cost of the prior", "",
              f"EVON step with a structured prior / without, interleaved in one run (d = "
              f"{cost['d']}, {cost['layers']} layers, refresh every 10 steps): mean "
              f"{t['evon_with_prior']['mean_ms']:.1f} / {t['evon']['mean_ms']:.1f} ms = "
              f"**{cost['ratio_mean']:.2f}**, median {cost['ratio_median']:.2f}.", ""]
  return "\n".join(lines)


def plot(results, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  streams = list(results["streams"])
  fig, axes = plt.subplots(1, len(streams) + 1, figsize=(5.2 * (len(streams) + 1), 4.2))
  colors = {"AdamW": "tab:gray", "IVON fine": "lightgreen", "IVON,": "tab:green",
            "EVON fine": "salmon", "EVON, iso": "tab:orange", "EVON, SOAP": "tab:red"}
  color = lambda name: next(c for k, c in colors.items() if name.startswith(k))
  for ax, stream in zip(axes, streams):
    per_method = results["streams"][stream]
    names = list(per_method)
    accuracy = [np.mean(per_method[n]["accuracy"]) for n in names]
    err = [np.std(per_method[n]["accuracy"]) for n in names]
    forgetting = [np.mean(per_method[n]["forgetting"]) for n in names]
    x = np.arange(len(names))
    ax.bar(x - 0.2, accuracy, 0.4, yerr=err, color=[color(n) for n in names],
           label="average accuracy")
    ax.bar(x + 0.2, forgetting, 0.4, color=[color(n) for n in names], alpha=0.4,
           hatch="//", label="forgetting")
    ax.set_xticks(x, [n.replace(", ", ",\n") for n in names], rotation=60, ha="right",
                  fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_title(f"{stream}: accuracy (solid), forgetting (hatched)", fontsize=9)
  ax = axes[-1]
  per_method = results["streams"][streams[0]]
  for name, r in per_method.items():
    first_task = np.mean([np.asarray(R)[:, 0] for R in r["matrices"]], axis=0)
    ax.plot(np.arange(1, len(first_task) + 1), first_task, "o-", color=color(name),
            label=name)
  ax.set_xlabel("after task")
  ax.set_ylabel("accuracy on task 1")
  ax.set_title(f"{streams[0]}: task 1 over time", fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--out", default="benchmarks/results/continual")
  parser.add_argument("--report-only", action="store_true",
                      help="rewrite the .md and .png from the existing .json")
  args = parser.parse_args(argv)
  if args.report_only:
    with open(args.out + ".json") as f:
      results = json.load(f)
    with open(args.out + ".md", "w") as f:
      f.write(report(results))
    plot(results, args.out + ".png")
    return results
  seeds = 1 if args.quick else args.seeds
  steps = 100 if args.quick else args.steps
  streams = {"permuted digits": permuted_stream, "split digits": split_stream}
  results = {"steps_per_task": steps, "seeds": seeds, "hyperparameters": HYPER,
             "streams": {}}
  start = time.time()
  for stream_name, make_stream in streams.items():
    per_method = {}
    for name, (make, reads_posterior) in methods(HYPER).items():
      matrices = [run_stream(make_stream(seed), make, reads_posterior, steps, seed)
                  for seed in range(seeds)]
      scores = [summarise(R) for R in matrices]
      per_method[name] = {
          "accuracy": [s[0] for s in scores], "forgetting": [s[1] for s in scores],
          "matrices": [R.tolist() for R in matrices]}
      print(f"{stream_name:16s} {name:28s} accuracy {np.mean([s[0] for s in scores]):.3f} "
            f"forgetting {np.mean([s[1] for s in scores]):.3f}  ({time.time() - start:.0f} s)",
            flush=True)
    results["streams"][stream_name] = per_method
  if not args.quick:
    results["cost"] = prior_cost()
    print(f"prior cost: {results['cost']['ratio_mean']:.2f} x EVON's step", flush=True)
  results["seconds"] = time.time() - start
  if not args.quick:
    with open(args.out + ".json", "w") as f:
      json.dump(results, f, indent=1)
    with open(args.out + ".md", "w") as f:
      f.write(report(results))
    plot(results, args.out + ".png")
  return results


if __name__ == "__main__":
  main()
