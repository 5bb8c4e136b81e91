"""One comparison of the structured posteriors in evon_jax, side by side with SOAP-Bubbles.

    python -m benchmarks.posteriors                    # moons, mnist1d, digits (~25 min, 2 CPUs)
    python -m benchmarks.posteriors --quick --out DIR  # smoke test at tiny sizes

Needs the ``examples`` extra (mnist1d, scikit-learn, matplotlib, scipy). Protocol, data,
model, OOD sets and the metrics are those of ``examples/classify.py`` (its docstring):
a GELU MLP trained on classes 0-7 of MNIST-1D and of scikit-learn's digits, OOD = the unseen
classes 8-9 and feature-shuffled test inputs; plus the 2-D toy ``moons`` (scikit-learn's two
moons, OOD = points on a circle of radius 3 around the data, where no training point lies).

Methods (same model and number of minibatch steps; settings from `method_settings`):

* ``MAP``: AdamW; ``deep ensemble``: 5 MAP networks;
* ``IVON`` / ``EVON`` (drop-in, BMA of posterior samples): diagonal Gaussian / SOAP-Bubble;
* ``Laplace``: post-hoc SOAP-Bubble on the MAP network (`evon_jax.laplace`: Kronecker
  eigenbases of the exact GGN's pseudo-gradients, GGN diagonal in that basis), prior
  precision tuned by the Laplace marginal likelihood; linearised and sampled predictives;
* ``Laplace (val λ)``: the same on a MAP trained on 85% of the training set, λ chosen by the
  NLL of the other 15%, separately for the sampled and the linearised predictive;
* ``low-rank``: every layer W = A Bᵀ of rank r (`evon_jax.lowrank`), posterior on the factors,
  trained with IVON, with EVON (both at a third of their dense learning rates) and with
  mean-field VI (Bayes by backprop, scale-mixture prior; `evon_jax.meanfield`);
* ``VIKING`` (`evon_jax.viking`): N(θ̂, σ²_ker P_ker + σ²_im P_im) over the kernel/image of
  the Jacobian of the (per-example centred) logits on a fixed random subset of 64 training
  inputs, mean and both scales trained by Adam on the ELBO (prior N(0, I), Hutchinson rank,
  30 CG iterations per projection).

Reported per predictive: accuracy, NLL, ECE, OOD AUROC (predictive entropy), parameters (floats
of one network, and floats the posterior stores), training time (compiled run, compilation
excluded; post-hoc Laplace = MAP's time plus its fit). One table (``posteriors.md``), one figure
(``posteriors.png``), and the raw numbers (``posteriors.json``) in ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import evon_jax
from evon_jax._progress import progress
from evon_jax.lowrank import num_parameters as _num_entries

_CLASSIFY = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "classify.py")


def load_classify():
  """examples/classify.py as a module (data, MLP, training loop, metrics)."""
  spec = importlib.util.spec_from_file_location("examples_classify", _CLASSIFY)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


classify = load_classify()
NUM_SAMPLES = classify.NUM_SAMPLES

# Per dataset: hidden width, steps, the low-rank layers' rank.
CONFIGS = {
    "moons": {"hidden": 64, "steps": 1500, "rank": 4},
    "mnist1d": {"hidden": 256, "steps": 2500, "rank": 16},
    "digits": {"hidden": 128, "steps": 1500, "rank": 8},
}
QUICK = {"hidden": 16, "steps": 60, "rank": 2, "max_train": 256}

# MAP/IVON/EVON: classify.py's tuned settings (moons: the digits ones). The new methods use one
# setting each across datasets (no per-dataset search: a fair but untuned baseline for them).
LOW_RANK_MFVI = {"lr": 3e-3, "init_std": 1e-3, "beta": 1.0}
VIKING = {"lr": 3e-3, "sigma_ker": 0.1, "sigma_im": 0.01, "prior_precision": 1.0,
          "projection_inputs": 64, "cg_iterations": 30}
LAPLACE_GRID = np.logspace(-3, 5, 33)


def low_rank(setting: dict) -> dict:
  """IVON/EVON on the factors A, B: the dense network's setting at a third of the learning
  rate (at the full rate IVON diverged on digits: W = A Bᵀ squares the step's effect)."""
  return dict(setting, lr=setting["lr"] / 3)


def method_settings(dataset: str) -> dict:
  tuned = classify.TUNED["digits" if dataset == "moons" else dataset]
  return {"MAP": tuned["MAP"], "ensemble": tuned["MAP"], "Laplace": tuned["MAP"],
          "Laplace (val λ)": tuned["MAP"],
          "IVON": tuned["IVON"],
          "EVON": tuned["EVON"], "low-rank IVON": low_rank(tuned["IVON"]),
          "low-rank EVON": low_rank(tuned["EVON"]),
          "low-rank MFVI": LOW_RANK_MFVI, "VIKING": VIKING}


# ----------------------------------------------------------------------------------- data


def load_moons(seed: int = 0, num_train: int = 400, num_test: int = 1000) -> "classify.Data":
  """Two moons (noise 0.15); OOD: 500 points on the circle of radius 3 around the data mean."""
  from sklearn.datasets import make_moons

  x_train, y_train = make_moons(num_train, noise=0.15, random_state=seed)
  x_test, y_test = make_moons(num_test, noise=0.15, random_state=seed + 1)
  center = x_train.mean(0)
  angles = np.random.default_rng(seed).uniform(0, 2 * np.pi, 500)
  ring = center[None, :] + 3.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
  f32 = lambda a: np.asarray(a, np.float32)
  return classify.Data(f32(x_train), y_train.astype(np.int32), f32(x_test),
                       y_test.astype(np.int32), {"far": f32(ring)})


def load(dataset: str, seed: int, max_train: int | None):
  if dataset == "moons":
    return load_moons(seed, num_train=max_train or 400)
  return classify.load_data(dataset, seed, max_train)


# ------------------------------------------------------------------------------- methods


def _posterior_floats(state) -> int:
  """Floats an EVON/IVON/Laplace posterior needs: mean, H and the bases of rotated axes."""
  bases = evon_jax.posterior.bases(state)  # identity axes are None: nothing stored
  state = evon_jax.posterior.bubble(state)
  return sum(_num_entries(tree) for tree in (state.mean, state.hessian, bases))


class Fit(dict):
  """{predictive name: predictor} plus the fit's bookkeeping."""

  def __init__(self, predictors: dict, *, weights: int, posterior_floats: int,
               train_s: float, compile_s: float, extra: dict | None = None):
    super().__init__(predictors)
    self.info = {"weights": weights, "posterior_floats": posterior_floats,
                 "train_s": train_s, "compile_s": compile_s, **(extra or {})}


def _timed(timings: list) -> tuple[float, float]:
  return (sum(t["train_s"] for t in timings), sum(t["compile_s"] for t in timings))


def fit_existing(method: str, setting: dict, data, config: dict, seed: int) -> Fit:
  """MAP, deep ensemble, IVON, EVON through classify.fit_method (BMA for IVON/EVON)."""
  timings = []
  predictors = classify.fit_method(method, setting, data, config["hidden"], config["steps"],
                                   seed, timings)
  if method in ("IVON", "EVON"):
    predictors = {f"{method} BMA": predictors[f"{method} BMA"]}
  sizes = (data.x_train.shape[1], config["hidden"], config["hidden"], classify.num_classes(data))
  weights = sum(a * b + b for a, b in zip(sizes, sizes[1:]))
  floats = {"MAP": weights, "ensemble": classify.ENSEMBLE_SIZE * weights,
            "IVON": 2 * weights}.get(method)
  if method == "EVON":
    floats = 2 * weights + sum(a * a + b * b for a, b in zip(sizes, sizes[1:]))
  train_s, compile_s = _timed(timings)
  return Fit(predictors, weights=weights, posterior_floats=floats, train_s=train_s,
             compile_s=compile_s)


FITTERS: dict[str, Callable] = {}


def _fitter(name):
  def register(fn):
    FITTERS[name] = fn
    return fn
  return register


for _name in ("MAP", "ensemble", "IVON", "EVON"):
  FITTERS[_name] = (lambda name: lambda setting, data, config, seed: fit_existing(
      name, setting, data, config, seed))(_name)


def _keys(seed: int):
  """The keys classify.fit_method uses (init, train, test-time samples): the MAP trained here
  is the MAP row's network."""
  return jax.random.split(jax.random.key(seed), 3)


def _sizes(data, config) -> tuple:
  return (data.x_train.shape[1], config["hidden"], config["hidden"], classify.num_classes(data))


@_fitter("Laplace")
def fit_laplace(setting, data, config, seed) -> Fit:
  """Post-hoc SOAP-Bubble Laplace on the MAP network; λ by the Laplace evidence."""
  from evon_jax import laplace

  init_key, train_key, sample_key = _keys(seed)
  steps, timings = config["steps"], []
  map_params, _ = classify.train(classify._adamw(setting, steps),
                                 classify.init_mlp(init_key, _sizes(data, config)),
                                 data.x_train, data.y_train, steps, train_key, timings=timings)
  train_s, compile_s = _timed(timings)
  start = time.perf_counter()
  train_set = (data.x_train, data.y_train)
  state = laplace.fit(classify.apply_fn, map_params, train_set, likelihood="classification")
  log_lik = laplace.log_likelihood(classify.apply_fn, map_params, train_set,
                                   likelihood="classification")
  state, search = laplace.tune_prior_precision(state, method="marglik", log_likelihood=log_lik,
                                               grid=LAPLACE_GRID)
  jax.block_until_ready(state)
  fit_s = time.perf_counter() - start
  weights = _num_entries(map_params)
  return Fit(classify.posterior_predictors("Laplace", classify.apply_fn, state, sample_key),
             weights=weights, posterior_floats=_posterior_floats(state),
             train_s=train_s + fit_s, compile_s=compile_s,
             extra={"laplace_fit_s": fit_s, "prior_precision": float(search.prior_precision)})


@_fitter("Laplace (val λ)")
def fit_laplace_validation(setting, data, config, seed) -> Fit:
  """Post-hoc SOAP-Bubble Laplace with λ chosen by validation NLL, separately for the sampled
  and the linearised predictive: the MAP network and the Laplace fit use 85% of the training
  set, the other 15% scores each λ of the grid (`laplace.tune_prior_precision(method='nll')`)."""
  from evon_jax import laplace

  init_key, train_key, sample_key = _keys(seed)
  split = classify.split_validation(data, seed)
  steps, timings = config["steps"], []
  map_params, _ = classify.train(classify._adamw(setting, steps),
                                 classify.init_mlp(init_key, _sizes(data, config)),
                                 split.x_train, split.y_train, steps, train_key,
                                 timings=timings)
  train_s, compile_s = _timed(timings)
  start = time.perf_counter()
  state = laplace.fit(classify.apply_fn, map_params, (split.x_train, split.y_train),
                      likelihood="classification")
  tuned, chosen = {}, {}
  for kind in ("sampled", "linearized"):
    tuned[kind], search = laplace.tune_prior_precision(
        state, method="nll", apply_fn=classify.apply_fn,
        validation=(jnp.asarray(split.x_test), jnp.asarray(split.y_test)), grid=LAPLACE_GRID,
        key=sample_key, num_samples=NUM_SAMPLES, predictive_kind=kind)
    chosen[kind] = float(search.prior_precision)
  jax.block_until_ready(tuned)
  fit_s = time.perf_counter() - start
  name = "Laplace (val λ)"
  predictors = {
      f"{name} BMA": classify.posterior_predictors(
          name, classify.apply_fn, tuned["sampled"], sample_key)[f"{name} BMA"],
      f"{name} linearised": classify.posterior_predictors(
          name, classify.apply_fn, tuned["linearized"], sample_key)[f"{name} linearised"]}
  return Fit(predictors, weights=_num_entries(map_params),
             posterior_floats=_posterior_floats(state), train_s=train_s + fit_s,
             compile_s=compile_s,
             extra={"laplace_fit_s": fit_s, "prior_precision_sampled": chosen["sampled"],
                    "prior_precision_linearised": chosen["linearized"]})


def _low_rank_params(data, config, seed):
  from evon_jax import lowrank

  init_key, train_key, sample_key = _keys(seed)
  return lowrank.init_low_rank_mlp(init_key, _sizes(data, config), config["rank"]), train_key, \
      sample_key


def _fit_low_rank_variational(method: str, make_optimizer) -> Callable:
  def fit(setting, data, config, seed) -> Fit:
    """Every layer W = A Bᵀ; IVON's diagonal Gaussian or EVON's SOAP-Bubble on the factors."""
    from evon_jax import lowrank

    params, train_key, sample_key = _low_rank_params(data, config, seed)
    timings = []
    tx = make_optimizer(setting, config["steps"], data.x_train.shape[0], seed)
    _, state = classify.train(tx, params, data.x_train, data.y_train, config["steps"],
                              train_key,
                              loss_fn=classify.cross_entropy_loss(model=lowrank.low_rank_mlp),
                              timings=timings)
    train_s, compile_s = _timed(timings)
    name = f"low-rank {method} BMA"
    predictor = classify.posterior_predictors(
        f"low-rank {method}", lowrank.low_rank_mlp, state, sample_key)[name]
    return Fit({name: predictor}, weights=_num_entries(params),
               posterior_floats=_posterior_floats(state), train_s=train_s,
               compile_s=compile_s)
  return fit


FITTERS["low-rank IVON"] = _fit_low_rank_variational("IVON", classify._ivon)
FITTERS["low-rank EVON"] = _fit_low_rank_variational("EVON", classify._evon)


@_fitter("low-rank MFVI")
def fit_low_rank_mfvi(setting, data, config, seed) -> Fit:
  """Every layer W = A Bᵀ; mean-field Gaussian VI (Bayes by backprop) on the factors with
  the scale-mixture prior, Adam on the reparameterised ELBO."""
  from evon_jax import lowrank, meanfield

  params, train_key, sample_key = _low_rank_params(data, config, seed)
  num_data = data.x_train.shape[0]
  prior = meanfield.ScaleMixturePrior()

  def nll(p, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(lowrank.low_rank_mlp(p, x), y).mean()

  def loss(q, x, y, key):
    return meanfield.elbo_loss(key, nll, q, (x, y), num_data=num_data, prior=prior,
                               beta=setting["beta"])

  timings = []
  tx = optax.adam(optax.cosine_decay_schedule(setting["lr"], config["steps"]))
  q, _ = classify.train(tx, meanfield.init(params, setting["init_std"]), data.x_train,
                        data.y_train, config["steps"], train_key, loss_fn=loss, timings=timings)
  train_s, compile_s = _timed(timings)
  predictor = classify.averaging_predictor(lambda x: meanfield.sample_predictive(
      sample_key, lowrank.low_rank_mlp, q, x, NUM_SAMPLES))
  return Fit({"low-rank MFVI BMA": predictor}, weights=_num_entries(params),
             posterior_floats=_num_entries(q), train_s=train_s, compile_s=compile_s)


@_fitter("VIKING")
def fit_viking(setting, data, config, seed) -> Fit:
  """VIKING on the full MLP: ELBO-trained mean and kernel/image scales; the subspaces are
  those of a fixed random subset of the training inputs (training and prediction alike)."""
  from evon_jax import viking

  init_key, train_key, sample_key = _keys(seed)
  params = classify.init_mlp(init_key, _sizes(data, config))
  num_data = data.x_train.shape[0]
  subset = np.random.default_rng(seed).permutation(num_data)[:setting["projection_inputs"]]
  projection_inputs = jnp.asarray(data.x_train[subset])
  options = {"solver": "cg", "maxiter": setting["cg_iterations"], "center_outputs": True}

  def nll(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def loss(q, x, y, key):
    return viking.elbo_loss(key, nll, classify.apply_fn, q, (x, y), num_data=num_data,
                            prior_precision=setting["prior_precision"],
                            projection_inputs=projection_inputs, **options)

  timings = []
  tx = optax.adam(optax.cosine_decay_schedule(setting["lr"], config["steps"]))
  q, _ = classify.train(tx, viking.init(params, sigma_ker=setting["sigma_ker"],
                                        sigma_im=setting["sigma_im"]),
                        data.x_train, data.y_train, config["steps"], train_key, loss_fn=loss,
                        timings=timings)
  train_s, compile_s = _timed(timings)
  predictor = classify.averaging_predictor(lambda x: viking.sample_predictive(
      sample_key, classify.apply_fn, q, projection_inputs, x, NUM_SAMPLES, **options))
  return Fit({"VIKING BMA": predictor}, weights=_num_entries(params),
             posterior_floats=_num_entries(q),
             train_s=train_s, compile_s=compile_s,
             extra={"sigma_ker": float(jnp.exp(q.log_sigma_ker)),
                    "sigma_im": float(jnp.exp(q.log_sigma_im))})


# ----------------------------------------------------------------------------- running


def run_dataset(dataset: str, seed: int = 0, quick: bool = False, methods=None,
                log=print) -> dict:
  config = dict(CONFIGS[dataset])
  max_train = None
  if quick:
    config.update({k: v for k, v in QUICK.items() if k != "max_train"})
    max_train = QUICK["max_train"]
  data = load(dataset, seed, max_train)
  settings = method_settings(dataset)
  methods = methods or list(FITTERS)
  log(f"{dataset}: {data.x_train.shape[0]} train / {data.x_test.shape[0]} test, OOD "
      + ", ".join(f"{k} {v.shape[0]}" for k, v in data.ood.items())
      + f"; hidden {config['hidden']}, {config['steps']} steps, rank {config['rank']}")
  results, info, probs, predictors_kept = {}, {}, {}, {}
  for method in progress(methods, f"{dataset}: fitting"):
    start = time.perf_counter()
    fit = FITTERS[method](settings.get(method, {}), data, config, seed)
    for name, predictor in fit.items():
      results[name], probs[name] = classify.evaluate(predictor, data)
      info[name] = {"method": method, **fit.info}
      if data.x_train.shape[1] == 2:  # the 2-D toy: keep predictors for the figure's maps
        predictors_kept[name] = predictor
    log(f"  {method}: " + "; ".join(
        f"{name} acc {results[name]['accuracy']:.3f} NLL {results[name]['nll']:.3f}"
        for name in fit) + f" (train {fit.info['train_s']:.1f} s, total "
        f"{time.perf_counter() - start:.1f} s)")
  return {"dataset": dataset, "seed": seed, "config": config, "settings": settings,
          "num_train": int(data.x_train.shape[0]), "results": results, "info": info,
          "_data": data, "_predictors": predictors_kept}


def main(argv: Sequence[str] | None = None) -> dict:
  import scipy.linalg  # noqa: F401  (loads the OpenBLAS behind JAX's CPU eigh/qr)
  from threadpoolctl import threadpool_limits

  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--datasets", default="moons,mnist1d,digits")
  parser.add_argument("--methods", default=None, help="comma-separated subset of FITTERS")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
  args = parser.parse_args(argv)
  methods = args.methods.split(",") if args.methods else None
  start = time.perf_counter()
  runs = []
  with threadpool_limits(limits=1, user_api="blas"):
    for dataset in args.datasets.split(","):
      runs.append(run_dataset(dataset, args.seed, args.quick, methods,
                              log=lambda s: print(s, flush=True)))
  command = " ".join(["python -m benchmarks.posteriors"] + list(
      sys.argv[1:] if argv is None else argv))
  out = {"command": command, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
         f"jax {jax.__version__}", "total_seconds": time.perf_counter() - start,
         "runs": runs}
  write_outputs(out, args.out)
  return out


# ------------------------------------------------------------------------------- outputs

COLUMNS = [("accuracy", "acc ↑"), ("nll", "NLL ↓"), ("ece", "ECE ↓")]


def _auroc_columns(run: dict) -> list:
  names = list(run["_data"].ood) if "_data" in run else sorted(
      {k[len("auroc["):-len(", entropy]")] for r in run["results"].values() for k in r
       if k.startswith("auroc[") and k.endswith(", entropy]")})
  return [(f"auroc[{name}, entropy]", f"AUROC {name} ↑") for name in names]


def table_markdown(out: dict) -> str:
  lines = [
      "# Posteriors side by side", "",
      f"Command: `{out['command']}` ({out['machine']}; {out['total_seconds'] / 60:.0f} min "
      "in all). Protocol: `benchmarks/posteriors.py` docstring. Single seed: differences in "
      "the second decimal of NLL are within run-to-run noise. OOD AUROC scores by predictive "
      "entropy. *weights*: floats of one network; *posterior*: floats the method stores for "
      "prediction; *train s*: the compiled training run (compilation excluded; Laplace adds "
      "its post-hoc fit to the MAP run).", ""]
  for run in out["runs"]:
    cfg = run["config"]
    aurocs = _auroc_columns(run)
    cols = COLUMNS + aurocs
    lines += [f"## {run['dataset']}", "",
              f"MLP hidden {cfg['hidden']}-{cfg['hidden']}, {cfg['steps']} steps of batch "
              f"{classify.BATCH_SIZE}, {run['num_train']} training inputs, low-rank rank "
              f"{cfg['rank']}, {NUM_SAMPLES} test-time samples.", "",
              "| predictive | " + " | ".join(h for _, h in cols)
              + " | weights | posterior | train s |",
              "| --- |" + " ---: |" * (len(cols) + 3)]
    for name, r in run["results"].items():
      i = run["info"][name]
      cells = [f"{r[k]:.3f}" if k in r else "–" for k, _ in cols]
      cells += [f"{i['weights']:,}", f"{i['posterior_floats']:,}", f"{i['train_s']:.1f}"]
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
    fitted = {}
    for name, i in run["info"].items():
      for key, value in i.items():
        if key.startswith(("prior_precision", "sigma_")):
          fitted[f"{i['method']} {key}"] = value
    if fitted:
      lines += ["", "Fitted: " + ", ".join(f"{k} = {v:.3g}" for k, v in fitted.items()) + "."]
    lines.append("")
  return "\n".join(lines)


def _method_colors(names):
  methods = sorted({n.split(" BMA")[0].split(" linearised")[0].split(" sampled")[0]
                    for n in names})
  return {m: f"C{i % 10}" for i, m in enumerate(methods)}


def plot(out: dict, path: str) -> None:
  """Top: the 2-D toy's predictive entropy maps. Bottom: per dataset, test NLL against OOD
  AUROC for every predictive."""
  from matplotlib.figure import Figure  # Agg canvas, no pyplot global state

  toy = next((r for r in out["runs"] if r.get("_predictors")), None)
  names = list(toy["_predictors"]) if toy else []
  cols = 5
  map_rows = -(-len(names) // cols)
  rows = map_rows + 1
  fig = Figure(figsize=(3.2 * cols, 3.0 * rows))
  if toy:
    data = toy["_data"]
    lo, hi = data.x_train.min(0) - 2.5, data.x_train.max(0) + 2.5
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 120), np.linspace(lo[1], hi[1], 120))
    grid = jnp.asarray(np.stack([gx.ravel(), gy.ravel()], 1).astype(np.float32))
    for i, name in enumerate(names):
      probs, _ = toy["_predictors"][name](grid)
      entropy = np.asarray(evon_jax.metrics.predictive_entropy(probs)).reshape(gx.shape)
      ax = fig.add_subplot(rows, cols, i + 1)
      # Binary task: entropy in [0, log 2]; clip the float rounding above log 2.
      ax.contourf(gx, gy, np.clip(entropy, 0.0, np.log(2)),
                  levels=np.linspace(0, np.log(2) + 1e-6, 11), cmap="viridis")
      ax.scatter(*data.x_train.T, c=data.y_train, cmap="coolwarm", s=3, lw=0)
      ax.set_title(f"{name}\nNLL {toy['results'][name]['nll']:.3f}", fontsize=8)
      ax.set_xticks([])
      ax.set_yticks([])
  colors = _method_colors([n for r in out["runs"] for n in r["results"]])
  for j, run in enumerate(out["runs"][:cols]):
    ax = fig.add_subplot(rows, cols, map_rows * cols + j + 1)
    key, label = _auroc_columns(run)[0]
    for name, r in run["results"].items():
      method = name.split(" BMA")[0].split(" linearised")[0].split(" sampled")[0]
      marker = "s" if "linearised" in name else ("^" if "sampled" in name else "o")
      ax.scatter(r["nll"], r[key], color=colors[method], marker=marker, s=30,
                 label=name if j == 0 else None)
    ax.set_xlabel("test NLL ↓", fontsize=8)
    ax.set_ylabel(label, fontsize=8)
    ax.set_title(run["dataset"], fontsize=9)
    ax.tick_params(labelsize=7)
  if out["runs"]:
    handles, labels = [], []
    for run in out["runs"]:
      for name in run["results"]:
        if name not in labels:
          method = name.split(" BMA")[0].split(" linearised")[0].split(" sampled")[0]
          marker = "s" if "linearised" in name else ("^" if "sampled" in name else "o")
          handles.append(fig.axes[0].scatter([], [], color=colors[method], marker=marker))
          labels.append(name)
    fig.legend(handles, labels, loc="lower right", fontsize=7, ncol=2)
  fig.suptitle("Structured posteriors: predictive entropy on two moons (top: dark = "
               "confident, yellow = log 2; dots: training inputs) and NLL vs OOD AUROC per dataset (bottom)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=90)


def write_outputs(out: dict, directory: str) -> dict:
  os.makedirs(directory, exist_ok=True)
  paths = {k: os.path.join(directory, f"posteriors.{k}") for k in ("json", "md", "png")}
  with open(paths["json"], "w") as f:
    json.dump({**out, "runs": [{k: v for k, v in r.items() if not k.startswith("_")}
                               for r in out["runs"]]}, f, indent=1)
  with open(paths["md"], "w") as f:
    f.write(table_markdown(out))
  plot(out, paths["png"])
  print("wrote " + ", ".join(paths.values()), flush=True)
  return paths


if __name__ == "__main__":
  main()
