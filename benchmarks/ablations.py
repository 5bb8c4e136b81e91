"""Before/after of the 2026-12-07 step-time changes, interleaved in one run (issue 15).

Each variant re-creates one of the replaced implementations by patching evon_jax's internals
at trace time; the rest of the program is today's. Variants are built one after another
with `jax.clear_caches()` in between: evon_jax compiles one update per optimizer spec
(`transforms._protocol._compiled_apply`), so without it a patched variant would silently
reuse the program of an unpatched one with the same settings.

    python -m benchmarks.ablations --md benchmarks/results/ablations.md

Variants (d = 256, 4 layers, `benchmarks.run`'s shapes and gradient):
* `grouped draws`: leaves of one shape drawn as one block behind an optimization barrier
  (XLA's CPU pipeline drops the barrier) with `lax.erf_inv`, as before;
* `direct NS`: Newton–Schulz run on X for every leaf (no Gram-space iteration);
* `refresh per leaf`: one conditional per leaf (no pairing of leaves);
* `unpadded QR`: the refresh's QR on the n x n matrix as it is (no zero rows appended, see
  `eigenbasis.orthonormal_columns`);
* `transitions only`: every axis of a change of basis through the transition matrix
  Q_newᵀ Q_old (never through parameter coordinates, see `kronecker.change_bases`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math

import jax
import jax.numpy as jnp

from benchmarks import common
from evon_jax.maths import eigenbasis, kronecker, normal_draws, whitening
from evon_jax.transforms import refresh


def _grouped_draws(seeds, requests):
  """The draws as before 2026-12-07: one (k, *shape) block per shape, barrier, erf_inv."""
  groups: dict = {}
  for position, request in enumerate(requests):
    if request is not None:
      stream, shape, dtype = request
      groups.setdefault((tuple(shape), jnp.dtype(dtype)), []).append((position, stream))
  out: list = [None] * len(requests)
  for (shape, dtype), members in groups.items():
    bits = normal_draws._hash_bits(seeds, [s for _, s in members], shape)
    one_to_two = jax.lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000),
                                              jnp.float32)
    uniform = 2.0 * (one_to_two - 1.0) - 1.0 + 2.0 ** -23
    block = (math.sqrt(2.0) * jax.lax.erf_inv(uniform)).astype(dtype)
    block = jax.lax.optimization_barrier(block)
    for row, (position, _) in enumerate(members):
      out[position] = block[row]
  return out


@contextlib.contextmanager
def _patched(module, name, value):
  original = getattr(module, name)
  setattr(module, name, value)
  try:
    yield
  finally:
    setattr(module, name, original)


PATCHES = {
    "as is": (),
    "grouped draws": ((normal_draws, "standard_normals_from_seeds", _grouped_draws),),
    "direct NS": ((whitening, "_gram_iterations", whitening._direct_iterations),),
    "refresh per leaf": ((refresh, "LEAVES_PER_REFRESH_BRANCH", 1),),
    "unpadded QR": ((eigenbasis, "orthonormal_columns", eigenbasis._householder_q),),
    "transitions only": ((kronecker, "_through_parameter_space", lambda *args: False),),
}


def _runner(name, optimizer, patches, shapes, frequency):
  params = common.make_params(shapes, 0)
  direction = common.make_params(shapes, 1, scale=1.0)
  jax.clear_caches()
  with contextlib.ExitStack() as stack:
    for module, attribute, value in patches:
      stack.enter_context(_patched(module, attribute, value))
    return common.StepRunner(name, common.make_optimizer(
        optimizer, precondition_frequency=frequency), params, direction)


def run(d: int = 256, layers: int = 4, frequency: int = 10, rounds: int = 8) -> dict:
  shapes = common.transformer_shapes(d, layers)
  plan = [("soap", "as is"), ("soap", "refresh per leaf"), ("soap", "unpadded QR"),
          ("soap", "transitions only"),
          ("evon", "as is"), ("evon", "grouped draws"), ("evon", "refresh per leaf"),
          ("evon", "unpadded QR"), ("evon", "transitions only"),
          ("evon_whiten", "as is"), ("evon_whiten", "direct NS")]
  runners = [_runner(f"{optimizer} / {variant}", optimizer, PATCHES[variant], shapes, frequency)
             for optimizer, variant in plan]
  results = common.time_interleaved(runners, rounds=rounds, steps_per_round=frequency)
  soap = results["soap / as is"]["mean_ms"]
  rows = []
  for name, res in results.items():
    refresh_extra = frequency * (res["mean_ms"] - res["median_ms"])
    rows.append({"variant": name, "median_ms": res["median_ms"], "mean_ms": res["mean_ms"],
                 "refresh_minus_normal_ms": refresh_extra, "mean_vs_soap": res["mean_ms"] / soap})
  return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "d": d, "layers": layers, "precondition_frequency": frequency, "rounds": rounds,
          "machine": common.machine_info(), "rows": rows}


def markdown(record: dict) -> str:
  lines = [f"# Step-time ablations ({record['date'][:10]}; d = {record['d']}, "
           f"{record['layers']} layers, refresh every {record['precondition_frequency']} steps)",
           "", "`python -m benchmarks.ablations --md benchmarks/results/ablations.md` "
           "(variants in `benchmarks/ablations.py`; one interleaved run, "
           f"{record['rounds']} rounds; median ≈ a normal step, "
           "refresh − normal ≈ T × (mean − median))", "",
           "| optimizer / variant | median ms | mean ms | refresh − normal ms | mean / SOAP as is |",
           "| --- | ---: | ---: | ---: | ---: |"]
  for row in record["rows"]:
    lines.append(f"| {row['variant']} | {row['median_ms']:.1f} | {row['mean_ms']:.1f} | "
                 f"{row['refresh_minus_normal_ms']:.0f} | {row['mean_vs_soap']:.3f} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--d", type=int, default=256)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--rounds", type=int, default=8)
  parser.add_argument("--lapack-threads", type=int, default=1)
  parser.add_argument("--json")
  parser.add_argument("--md")
  args = parser.parse_args(argv)
  common.set_lapack_threads(args.lapack_threads)
  record = run(args.d, args.layers, rounds=args.rounds)
  text = markdown(record)
  print(text)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(record, f, indent=1)
  if args.md:
    with open(args.md, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
