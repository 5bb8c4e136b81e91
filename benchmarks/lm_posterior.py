"""Why the posterior average does not beat the posterior mean on the LM example, and what does.

    python -m benchmarks.lm_posterior                  # ~8 min on 2 CPU cores
    python -m benchmarks.lm_posterior --steps 30 --windows 16 --quick   # smoke test

Trains `examples/train_lm.py`'s EVON (its tuned settings: lr 0.05, hess_init 0.1,
ess = training characters, kernels by EVON, the rest by AdamW) once, then reads the one
posterior out in many ways, all on the same validation windows and the same training
windows (to see the generalisation gap the posterior could close):

- the posterior mean, the BMA of S samples, and the linearised predictive;
- tempering at read-out time, `evon_jax.posterior.tempered(state, T)` (covariance × T;
  T = 1 is the Bayesian posterior at ess = N), for several T;
- which layers carry the uncertainty (T = 0 elsewhere): attention or MLP kernels only;
- S = 8 and S = 32.

For every read-out with samples it also reports the average loss of the single samples,
``E_s[L(W_s)]``: then ``BMA - mean = (E_s L - L(mean)) - (E_s L - BMA)``, the price of
evaluating perturbed weights (curvature times variance) minus the gain of averaging
diverse predictions (the Jensen gap, the predictive's mutual information). The posterior
helps only where the second outweighs the first.
Results: `benchmarks/results/lm_posterior.{json,md}`.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import evon_jax
from evon_jax import predictive

HERE = os.path.dirname(os.path.abspath(__file__))


def load_example():
  path = os.path.join(HERE, os.pardir, "examples", "train_lm.py")
  spec = importlib.util.spec_from_file_location("train_lm", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _sums(apply_fn, num_samples: int, linearized: bool, params, posterior, key, windows):
  """(Σ NLL of the BMA, Σ over samples of each sample's NLL / S) over the windows' tokens."""
  inputs, targets = windows[:, :-1], windows[:, 1:]
  if linearized:
    probs = predictive.linearized_sample_predictive(key, apply_fn, posterior, inputs,
                                                    num_samples, params=params)
  else:
    probs = predictive.sample_predictive(key, apply_fn, posterior, inputs, num_samples,
                                         params=params)
  picked = jnp.take_along_axis(probs, targets[None, ..., None], axis=-1)[..., 0]
  tiny = jnp.finfo(probs.dtype).tiny
  bma = -jnp.sum(jnp.log(jnp.maximum(jnp.mean(picked, axis=0), tiny)))
  single = -jnp.sum(jnp.log(jnp.maximum(picked, tiny))) / num_samples
  return bma, single


def posterior_losses(apply_fn, params, posterior, windows, key, num_samples, linearized,
                     batch):
  """Mean per-token (BMA NLL, average single-sample NLL) over `windows` (batches of `batch`;
  the same key, so the same S weight samples, for every batch)."""
  totals = np.zeros(2)
  assert len(windows) % batch == 0, (len(windows), batch)
  for i in range(0, len(windows), batch):
    totals += np.asarray(jax.device_get(_sums(apply_fn, num_samples, linearized, params,
                                              posterior, key, jnp.asarray(windows[i:i + batch]))))
  tokens = len(windows) * (windows.shape[1] - 1)
  return totals / tokens


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--windows", type=int, default=512,
                      help="validation (and training) windows evaluated, a multiple of --batch")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--quick", action="store_true", help="few read-outs (smoke test)")
  parser.add_argument("--out", default=os.path.join(HERE, "results"))
  args = parser.parse_args(argv)
  start = time.time()
  lm = load_example()
  lm_args = lm.build_parser().parse_args(
      ["--optimizer", "evon", "--steps", str(args.steps), "--seed", str(args.seed), "--quiet"])
  corpus = lm.load_corpus(None)
  apply_fn, init_params = lm.make_model(lm_args, len(corpus.vocab))
  tx, settings = lm.make_optimizer(lm_args, len(corpus.train))
  params, opt_state, losses, train_seconds = lm.train(lm_args, tx, apply_fn, init_params,
                                                      corpus, progress=False)
  mean = lm.posterior_mean("evon", params, opt_state)
  if args.windows % args.batch:
    parser.error("--windows must be a multiple of --batch")
  train_windows = lm._windows(corpus.train, lm_args.seq_len)
  sets = {"val": lm._windows(corpus.val, lm_args.seq_len)[:args.windows],
          # training windows spread evenly over the whole training text
          "train": train_windows[::max(1, len(train_windows) // args.windows)][:args.windows]}
  state = evon_jax.posterior.bubble(opt_state)
  names = [lm._path_name(p) for p, _ in jax.tree.flatten_with_path(
      state.mean, is_leaf=lambda x: isinstance(x, optax.MaskedNode))[0]]
  print(f"trained {args.steps} steps in {train_seconds:.0f} s; EVON leaves: "
        f"{[n for n, l in zip(names, jax.tree.leaves(state.mean, is_leaf=lambda x: isinstance(x, optax.MaskedNode))) if not isinstance(l, optax.MaskedNode)]}",
        flush=True)

  def only(word):
    return lambda path, leaf: 1.0 if word in lm._path_name(path) else 0.0

  temperatures = (1.0, 16.0) if args.quick else (1.0, 4.0, 16.0, 64.0, 256.0)
  readouts = [("sample", 8, t, "all") for t in temperatures]
  if not args.quick:
    readouts += [("sample", 32, 1.0, "all"), ("sample", 32, 16.0, "all"),
                 ("linearized", 8, 1.0, "all"), ("linearized", 8, 16.0, "all"),
                 ("linearized", 8, 64.0, "all"),
                 ("sample", 8, 16.0, "attn"), ("sample", 8, 16.0, "fc")]
  rows = []
  mean_loss = {k: lm.evaluate(apply_fn, mean, w, args.batch) for k, w in sets.items()}
  print(f"mean: val {mean_loss['val']:.4f} train {mean_loss['train']:.4f}", flush=True)
  for kind, samples, temperature, layers in readouts:
    scale = temperature if layers == "all" else (
        lambda path, leaf, w=layers, t=temperature: t * only(w)(path, leaf))
    posterior = evon_jax.posterior.tempered(state, scale)
    row = {"predictive": kind, "samples": samples, "temperature": temperature,
           "layers": layers}
    for split, windows in sets.items():
      bma, single = posterior_losses(apply_fn, params, posterior, windows,
                                     jax.random.key(args.seed + 2), samples,
                                     kind == "linearized", args.batch)
      row[split] = {"bma": float(bma), "single": float(single),
                    "bma_minus_mean": float(bma - mean_loss[split]),
                    "perturbation_cost": float(single - mean_loss[split]),
                    "averaging_gain": float(single - bma)}
    rows.append(row)  # (train: same windows as the mean's loss above)
    print(f"{kind:10s} S={samples:2d} T={temperature:6.1f} {layers:4s}: val BMA "
          f"{row['val']['bma']:.4f} (BMA-mean {row['val']['bma_minus_mean']:+.4f}: cost "
          f"{row['val']['perturbation_cost']:+.4f} gain {row['val']['averaging_gain']:+.4f})"
          f"  train BMA-mean {row['train']['bma_minus_mean']:+.4f}", flush=True)
  width = lm._relative_width(opt_state)
  result = {"steps": args.steps, "seed": args.seed, "windows": args.windows,
            "train_seconds": train_seconds, "seconds": time.time() - start,
            "settings": settings, "mean": mean_loss, "relative_stddev": width,
            "train_loss_last_50": float(np.mean(losses[-50:])), "readouts": rows,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(start))}
  if not args.quick:
    with open(os.path.join(args.out, "lm_posterior.json"), "w") as f:
      json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "lm_posterior.md"), "w") as f:
      f.write(markdown(result))
  return result


def markdown(result) -> str:
  lines = [
      "# LM example: posterior mean vs BMA vs linearised, tempering and layers",
      "", f"    python -m benchmarks.lm_posterior   # {result['date']}, "
      f"{result['seconds']:.0f} s", "",
      f"EVON, {result['steps']} steps, seed {result['seed']}, the example's tuned settings; "
      f"{result['windows']} validation and {result['windows']} training windows of 64 "
      f"characters. Posterior mean: val {result['mean']['val']:.4f}, train "
      f"{result['mean']['train']:.4f} nats/char; relative posterior std "
      f"{result['relative_stddev']:.4f}.", "",
      "T: read-out temperature (`posterior.tempered`, covariance × T). cost = E_s L(W_s) − "
      "L(mean), gain = E_s L(W_s) − L(BMA); BMA − mean = cost − gain.", "",
      "| predictive | S | T | layers | val BMA | val BMA − mean | val cost | val gain | "
      "train BMA − mean |", "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
  for r in result["readouts"]:
    v, t = r["val"], r["train"]
    lines.append(f"| {r['predictive']} | {r['samples']} | {r['temperature']:g} | "
                 f"{r['layers']} | {v['bma']:.4f} | {v['bma_minus_mean']:+.4f} | "
                 f"{v['perturbation_cost']:+.4f} | {v['averaging_gain']:+.4f} | "
                 f"{t['bma_minus_mean']:+.4f} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
