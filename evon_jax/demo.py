"""Demo: structured weight uncertainty for a small MLP on scikit-learn's digits.

Run ``python -m evon_jax.demo [--steps N] [--seed S] [--out DIR]`` (needs the ``demo`` extra:
flax, scikit-learn, matplotlib; no network access). It trains the same Flax NNX MLP twice in
an ordinary jitted optax loop:

* ``optax.adamw``: a point estimate (baseline);
* ``evon_jax.evon`` in drop-in mode: the parameters the loop holds are posterior samples, the
  posterior mean and samples are read from the optimizer state afterwards.

It prints test accuracy / NLL / ECE / Brier for AdamW, the EVON posterior mean and the EVON
Bayesian model average, the mean predictive entropy on test digits versus two
out-of-distribution sets (pixel-shuffled digits and uniform noise) with the OOD AUROC of the
entropy, and writes a figure (reliability diagram, entropy histograms, example predictions).
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
from evon_jax import metrics, predictive

NUM_CLASSES = 10
HIDDEN = 128
BATCH_SIZE = 128
BMA_SAMPLES = 32

# EVON: ess = number of training examples (the loss is a mean over the minibatch). With
# whitening the matrix updates are orthogonalised, so the learning rate is a step length per
# singular direction; a cosine decay lets the mean settle (ALGORITHM.md, remedy 1). The prior
# precision per example weight_decay = 5e-3 is a prior N(0, 1/(ess·δ)) ≈ N(0, 0.4²) on weights.
EVON_LR = 0.1
EVON_HESS_INIT = 0.3
EVON_WEIGHT_DECAY = 5e-3
EVON_B2 = 0.99999
ADAMW_LR = 3e-3
ADAMW_WEIGHT_DECAY = 1e-4


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
  x_train: jax.Array
  y_train: jax.Array
  x_test: jax.Array
  y_test: jax.Array
  ood: dict  # name -> (n, 64) out-of-distribution inputs


def load_data(seed: int) -> Data:
  """Digits (8x8, 1797 images) scaled to [0, 1], a stratified 75/25 split, and OOD sets."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  x = digits.data.astype(np.float32) / 16.0
  x_train, x_test, y_train, y_test = train_test_split(
      x, digits.target, test_size=0.25, random_state=seed, stratify=digits.target)
  rng = np.random.default_rng(seed)
  # Each test digit with its 64 pixels shuffled (same intensities, no digit structure), and
  # images of uniform noise.
  shuffled = np.stack([row[rng.permutation(row.size)] for row in x_test])
  noise = rng.uniform(0.0, 1.0, x_test.shape).astype(np.float32)
  as_jax = lambda a: jnp.asarray(a)
  return Data(as_jax(x_train), as_jax(y_train.astype(np.int32)), as_jax(x_test),
              as_jax(y_test.astype(np.int32)),
              {"shuffled pixels": as_jax(shuffled), "uniform noise": as_jax(noise)})


def make_model(seed: int, num_features: int):
  """Splits a fresh MLP into its graph and parameters; apply_fn(params, x) -> logits."""
  graphdef, params = nnx.split(MLP(num_features, rngs=nnx.Rngs(seed)))

  def apply_fn(params, x):
    return nnx.merge(graphdef, params)(x)

  return apply_fn, params


def train(tx: optax.GradientTransformation, apply_fn: Callable, params, data: Data,
          steps: int, seed: int, name: str):
  """A plain jitted optax loop on minibatches; returns the final params and optimizer state."""

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


def evaluate(probs: jax.Array, labels: jax.Array) -> dict:
  return {
      "accuracy": float(metrics.accuracy(probs, labels)),
      "nll": float(metrics.nll(probs, labels)),
      "ece": float(metrics.expected_calibration_error(probs, labels)),
      "brier": float(metrics.brier_score(probs, labels)),
  }


def ood_summary(prob_fn: Callable[[jax.Array], jax.Array], data: Data, in_probs) -> dict:
  """Mean predictive entropy in- and out-of-distribution, and the entropy's OOD AUROC."""
  in_entropy = metrics.predictive_entropy(in_probs)
  out = {"entropy_in": float(jnp.mean(in_entropy))}
  for name, x in data.ood.items():
    out_entropy = metrics.predictive_entropy(prob_fn(x))
    out[f"entropy[{name}]"] = float(jnp.mean(out_entropy))
    out[f"auroc[{name}]"] = float(metrics.ood_auroc(in_entropy, out_entropy))
  return out


