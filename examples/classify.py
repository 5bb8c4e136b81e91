"""Classification with uncertainty: MAP, deep ensemble, MC dropout, IVON and EVON.

Run ``python examples/classify.py --dataset mnist1d`` (or ``--dataset digits``); needs the
``examples`` extra (mnist1d, scikit-learn, matplotlib). No network access: MNIST-1D is
generated with ``mnist1d.data.make_dataset`` (its default arguments, data seed 42), and
scikit-learn's 8x8 digits ship with scikit-learn.

**Task.** A GELU MLP (two hidden layers) is trained on classes 0-7 only; inputs are
standardised with the mean and std of all training features. Evaluation on the held-out test
inputs of classes 0-7 (accuracy, NLL, 15-bin ECE, Brier score) and out-of-distribution (OOD)
detection against two sets, with OOD as the positive class:

* ``unseen classes``: the test inputs of classes 8 and 9 (never seen in training);
* ``shuffled``: each in-distribution test input with its features randomly permuted (same
  values, no structure).

The OOD score is the predictive entropy (every method) and, for methods with several
predictions per input, the mutual information (BALD: entropy of the average minus average
entropy); AUROC, AUPR-Out and FPR at 95% TPR are reported (`evon_jax.metrics`).

**Methods** (same model, same number of minibatch steps, cosine-decayed learning rates):

* ``MAP``: ``optax.adamw`` (the point estimate);
* ``ensemble``: 5 AdamW MAP networks (MAP's settings, different initialisations and batch
  orders), averaged probabilities;
* ``MC dropout``: AdamW with dropout after each hidden layer, ``S`` dropout masks at test time;
* ``IVON`` (`evon_jax.ivon`, diagonal Gaussian) and ``EVON`` (`evon_jax.evon`, SOAP-Bubble) in
  drop-in mode, each reported three ways: ``mean`` (softmax at the posterior mean), ``BMA``
  (average of ``S`` posterior weight samples through the network) and ``linearised``
  (``S`` samples through the network linearised at the mean, `evon_jax.predictive`).

**Tuning** (``--tune``): each method gets the same small grid (4 settings, listed in
``GRIDS``) trained on 85% of the training set and scored by NLL on the other 15% (MAP and MC
dropout by their own predictive, IVON/EVON by the BMA); the ensemble reuses MAP's choice. The
chosen settings are recorded in the JSON and in ``TUNED``; without ``--tune`` the script uses
``TUNED``, so a plain run reproduces the reported numbers.

Outputs (``--out``, default ``examples/results``): ``classify_<dataset>.json`` (settings,
tuning scores, metrics per method), ``reliability_<dataset>.png`` (reliability diagrams) and
``classify_summary.md`` (tables of every ``classify_*.json`` in ``--out``).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import evon_jax
from evon_jax import metrics, plots, predictive
from evon_jax._progress import progress

NUM_CLASSES = 8  # classes 0-7 are in-distribution; 8 and 9 are the unseen-class OOD set
BATCH_SIZE = 128
NUM_SAMPLES = 32  # test-time samples (BMA, linearised, MC dropout masks)
ENSEMBLE_SIZE = 5
ECE_BINS = 15

# Per dataset: hidden width and training steps (~epochs: mnist1d 3200 train inputs of classes
# 0-7 -> 2500 steps of 128 = 100 epochs; digits ~1080 -> 1500 steps = 180 epochs).
CONFIGS = {
    "mnist1d": {"hidden": 256, "steps": 2500},
    "digits": {"hidden": 128, "steps": 1500},
}

# The tuning grids: four settings per method (same budget for every method).
GRIDS = {
    "MAP": [{"lr": lr, "weight_decay": wd} for lr in (1e-3, 3e-3) for wd in (1e-1, 1.0)],
    "MC dropout": [{"lr": lr, "weight_decay": 1e-4, "rate": rate}
                   for lr in (1e-3, 3e-3) for rate in (0.1, 0.3)],
    "IVON": [{"lr": lr, "hess_init": h0, "weight_decay": 1e-3}
             for lr in (0.1, 0.3) for h0 in (0.1, 0.5)],
    "EVON": [{"lr": lr, "hess_init": h0, "weight_decay": 1e-3}
             for lr in (0.05, 0.2) for h0 in (0.1, 0.5)],
}

# Settings chosen by `--tune` (seed 0); a plain run uses these.
TUNED = {
    "mnist1d": {
        "MAP": {"lr": 3e-3, "weight_decay": 1.0},
        "MC dropout": {"lr": 3e-3, "weight_decay": 1e-4, "rate": 0.3},
        "IVON": {"lr": 0.3, "hess_init": 0.1, "weight_decay": 1e-3},
        "EVON": {"lr": 0.2, "hess_init": 0.1, "weight_decay": 1e-3},
    },
    "digits": {
        "MAP": {"lr": 3e-3, "weight_decay": 1e-1},
        "MC dropout": {"lr": 3e-3, "weight_decay": 1e-4, "rate": 0.1},
        "IVON": {"lr": 0.3, "hess_init": 0.5, "weight_decay": 1e-3},
        "EVON": {"lr": 0.05, "hess_init": 0.5, "weight_decay": 1e-3},
    },
}

# Fixed (not tuned): IVON's and EVON's Hessian EMA decay and the number of training examples
# as the effective sample size (the loss is a minibatch mean).
IVON_B2 = 0.99999
EVON_B2 = 0.99999


# ----------------------------------------------------------------------------------- data


class Data(NamedTuple):
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  ood: dict  # name -> inputs


def _raw(dataset: str):
  """(x_train, y_train, x_test, y_test) with all ten classes."""
  if dataset == "mnist1d":
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()  # 5000 sequences of length 40, 80/20 split, data seed 42
    d = make_dataset(args)  # generated locally; nothing is downloaded
    return d["x"], d["y"], d["x_test"], d["y_test"]
  if dataset == "digits":
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.25, random_state=0, stratify=digits.target)
    return x_train, y_train, x_test, y_test
  raise ValueError(f"unknown dataset {dataset!r}")


def load_data(dataset: str, seed: int = 0, max_train: int | None = None) -> Data:
  """Classes 0-7 in distribution; OOD: test inputs of classes 8-9 and feature-shuffled
  in-distribution test inputs. Inputs standardised with the training mean and std."""
  x_train, y_train, x_test, y_test = (np.asarray(a) for a in _raw(dataset))
  keep_train, keep_test = y_train < NUM_CLASSES, y_test < NUM_CLASSES
  x_in_train, y_in_train = x_train[keep_train], y_train[keep_train]
  if max_train is not None:
    x_in_train, y_in_train = x_in_train[:max_train], y_in_train[:max_train]
  # One scalar mean/std over all training features: per-feature statistics would blow up
  # features that are constant in training (digits' border pixels) but not at test time.
  mu, sd = x_in_train.mean(), x_in_train.std()

  def norm(x):
    return ((x - mu) / sd).astype(np.float32)

  x_in_test = norm(x_test[keep_test])
  rng = np.random.default_rng(seed)
  shuffled = np.stack([row[rng.permutation(row.size)] for row in x_in_test])
  return Data(norm(x_in_train), y_in_train.astype(np.int32), x_in_test,
              y_test[keep_test].astype(np.int32),
              {"unseen classes": norm(x_test[~keep_test]), "shuffled": shuffled})


def num_classes(data: Data) -> int:
  """Number of in-distribution classes (labels are 0..K-1)."""
  return int(np.max(data.y_train)) + 1


def split_validation(data: Data, seed: int, fraction: float = 0.15) -> Data:
  """Train on 1 - fraction of the training set; the rest stands in for the test set."""
  perm = np.random.default_rng(seed + 1000).permutation(data.x_train.shape[0])
  n_val = int(fraction * perm.size)
  val, train = perm[:n_val], perm[n_val:]
  return Data(data.x_train[train], data.y_train[train], data.x_train[val],
              data.y_train[val], {})


# ---------------------------------------------------------------------------------- model


def init_mlp(key: jax.Array, sizes: Sequence[int]) -> list:
  """LeCun-normal weights, zero biases: [{'w': (d_in, d_out), 'b': (d_out,)}, ...]."""
  params = []
  for k, (d_in, d_out) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes, sizes[1:])):
    w = jax.random.normal(k, (d_in, d_out)) / np.sqrt(d_in)
    params.append({"w": w, "b": jnp.zeros(d_out)})
  return params


def mlp(params: list, x: jax.Array, dropout_key: jax.Array | None = None,
        rate: float = 0.0) -> jax.Array:
  """Logits; dropout (inverted, rate ``rate``) after each hidden layer when a key is given."""
  for i, layer in enumerate(params):
    x = x @ layer["w"] + layer["b"][None, :]
    if i < len(params) - 1:
      x = jax.nn.gelu(x)
      if dropout_key is not None and rate > 0:
        dropout_key, sub = jax.random.split(dropout_key)
        keep = jax.random.bernoulli(sub, 1.0 - rate, x.shape)
        x = jnp.where(keep, x / (1.0 - rate), 0.0)
  return x


def apply_fn(params, x):
  return mlp(params, x)


# ------------------------------------------------------------------------------- training


def cross_entropy_loss(model: Callable = None, dropout_rate: float = 0.0) -> Callable:
  """``loss(params, x, y, key)``: mean softmax cross-entropy of ``model`` (default `mlp`, with
  dropout at ``dropout_rate`` drawn from ``key``)."""
  def loss(params, x, y, key):
    if model is None:
      logits = mlp(params, x, key if dropout_rate > 0 else None, dropout_rate)
    else:
      logits = model(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return loss


def train(tx: optax.GradientTransformation, params, x_train, y_train, steps: int,
          key: jax.Array, dropout_rate: float = 0.0, *, loss_fn: Callable | None = None,
          members: bool = False, timings: list | None = None):
  """``steps`` minibatch steps of ``tx`` in one `lax.scan`; returns (params, opt_state).

  For IVON/EVON (drop-in mode) the params the loop holds are posterior samples and the
  gradient is taken there; the posterior lives in the returned state. ``loss_fn(params, x, y,
  key)`` defaults to the MLP's cross-entropy (`cross_entropy_loss`). ``members=True`` trains
  independent networks at once: ``params`` and ``key`` carry a leading member axis (deep
  ensembles). ``timings``: when given, the run is compiled ahead of time and
  ``{"compile_s", "train_s"}`` is appended (training time without compilation).
  """
  x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)
  n = x_train.shape[0]
  batch = min(BATCH_SIZE, n)
  loss_fn = loss_fn or cross_entropy_loss(dropout_rate=dropout_rate)

  def step(carry, key):
    params, opt_state = carry
    batch_key, loss_key = jax.random.split(key)
    idx = jax.random.choice(batch_key, n, (batch,), replace=False)
    grads = jax.grad(loss_fn)(params, x_train[idx], y_train[idx], loss_key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  def run_one(params, key):
    (params, opt_state), _ = jax.lax.scan(step, (params, tx.init(params)),
                                          jax.random.split(key, steps))
    return params, opt_state

  run = jax.jit(jax.vmap(run_one) if members else run_one)
  if timings is None:
    return run(params, key)
  start = time.perf_counter()
  compiled = run.lower(params, key).compile()
  compiled_at = time.perf_counter()
  out = jax.block_until_ready(compiled(params, key))
  timings.append({"compile_s": compiled_at - start, "train_s": time.perf_counter() - compiled_at})
  return out


def _adamw(setting: dict, steps: int):
  return optax.adamw(optax.cosine_decay_schedule(setting["lr"], steps),
                     weight_decay=setting["weight_decay"])


def _ivon(setting: dict, steps: int, num_train: int, seed: int):
  return evon_jax.ivon(optax.cosine_decay_schedule(setting["lr"], steps), ess=float(num_train),
                       hess_init=setting["hess_init"], weight_decay=setting["weight_decay"],
                       b2=IVON_B2, key=seed)


def _evon(setting: dict, steps: int, num_train: int, seed: int):
  return evon_jax.evon(optax.cosine_decay_schedule(setting["lr"], steps), ess=float(num_train),
                       hess_init=setting["hess_init"], weight_decay=setting["weight_decay"],
                       b2=EVON_B2, whiten=True, key=seed)


# ---------------------------------------------------------------------------- predictions


Predictor = Callable[[jax.Array], tuple]  # inputs -> (probs, sample_probs or None)


def averaging_predictor(sample_probs_fn: Callable[[jax.Array], jax.Array]) -> Predictor:
  """A jitted predictor from ``inputs -> (S, n, K)`` per-sample probabilities: returns their
  average (the model average) and the samples."""

  @jax.jit
  def predictor(x):
    sample_probs = sample_probs_fn(x)
    return sample_probs.mean(0), sample_probs

  return predictor


def posterior_predictors(name: str, model, state, key: jax.Array) -> dict[str, Predictor]:
  """``{name BMA, name linearised}`` predictors of a SOAP-Bubble state (EVON, IVON, or a
  post-hoc Laplace fit): ``NUM_SAMPLES`` weight samples from ``key`` through the network and
  through its linearisation at the mean."""
  return {
      f"{name} BMA": averaging_predictor(lambda x: predictive.sample_predictive(
          key, model, state, x, NUM_SAMPLES)),
      f"{name} linearised": averaging_predictor(
          lambda x: predictive.linearized_sample_predictive(key, model, state, x,
                                                            NUM_SAMPLES))}


def fit_method(method: str, setting: dict, data: Data, hidden: int, steps: int,
               seed: int, timings: list | None = None) -> dict[str, Predictor]:
  """Trains ``method`` and returns ``{predictive name: predictor}``.

  A predictor maps inputs to ``(probs (n, K), sample_probs (S, n, K) or None)``. All samples
  are drawn from fixed keys, so every input set sees the same weight samples / masks.
  ``timings``: see `train`.
  """
  sizes = (data.x_train.shape[1], hidden, hidden, num_classes(data))
  init_key, train_key, sample_key = jax.random.split(jax.random.key(seed), 3)
  params = init_mlp(init_key, sizes)
  num_train = data.x_train.shape[0]

  def point(p):
    return jax.jit(lambda x: (jax.nn.softmax(mlp(p, x), axis=-1), None))

  if method == "MAP":
    p, _ = train(_adamw(setting, steps), params, data.x_train, data.y_train, steps, train_key,
                 timings=timings)
    return {"MAP": point(p)}

  if method == "ensemble":
    keys = jax.random.split(jax.random.key(seed + 7919), ENSEMBLE_SIZE)
    member_params = [init_mlp(jax.random.fold_in(k, 0), sizes) for k in keys]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *member_params)
    members, _ = train(_adamw(setting, steps), stacked, data.x_train, data.y_train, steps,
                       jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys), members=True,
                       timings=timings)

    ensemble = averaging_predictor(
        lambda x: predictive.probabilities_of_samples(mlp, members, x))
    return {f"ensemble ({ENSEMBLE_SIZE})": ensemble}

  if method == "MC dropout":
    rate = setting["rate"]
    p, _ = train(_adamw(setting, steps), params, data.x_train, data.y_train, steps, train_key,
                 dropout_rate=rate, timings=timings)

    masks = jax.random.split(sample_key, NUM_SAMPLES)
    mc_dropout = averaging_predictor(lambda x: jax.vmap(
        lambda k: jax.nn.softmax(mlp(p, x, k, rate), axis=-1))(masks))
    return {"MC dropout": mc_dropout}

  if method in ("IVON", "EVON"):
    make = _ivon if method == "IVON" else _evon
    _, state = train(make(setting, steps, num_train, seed), params, data.x_train,
                     data.y_train, steps, train_key, timings=timings)
    mean = evon_jax.posterior.mean(state)
    return {f"{method} mean": point(mean),
            **posterior_predictors(method, apply_fn, state, sample_key)}
  raise ValueError(f"unknown method {method!r}")


def _predict_all(predictor: Predictor, data: Data) -> dict:
  """{set name: (probs, sample_probs)} for the test set and each OOD set, from one call of
  ``predictor`` on their concatenation (one compilation per predictor)."""
  sets = {"test": data.x_test, **data.ood}
  probs, sample_probs = predictor(jnp.asarray(np.concatenate(list(sets.values()))))
  out, start = {}, 0
  for name, x in sets.items():
    stop = start + x.shape[0]
    out[name] = (probs[start:stop],
                 None if sample_probs is None else sample_probs[:, start:stop])
    start = stop
  return out


def evaluate(predictor: Predictor, data: Data) -> tuple[dict, np.ndarray]:
  """Metrics of one predictive; also returns the test probabilities (for the diagram)."""
  predictions = _predict_all(predictor, data)
  probs, sample_probs = predictions["test"]
  labels = jnp.asarray(data.y_test)
  out = {
      "accuracy": float(metrics.accuracy(probs, labels)),
      "nll": float(metrics.nll(probs, labels)),
      "ece": float(metrics.expected_calibration_error(probs, labels, ECE_BINS)),
      "brier": float(metrics.brier_score(probs, labels)),
      "entropy[test]": float(jnp.mean(metrics.predictive_entropy(probs))),
  }
  scores_in = {"entropy": metrics.predictive_entropy(probs)}
  if sample_probs is not None:
    scores_in["mutual_info"] = metrics.mutual_information(sample_probs)
  for name in data.ood:
    ood_probs, ood_samples = predictions[name]
    scores_out = {"entropy": metrics.predictive_entropy(ood_probs)}
    if ood_samples is not None:
      scores_out["mutual_info"] = metrics.mutual_information(ood_samples)
    out[f"entropy[{name}]"] = float(jnp.mean(scores_out["entropy"]))
    for score, s_in in scores_in.items():
      s_out = scores_out[score]
      out[f"auroc[{name}, {score}]"] = float(metrics.ood_auroc(s_in, s_out))
      out[f"aupr[{name}, {score}]"] = float(metrics.ood_aupr(s_in, s_out))
      out[f"fpr95[{name}, {score}]"] = float(metrics.fpr_at_95_tpr(s_in, s_out))
  return out, np.asarray(probs)


def _tune_score(method: str, predictors: dict, val: Data) -> float:
  """Validation NLL of the method's main predictive (BMA for IVON/EVON)."""
  name = f"{method} BMA" if method in ("IVON", "EVON") else next(iter(predictors))
  probs, _ = predictors[name](jnp.asarray(val.x_test))
  return float(metrics.nll(probs, jnp.asarray(val.y_test)))


