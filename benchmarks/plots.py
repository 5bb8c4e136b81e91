"""PNG plots of a results dict (as written by `benchmarks.run`)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from benchmarks import common  # noqa: E402

_COLORS = {"adamw": "tab:gray", "soap": "tab:blue", "ivon": "tab:green", "evon": "tab:red",
           "evon_whiten": "tab:purple", "evon_stagger": "tab:orange",
           "torch_adamw": "silver", "ivon_opt": "darkgreen",
           "pytorch_optimizer_soap": "navy"}


def _save(fig, out_dir, name):
  path = os.path.join(out_dir, name)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def step_time_vs_d(results, out_dir):
  panels = [("step", "mean (solid) and median (dashed)"),
            ("growth_d", "growth with d")]
  panels = [(key, title) for key, title in panels if results.get(key)]
  if not panels:
    return None
  fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
  for ax, (key, title) in zip(axes[0], panels):
    records = results[key]
    names = [n for n in list(common.OPTIMIZERS) if n in records[0]["results"]]
    for name in names:
      ds = [r["d"] for r in records]
      ax.plot(ds, [r["results"][name]["mean_ms"] for r in records], "o-",
              color=_COLORS.get(name), label=name)
      ax.plot(ds, [r["results"][name]["median_ms"] for r in records], "--",
              color=_COLORS.get(name), alpha=0.6)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("d (shapes (d,3d),(d,d),(d,4d),(4d,d) per layer)")
    ax.set_ylabel("step time [ms]")
    ax.set_title(f"{title} ({records[0]['layers']} layers)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  return _save(fig, out_dir, "step_time_vs_d.png")


def ratio_bars(results, out_dir, d=256):
  records = [r for r in results.get("step", []) if r["d"] == d] or results.get("step", [])[-1:]
  if not records:
    return None
  record = records[0]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, reference in zip(axes, ("soap", "adamw")):
    ratio = record.get(f"ratio_vs_{reference}")
    if not ratio:
      continue
    shown = [n for n in record["results"] if n != reference]
    ax.bar(shown, [ratio[n]["mean"] for n in shown],
           color=[_COLORS.get(n) for n in shown])
    ax.axhline(1.0, color="black", lw=0.8)
    if reference == "soap":
      ax.axhline(1.05, color="tab:red", ls=":", lw=1, label="target EVON <= 1.05 x SOAP")
      ax.axhline(1.25, color="tab:orange", ls=":", lw=1,
                 label="target whitened EVON <= 1.25 x SOAP")
      ax.legend(fontsize=8)
    ax.set_ylabel(f"mean step / {reference} mean step")
    ax.set_title(f"d={record['d']}, {record['layers']} layers (same interleaved run)")
    ax.tick_params(axis="x", rotation=30)
  peers = results.get("peers", {}).get("records")
  if peers:
    rec = [r for r in peers if r["d"] == d] or peers[-1:]
    fig2, ax = plt.subplots(figsize=(6, 4))
    items = list(rec[0]["ratios"].items())
    ax.bar([k.replace("_vs_", "\nvs ") for k, _ in items], [v["mean"] for _, v in items],
           color="tab:cyan")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_ylabel("mean step ratio (evon_jax / torch peer)")
    ax.set_title(f"vs PyTorch peers, d={rec[0]['d']}, {rec[0]['layers']} layers")
    ax.tick_params(axis="x", labelsize=7)
    _save(fig2, out_dir, "peer_ratios.png")
  return _save(fig, out_dir, "ratios.png")


def memory_bars(results, out_dir):
  records = results.get("memory", {}).get("state_bytes")
  if not records:
    return None
  d = max(r["d"] for r in records if r["d"] <= 256) if any(
      r["d"] <= 256 for r in records) else records[0]["d"]
  rows = [r for r in records if r["d"] == d]
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.bar([r["optimizer"] for r in rows], [r["state_per_param_byte"] for r in rows],
         color=[_COLORS.get(r["optimizer"]) for r in rows])
  soap = [r for r in rows if r["optimizer"] == "soap"]
  if soap:
    ax.axhline(soap[0]["state_per_param_byte"] + 1, color="tab:red", ls=":",
               label="SOAP + one parameter buffer (target for EVON)")
    ax.legend(fontsize=8)
  ax.set_ylabel("optimizer state bytes / parameter bytes")
  ax.set_title(f"state memory, d={d}, {rows[0]['layers']} layers")
  ax.tick_params(axis="x", rotation=30)
  return _save(fig, out_dir, "memory.png")


def growth(results, out_dir):
  panels = [k for k in ("layers", "frequency", "max_precond_dim", "train") if results.get(k)]
  if not panels:
    return None
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
  for ax, key in zip(axes[0], panels):
    if key == "train":
      records = results["train"]["records"]
      names = list(records[0]["optimizer_fraction"])
      for name in names:
        ax.plot([r["batch"] for r in records],
                [r["optimizer_fraction"][name] for r in records], "o-",
                color=_COLORS.get(name), label=name)
      ax.set_xscale("log", base=2)
      ax.set_xlabel("batch size (sequences)")
      ax.set_ylabel("optimizer fraction of train step")
      ax.set_title("GPT train step")
      ax.legend(fontsize=8)
      continue
    records = results[key]
    x_key = {"layers": "layers", "frequency": "precondition_frequency",
             "max_precond_dim": "max_precond_dim"}[key]
    for name in records[0]["results"]:
      xs = [r[x_key] for r in records]
      ax.plot(xs, [r["results"][name]["mean_ms"] for r in records], "o-",
              color=_COLORS.get(name), label=f"{name} mean")
      if key == "frequency":
        ax.plot(xs, [r["results"][name]["max_ms"] for r in records], ":",
                color=_COLORS.get(name), label=f"{name} max")
    ax.set_xlabel(x_key)
    ax.set_ylabel("step time [ms]")
    ax.set_yscale("log")
    if key != "max_precond_dim":
      ax.set_xscale("log", base=2)
    ax.set_title(f"d={records[0]['d']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
  return _save(fig, out_dir, "growth.png")


def all_plots(results, out_dir) -> list[str]:
  os.makedirs(out_dir, exist_ok=True)
  paths = [step_time_vs_d(results, out_dir), ratio_bars(results, out_dir),
           memory_bars(results, out_dir), growth(results, out_dir)]
  if results.get("peers", {}).get("records"):
    paths.append(os.path.join(out_dir, "peer_ratios.png"))
  return [p for p in paths if p]
