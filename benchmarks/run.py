"""Runs the benchmarks and writes results.json, summary.md and PNG plots.

    python -m benchmarks.run            # full run (tens of minutes on a 2-core CPU)
    python -m benchmarks.run --quick    # everything small, < 1 minute: a smoke test
    python -m benchmarks.run --only step,memory --out /tmp/bench

`--lapack-threads N` sets the OpenBLAS thread count that XLA's CPU LAPACK kernels (QR,
eigh, Cholesky) run with; by default it is left as found (and recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import time

SECTIONS = ("step", "growth_d", "layers", "frequency", "max_precond_dim", "pieces", "peers",
            "train", "memory")

# Sizes per mode. Quick: tiny shapes, one short round each (a smoke test, not a measurement).
FULL = {
    "step": dict(d_values=(128, 256, 512), layers=4, rounds=10, budget_s=240),
    "growth_d": dict(d_values=(64, 128, 256, 512, 1024), layers=1,
                     optimizers=("adamw", "soap", "ivon", "evon"), rounds=5, budget_s=120),
    "layers": dict(layer_values=(1, 2, 4, 8), d=256, rounds=5, budget_s=90),
    "frequency": dict(frequencies=(1, 5, 10, 20, 50), d=256, layers=4, rounds=3,
                      budget_s=60),
    "max_precond_dim": dict(dims=(0, 256, 768, 1024), d=256, layers=4, rounds=3,
                            budget_s=60),
    "pieces": dict(d=256, layers=4, sizes=(256, 512, 1024)),
    "peers": dict(d_values=(128, 256), layers=4, rounds=5, budget_s=180),
    "train": dict(batch_sizes=(8, 32, 128), d=128, layers=4, length=128, heads=4, rounds=5,
                  budget_s=180),
    "memory": dict(d_values=(128, 256, 512), layers=4, rss_d=256),
}
QUICK = {
    "step": dict(d_values=(32,), layers=1, rounds=2, precondition_frequency=2),
    "growth_d": dict(d_values=(16, 32), layers=1, optimizers=("adamw", "evon"), rounds=1,
                     precondition_frequency=2),
    "layers": dict(layer_values=(1, 2), d=16, optimizers=("adamw",), rounds=1,
                   precondition_frequency=2),
    "frequency": dict(frequencies=(1, 2), d=16, layers=1, optimizers=("soap",), rounds=1),
    "max_precond_dim": dict(dims=(0, 16), d=16, layers=1, optimizers=("soap",), rounds=1,
                            precondition_frequency=2),
    "pieces": dict(d=16, layers=1, sizes=(32,), repeats=2),
    "peers": dict(d_values=(16,), layers=1, jax_optimizers=("ivon",),
                  peers=("ivon_opt", "pytorch_optimizer_soap"), rounds=1,
                  precondition_frequency=2),
    "train": dict(batch_sizes=(2,), d=16, layers=1, length=8, heads=2,
                  optimizers=("adamw", "evon"), rounds=1, precondition_frequency=2),
    "memory": dict(d_values=(32,), layers=1, rss_d=16, rss_optimizers=("adamw",),
                   plan_optimizers=("adamw",)),
}


def run_section(name: str, cfg: dict):
  """Runs one section with its config; returns its JSON-able result."""
  from benchmarks import common, memory, optimizer_step, peers, pieces, train_step
  cfg = dict(cfg)
  if name == "step":
    return optimizer_step.step_sweep(cfg.pop("d_values"), **cfg)
  if name == "growth_d":
    return optimizer_step.step_sweep(cfg.pop("d_values"), **cfg)
  if name == "layers":
    return optimizer_step.layers_sweep(cfg.pop("layer_values"), **cfg)
  if name == "frequency":
    return optimizer_step.frequency_sweep(cfg.pop("frequencies"), **cfg)
  if name == "max_precond_dim":
    return optimizer_step.max_precond_dim_sweep(cfg.pop("dims"), **cfg)
  if name == "pieces":
    repeats = cfg.get("repeats", 5)
    return {"step_pieces": pieces.step_pieces(cfg["d"], cfg["layers"], repeats=repeats),
            "factor_sizes": pieces.factor_size_pieces(cfg["sizes"], repeats=repeats)}
  if name == "peers":
    return peers.peer_step_sweep(cfg.pop("d_values"), **cfg)
  if name == "train":
    return train_step.train_step_sweep(cfg.pop("batch_sizes"), **cfg)
  if name == "memory":
    optimizers = common.OPTIMIZERS
    return {
        "state_bytes": memory.state_bytes(optimizers, cfg["d_values"], layers=cfg["layers"]),
        "shaped_leaves": memory.shaped_leaf_state_bytes(),
        "step_buffer_plan": memory.step_buffer_plan(
            cfg.get("plan_optimizers", optimizers), cfg["rss_d"], layers=cfg["layers"]),
        "peak_rss": memory.peak_rss(cfg.get("rss_optimizers", optimizers), cfg["rss_d"],
                                    layers=cfg["layers"])}
  raise ValueError(f"unknown section {name!r}")


def headline(results: dict, d: int = 256) -> dict:
  """The targets of issue 15 (and the earlier ones still tracked), evaluated on this run's
  numbers; keys are absent where a section is."""
  out = {}
  step = [r for r in results.get("step", []) if r["d"] == d]
  if step and "evon" in step[0]["results"] and "soap" in step[0]["results"]:
    rec = step[0]
    evon, soap = rec["results"]["evon"], rec["results"]["soap"]
    out["evon_over_soap_mean"] = rec["ratio_vs_soap"]["evon"]["mean"]
    out["evon_over_soap_round_median"] = rec["ratio_vs_soap"]["evon"]["round_median"]
    out["target_evon_mean_le_1.05_soap"] = out["evon_over_soap_mean"] <= 1.05
    # Medians are the steps without a refresh (one step in T refreshes).
    out["evon_over_soap_median_step"] = evon["median_ms"] / soap["median_ms"]
    out["target_evon_median_step_le_1.03_soap"] = out["evon_over_soap_median_step"] <= 1.03
    if "evon_whiten" in rec["results"]:
      out["evon_whiten_over_soap_mean"] = rec["ratio_vs_soap"]["evon_whiten"]["mean"]
      out["target_evon_whiten_mean_le_1.25_soap"] = out["evon_whiten_over_soap_mean"] <= 1.25
    # Refresh amortised over T steps: (mean - median) / median = (refresh extra / T) / normal.
    out["evon_refresh_amortised_over_normal_step"] = (
        evon["mean_ms"] - evon["median_ms"]) / evon["median_ms"]
    out["target_refresh_amortised_le_0.25"] = (
        out["evon_refresh_amortised_over_normal_step"] <= 0.25)
    for name in ("evon_stagger", "evon"):
      if name in rec["results"]:
        out[f"{name}_max_over_median"] = rec["results"][name]["max_over_median"]
    if "evon_stagger" in rec["results"]:
      out["target_stagger_max_le_2_median"] = out["evon_stagger_max_over_median"] <= 2.0
  states = {r["optimizer"]: r for r in results.get("memory", {}).get("state_bytes", [])
            if r["d"] == d}
  if "evon" in states and "soap" in states:
    extra = (states["evon"]["state_bytes"] - states["soap"]["state_bytes"]) / states[
        "evon"]["param_bytes"]
    out["evon_state_minus_soap_state_in_param_buffers"] = extra
    # The tolerance covers EVON's scalar fields (count, key, ess, ...): a few bytes.
    out["target_evon_state_le_soap_plus_1"] = extra <= 1.0 + 1e-3
  peers = [r for r in results.get("peers", {}).get("records", []) if r["d"] == d]
  if peers and "ivon_vs_ivon_opt" in peers[0]["ratios"]:
    out["ivon_over_ivon_opt_mean"] = peers[0]["ratios"]["ivon_vs_ivon_opt"]["mean"]
    out["target_ivon_le_0.5_ivon_opt"] = out["ivon_over_ivon_opt_mean"] <= 0.5
  return out


def _fmt(x, digits=1):
  return "-" if x is None else f"{x:.{digits}f}"


def summary_markdown(results: dict) -> str:
  """Markdown tables of the main numbers (pasted into benchmarks/README.md)."""
  lines = []
  machine = results["machine"]
  lines.append(f"Measured {machine['date_utc']} on {machine['cpu_model']}, "
               f"{machine['nproc']} CPUs, load average at start "
               f"{machine['load_average_1_5_15'][0]:.2f}, jax {machine['jax']}, "
               f"LAPACK (OpenBLAS) threads {machine['lapack_threads']}.")
  lines.append("")
  if results.get("section_runs"):
    runs = ", ".join(f"{name} {run.get('date_utc')} ({run.get('git_commit')})"
                     for name, run in results["section_runs"].items() if run)
    lines += [f"Sections measured: {runs}.", ""]
  if results.get("headline"):
    lines += ["| headline | value |", "| --- | --- |"]
    for key, value in results["headline"].items():
      lines.append(f"| {key} | {value if isinstance(value, bool) else _fmt(value, 3)} |")
    lines.append("")
  for key, title in (("step", "Optimizer step"), ("growth_d", "Growth with d")):
    if not results.get(key):
      continue
    lines += [f"**{title}** (ms; mean includes refresh steps; ratios = mean / mean in the "
              "same interleaved run)", "",
              "| d | layers | optimizer | median | mean | max | max/median | first step | "
              "vs SOAP | vs AdamW |", "| --- " * 10 + "|"]
    for rec in results[key]:
      for name, res in rec["results"].items():
        vs_soap = rec.get("ratio_vs_soap", {}).get(name, {}).get("mean")
        vs_adamw = rec.get("ratio_vs_adamw", {}).get(name, {}).get("mean")
        lines.append(
            f"| {rec['d']} | {rec['layers']} | {name} | {_fmt(res['median_ms'])} | "
            f"{_fmt(res['mean_ms'])} | {_fmt(res['max_ms'])} | "
            f"{_fmt(res['max_over_median'])} | {_fmt(res['first_step_ms'])} | "
            f"{_fmt(vs_soap, 2)} | {_fmt(vs_adamw, 2)} |")
    lines.append("")
  for key, x_key in (("layers", "layers"), ("frequency", "precondition_frequency"),
                     ("max_precond_dim", "max_precond_dim")):
    if not results.get(key):
      continue
    lines += [f"**{x_key} sweep** (d={results[key][0]['d']}; ms)", "",
              f"| {x_key} | optimizer | median | mean | max |", "| --- " * 5 + "|"]
    for rec in results[key]:
      for name, res in rec["results"].items():
        lines.append(f"| {rec[x_key]} | {name} | {_fmt(res['median_ms'])} | "
                     f"{_fmt(res['mean_ms'])} | {_fmt(res['max_ms'])} |")
    lines.append("")
  peers = results.get("peers", {})
  if peers.get("records"):
    lines += [f"**PyTorch peers** (torch {peers['torch']}, {peers['torch_threads']} "
              "threads; ms)", "", "| d | optimizer | median | mean | max |",
              "| --- " * 5 + "|"]
    for rec in peers["records"]:
      for name, res in rec["results"].items():
        lines.append(f"| {rec['d']} | {name} | {_fmt(res['median_ms'])} | "
                     f"{_fmt(res['mean_ms'])} | {_fmt(res['max_ms'])} |")
      for key, ratio in rec["ratios"].items():
        lines.append(f"| {rec['d']} | ratio {key} | {_fmt(ratio['median'], 2)} | "
                     f"{_fmt(ratio['mean'], 2)} | |")
    lines.append("")
  elif peers.get("skipped"):
    lines += [f"PyTorch peers skipped: {peers['skipped']}.", ""]
  train = results.get("train")
  if train:
    model = train["model"]
    lines += [f"**GPT train step** (d={model['d']}, {model['layers']} layers, length "
              f"{model['length']}, {model['num_params']} params; ms, optimizer fraction)",
              "", "| batch | optimizer | mean step | optimizer fraction |",
              "| --- " * 4 + "|"]
    for rec in train["records"]:
      for name, res in rec["results"].items():
        fraction = rec["optimizer_fraction"].get(name)
        lines.append(f"| {rec['batch']} | {name} | {_fmt(res['mean_ms'])} | "
                     f"{_fmt(fraction, 2)} |")
    lines.append("")
  memory = results.get("memory")
  if memory:
    lines += ["**Memory** (state bytes per parameter byte; XLA temporaries of one step; "
              "peak RSS of the steps minus RSS with params only, fresh process)", "",
              "| d | optimizer | state / params | fields (MB) |", "| --- " * 4 + "|"]
    for rec in memory["state_bytes"]:
      fields = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in rec["fields"].items()
                         if v >= 2**16)
      lines.append(f"| {rec['d']} | {rec['optimizer']} | "
                   f"{_fmt(rec['state_per_param_byte'], 2)} | {fields} |")
    if memory.get("shaped_leaves"):
      lines += ["", "| N-D leaf | optimizer | state MB | state / params |", "| --- " * 4 + "|"]
      for rec in memory["shaped_leaves"]:
        lines.append(f"| {rec['leaf']} | {rec['optimizer']} | "
                     f"{_fmt(rec['state_bytes'] / 2**20)} | "
                     f"{_fmt(rec['state_per_param_byte'], 2)} |")
    lines += ["", "| optimizer | XLA temp MB | steps peak RSS - baseline MB | "
              "compile peak RSS - baseline MB |", "| --- " * 4 + "|"]
    for rec in memory["peak_rss"]:
      plan = memory["step_buffer_plan"].get(rec["optimizer"], {})
      temp = plan.get("temp_size_in_bytes")
      if "error" in rec:
        lines.append(f"| {rec['optimizer']} | - | error | - |")
        continue
      lines.append(f"| {rec['optimizer']} | {_fmt(temp / 2**20 if temp is not None else None)}"
                   f" | {_fmt(rec['steps_peak_minus_baseline'] / 2**20)} | "
                   f"{_fmt(rec['compile_peak_minus_baseline'] / 2**20)} |")
    lines.append("")
  pieces = results.get("pieces")
  if pieces:
    sp = pieces["step_pieces"]
    lines += [f"**Pieces of a step** (d={sp['d']}, {sp['layers']} layers, "
              f"{sp['num_params']} params; ms, all leaves at once)", "",
              "| piece | ms |", "| --- | --- |"]
    for key, value in sp.items():
      if key not in ("d", "layers", "num_params"):
        lines.append(f"| {key} | {_fmt(value, 2)} |")
    lines += ["", "| k | LAPACK threads | QR | QR, 8 zero rows appended | Cholesky-QR2 | eigh "
              "| k x k matmul |", "| --- " * 7 + "|"]
    for rec in pieces["factor_sizes"]:
      lines.append(f"| {rec['k']} | {rec['lapack_threads']} | {_fmt(rec['qr_ms'], 2)} | "
                   f"{_fmt(rec.get('padded_qr_ms'), 2)} | "
                   f"{_fmt(rec['cholesky_qr2_ms'], 2)} | {_fmt(rec['eigh_ms'], 2)} | "
                   f"{_fmt(rec['matmul_ms'], 2)} |")
    lines.append("")
  return "\n".join(lines)


def _git_commit(directory: str):
  """The checked-out commit (with '+dirty' for uncommitted changes), or None."""
  import subprocess
  try:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=directory,
                          capture_output=True, text=True, timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           cwd=directory, capture_output=True, text=True,
                           timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return (head + ("+dirty" if dirty else "")) or None


def _write_json(results: dict, out_dir: str):
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=1, default=str)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="tiny sizes, < 1 minute")
  parser.add_argument("--out", default=None,
                      help="output folder (default benchmarks/results, or "
                           "benchmarks/results/quick with --quick)")
  parser.add_argument("--only", default=None,
                      help=f"comma-separated subset of {','.join(SECTIONS)}")
  parser.add_argument("--lapack-threads", type=int, default=None,
                      help="OpenBLAS threads for XLA's CPU LAPACK calls (default: as found)")
  parser.add_argument("--no-plots", action="store_true")
  parser.add_argument("--merge", action="store_true",
                      help="keep the sections of an existing results.json that this run does "
                           "not measure (each section records when and on which commit it "
                           "was measured)")
  args = parser.parse_args(argv)

  from benchmarks import common, plots
  here = os.path.dirname(os.path.abspath(__file__))
  out_dir = args.out or os.path.join(here, "results", "quick" if args.quick else "")
  out_dir = os.path.normpath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  if args.lapack_threads is not None:
    common.set_lapack_threads(args.lapack_threads)
  config = QUICK if args.quick else FULL
  sections = args.only.split(",") if args.only else list(SECTIONS)
  unknown = set(sections) - set(SECTIONS)
  if unknown:
    parser.error(f"unknown sections {sorted(unknown)}")
  machine = common.machine_info()
  measured = {"date_utc": machine["date_utc"], "git_commit": _git_commit(here)}
  results = {"mode": "quick" if args.quick else "full", "machine": machine,
             "config": {k: config[k] for k in sections}, "timings_s": {},
             "section_runs": {}}
  previous_path = os.path.join(out_dir, "results.json")
  if args.merge and os.path.exists(previous_path):
    with open(previous_path) as f:
      previous = json.load(f)
    old_run = {"date_utc": previous.get("machine", {}).get("date_utc"), "git_commit": None}
    for name in SECTIONS:
      if name in previous and name not in sections:
        results[name] = previous[name]
        results["config"][name] = previous.get("config", {}).get(name)
        results["timings_s"][name] = previous.get("timings_s", {}).get(name)
        results["section_runs"][name] = previous.get("section_runs", {}).get(name, old_run)
  for name in sections:
    results["section_runs"][name] = measured
    start = time.perf_counter()
    print(f"[benchmarks] {name} ...", flush=True)
    results[name] = run_section(name, config[name])
    results["timings_s"][name] = time.perf_counter() - start
    print(f"[benchmarks] {name} done in {results['timings_s'][name]:.1f} s", flush=True)
    _write_json(results, out_dir)  # partial results survive an interrupted run
  results["machine"]["load_average_at_end"] = list(os.getloadavg())
  headline_d = config["step"]["d_values"][0] if args.quick else 256
  results["headline"] = headline(results, d=headline_d)
  _write_json(results, out_dir)
  summary = summary_markdown(results)
  with open(os.path.join(out_dir, "summary.md"), "w") as f:
    f.write(summary + "\n")
  if not args.no_plots:
    results["plots"] = plots.all_plots(results, out_dir)
  print(summary)
  print(f"[benchmarks] wrote {out_dir}/results.json, summary.md"
        + ("" if args.no_plots else " and plots"))
  return results


if __name__ == "__main__":
  main()