def tune(dataset: str, data: Data, hidden: int, steps: int, seed: int,
         grids: dict = GRIDS, log=print) -> tuple[dict, dict]:
  """Picks each method's setting by validation NLL; returns (chosen, all scores)."""
  val = split_validation(data, seed)
  chosen, scores = {}, {}
  for method, grid in grids.items():
    scores[method] = []
    for setting in grid:
      start = time.perf_counter()
      score = _tune_score(method, fit_method(method, setting, val, hidden, steps, seed), val)
      scores[method].append({"setting": setting, "val_nll": score})
      log(f"  tune {dataset} {method} {setting}: val NLL {score:.4f} "
          f"({time.perf_counter() - start:.1f} s)")
    chosen[method] = min(scores[method], key=lambda r: r["val_nll"])["setting"]
  return chosen, scores


def run_dataset(dataset: str, seed: int = 0, steps: int | None = None,
                hidden: int | None = None, settings: dict | None = None,
                max_train: int | None = None, do_tune: bool = False, log=print) -> dict:
  """Trains every method on ``dataset`` and evaluates every predictive.

  Returns a JSON-ready dict: config, settings (and tuning scores), per-predictive metrics
  under 'results', seconds per method, and test probabilities under '_probs' (not saved).
  """
  config = dict(CONFIGS[dataset])
  config.update({k: v for k, v in (("steps", steps), ("hidden", hidden)) if v is not None})
  data = load_data(dataset, seed, max_train)
  log(f"{dataset}: {data.x_train.shape[0]} train / {data.x_test.shape[0]} test inputs "
      f"(classes 0-{NUM_CLASSES - 1}), OOD: "
      + ", ".join(f"{k} {v.shape[0]}" for k, v in data.ood.items())
      + f"; MLP {data.x_train.shape[1]}-{config['hidden']}-{config['hidden']}-{NUM_CLASSES}, "
      f"{config['steps']} steps of batch {BATCH_SIZE}")
  tuning = None
  if do_tune:
    settings, tuning = tune(dataset, data, config["hidden"], config["steps"], seed, log=log)
  settings = dict(settings or TUNED[dataset])
  settings["ensemble"] = settings["MAP"]
  results, probs, seconds = {}, {}, {}
  for method in progress(("MAP", "ensemble", "MC dropout", "IVON", "EVON"),
                         f"{dataset}: training"):
    start = time.perf_counter()
    predictors = fit_method(method, settings[method], data, config["hidden"], config["steps"],
                            seed)
    for name, predictor in predictors.items():
      results[name], probs[name] = evaluate(predictor, data)
    seconds[method] = time.perf_counter() - start
    log(f"  {method}: " + "; ".join(
        f"{name} acc {results[name]['accuracy']:.4f} NLL {results[name]['nll']:.4f}"
        for name in predictors) + f" ({seconds[method]:.1f} s)")
  return {
      "dataset": dataset, "seed": seed, "config": {
          **config, "batch_size": BATCH_SIZE, "num_samples": NUM_SAMPLES,
          "ensemble_size": ENSEMBLE_SIZE, "ece_bins": ECE_BINS, "ivon_b2": IVON_B2,
          "evon_b2": EVON_B2, "ess": data.x_train.shape[0],
          "num_train": data.x_train.shape[0], "num_test": data.x_test.shape[0],
          "ood": {k: v.shape[0] for k, v in data.ood.items()},
          "in_distribution_classes": list(range(NUM_CLASSES))},
      "settings": settings, "tuning": tuning, "results": results, "seconds": seconds,
      "_probs": probs, "_labels": data.y_test,
  }


