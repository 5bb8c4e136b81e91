"""KL-Shampoo factor statistics in EVON: exactness on a Kronecker quadratic, and the LM loss.

    python -m benchmarks.kl_shampoo                     # markdown tables to stdout
    python -m benchmarks.kl_shampoo --json out.json --lm-steps 400

1. Exactness. loss(W) = ½ tr(A (W - W0) B (W - W0)ᵀ) (6 x 4, Hessian A ⊗ B, ess 100, prior
   precision 1e-2): the exact posterior is Gaussian and known in closed form. Drop-in EVON
   for 40,000 gradient evaluations (the settings of tests/test_exactness.py), with the plain
   factor statistics and with `use_kl_shampoo=True`, for the reference's factor options
   (power-QR, loss gradient) and evon_jax's remedies (eigh, regularised gradient); KL(q‖q*)
   in nats per key. (A 1-D weight, as in the logistic-regression exactness test, has one
   Kronecker axis and no other side to weight by: KL-Shampoo's statistic is then the plain
   one, so that test cannot tell them apart.)
2. The LM example (`examples/train_lm.py`, EVON with its documented settings), validation
   loss of the posterior mean with and without `use_kl_shampoo`.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

import evon_jax
from evon_jax import posterior

BUDGET = 40_000
WEIGHT_DECAY = 1e-2
FACTOR_OPTIONS = {
    "reference factors": dict(refresh_method="power_qr", factor_gradient="loss"),
    "remedies": dict(refresh_method="eigh", factor_gradient="regularized"),
}


def gaussian_kl(m, S, m_star, S_star) -> float:
  """KL(N(m, S) || N(m_star, S_star))."""
  inverse = np.linalg.inv(S_star)
  diff = m_star - m
  _, logdet_star = np.linalg.slogdet(S_star)
  _, logdet = np.linalg.slogdet(S)
  return 0.5 * float(np.trace(inverse @ S) + diff @ inverse @ diff - len(m)
                     + logdet_star - logdet)


def _spd(rng, eigenvalues):
  q, r = np.linalg.qr(rng.standard_normal((len(eigenvalues), len(eigenvalues))))
  q = q * np.sign(np.diag(r))
  return q @ np.diag(eigenvalues) @ q.T


def quadratic_kl(factor_options: dict, use_kl_shampoo: bool, key: int) -> float:
  rng = np.random.default_rng(0)
  rows, cols, ess = 6, 4, 100.0
  A = _spd(rng, np.linspace(0.5, 3.0, rows))
  B = _spd(rng, np.linspace(0.4, 2.5, cols))
  W0 = rng.standard_normal((rows, cols))
  hessian = np.kron(A, B)
  precision = hessian + WEIGHT_DECAY * np.eye(rows * cols)
  m_star = np.linalg.solve(precision, hessian @ W0.reshape(-1))
  S_star = np.linalg.inv(ess * precision)
  A32, B32, W032 = (jnp.asarray(x, jnp.float32) for x in (A, B, W0))
  loss = lambda W: 0.5 * jnp.sum((A32 @ (W - W032) @ B32) * (W - W032))

  mc_samples = 4
  steps = (BUDGET - 1) // mc_samples
  lr = optax.join_schedules([optax.constant_schedule(0.1), lambda s: 1.0 / (10.0 + s)],
                            [steps // 2])
  tx = evon_jax.evon(lr, ess=ess, weight_decay=WEIGHT_DECAY, whiten=False, key=key,
                     mc_samples=mc_samples, b2=0.999, shampoo_b=0.999, hess_init=1.0,
                     use_kl_shampoo=use_kl_shampoo, **factor_options)
  grad = jax.grad(loss)

  @jax.jit
  def train(params):
    def call(carry, _):
      params, state = carry
      updates, state = tx.update(grad(params), state, params)
      return (optax.apply_updates(params, updates), state), None
    return jax.lax.scan(call, (params, tx.init(params)), None,
                        length=1 + steps * mc_samples)[0][1]

  state = train(jnp.zeros((rows, cols), jnp.float32))
  m = np.asarray(posterior.mean(state), np.float64).reshape(-1)
  S = np.asarray(posterior.covariance(state), np.float64)
  return gaussian_kl(m, S, m_star, S_star)


def lm_losses(steps: int, seed: int = 0) -> dict:
  from benchmarks.lm_posterior import load_example
  lm = load_example()
  out = {}
  for name, flag in (("plain factors", False), ("use_kl_shampoo", True)):
    args = lm.build_parser().parse_args(["--optimizer", "evon", "--steps", str(steps),
                                         "--seed", str(seed), "--quiet", "--bma-samples",
                                         "0", "--val-windows", "512"])
    original = evon_jax.evon

    def patched(*a, **k):
      return original(*a, use_kl_shampoo=flag, **k)

    lm.evon_jax.evon = patched  # the example builds EVON through evon_jax.evon
    try:
      record = lm.run(args, progress=False)
    finally:
      lm.evon_jax.evon = original
    out[name] = {"val_loss_mean": record["val_loss_mean"],
                 "train_seconds": record["train_seconds"]}
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--keys", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--lm-steps", type=int, default=400)
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  exactness = {}
  for name, options in FACTOR_OPTIONS.items():
    for flag in (False, True):
      label = f"{name}, {'use_kl_shampoo' if flag else 'plain'}"
      exactness[label] = [quadratic_kl(options, flag, key) for key in args.keys]
  print(f"KL(q || q*) in nats on the Kronecker quadratic, keys {args.keys}:\n")
  print("| factors | KL per key |\n| --- | --- |")
  for label, values in exactness.items():
    print(f"| {label} | {', '.join(f'{v:.4f}' for v in values)} |")
  record = {"exactness_kl": exactness, "keys": args.keys}
  if args.lm_steps:
    lm = lm_losses(args.lm_steps)
    record["lm"] = {"steps": args.lm_steps, **lm}
    print(f"\nLM example, EVON, {args.lm_steps} steps, validation loss of the mean:\n")
    print("| factors | val loss | train s |\n| --- | --- | --- |")
    for label, r in lm.items():
      print(f"| {label} | {r['val_loss_mean']:.4f} | {r['train_seconds']:.0f} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(record, f, indent=1)
  return record


if __name__ == "__main__":
  main()
