"""What a SOAP-Bubble is for: posterior-weighted model merging and pruning by posterior
signal-to-noise, against their diagonal and unweighted counterparts, on scikit-learn's digits.

    python -m benchmarks.merging_pruning             # 3 seeds, a few minutes on 2 CPU cores
    python -m benchmarks.merging_pruning --quick     # 1 seed, short runs (smoke test)

Data: digits (1797 8x8 images, 10 classes), standardised, a 60/40 split per seed; an MLP
64-64-64-10 (ReLU), as `benchmarks.hyperparameters`.

Merging. One shared starting point (AdamW, 300 steps on a random quarter of the training rows,
all classes), then five fine-tunes, task k on the training rows of classes {2k, 2k+1} only
(10-way head, 400 steps, batch 32): with EVON (ess = the task's rows) and, separately, with
IVON. Every merge is scored on every task's test rows (10-way argmax): per-task accuracy,
their mean, and accuracy on the whole test set. Merges of the EVON fine-tunes: the average
(task arithmetic with scale 1/K), task arithmetic (scale 1), the diagonal merge with the
SOAP-Bubbles' parameter-space precision diagonals, and the full SOAP-Bubble merge (CG);
of the IVON fine-tunes: the average and IVON's (exact, diagonal) posterior merge.

Pruning. EVON and IVON trained on the whole training set (1500 steps) from one init; the
posterior mean pruned globally over the weight matrices at each sparsity by |m| (magnitude),
by |m|/σ (the posterior's marginal std), and for EVON by the eigen-direction SNR |M°|/√V
(`pruning.prune_eigen_mean`, dense weights of fewer eigen-directions); test accuracy and NLL
of the pruned mean network.

Results: `benchmarks/results/merging_pruning.{json,md}` and `merging_pruning.png`.
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
from benchmarks.hyperparameters import init_mlp, mlp, split, train_mlp as train
from evon_jax import merging, metrics, posterior, pruning

HIDDEN = 64
TASKS = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95)


def _digits():
  from sklearn import datasets as sk
  return sk.load_digits(return_X_y=True)


def _scores(params, x, y):
  probs = jax.nn.softmax(mlp(params, x), axis=-1)
  return float(metrics.accuracy(probs, y)), float(metrics.nll(probs, y))


def _task_accuracies(params, test):
  x, y = test
  out = []
  for task in TASKS:
    rows = np.isin(np.asarray(y), task)
    out.append(_scores(params, x[rows], y[rows])[0])
  return out


def linear_shards_run(seed: int, shards: int = 4, prior_precision: float = 1.0) -> dict:
  """Where the structured precision is informative and not diagonal: Bayesian linear
  regression on scikit-learn's diabetes (442 rows, 10 correlated features, standardised),
  the training rows split into `shards`; per shard the exact ridge mode and its Laplace
  posterior (`laplace.fit`, exact for a linear model: the GGN is XᵀX, whose eigenbasis the
  fit finds). The product of the shard posteriors is the whole-data posterior under the
  prior counted `shards` times: precision XᵀX + Kλ. Reported: each merge's distance to that
  solution (relative) and test MSE."""
  from sklearn import datasets as sk

  from evon_jax import laplace
  x, y = sk.load_diabetes(return_X_y=True)
  order = np.random.default_rng(seed).permutation(len(y))
  cut = int(0.6 * len(y))
  train_rows, test_rows = order[:cut], order[cut:]
  mean, std = x[train_rows].mean(0), x[train_rows].std(0)
  x = (x - mean) / std
  y = (y - y[train_rows].mean()) / y[train_rows].std()
  apply_fn = lambda p, inputs: (inputs @ p["w"])[:, 0]

  def ridge(rows, lam):
    a = x[rows].T @ x[rows] + lam * np.eye(x.shape[1])
    return np.linalg.solve(a, x[rows].T @ y[rows])

  bubbles = []
  for rows in np.array_split(train_rows, shards):
    theta = {"w": jnp.asarray(ridge(rows, prior_precision)[:, None], jnp.float32)}
    bubbles.append(laplace.fit(apply_fn, theta, (jnp.asarray(x[rows], jnp.float32),
                                                 jnp.asarray(y[rows], jnp.float32)),
                               likelihood="regression", prior_precision=prior_precision))
  target = ridge(train_rows, shards * prior_precision)
  means = [posterior.mean(b) for b in bubbles]
  merges = {
      "average of the shard modes": merging.task_arithmetic(
          jax.tree.map(jnp.zeros_like, means[0]), means, 1 / shards),
      "diagonal precision merge": merging.merge(bubbles, diagonal=True).params,
      "SOAP-Bubble merge (full precision, CG)": merging.merge(bubbles).params,
  }
  out = {}
  for name, params in merges.items():
    w = np.asarray(params["w"], np.float64)[:, 0]
    out[name] = {"relative_error": float(np.linalg.norm(w - target) / np.linalg.norm(target)),
                 "test_mse": float(np.mean((x[test_rows] @ w - y[test_rows]) ** 2))}
  out["whole-data posterior (prior Kλ)"] = {
      "relative_error": 0.0, "test_mse": float(np.mean((x[test_rows] @ target - y[test_rows]) ** 2))}
  return out


def merging_run(seed: int, pretrain_steps=300, finetune_steps=400) -> dict:
  train_set, test = split(*_digits(), seed)
  x, y = train_set
  rng = np.random.default_rng(seed)
  quarter = rng.permutation(x.shape[0])[: x.shape[0] // 4]
  start = init_mlp(jax.random.key(seed), [x.shape[1], HIDDEN, HIDDEN, 10])
  base, _ = train(optax.adamw(1e-3, weight_decay=1e-2), start, x[quarter], y[quarter],
                  pretrain_steps, seed + 100)
  evon_states, evon_means, ivon_states, ivon_means = [], [], [], []
  for k, task in enumerate(TASKS):
    rows = np.isin(np.asarray(y), task)
    xt, yt = x[rows], y[rows]
    n = float(xt.shape[0])
    _, s = train(evon_jax.evon(0.05, ess=n, key=seed), base, xt, yt, finetune_steps,
                 seed + 10 * k)
    evon_states.append(posterior.bubble(s))
    evon_means.append(posterior.mean(s))
    _, s = train(evon_jax.ivon(0.1, ess=n, key=seed), base, xt, yt, finetune_steps,
                 seed + 10 * k)
    ivon_states.append(posterior.bubble(s))
    ivon_means.append(posterior.mean(s))
  K = len(TASKS)
  full = merging.merge(evon_states)
  models = {
      "pretrained (start)": base,
      "EVON: average (task arithmetic 1/K)": merging.task_arithmetic(base, evon_means, 1 / K),
      "EVON: task arithmetic (scale 1)": merging.task_arithmetic(base, evon_means, 1.0),
      "EVON: diagonal precision merge": merging.merge(evon_states, diagonal=True).params,
      "EVON: SOAP-Bubble merge (full precision, CG)": full.params,
      "IVON: average (task arithmetic 1/K)": merging.task_arithmetic(base, ivon_means, 1 / K),
      "IVON: posterior merge (diagonal, exact)": merging.merge(ivon_states).params,
  }
  out = {}
  for name, params in models.items():
    per_task = _task_accuracies(params, test)
    overall, nll = _scores(params, *test)
    out[name] = {"per_task": per_task, "mean_task": float(np.mean(per_task)),
                 "overall": overall, "nll": nll}
  own = [_task_accuracies(m, test)[k] for k, m in enumerate(evon_means)]
  out["EVON fine-tune k on its own task k"] = {"per_task": own, "mean_task": float(np.mean(own)),
                                               "overall": float("nan"), "nll": float("nan")}
  out["_cg_relative_residual"] = float(full.relative_residual)
  return out


def pruning_run(seed: int, steps=1500) -> dict:
  train_set, test = split(*_digits(), seed)
  x, y = train_set
  start = init_mlp(jax.random.key(seed), [x.shape[1], HIDDEN, HIDDEN, 10])
  n = float(x.shape[0])
  _, evon_state = train(evon_jax.evon(0.05, ess=n, key=seed), start, x, y, steps, seed + 1)
  _, ivon_state = train(evon_jax.ivon(0.1, ess=n, key=seed), start, x, y, steps, seed + 1)
  evon_mean, ivon_mean = posterior.mean(evon_state), posterior.mean(ivon_state)
  methods = {
      "EVON mean, magnitude": lambda s: pruning.prune(
          evon_mean, pruning.magnitude(evon_mean), s)[0],
      "EVON mean, SOAP-Bubble SNR (m/σ)": lambda s: pruning.prune(
          evon_mean, pruning.signal_to_noise(evon_state), s)[0],
      "EVON mean, eigen-direction SNR (dense)": lambda s: pruning.prune_eigen_mean(
          evon_state, s),
      "IVON mean, magnitude": lambda s: pruning.prune(
          ivon_mean, pruning.magnitude(ivon_mean), s)[0],
      "IVON mean, IVON SNR (m/σ)": lambda s: pruning.prune(
          ivon_mean, pruning.signal_to_noise(ivon_state), s)[0],
  }
  out = {}
  for label, state in (("EVON", evon_state), ("IVON", ivon_state)):
    # How much the posterior says beyond its initialisation: the spread of the weights'
    # marginal std (coefficient of variation) and H against hess_init (1.0 for both).
    stds = np.concatenate([np.ravel(l["w"]) for l in posterior.marginal_stddev(state)])
    hessians = np.concatenate([np.ravel(l["w"]) for l in posterior.bubble(state).hessian])
    out[f"_{label}_std_cv"] = float(stds.std() / stds.mean())
    out[f"_{label}_hessian_range"] = [float(hessians.min()), float(hessians.max())]
  for name, prune_at in methods.items():
    rows = []
    for sparsity in SPARSITIES:
      accuracy, nll = _scores(prune_at(sparsity), *test)
      rows.append({"sparsity": sparsity, "accuracy": accuracy, "nll": nll})
    out[name] = rows
  return out


def _mean_std(values):
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std())


def tables(merge_runs: list, prune_runs: list, linear_runs: list) -> str:
  lines = ["## Merging shard posteriors of a linear regression (diabetes, 4 shards)", "",
           "| merge | relative distance to the whole-data posterior mean | test MSE |",
           "|---|---|---|"]
  for name in linear_runs[0]:
    e, es = _mean_std([r[name]["relative_error"] for r in linear_runs])
    m, ms = _mean_std([r[name]["test_mse"] for r in linear_runs])
    lines.append(f"| {name} | {e:.2e} ± {es:.1e} | {m:.4f} ± {ms:.4f} |")
  lines += ["", "## Merging five class-pair fine-tunes (digits)", "",
           "| model | mean task accuracy | whole test set accuracy | test NLL |",
           "|---|---|---|---|"]
  for name in merge_runs[0]:
    if name.startswith("_"):
      continue
    m, s = _mean_std([r[name]["mean_task"] for r in merge_runs])
    o, os_ = _mean_std([r[name]["overall"] for r in merge_runs])
    nl, ns = _mean_std([r[name]["nll"] for r in merge_runs])
    overall = "—" if np.isnan(o) else f"{o:.3f} ± {os_:.3f}"
    nll = "—" if np.isnan(nl) else f"{nl:.3f} ± {ns:.3f}"
    lines.append(f"| {name} | {m:.3f} ± {s:.3f} | {overall} | {nll} |")
  residuals = [r["_cg_relative_residual"] for r in merge_runs]
  lines += ["", f"CG relative residual of the SOAP-Bubble merge: {max(residuals):.1e} (max).", "",
            "## Pruning the posterior mean (digits, test accuracy)", "",
            "| method | " + " | ".join(f"{s:.0%}" for s in SPARSITIES) + " |",
            "|---|" + "---|" * len(SPARSITIES)]
  for name in [n for n in prune_runs[0] if not n.startswith("_")]:
    cells = []
    for j in range(len(SPARSITIES)):
      m, s = _mean_std([r[name][j]["accuracy"] for r in prune_runs])
      cells.append(f"{m:.3f} ± {s:.3f}")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  for label in ("EVON", "IVON"):
    cv = max(r[f"_{label}_std_cv"] for r in prune_runs)
    low = min(r[f"_{label}_hessian_range"][0] for r in prune_runs)
    high = max(r[f"_{label}_hessian_range"][1] for r in prune_runs)
    lines.append(f"\n{label}: H of the weight matrices in [{low:.3f}, {high:.3f}] "
                 f"(hess_init 1.0); coefficient of variation of the marginal std ≤ {cv:.1e}.")
  return "\n".join(lines)


def plot(merge_runs, prune_runs, linear_runs, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (linear, left, right) = plt.subplots(1, 3, figsize=(18, 4.8))
  names = [n for n in linear_runs[0] if not n.startswith("whole")]
  errors = [np.mean([r[n]["relative_error"] for r in linear_runs]) for n in names]
  linear.barh(range(len(names)), errors, color="tab:green")
  linear.set_xscale("log")
  linear.set_yticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=7)
  linear.invert_yaxis()
  linear.set_xlabel("relative distance to the whole-data posterior mean")
  linear.set_title("Linear regression, 4 shard posteriors merged")
  names = [n for n in merge_runs[0] if not n.startswith("_")]
  means = [np.mean([r[n]["mean_task"] for r in merge_runs]) for n in names]
  stds = [np.std([r[n]["mean_task"] for r in merge_runs]) for n in names]
  left.barh(range(len(names)), means, xerr=stds, color="tab:blue")
  left.set_yticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=7)
  left.invert_yaxis()
  left.set_xlabel("mean per-task test accuracy (10-way)")
  left.set_title("Merging 5 class-pair fine-tunes of one model")
  for name in [n for n in prune_runs[0] if not n.startswith("_")]:
    acc = np.array([[row["accuracy"] for row in r[name]] for r in prune_runs])
    right.errorbar(SPARSITIES, acc.mean(0), yerr=acc.std(0), marker="o", capsize=3,
                   label=name, linestyle="--" if name.startswith("IVON") else "-")
  right.set_xlabel("sparsity of the weight matrices")
  right.set_ylabel("test accuracy of the pruned mean")
  right.set_title("Pruning by posterior signal-to-noise")
  right.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument("--replot", action="store_true",
                      help="redraw the PNG from the saved JSON, without training")
  args = parser.parse_args()
  if args.replot:
    with open(f"{args.out}/merging_pruning.json") as f:
      saved = json.load(f)
    plot(saved["merging"], saved["pruning"], saved["linear_shards"],
         f"{args.out}/merging_pruning.png")
    return
  seeds = (0,) if args.quick else (0, 1, 2)
  scale = 10 if args.quick else 1
  start = time.perf_counter()
  linear_runs = [linear_shards_run(s) for s in seeds]
  merge_runs = [merging_run(s, 300 // scale, 400 // scale) for s in seeds]
  prune_runs = [pruning_run(s, 1500 // scale) for s in seeds]
  elapsed = time.perf_counter() - start
  text = tables(merge_runs, prune_runs, linear_runs)
  command = "python -m benchmarks.merging_pruning" + (" --quick" if args.quick else "")
  header = (f"# SOAP-Bubble merging and pruning ({time.strftime('%Y-%m-%d')})\n\n`{command}` "
            f"({elapsed:.0f} s, seeds {list(seeds)}; mean ± std over seeds)\n\n")
  print(header + text)
  if not args.quick:
    with open(f"{args.out}/merging_pruning.md", "w") as f:
      f.write(header + text + "\n")
    with open(f"{args.out}/merging_pruning.json", "w") as f:
      json.dump({"command": command, "seconds": elapsed, "seeds": list(seeds),
                 "linear_shards": linear_runs, "merging": merge_runs, "pruning": prune_runs},
                f, indent=1)
    plot(merge_runs, prune_runs, linear_runs, f"{args.out}/merging_pruning.png")


if __name__ == "__main__":
  main()