# -------------------------------------------------------------------------------- outputs


def plot_reliability(path: str, run: dict, num_bins: int = 10) -> None:
  """One reliability diagram per predictive: accuracy per confidence bin (bars, labelled with
  the bin's count), the bin's mean confidence (red ticks) and the diagonal."""
  from matplotlib.figure import Figure  # Agg canvas, no pyplot global state

  names = list(run["_probs"])
  cols = 3
  rows = -(-len(names) // cols)
  fig = Figure(figsize=(3.6 * cols, 3.4 * rows))
  for i, name in enumerate(names):
    ax = fig.add_subplot(rows, cols, i + 1)
    plots.reliability_diagram(ax, run["_probs"][name], run["_labels"], num_bins=num_bins,
                              style="bars")
    r = run["results"][name]
    ax.set_title(f"{name}: acc {r['accuracy']:.3f}, ECE {r['ece']:.3f}", fontsize=9)
    ax.set(xlim=(0, 1), ylim=(0, 1))
    ax.tick_params(labelsize=7)
    if i % cols == 0:
      ax.set_ylabel("accuracy in bin", fontsize=8)
    if i >= len(names) - cols:
      ax.set_xlabel("confidence (max probability)", fontsize=8)
    if i == 0:
      ax.legend(fontsize=7, loc="upper left")
  fig.suptitle(f"Reliability on {run['dataset']} test inputs (classes 0-{NUM_CLASSES - 1}); "
               f"{num_bins} bins (numbers: inputs per bin); ECE uses {ECE_BINS} bins",
               fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


SUMMARY_COLUMNS = [
    ("accuracy", "acc ↑"), ("nll", "NLL ↓"), ("ece", "ECE ↓"), ("brier", "Brier ↓"),
    ("auroc[unseen classes, entropy]", "AUROC unseen (H) ↑"),
    ("auroc[unseen classes, mutual_info]", "AUROC unseen (MI) ↑"),
    ("fpr95[unseen classes, entropy]", "FPR95 unseen (H) ↓"),
    ("auroc[shuffled, entropy]", "AUROC shuffled (H) ↑"),
]


def summary_markdown(runs: Sequence[dict]) -> str:
  lines = [
      "# Classification with uncertainty: results", "",
      "Written by `examples/classify.py` (see its docstring for the protocol). "
      f"In-distribution: classes 0-{NUM_CLASSES - 1}; OOD sets: the test inputs of the unseen "
      "classes 8-9, and feature-shuffled in-distribution test inputs. OOD scores: predictive "
      "entropy (H) and mutual information (MI, only for predictives with several samples). "
      f"ECE with {ECE_BINS} equal-width bins. Single seed, single run per method: differences "
      "in the third decimal are within run-to-run noise.", "",
      "Each `--tune` command below grid-searches every method (validation NLL) and then fits "
      "and evaluates the chosen settings; `python examples/classify.py --dataset <name>` "
      "(no `--tune`) skips the search and uses the recorded choices (`TUNED`). Reliability "
      "diagrams: `reliability_<dataset>.png`.", "",
  ]
  for run in runs:
    cfg = run["config"]
    lines += [
        f"## {run['dataset']}", "",
        f"Command: `{run.get('command', '')}`", "",
        f"MLP {cfg['hidden']}-{cfg['hidden']} hidden (GELU), {cfg['steps']} steps of batch "
        f"{cfg['batch_size']}, {cfg['num_train']} train / {cfg['num_test']} test inputs, OOD "
        + ", ".join(f"{k}: {v}" for k, v in cfg["ood"].items())
        + f"; {cfg['num_samples']} test-time samples; ensemble of {cfg['ensemble_size']}; "
        f"seed {run['seed']}; final fits took {sum(run['seconds'].values()):.0f} s "
        f"(tuning not included; {run.get('machine', '')}, shared and loaded: times are "
        "indicative).", "",
        "| predictive | " + " | ".join(h for _, h in SUMMARY_COLUMNS) + " |",
        "| --- |" + " ---: |" * len(SUMMARY_COLUMNS),
    ]
    for name, r in run["results"].items():
      cells = [f"{r[k]:.4f}" if k in r else "–" for k, _ in SUMMARY_COLUMNS]
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Settings (cosine-decayed learning rate; IVON/EVON: ess = number of training "
              f"inputs, b2 = {cfg['ivon_b2']} / {cfg['evon_b2']}):", ""]
    for method, setting in run["settings"].items():
      lines.append(f"- {method}: " + ", ".join(f"{k}={v}" for k, v in setting.items()))
    if run.get("tuning"):
      lines += ["", "Tuning (validation NLL, 15% of the training set held out):", ""]
      for method, rows in run["tuning"].items():
        lines.append(f"- {method}: " + "; ".join(
            ", ".join(f"{k}={v}" for k, v in row["setting"].items())
            + f" → {row['val_nll']:.4f}" for row in rows))
    lines.append("")
  return "\n".join(lines)


def write_summary(out: str) -> str:
  """(Re)writes ``classify_summary.md`` from every ``classify_*.json`` in ``out``."""
  runs = []
  for path in sorted(glob.glob(os.path.join(out, "classify_*.json"))):
    with open(path) as f:
      runs.append(json.load(f))
  path = os.path.join(out, "classify_summary.md")
  with open(path, "w") as f:
    f.write(summary_markdown(runs))
  return path


def write_outputs(run: dict, out: str) -> dict:
  os.makedirs(out, exist_ok=True)
  paths = {"json": os.path.join(out, f"classify_{run['dataset']}.json"),
           "png": os.path.join(out, f"reliability_{run['dataset']}.png")}
  with open(paths["json"], "w") as f:
    json.dump({k: v for k, v in run.items() if not k.startswith("_")}, f, indent=1)
  plot_reliability(paths["png"], run)
  paths["md"] = write_summary(out)
  return paths


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Command-line entry point; returns the run dict (with output paths under 'paths')."""
  import scipy.linalg  # noqa: F401  (loads the OpenBLAS behind JAX's CPU eigh/qr)
  from threadpoolctl import threadpool_limits

  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dataset", choices=sorted(CONFIGS), default="mnist1d")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--steps", type=int, default=None, help="override the training steps")
  parser.add_argument("--hidden", type=int, default=None, help="override the hidden width")
  parser.add_argument("--max-train", type=int, default=None,
                      help="use only the first N training inputs (smoke tests)")
  parser.add_argument("--tune", action="store_true", help="grid-search settings first")
  parser.add_argument("--out", default=os.path.join("examples", "results"))
  parser.add_argument("--summary-only", action="store_true",
                      help="only rewrite classify_summary.md from the JSON files in --out")
  args = parser.parse_args(argv)
  if args.summary_only:
    print(f"wrote {write_summary(args.out)}")
    return {}
  start = time.perf_counter()
  # EVON's basis refresh runs LAPACK (OpenBLAS) on CPU; one BLAS thread avoids oversubscribing
  # the cores XLA already uses (see evon_jax/demo.py).
  with threadpool_limits(limits=1, user_api="blas"):
    run = run_dataset(args.dataset, args.seed, args.steps, args.hidden, None, args.max_train,
                      args.tune, log=lambda s: print(s, flush=True))
  run["command"] = "python examples/classify.py " + " ".join(
      sys.argv[1:] if argv is None else argv)
  run["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}"
  run["total_seconds"] = time.perf_counter() - start
  run["paths"] = write_outputs(run, args.out)
  print(f"wrote {', '.join(run['paths'].values())} ({run['total_seconds']:.0f} s)")
  return run


if __name__ == "__main__":
  main()
