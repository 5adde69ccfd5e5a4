"""Tables, heatmaps and the markdown reports of the Fal-reTune study (``resilience-ax`` and
``retune``). Everything is drawn from saved rows, so a report can be redrawn any time."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from hasched.io import atomic_write  # noqa: E402
from hasched.report.search import save_figure  # noqa: E402

__all__ = ["plot_loss_heatmaps", "axres_markdown", "headline", "write_axres_report",
           "retune_table", "write_retune_report", "rows_csv"]


def _pts(x: float) -> str:
    return f"{100 * x:.1f}"


def _ci(s: dict) -> str:
    return f"{_pts(s['mean'])} [{_pts(s['ci95'][0])}, {_pts(s['ci95'][1])}]"


def rows_csv(rows: list[dict]) -> str:
    """The rows as CSV (every row's columns, in order of appearance; nested values as
    JSON)."""
    if not rows:
        return ""
    buf = io.StringIO()
    names = list(dict.fromkeys(k for r in rows for k in r))
    w = csv.DictWriter(buf, fieldnames=names, restval="", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: json.dumps(v) if isinstance(v, dict | list) else v
                    for k, v in r.items()})
    return buf.getvalue()


def plot_loss_heatmaps(rows: list[dict], fraction: float, path: str | Path,
                       title: str = "") -> Path:
    """Mean accuracy loss (points), multiplier x stuck bit; one panel per site and value."""
    rows = [r for r in rows if r["faulty_pes"] == fraction]
    mults = list(dict.fromkeys(r["multiplier"] for r in rows))
    bits = sorted({r["bit"] for r in rows})
    sites = list(dict.fromkeys(r["site"] for r in rows))
    values = sorted({r["value"] for r in rows})
    fig, axes = plt.subplots(len(sites), len(values), squeeze=False,
                             figsize=(1.0 + 0.55 * len(bits) * len(values),
                                      0.9 + 0.45 * len(mults) * len(sites)))
    for i, site in enumerate(sites):
        for j, val in enumerate(values):
            grid = np.full((len(mults), len(bits)), np.nan)
            for a, m in enumerate(mults):
                for b, bit in enumerate(bits):
                    losses = [r["clean_accuracy"] - r["accuracy"] for r in rows
                              if (r["multiplier"], r["site"], r["bit"], r["value"]) ==
                              (m, site, bit, val)]
                    if losses:
                        grid[a, b] = 100 * sum(losses) / len(losses)
            ax = axes[i][j]
            ax.imshow(grid, cmap="Reds", vmin=0, vmax=100, aspect="auto")
            for (a, b), v in np.ndenumerate(grid):
                if np.isfinite(v):
                    ax.text(b, a, f"{v:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if v > 60 else "black")
            ax.set_xticks(range(len(bits)), [str(b) for b in bits], fontsize=7)
            ax.set_yticks(range(len(mults)), mults, fontsize=7)
            ax.set_title(f"{site}, stuck-at-{val}", fontsize=8)
            ax.set_xlabel("stuck bit", fontsize=7)
    fig.suptitle(title or f"accuracy loss (points), {fraction:g} of PEs faulty", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def headline(summary: dict, chips: int) -> str:
    """'same faulty bit: AxDNN loses X, AccDNN loses Y' for the fault with the largest gap."""
    h = summary["headline"]
    if h is None:
        return "no AxDNN cell finished yet"
    return (f"same faulty bit ({h['site']} bit {h['bit']} stuck-at-{h['value']}, "
            f"{h['faulty_pes']:g} of PEs faulty, {chips} chips): AxDNN ({h['multiplier']}) "
            f"loses {_ci(h['ax_loss'])} points, AccDNN loses {_ci(h['acc_loss'])} points "
            "(mean [95% CI over chips])")


def axres_markdown(summary: dict, settings: dict, figures: list[Path]) -> str:
    """The report: headline, direction per multiplier, the per-fault table."""
    scn = settings["scenario"]
    mults = [m for m in settings["multipliers"] if m != "exact"]
    lines = [f"# resilience-ax: {scn['model']} seed {scn['seed']} ({scn['mapping']}, int8)", "",
             f"Layers on the accelerator: {'+'.join(scn['layers'])}; {summary['cells']} "
             f"cells; chips per fraction: {settings['chips']}.", "",
             "Fault-free accuracy: fp32 "
             f"{_pts(summary['reference_accuracy'] or 0)} %; int8 " + ", ".join(
                 f"{m} {_pts(a)} %" for m, a in summary["clean_accuracy"].items()) + ".", "",
             "**Headline.** " + headline(summary, settings["chips"]), "",
             "## Does the AxDNN lose more than the AccDNN? (averaged over all faults)", "",
             "| multiplier | faults | AxDNN loss | AccDNN loss | gap (mean [95% CI over "
             "chips]) | AxDNN worse / better (CI excludes 0) | direction holds |",
             "|---|---:|---:|---:|---|---|---|"]
    for p in summary["per_multiplier"]:
        holds = "yes" if p["mean_gap"]["ci95"][0] > 0 else (
            "reversed" if p["mean_gap"]["ci95"][1] < 0 else "not significant")
        lines.append(f"| {p['multiplier']} | {p['faults']} | {_pts(p['ax_loss_mean'])} | "
                     f"{_pts(p['acc_loss_mean'])} | {_ci(p['mean_gap'])} | {p['ax_worse']} / "
                     f"{p['ax_better']} | {holds} |")
    lines += ["", "## Loss per fault (points, mean [95% CI over chips])", "",
              "| site | stuck | faulty PEs | bit | exact | " + " | ".join(mults) + " |",
              "|---|---|---:|---:|---|" + "---|" * len(mults)]
    table = {(f["site"], f["value"], f["faulty_pes"], f["bit"], f["multiplier"]): f
             for f in summary["per_fault"]}
    for key in sorted({k[:4] for k in table}, key=lambda k: (k[0], k[1], k[2], k[3])):
        cells = [table.get((*key, m)) for m in mults]
        exact = next((c["acc_loss"] for c in cells if c is not None), None)
        row = [f"{_ci(c['ax_loss'])}{'*' if c['gap']['ci95'][0] > 0 else ''}" if c else ""
               for c in cells]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]:g} | {key[3]} | "
                     f"{_ci(exact) if exact else ''} | " + " | ".join(row) + " |")
    lines += ["", "`*`: the AxDNN loses significantly more than the AccDNN on the same chips "
              "(paired 95% CI of the gap above 0).", ""]
    lines += [f"![heatmap]({p.name})" for p in figures]
    return "\n".join(lines) + "\n"


def write_axres_report(out: str | Path, rows: list[dict], settings: dict, summary: dict
                       ) -> dict:
    """Writes results.csv, summary.json, the heatmaps and report.md into ``out``."""
    out = Path(out)
    atomic_write(out / "results.csv", rows_csv(rows))
    atomic_write(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    figs = []
    scn = settings["scenario"]
    for f in sorted({r["faulty_pes"] for r in rows}):
        figs.append(plot_loss_heatmaps(
            rows, f, out / f"heatmap_f{f:g}.png",
            f"{scn['model']}: accuracy loss (points), {f:g} of PEs faulty, "
            f"{scn['mapping']}"))
    report = atomic_write(out / "report.md", axres_markdown(summary, settings, figs))
    return {"report": report, "figures": figs}


def retune_table(summary: dict) -> str:
    """The mitigations side by side (markdown)."""
    lines = ["| faulty PEs | method | chips | accuracy % (mean [95% CI]) | "
             "recovered % of the loss (mean [95% CI]) |", "|---:|---|---:|---|---|"]
    names = {"none": "none (AxDNN, unmitigated)",
             "exact": "exact multiplier (AccDNN, unmitigated)"}
    for r in summary["rows"]:
        rec = "" if r["recovery"] is None else (
            f"{100 * r['recovery']['mean']:.0f} [{100 * r['recovery']['ci95'][0]:.0f}, "
            f"{100 * r['recovery']['ci95'][1]:.0f}]")
        frac = "(file)" if r["faulty_pes"] is None else f"{r['faulty_pes']:g}"
        lines.append(f"| {frac} | {names.get(r['method'], r['method'])} | {r['chips']} | "
                     f"{_ci(r['accuracy'])} | {rec} |")
    return "\n".join(lines) + "\n"


def write_retune_report(out: str | Path, rows: list[dict], settings: dict, summary: dict
                        ) -> Path:
    """Writes results.csv, summary.json and report.md (the table) into ``out``."""
    out = Path(out)
    scn = settings["scenario"]
    atomic_write(out / "results.csv", rows_csv(rows))
    atomic_write(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    fault = scn["fault"] + (":" + ",".join(f"{k}={v}" for k, v in scn["fault_params"].items())
                            if scn["fault_params"] else "")
    clean = summary["clean_accuracy"]
    text = (f"# retune: {scn['model']} seed {scn['seed']}, int8 {scn['multiplier']}, "
            f"{scn['mapping']}\n\nFault: {fault}; layers {'+'.join(scn['layers'])}. "
            f"Fault-free accuracy: fp32 {_pts(summary['reference_accuracy'] or 0)} %, "
            f"int8 exact {_pts(summary['exact_clean_accuracy'] or 0)} %, int8 "
            f"{scn['multiplier']} (the AxDNN) {_pts(clean or 0)} %. Recovery on a chip is "
            "(method - none) / (fault-free AxDNN - none).\n\n" + retune_table(summary))
    return atomic_write(out / "report.md", text)
