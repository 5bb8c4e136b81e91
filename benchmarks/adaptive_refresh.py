"""The adaptive refresh criterion against a fixed refresh period, on the LM example.

    python -m benchmarks.adaptive_refresh                  # markdown table to stdout
    python -m benchmarks.adaptive_refresh --steps 400 --json out.json

SOAP with the NVIDIA reference's names (`evon_jax.soap(lr=..., ...)`, betas (0.95, 0.95),
shampoo_beta 0.95, weight decay 0.1, the LM example's schedule and partition: SOAP on the
attention/MLP kernels, AdamW on the rest), once with a fixed refresh every 10 steps and
once per tolerance with `use_adaptive_criteria=True` checked every step (frequency 1): a
side is refreshed only when ‖diag(QᵀFQ)‖ < (1 - tol) ‖F‖_F on some side of the leaf.
Reported per variant: refreshes per leaf, validation loss of the final weights, and the mean
step time as a ratio to the fixed period's, from interleaved timing rounds in this one run
(the first call, which compiles, is not timed).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
import optax

import evon_jax
from benchmarks.lm_posterior import load_example
from evon_jax.transforms.refresh import EigenbasisRefreshState


def _refresh_states(state):
  is_refresh = lambda x: isinstance(x, EigenbasisRefreshState)
  return [x for x in jax.tree.leaves(state, is_leaf=is_refresh) if is_refresh(x)]


def _bases_changed(old, new):
  """How many leaves' bases changed in this step (any side)."""
  count = 0
  for a, b in zip(_refresh_states(old), _refresh_states(new)):
    per_slot = [[jax.numpy.any(x != y) for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb))]
                for sa, sb in zip(a.bases, b.bases)]
    for flags in zip(*per_slot):  # one leaf: changed if any of its slots did
      count = count + jax.numpy.any(jax.numpy.stack(flags)).astype(np.int32)
  return count


def _leaves_with_bases(state) -> int:
  first_slot = _refresh_states(state)[0].bases[0]
  return sum(1 for x in jax.tree.leaves(first_slot) if np.ndim(x) >= 2)


def variants(tolerances, fixed=(10, 1), check_every=(1,)):
  """The fixed periods (10 first: the ratios' base), then the adaptive criterion for each
  (check period, tolerance)."""
  out = {f"fixed T={t}": dict(precondition_frequency=t) for t in fixed}
  for every in check_every:
    for tol in tolerances:
      out[f"adaptive tol={tol:g}, checked every {every}"] = dict(
          precondition_frequency=every, use_adaptive_criteria=True,
          adaptive_update_tolerance=tol)
  return out


def make_tx(lm, args, options):
  main = evon_jax.soap(lr=lm.schedule(1e-2, args.steps, args.warmup), betas=(0.95, 0.95),
                       shampoo_beta=0.95, weight_decay=0.1, **options)
  return optax.partition({"main": main, "adamw": lm.make_adamw(3e-3, args.steps, args)},
                         lambda p: lm.param_labels(p, "hidden"))


def run(steps: int, tolerances, timing_steps: int, rounds: int, seed: int = 0, fixed=(10, 1),
        check_every=(1,)):
  lm = load_example()
  args = lm.build_parser().parse_args(["--steps", str(steps), "--seed", str(seed)])
  corpus = lm.load_corpus()
  apply_fn, init_params = lm.make_model(args, len(corpus.vocab))
  val = lm._windows(corpus.val, args.seq_len)[:512]
  train_tokens = jax.numpy.asarray(corpus.train)
  offsets = jax.numpy.arange(args.seq_len + 1)

  def loss_fn(params, batch):
    logits = apply_fn(params, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

  def make_step(tx):
    @jax.jit
    def step(params, opt_state, key):
      starts = jax.random.randint(key, (args.batch_size, 1), 0,
                                  train_tokens.shape[0] - args.seq_len - 1)
      batch = train_tokens[starts + offsets[None, :]]
      grads = jax.grad(loss_fn)(params, batch)
      updates, new_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), new_state,
              _bases_changed(opt_state, new_state))
    return step

  keys = jax.random.split(jax.random.key(seed + 1), steps)
  results, runners = {}, {}
  for name, options in variants(tolerances, fixed, check_every).items():
    tx = make_tx(lm, args, options)
    step = make_step(tx)
    params, state = init_params, tx.init(init_params)
    refreshes = 0
    for t in range(steps):
      params, state, changed = step(params, state, keys[t])
      refreshes += int(changed)
    results[name] = {"refreshes_per_leaf": refreshes / _leaves_with_bases(state),
                     "val_loss": lm.evaluate(apply_fn, params, val, args.eval_batch),
                     "options": {k: v for k, v in options.items()}}
    runners[name] = (step, params, state)

  # Interleaved timing rounds, continuing each run from where it ended.
  times = {name: [] for name in runners}
  for _ in range(rounds):
    for name, (step, params, state) in runners.items():
      start = time.perf_counter()
      for t in range(timing_steps):
        params, state, changed = step(params, state, keys[t % steps])
      jax.block_until_ready(params)
      times[name].append((time.perf_counter() - start) / timing_steps)
      runners[name] = (step, params, state)
  base = min(times[next(iter(times))])
  for name in results:
    results[name]["step_ms"] = 1e3 * min(times[name])
    results[name]["step_time_ratio"] = min(times[name]) / base
  return {"steps": steps, "timing_steps": timing_steps, "rounds": rounds,
          "leaves_note": "leaves with a basis: the 8 attention/MLP kernels",
          "variants": results, "jax": jax.__version__}


def markdown(record) -> str:
  lines = [f"SOAP (reference names) on the LM example, {record['steps']} steps; step time: "
           f"min over {record['rounds']} interleaved rounds of {record['timing_steps']} steps.",
           "", "| variant | refreshes per leaf | val loss | step ms | step time / first row |",
           "| --- | --- | --- | --- | --- |"]
  for name, r in record["variants"].items():
    lines.append(f"| {name} | {r['refreshes_per_leaf']:.1f} | {r['val_loss']:.4f} | "
                 f"{r['step_ms']:.1f} | {r['step_time_ratio']:.2f} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--tolerances", type=float, nargs="+", default=[1e-3, 1e-2])
  parser.add_argument("--fixed", type=int, nargs="+", default=[10, 1],
                      help="fixed refresh periods (the first is the ratios' base)")
  parser.add_argument("--check-every", type=int, nargs="+", default=[1],
                      help="periods at which the adaptive criterion is checked")
  parser.add_argument("--timing-steps", type=int, default=60)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  record = run(args.steps, args.tolerances, args.timing_steps, args.rounds,
               fixed=tuple(args.fixed), check_every=tuple(args.check_every))
  print(markdown(record))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(record, f, indent=1)
  return record


if __name__ == "__main__":
  main()
