"""Demo: structured weight uncertainty for a small MLP on scikit-learn's digits.

Run ``python -m evon_jax.demo [--steps N] [--seed S] [--out DIR]`` (needs the ``demo`` extra:
flax, scikit-learn, matplotlib; no network access). It trains the same Flax NNX MLP twice in
an ordinary jitted optax loop:

* ``optax.adamw``: a point estimate (the baseline);
* ``evon_jax.evon`` in drop-in mode: the parameters the loop holds are posterior samples; the
  posterior mean and fresh samples are read from the optimizer state afterwards.

It prints test accuracy / NLL / ECE / Brier score for AdamW, the EVON posterior mean and the
EVON Bayesian model average (BMA), the mean predictive entropy on test digits and on two
out-of-distribution (OOD) sets (pixel-shuffled test digits, uniform noise) with the OOD AUROC
of the entropy, and writes a figure: reliability diagram, entropy histograms in- vs
out-of-distribution, and example inputs with their BMA probabilities.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import evon_jax
from evon_jax.readout import metrics, plots, predictive

NUM_CLASSES = 10
HIDDEN = 128
BATCH_SIZE = 128
BMA_SAMPLES = 32

# EVON, tuned a little on a held-out split (lr 0.05-0.3, hess_init 0.1-1 and weight_decay
# 5e-4..1e-2 all give 97.5-98.5% accuracy; weight_decay matters most for NLL and ECE).
# ess = number of training examples, as the loss is a minibatch mean. With whitening each
# matrix update is orthogonalised, so lr is a step length per singular direction; the cosine
# decay lets the mean settle (docs/algorithm.md, option 1 under "Exactness"). weight_decay is the prior precision
# per example: prior N(0, 1/(ess·δ)) ≈ N(0, 0.86²) per weight.
EVON_LR = 0.1
EVON_HESS_INIT = 0.3
EVON_WEIGHT_DECAY = 1e-3
EVON_B2 = 0.99999
# AdamW: the best of lr {1e-3, 3e-3, 1e-2} x weight_decay {1e-4, 1e-2, 1e-1} that was stable
# across two seeds.
ADAMW_LR = 1e-3
ADAMW_WEIGHT_DECAY = 1e-2


class MLP(nnx.Module):
  """64 → 128 → 128 → 10 with GELU activations."""

  def __init__(self, num_features: int, *, rngs: nnx.Rngs):
    self.hidden1 = nnx.Linear(num_features, HIDDEN, rngs=rngs)
    self.hidden2 = nnx.Linear(HIDDEN, HIDDEN, rngs=rngs)
    self.out = nnx.Linear(HIDDEN, NUM_CLASSES, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.gelu(self.hidden1(x))
    x = jax.nn.gelu(self.hidden2(x))
    return self.out(x)


class Data(NamedTuple):
  """Digits split into train/test, and OOD input sets {name: (n, 64)}."""
  x_train: jax.Array
  y_train: jax.Array
  x_test: jax.Array
  y_test: jax.Array
  ood: dict


def load_data(seed: int) -> Data:
  """scikit-learn's bundled digits (1797 8x8 images) in [0, 1], a stratified 75/25 split."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  x = digits.data.astype(np.float32) / 16.0
  x_train, x_test, y_train, y_test = train_test_split(
      x, digits.target.astype(np.int32), test_size=0.25, random_state=seed,
      stratify=digits.target)
  rng = np.random.default_rng(seed)
  # Each test digit with its 64 pixels shuffled (same intensities, no digit structure), and
  # images of uniform noise.
  shuffled = np.stack([row[rng.permutation(row.size)] for row in x_test])
  noise = rng.uniform(0.0, 1.0, x_test.shape).astype(np.float32)
  return Data(jnp.asarray(x_train), jnp.asarray(y_train), jnp.asarray(x_test),
              jnp.asarray(y_test),
              {"shuffled pixels": jnp.asarray(shuffled), "uniform noise": jnp.asarray(noise)})