def _reliability(probs, labels, num_bins=10):
  probs, labels = np.asarray(probs), np.asarray(labels)
  confidence, correct = probs.max(-1), probs.argmax(-1) == labels
  bins = np.clip(np.ceil(confidence * num_bins).astype(int) - 1, 0, num_bins - 1)
  centers, accs = [], []
  for b in range(num_bins):
    if np.any(bins == b):
      centers.append(confidence[bins == b].mean())
      accs.append(correct[bins == b].mean())
  return np.array(centers), np.array(accs)


def plot(path: str, data: Data, test_probs: dict, entropies: dict, examples) -> None:
  """Reliability diagram, entropy histograms (in vs OOD) and example BMA predictions."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig = plt.figure(figsize=(13, 8.5))
  grid = fig.add_gridspec(3, 6, height_ratios=[2.2, 1.0, 0.9], hspace=0.55, wspace=0.45)

  ax = fig.add_subplot(grid[0, :3])
  ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect calibration")
  for (name, probs), marker in zip(test_probs.items(), "osD"):
    conf, acc = _reliability(probs, data.y_test)
    ece = metrics.expected_calibration_error(probs, data.y_test)
    ax.plot(conf, acc, marker=marker, label=f"{name} (ECE {float(ece):.3f})")
  ax.set(xlabel="confidence (max probability)", ylabel="accuracy",
         title="Reliability on test digits (10 bins)", xlim=(0, 1.02), ylim=(0, 1.02))
  ax.legend(loc="upper left", fontsize=8)

  ax = fig.add_subplot(grid[0, 3:])
  bins = np.linspace(0.0, np.log(NUM_CLASSES), 31)
  for (name, values), color in zip(entropies.items(), ["C0", "C1", "C3"]):
    ax.hist(np.asarray(values), bins=bins, alpha=0.45, density=True, color=color, label=name)
  ax.axvline(np.log(NUM_CLASSES), color="0.5", ls=":", lw=1)
  ax.set(xlabel="predictive entropy of the EVON BMA (nats; max log 10)", ylabel="density",
         title="Uncertainty in- vs out-of-distribution")
  ax.legend(fontsize=8)

  for j, (title, image, probs) in enumerate(examples):
    ax = fig.add_subplot(grid[1, j])
    ax.imshow(np.asarray(image).reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([]), ax.set_yticks([])
    ax = fig.add_subplot(grid[2, j])
    probs = np.asarray(probs)
    ax.bar(range(NUM_CLASSES), probs, color=["C2" if k == probs.argmax() else "C7"
                                             for k in range(NUM_CLASSES)])
    ax.set(ylim=(0, 1), xticks=range(NUM_CLASSES))
    ax.tick_params(labelsize=6)
    if j == 0:
      ax.set_ylabel("BMA prob.", fontsize=8)
  fig.suptitle("evon_jax demo: EVON (SOAP-Bubble posterior) vs AdamW on digits", fontsize=12)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)


def _table(rows: dict, columns: Sequence[str], header: Sequence[str]) -> str:
  width = max(len(name) for name in rows) + 2
  lines = [" " * width + "".join(f"{h:>12}" for h in header)]
  for name, values in rows.items():
    lines.append(f"{name:<{width}}" + "".join(f"{values[c]:>12.4f}" for c in columns))
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the demo; returns {method: metrics} and the figure path under 'figure'."""
  parser = argparse.ArgumentParser(prog="python -m evon_jax.demo", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=1500, help="training steps per optimizer")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="demo_out", help="directory for the figure")
  args = parser.parse_args(argv)
  if args.steps < 2:
    parser.error("--steps must be at least 2")
  start = time.perf_counter()

  data = load_data(args.seed)
  num_train = data.x_train.shape[0]
  apply_fn, init_params = make_model(args.seed, data.x_train.shape[1])
  print(f"digits: {num_train} train / {data.x_test.shape[0]} test images; "
        f"{args.steps} steps of batch {BATCH_SIZE}", flush=True)

  adamw = optax.adamw(optax.cosine_decay_schedule(ADAMW_LR, args.steps),
                      weight_decay=ADAMW_WEIGHT_DECAY)
  adamw_params, _ = train(adamw, apply_fn, init_params, data, args.steps, args.seed, "adamw")

  evon = evon_jax.evon(
      optax.cosine_decay_schedule(EVON_LR, args.steps), ess=float(num_train),
      hess_init=EVON_HESS_INIT, weight_decay=EVON_WEIGHT_DECAY, b2=EVON_B2, key=args.seed)
  _, evon_state = train(evon, apply_fn, init_params, data, args.steps, args.seed, "evon")

  bma_key = jax.random.key(args.seed + 1)
  adamw_fn = jax.jit(lambda x: jax.nn.softmax(apply_fn(adamw_params, x), axis=-1))
  mean_fn = jax.jit(lambda x: predictive.mean_predictive(apply_fn, evon_state, x))
  # The same key for every input set: one set of BMA_SAMPLES weight samples.
  samples_fn = jax.jit(lambda x: predictive.sample_predictive(
      apply_fn, evon_state, x, bma_key, BMA_SAMPLES))
  bma_fn = lambda x: jnp.mean(samples_fn(x), axis=0)

  methods = {"AdamW": adamw_fn, "EVON mean": mean_fn,
             f"EVON BMA ({BMA_SAMPLES})": bma_fn}
  test_probs = {name: fn(data.x_test) for name, fn in methods.items()}
  results = {name: {**evaluate(probs, data.y_test), **ood_summary(fn, data, probs)}
             for (name, fn), probs in zip(methods.items(), test_probs.values())}

  ood_names = list(data.ood)
  print("\nTest digits (lower is better except accuracy):")
  print(_table(results, ["accuracy", "nll", "ece", "brier"],
               ["accuracy", "NLL", "ECE(15)", "Brier"]))
  print("\nMean predictive entropy (nats) and OOD AUROC of the entropy:")
  ood_columns = ["entropy_in"] + [f"entropy[{n}]" for n in ood_names] + [
      f"auroc[{n}]" for n in ood_names]
  print(_table(results, ood_columns,
               ["H test", "H shuffled", "H noise", "AUROC shuf", "AUROC noise"]))

  bma_name = f"EVON BMA ({BMA_SAMPLES})"
  mi_in = metrics.mutual_information(samples_fn(data.x_test))
  mi_note = ", ".join(
      f"{name} {float(jnp.mean(metrics.mutual_information(samples_fn(x)))):.4f}"
      f" (AUROC {float(metrics.ood_auroc(mi_in, metrics.mutual_information(samples_fn(x)))):.3f})"
      for name, x in data.ood.items())
  print(f"\nEVON mutual information (epistemic, nats): test {float(jnp.mean(mi_in)):.4f}; "
        f"{mi_note}")

  entropies = {"test digits": metrics.predictive_entropy(test_probs[bma_name])}
  entropies.update({name: metrics.predictive_entropy(bma_fn(x)) for name, x in data.ood.items()})
  bma_test = test_probs[bma_name]
  confidence = np.asarray(jnp.max(bma_test, axis=-1))
  correct = np.asarray(jnp.argmax(bma_test, axis=-1) == data.y_test)
  order = np.argsort(confidence)
  picks = [("confident", int(order[-1])), ("confident", int(order[-2]))]
  wrong = [i for i in order if not correct[i]]
  picks.append(("least confident", int(order[0])))
  if wrong:
    picks.append(("misclassified", int(wrong[0])))
  else:
    picks.append(("least confident", int(order[1])))
  examples = [(f"{tag}\nlabel {int(data.y_test[i])}", data.x_test[i], bma_test[i])
              for tag, i in picks]
  for name, x in data.ood.items():
    examples.append((name, x[0], bma_fn(x[:1])[0]))

  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "evon_digits_uncertainty.png")
  plot(path, data, test_probs, entropies, examples)
  elapsed = time.perf_counter() - start
  print(f"\nTotal time {elapsed:.1f} s. Figure: {os.path.abspath(path)}")
  return {**results, "figure": path, "seconds": elapsed}


if __name__ == "__main__":
  main()
