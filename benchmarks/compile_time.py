"""Compile time of one optimizer update on GPT-shaped parameters (issue 15's target: EVON's
first step compiles in at most 2 x SOAP's at 12 layers).

    python -m benchmarks.compile_time                       # markdown table to stdout
    python -m benchmarks.compile_time --json out.json --md out.md

Each (optimizer, layers) is measured in its own fresh process (JAX's first compilation in a
process pays one-off costs, and an earlier compilation would warm caches for a later one),
in interleaved rounds; the table keeps the minimum over rounds of trace, lower and XLA
compile time of `jax.jit(tx.update)` and the size of the lowered StableHLO (a count, not a
time). Shapes: `benchmarks.common.transformer_shapes(width, layers)` (4 matrices per block).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

OPTIMIZERS = ("adamw", "ivon", "soap", "evon", "evon_whiten")


def measure_one(name: str, layers: int, width: int) -> dict:
  """Trace / lower / compile seconds and StableHLO line count, in this process."""
  import jax

  from benchmarks import common
  params = common.make_params(common.transformer_shapes(width, layers))
  tx = common.make_optimizer(name)
  state = tx.init(params)
  update = jax.jit(tx.update)
  start = time.perf_counter()
  traced = update.trace(params, state, params)
  traced_at = time.perf_counter()
  lowered = traced.lower()
  lowered_at = time.perf_counter()
  lowered.compile()
  compiled_at = time.perf_counter()
  return {"trace_s": traced_at - start, "lower_s": lowered_at - traced_at,
          "compile_s": compiled_at - lowered_at, "total_s": compiled_at - start,
          "stablehlo_lines": len(lowered.as_text().splitlines())}


def _in_subprocess(name: str, layers: int, width: int) -> dict:
  code = ("import json, sys; from benchmarks.compile_time import measure_one; "
          f"print(json.dumps(measure_one({name!r}, {layers}, {width})))")
  out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                       text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def compile_times(layer_values=(2, 12), width: int = 64, rounds: int = 2,
                  optimizers=OPTIMIZERS) -> list[dict]:
  best: dict = {}
  for _ in range(rounds):
    for layers in layer_values:
      for name in optimizers:
        result = _in_subprocess(name, layers, width)
        key = (name, layers)
        if key not in best:
          best[key] = result
        else:
          best[key] = {k: min(best[key][k], v) for k, v in result.items()}
  rows = []
  for layers in layer_values:
    soap = best[("soap", layers)]["total_s"]
    for name in optimizers:
      rows.append({"optimizer": name, "layers": layers, "width": width,
                   **best[(name, layers)],
                   "total_over_soap": best[(name, layers)]["total_s"] / soap})
  return rows


def markdown(rows: list[dict]) -> str:
  lines = ["| layers | optimizer | trace s | lower s | XLA compile s | total s | / SOAP | "
           "StableHLO lines |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['layers']} | {r['optimizer']} | {r['trace_s']:.2f} | "
                 f"{r['lower_s']:.2f} | {r['compile_s']:.2f} | {r['total_s']:.2f} | "
                 f"{r['total_over_soap']:.2f} | {r['stablehlo_lines']} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", default="2,12")
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--json")
  parser.add_argument("--md")
  args = parser.parse_args()
  rows = compile_times(tuple(int(x) for x in args.layers.split(",")), args.width,
                       args.rounds)
  table = markdown(rows)
  print(table)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"date": time.strftime("%Y-%m-%d"), "command":
                 "python -m benchmarks.compile_time " + " ".join(sys.argv[1:]),
                 "rows": rows}, f, indent=1)
  if args.md:
    with open(args.md, "w") as f:
      f.write(f"# Compile time of one update ({time.strftime('%Y-%m-%d')})\n\n"
              f"`python -m benchmarks.compile_time {' '.join(sys.argv[1:])}`\n\n{table}\n")


if __name__ == "__main__":
  main()
