"""Where the time of a step goes: each piece against its lower bound at this machine's rates.

    python -m benchmarks.where_time_goes            # d = 256, 4 layers (~3 min on 2 cores)
    python -m benchmarks.where_time_goes --md benchmarks/results/where_time_goes.md

The machine's rates are measured first in the same run: float32 matmul throughput
(1024 x 1024 x 1024 at HIGHEST precision under jit) and the streaming rate of x ↦ 2x + 1 over
the same leaves (cache-resident at these sizes, so it is the elementwise passes' bound). Each piece of `benchmarks.pieces.step_pieces` (all 16 leaves of
`transformer_shapes(d, layers)` at once) gets a work count from the shapes — flops for
products and factorisations, bytes for elementwise passes — and its lower bound is that work
at the measured rate. Counts: a product A (m x k) B (k x n) is 2mkn; a rotation Q_Lᵀ G Q_R of
G (m x n) 2mn(m + n); the two factor statistics G Gᵀ, Gᵀ G 2mn(m + n) (dense; a symmetric
rank-k update would halve it); five quintic Newton–Schulz steps on the smaller Gram side
5 (4m²n + 2m³), m ≤ n; a power-QR refresh of an n x n factor F Q plus Householder QR and
forming Q, 2n³ + 8/3 n³; `eigh` with vectors ~9n³ (Golub & Van Loan's count for the
symmetric QR algorithm); the change of basis per axis of size k, by the route the library
takes (`kronecker.change_bases`): the transition Q_newᵀ Q_old (2k³) and one mode product
per buffer, or two mode products per buffer through parameter coordinates. Elementwise passes count the float32 bytes of the distinct
arrays they read and write. The step rows add the pieces a step is made of and compare with steps measured in the
same run (`StepRunner`, interleaved, refresh period T; the refresh step's extra is its mean
minus the median step).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from benchmarks import common, pieces
from evon_jax.maths import kronecker, whitening

_EXACT = jax.lax.Precision.HIGHEST


def machine_rates(d: int, layers: int) -> dict:
  """float32 matmul flop/s, and streaming bytes/s over the leaves themselves (each ≤ 1 MB at
  d = 256, so cache-resident: the rate an elementwise pass over them can reach), now."""
  n = 1024
  a = jax.random.normal(jax.random.key(0), (n, n))
  b = jax.random.normal(jax.random.key(1), (n, n))
  matmul_ms = pieces.time_call(jax.jit(lambda x, y: jnp.matmul(x, y, precision=_EXACT)), a, b,
                               repeats=15)
  leaves = jax.tree.leaves(common.make_params(common.transformer_shapes(d, layers), 0))
  stream_ms = pieces.time_call(jax.jit(lambda xs: [2.0 * x + 1.0 for x in xs]), leaves,
                               repeats=15)
  return {"matmul_flops_per_s": 2 * n ** 3 / (matmul_ms * 1e-3),
          "stream_bytes_per_s": 2 * 4 * sum(x.size for x in leaves) / (stream_ms * 1e-3)}


def _sides(shape):
  return [n for n in shape]  # every axis of a matrix leaf is rotated at d ≤ 10000


def work_counts(d: int, layers: int) -> dict:
  """Per piece ('flops' or 'bytes', amount) over all leaves."""
  shapes = [s for block in common.transformer_shapes(d, layers).values() for s in block.values()]
  size = sum(m * n for m, n in shapes)
  rotation = sum(2 * m * n * (m + n) for m, n in shapes)
  # The cheaper of the direct and the Gram-space iteration per leaf (`whitening.newton_schulz`)
  newton_schulz = sum(min(whitening.iteration_flops(min(m, n), max(m, n)).values())
                      for m, n in shapes)
  sides = [k for shape in shapes for k in _sides(shape)]
  return {
      "rotate_in_all": ("flops", rotation),
      "factor_statistics_all": ("flops", rotation),
      "newton_schulz_all": ("flops", newton_schulz),
      # one normal per weight: 4 bytes written (the bits are computed, not read)
      "hash_normal_all": ("bytes", 4 * size),
      # `pieces` passes one buffer as m, g and z (and as m, g for Adam): distinct arrays
      # read are h and that one, written m, h and the sample (Adam: m and the direction).
      # A real step reads them separately: 7 and 4 arrays.
      "ivon_elementwise_all": ("bytes", 5 * 4 * size),
      "adam_elementwise_all": ("bytes", 3 * 4 * size),
      "power_qr_all": ("flops", sum((2 + 8 / 3) * k ** 3 for k in sides)),
      "eigh_all": ("flops", sum(9 * k ** 3 for k in sides)),
      "change_basis_1_buffer_all": ("flops", change_basis_flops(shapes, 1)),
      "change_basis_2_buffers_all": ("flops", change_basis_flops(shapes, 2)),
  }


def change_basis_flops(shapes, buffers: int) -> float:
  """Flops of `kronecker.change_bases` of `buffers` buffers per leaf: per axis the cheaper of
  the transition route (2k³ + buffers·2·entries·k) and the route through parameter
  coordinates (buffers·4·entries·k), as the library picks."""
  total = 0.0
  for m, n in shapes:
    for k in (m, n):
      transition = 2 * k ** 3 + buffers * 2 * m * n * k
      direct = buffers * 4 * m * n * k
      total += direct if kronecker._through_parameter_space(k, m * n, buffers) else transition
  return total


def lower_bound_ms(kind: str, amount: float, rates: dict) -> float:
  rate = rates["matmul_flops_per_s"] if kind == "flops" else rates["stream_bytes_per_s"]
  return 1e3 * amount / rate


# The pieces a step is made of (rotate_in_all stands for any one rotation of every leaf).
STEPS = {
    "SOAP normal step": ["rotate_in_all", "rotate_in_all", "factor_statistics_all",
                         "adam_elementwise_all"],
    "EVON normal step (whiten=False)": ["rotate_in_all", "rotate_in_all",
                                        "factor_statistics_all", "hash_normal_all",
                                        "hash_normal_all", "ivon_elementwise_all"],
    "EVON normal step (whiten=True)": ["rotate_in_all", "rotate_in_all",
                                       "factor_statistics_all", "hash_normal_all",
                                       "hash_normal_all", "ivon_elementwise_all",
                                       "newton_schulz_all"],
    "SOAP refresh (extra)": ["power_qr_all", "change_basis_1_buffer_all"],
    "EVON refresh (extra)": ["power_qr_all", "change_basis_2_buffers_all"],
}
MEASURED_STEP = {"SOAP normal step": ("soap", "median"),
                 "EVON normal step (whiten=False)": ("evon", "median"),
                 "EVON normal step (whiten=True)": ("evon_whiten", "median"),
                 "SOAP refresh (extra)": ("soap", "refresh"),
                 "EVON refresh (extra)": ("evon", "refresh")}


def measured_steps(d: int, layers: int, frequency: int = 10, rounds: int = 4) -> dict:
  shapes = common.transformer_shapes(d, layers)
  params = common.make_params(shapes, 0)
  direction = common.make_params(shapes, 1, scale=1.0)
  runners = [common.StepRunner(name, common.make_optimizer(
      name, precondition_frequency=frequency), params, direction)
      for name in ("soap", "evon", "evon_whiten")]
  results = common.time_interleaved(runners, rounds=rounds, steps_per_round=frequency)
  out = {}
  for name, r in results.items():
    # mean = median + (refresh extra) / T when the other steps sit at the median
    out[name] = {"median": r["median_ms"],
                 "refresh": frequency * (r["mean_ms"] - r["median_ms"])}
  return out


def table(d: int, layers: int, rates: dict, measured: dict, steps: dict) -> str:
  counts = work_counts(d, layers)
  lines = [f"Machine rates measured in this run: matmul {rates['matmul_flops_per_s'] / 1e9:.0f} "
           f"GFLOP/s (float32, 1024³), streaming over the leaves "
           f"{rates['stream_bytes_per_s'] / 1e9:.1f} GB/s.",
           "", "| piece (all 16 leaves) | work | lower bound ms | measured ms | measured / bound |",
           "|---|---|---|---|---|"]
  bounds = {}
  for name, (kind, amount) in counts.items():
    bound = lower_bound_ms(kind, amount, rates)
    bounds[name] = bound
    work = f"{amount / 1e9:.2f} GFLOP" if kind == "flops" else f"{amount / 1e6:.0f} MB"
    lines.append(f"| {name} | {work} | {bound:.1f} | {measured[name]:.1f} | "
                 f"{measured[name] / bound:.1f} |")
  lines += ["", "| step | sum of the pieces' bounds ms | sum of the pieces measured ms | "
            "step measured ms | step / bound |", "|---|---|---|---|---|"]
  for name, parts in STEPS.items():
    bound = sum(bounds[p] for p in parts)
    pieces_ms = sum(measured[p] for p in parts)
    optimizer, which = MEASURED_STEP[name]
    step_ms = steps[optimizer][which]
    lines.append(f"| {name} | {bound:.1f} | {pieces_ms:.1f} | {step_ms:.1f} | "
                 f"{step_ms / bound:.1f} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--d", type=int, default=256)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--lapack-threads", type=int, default=1)
  parser.add_argument("--md")
  args = parser.parse_args()
  if args.lapack_threads:
    common.set_lapack_threads(args.lapack_threads)
  start = time.perf_counter()
  rates = machine_rates(args.d, args.layers)
  measured = pieces.step_pieces(args.d, args.layers, repeats=5)
  steps = measured_steps(args.d, args.layers)
  text = table(args.d, args.layers, rates, measured, steps)
  command = (f"python -m benchmarks.where_time_goes --d {args.d} --layers {args.layers} "
             f"--lapack-threads {args.lapack_threads}")
  header = (f"# Where the time goes ({time.strftime('%Y-%m-%d')}; d = {args.d}, "
            f"{args.layers} layers, {measured['num_params'] / 1e6:.1f} M parameters)\n\n"
            f"`{command}` ({time.perf_counter() - start:.0f} s; refresh period 10 for the "
            "measured steps)\n\n")
  print(header + text)
  if args.md:
    with open(args.md, "w") as f:
      f.write(header + text + "\n")


if __name__ == "__main__":
  main()
