"""What continuous bases cost: the refresh of one Kronecker side, evon_jax's against the plain
one (the reference's: `eigh`, or one QR of F Q), as ratios of times taken interleaved in one run.

    python -m benchmarks.refresh_cost                    # table (markdown) to stdout
    python -m benchmarks.refresh_cost --json out.json

evon_jax's eigh refresh adds canonical signs and, only when the factor has a numerically
null eigenspace, a pivoted Gram–Schmidt of the previous basis projected onto it (a serial
loop of n rank-1 updates, about 2n³ flops); its power-QR adds a shift (one axpy) and signs
aligned with the previous basis. Full-rank factors (the steady state of training) take the
first branch only; rank-deficient ones (a batch smaller than the side, the first refreshes)
the second.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from evon_jax.maths import eigenbasis

SIZES = (64, 256, 768)


def plain_eigh(factor, basis):
  del basis
  return jnp.linalg.eigh(0.5 * (factor + factor.T))[1][:, ::-1]


def plain_power_qr(factor, basis):
  return jnp.linalg.qr(factor @ basis)[0]


def ours_eigh(factor, basis):
  return eigenbasis.eigh_descending(factor, basis)


def ours_power_qr(factor, basis):
  return eigenbasis.aligned_signs(eigenbasis.power_qr(factor, basis), basis)


def factor_of_rank(size: int, rank: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """A factor G Gᵀ with G of `rank` columns, and an orthonormal previous basis near its
  eigenbasis (the situation of a refresh)."""
  rng = np.random.default_rng(seed)
  g = rng.normal(size=(size, rank)).astype(np.float32)
  factor = g @ g.T / rank
  previous = np.linalg.qr(np.linalg.eigh(factor)[1] + 1e-2 * rng.normal(size=(size, size)))[0]
  return factor.astype(np.float32), previous.astype(np.float32)


def _time(fn, args, calls: int) -> float:
  start = time.perf_counter()
  for _ in range(calls):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / calls


def measure(size: int, rank: int, rounds: int = 5, calls: int | None = None) -> dict:
  """Min over `rounds` interleaved rounds of the mean time of `calls` calls (default: about
  2e8 / size³, at least 2), plain and ours, for eigh and power-QR."""
  args = tuple(jnp.asarray(a) for a in factor_of_rank(size, rank))
  pairs = {"eigh": (plain_eigh, ours_eigh), "power_qr": (plain_power_qr, ours_power_qr)}
  calls = calls or max(2, int(2e8 // size ** 3))
  row = {}
  for method, (plain, ours) in pairs.items():
    plain, ours = jax.jit(plain), jax.jit(ours)
    jax.block_until_ready((plain(*args), ours(*args)))  # compile outside the timing
    times = {"plain": [], "ours": []}
    for _ in range(rounds):  # interleaved rounds: load changes hit both alike
      times["plain"].append(_time(plain, args, calls))
      times["ours"].append(_time(ours, args, calls))
    plain_s, ours_s = min(times["plain"]), min(times["ours"])
    row[method] = {"plain_ms": 1e3 * plain_s, "ours_ms": 1e3 * ours_s,
                   "ratio": ours_s / plain_s}
  return row


def table() -> dict:
  results = {}
  for size in SIZES:
    # A Wishart factor with 4n samples has λ_min/λ_max ≈ 1/9 (no null space); with n/4,
    # three quarters of its eigenvalues are zero.
    for label, rank in (("full rank", 4 * size), ("rank n/4", max(1, size // 4))):
      results[f"{size} ({label})"] = measure(size, rank)
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  results = table()
  print("| side (factor) | eigh: plain ms | ours ms | ratio | power-QR: plain ms | ours ms | ratio |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for name, row in results.items():
    e, p = row["eigh"], row["power_qr"]
    print(f"| {name} | {e['plain_ms']:.2f} | {e['ours_ms']:.2f} | {e['ratio']:.2f} | "
          f"{p['plain_ms']:.2f} | {p['ours_ms']:.2f} | {p['ratio']:.2f} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