def make_model(seed: int, num_features: int):
  """A fresh MLP as ``(apply_fn, params)``; ``apply_fn(params, x)`` returns logits.

  `nnx.split` separates the module's static graph from its parameters (an `nnx.State`
  pytree), so optax transformations work on the parameters directly.
  """
  graphdef, params = nnx.split(MLP(num_features, rngs=nnx.Rngs(seed)))

  def apply_fn(params, x):
    return nnx.merge(graphdef, params)(x)

  return apply_fn, params


def train(tx: optax.GradientTransformation, apply_fn: Callable, params, data: Data,
          steps: int, seed: int, name: str):
  """A plain jitted optax loop on random minibatches; returns the final params and state.

  With EVON in drop-in mode nothing changes in the loop: the gradient is taken at the params
  the loop holds (a posterior sample) and `tx.update` needs those params.
  """

  def loss_fn(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, x), y).mean()

  @jax.jit
  def step(params, opt_state, key):
    idx = jax.random.choice(key, data.x_train.shape[0], (BATCH_SIZE,), replace=False)
    loss, grads = jax.value_and_grad(loss_fn)(params, data.x_train[idx], data.y_train[idx])
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  keys = jax.random.split(jax.random.key(seed), steps)
  report_every = max(1, steps // 5)
  start = time.perf_counter()
  for t in range(steps):
    params, opt_state, loss = step(params, opt_state, keys[t])
    if (t + 1) % report_every == 0 or t + 1 == steps:
      print(f"  [{name}] step {t + 1:5d}/{steps}  minibatch loss {float(loss):.4f}  "
            f"({time.perf_counter() - start:.1f} s)", flush=True)
  return params, opt_state


def summarize(probs: dict, labels: jax.Array) -> dict:
  """Test metrics of ``probs['test']`` and entropy-based OOD detection of the other sets."""
  test = probs["test"]
  in_entropy = metrics.predictive_entropy(test)
  out = {
      "accuracy": float(metrics.accuracy(test, labels)),
      "nll": float(metrics.nll(test, labels)),
      "ece": float(metrics.expected_calibration_error(test, labels)),
      "brier": float(metrics.brier_score(test, labels)),
      "entropy[test]": float(jnp.mean(in_entropy)),
  }
  for name, p in probs.items():
    if name != "test":
      out_entropy = metrics.predictive_entropy(p)
      out[f"entropy[{name}]"] = float(jnp.mean(out_entropy))
      out[f"auroc[{name}]"] = float(metrics.ood_auroc(in_entropy, out_entropy))
  return out


def _pick_examples(probs: jax.Array, labels: jax.Array) -> list:
  """Two confident correct test digits (different classes), the most confident mistake and
  the least confident prediction, as (tag, index) pairs."""
  confidence = np.asarray(jnp.max(probs, axis=-1))
  correct = np.asarray(jnp.argmax(probs, axis=-1) == labels)
  labels = np.asarray(labels)
  order = np.argsort(-confidence)
  confident = list(order[correct[order]]) or [order[0]]
  first = confident[0]
  second = next((i for i in confident if labels[i] != labels[first]),
                next(i for i in order if i != first))
  picks = [("confident", int(first)), ("confident", int(second))]
  mistakes = order[~correct[order]]
  if mistakes.size:
    picks.append(("most confident error", int(mistakes[0])))
  taken = {i for _, i in picks}
  picks.append(("least confident", int(next(i for i in order[::-1] if i not in taken))))
  return picks


def plot(path: str, data: Data, test_probs: dict, bma_probs: dict, adamw_probs: dict) -> None:
  """Reliability diagram, entropy histograms (in vs OOD) and example BMA predictions."""
  from matplotlib.figure import Figure  # no pyplot: no global backend state, no display

  fig = Figure(figsize=(13, 9))
  outer = fig.add_gridspec(2, 1, height_ratios=[1.5, 1.0], hspace=0.3)
  top = outer[0].subgridspec(1, 2, wspace=0.22)

  ax = fig.add_subplot(top[0])
  ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect calibration")
  for (name, probs), marker in zip(test_probs.items(), "osD"):
    ece = float(metrics.expected_calibration_error(probs, data.y_test))
    plots.reliability_diagram(ax, probs, data.y_test, num_bins=10, marker=marker,
                              label=f"{name} (ECE {ece:.3f})", diagonal=False)
  ax.set(xlabel="confidence (max probability); 10 bins, marker area ~ bin size",
         ylabel="accuracy in bin",
         title="Reliability on test digits", xlim=(0, 1.02), ylim=(0, 1.02))
  ax.legend(loc="upper left", fontsize=8)

  ax = fig.add_subplot(top[1])
  bins = np.linspace(0.0, np.log(NUM_CLASSES), 31)
  for (name, probs), color in zip(bma_probs.items(), ["C0", "C1", "C3"]):
    label = "test digits" if name == "test" else name
    ax.hist(np.asarray(metrics.predictive_entropy(probs)), bins=bins, alpha=0.45,
            density=True, color=color, label=f"EVON BMA: {label}")
  for (name, probs), style in zip(list(adamw_probs.items())[1:], ["--", ":"]):
    ax.hist(np.asarray(metrics.predictive_entropy(probs)), bins=bins, density=True,
            histtype="step", color="k", ls=style, lw=1.2, label=f"AdamW: {name}")
  ax.set_yscale("log")
  ax.set(xlabel=f"predictive entropy (nats; max log {NUM_CLASSES} = {np.log(NUM_CLASSES):.2f})",
         ylabel="density (log scale)", title="Uncertainty in- vs out-of-distribution")
  ax.legend(fontsize=8)

  bma = bma_probs["test"]
  examples = [(f"{tag}\nlabel {int(data.y_test[i])}, predicted {int(jnp.argmax(bma[i]))}",
               data.x_test[i], bma[i])
              for tag, i in _pick_examples(bma, data.y_test)]
  examples += [(name, data.ood[name][0], probs[0]) for name, probs in bma_probs.items()
               if name != "test"]
  bottom = outer[1].subgridspec(2, len(examples), height_ratios=[1.2, 1.0], hspace=0.15,
                                wspace=0.35)
  for j, (title, image, probs) in enumerate(examples):
    ax = fig.add_subplot(bottom[0, j])
    ax.imshow(np.asarray(image).reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax = fig.add_subplot(bottom[1, j])
    probs = np.asarray(probs)
    ax.bar(range(NUM_CLASSES), probs,
           color=["C2" if k == probs.argmax() else "C7" for k in range(NUM_CLASSES)])
    ax.set(ylim=(0, 1), xticks=range(NUM_CLASSES))
    ax.tick_params(labelsize=6)
    if j == 0:
      ax.set_ylabel(f"BMA probability\n({BMA_SAMPLES} samples)", fontsize=8)
  fig.suptitle("evon_jax: EVON (SOAP-Bubble posterior) vs AdamW, MLP on 8x8 digits",
               fontsize=12)
  fig.savefig(path, dpi=110, bbox_inches="tight")


def _table(results: dict, columns: Sequence[str], header: Sequence[str]) -> str:
  width = max(len(name) for name in results) + 2
  lines = [" " * width + "".join(f"{h:>13}" for h in header)]
  for name, values in results.items():
    lines.append(f"{name:<{width}}" + "".join(f"{values[c]:>13.4f}" for c in columns))
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the demo. Returns ``{method: {metric: value}}`` plus 'figure' and 'seconds'."""
  import scipy.linalg  # noqa: F401  (loads the OpenBLAS behind JAX's CPU LAPACK; see below)
  from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

  parser = argparse.ArgumentParser(prog="python -m evon_jax.demo", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=1000, help="training steps per optimizer")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="demo_out", help="directory for the figure")
  args = parser.parse_args(argv)
  if args.steps < 2:
    parser.error("--steps must be at least 2 (EVON's first call only initialises).")
  # On CPU, jnp.linalg.qr / eigh (EVON's basis refresh) run LAPACK from scipy's OpenBLAS
  # (loaded lazily, hence the import above: the limit only reaches loaded libraries), whose
  # spinning worker threads compete with XLA's thread pool. On an idle 2-core machine one
  # BLAS thread changes little (9.7 -> 8.9 s for the EVON loop); on a busy one (load ~5) it
  # took the loop from ~40 s to ~8 s.
  with threadpool_limits(limits=1, user_api="blas"):
    return _run(args)


def _run(args: argparse.Namespace) -> dict[str, Any]:
  start = time.perf_counter()

  data = load_data(args.seed)
  num_train = data.x_train.shape[0]
  apply_fn, init_params = make_model(args.seed, data.x_train.shape[1])
  print(f"digits: {num_train} train / {data.x_test.shape[0]} test images, "
        f"{args.steps} steps of batch {BATCH_SIZE} per optimizer", flush=True)

  adamw = optax.adamw(optax.cosine_decay_schedule(ADAMW_LR, args.steps),
                      weight_decay=ADAMW_WEIGHT_DECAY)
  adamw_params, _ = train(adamw, apply_fn, init_params, data, args.steps, args.seed, "adamw")
  evon = evon_jax.evon(
      optax.cosine_decay_schedule(EVON_LR, args.steps), ess=float(num_train),
      hess_init=EVON_HESS_INIT, weight_decay=EVON_WEIGHT_DECAY, b2=EVON_B2,
      whiten=True, key=args.seed)
  _, evon_state = train(evon, apply_fn, init_params, data, args.steps, args.seed, "evon")

  inputs = {"test": data.x_test, **data.ood}
  point = jax.jit(lambda params, x: jax.nn.softmax(apply_fn(params, x), axis=-1))
  mean_params = evon_jax.posterior.mean(evon_state)
  # One key for every input set: the BMA uses the same BMA_SAMPLES weight samples throughout.
  bma_key = jax.random.key(args.seed + 1)
  sample_fn = jax.jit(lambda x: predictive.sample_predictive(bma_key, apply_fn, evon_state, x,
                                                             BMA_SAMPLES))
  sample_probs = {name: sample_fn(x) for name, x in inputs.items()}
  bma_name = f"EVON BMA ({BMA_SAMPLES})"
  probs = {
      "AdamW": {name: point(adamw_params, x) for name, x in inputs.items()},
      "EVON mean": {name: point(mean_params, x) for name, x in inputs.items()},
      bma_name: {name: jnp.mean(p, axis=0) for name, p in sample_probs.items()},
  }
  results = {method: summarize(p, data.y_test) for method, p in probs.items()}

  ood = list(data.ood)
  print("\nTest digits (accuracy: higher is better; NLL, ECE (15 bins), Brier: lower):")
  print(_table(results, ["accuracy", "nll", "ece", "brier"],
               ["accuracy", "NLL", "ECE", "Brier"]))
  print("\nMean predictive entropy (nats) on test digits and OOD sets; "
        "OOD AUROC of the entropy:")
  print(_table(results, ["entropy[test]"] + [f"entropy[{n}]" for n in ood]
               + [f"auroc[{n}]" for n in ood],
               ["H test", "H shuffled", "H noise", "AUROC shuf.", "AUROC noise"]))
  info = {name: metrics.mutual_information(p) for name, p in sample_probs.items()}
  print("\nEVON mutual information (epistemic part of the BMA entropy), mean nats: "
        + ", ".join(f"{name} {float(jnp.mean(v)):.4f}" for name, v in info.items())
        + "; OOD AUROC: " + ", ".join(
            f"{n} {float(metrics.ood_auroc(info['test'], info[n])):.3f}" for n in ood))

  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "evon_digits_uncertainty.png")
  plot(path, data, {method: p["test"] for method, p in probs.items()}, probs[bma_name],
       probs["AdamW"])
  elapsed = time.perf_counter() - start
  print(f"\nTotal time {elapsed:.1f} s. Figure written to {os.path.abspath(path)}")
  return {**results, "figure": path, "seconds": elapsed}


if __name__ == "__main__":
  main()
