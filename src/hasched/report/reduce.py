"""Figures and markdown of the Reduce study: chip maps, the resilience map, and the one plot
that compares the policies (total retraining cost against yield)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hasched.errors import HaschedError  # noqa: E402
from hasched.io import atomic_write, read_json, require  # noqa: E402
from hasched.report.search import save_figure  # noqa: E402

__all__ = ["plot_chips", "plot_resilience", "acceptance", "write_reduce_report"]

_STYLE = {"none": ("tab:gray", "s"), "reduce": ("tab:red", "*"),
          "reduce-crit": ("tab:purple", "P"), "remap": ("tab:green", "D")}
_LABEL = {"none": "none (FAP only)", "reduce": "Reduce (amount from the chip's rate)",
          "reduce-crit": "Reduce-crit (amount from its FAP damage)",
          "remap": "remap rows (no retraining)"}


def plot_chips(chips: list, path: str | Path, max_cols: int = 20) -> Path:
    """Small multiples of chip maps (black = faulty PE), one row per faulty-PE share.

    Args:
        chips: ``(name, ChipMap)`` pairs.
    """
    groups: dict[float, list] = {}
    for name, chip in chips:
        frac = chip.faulty_fraction if chip.faulty_fraction is not None else float(
            chip.faulty.mean())
        groups.setdefault(frac, []).append((name, chip))
    n_rows = len(groups)
    n_cols = min(max_cols, max(len(v) for v in groups.values()))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(0.9 * n_cols + 0.6, 1.05 * n_rows + 0.4),
                             squeeze=False)
    for i, (frac, members) in enumerate(sorted(groups.items())):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(members):
                ax.axis("off")
                continue
            name, chip = members[j]
            ax.imshow(chip.faulty, cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"{int(chip.faulty.sum())} PEs", fontsize=6)
            if j == 0:
                ax.set_ylabel(f"{100 * frac:g} %", fontsize=7)
    fig.suptitle(f"chip fault maps ({chips[0][1].shape[0]}x{chips[0][1].shape[1]} PEs, "
                 "black = faulty; rows: share of faulty PEs)", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_resilience(summary: dict, out: str | Path, title: str = "") -> list[Path]:
    """``resilience_heatmap.png`` (worst-case and mean validation drop per (f, e)) and
    ``resilience_curves.png`` (accuracy against epochs per rate: mean, 95 % CI, worst)."""
    out = Path(out)
    rates, epochs = summary["rates"], summary["epochs"]
    clean = summary["clean"]["val"]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 0.9 * len(epochs), 1.2 + 0.45 * len(rates)))
    for ax, key, label in ((axes[0], "val_worst", "worst chip"), (axes[1], "val_mean",
                                                                  "mean over chips")):
        drop = [[100 * (clean - v) for v in row] for row in summary[key]]
        im = ax.imshow(drop, cmap="RdYlGn_r", vmin=0, vmax=max(5.0, max(map(max, drop))),
                       aspect="auto")
        for i, row in enumerate(drop):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(epochs)), [f"{e:g}" for e in epochs])
        ax.set_yticks(range(len(rates)), [f"{100 * f:g} %" for f in rates])
        ax.set_xlabel("FAP+T epochs")
        ax.set_ylabel("faulty PEs")
        ax.set_title(f"accuracy drop (points), {label}", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(title or "resilience map R[f, e] (validation images)", fontsize=9)
    fig.tight_layout()
    heat = save_figure(fig, out / "resilience_heatmap.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    x = [max(e, 0.02) for e in epochs]  # log axis; e = 0 drawn at 0.02
    cmap = plt.get_cmap("viridis")
    for i, f in enumerate(rates):
        c = cmap(i / max(len(rates) - 1, 1))
        ax.plot(x, [100 * v for v in summary["val_mean"][i]], "o-", color=c, ms=3,
                label=f"{100 * f:g} % faulty")
        # a t-interval over a handful of chips can leave [0, 100] %: clip it to the axis
        ax.fill_between(x, [max(0.0, 100 * v) for v in summary["val_ci_lo"][i]],
                        [min(100.0, 100 * v) for v in summary["val_ci_hi"][i]], color=c,
                        alpha=0.15)
        ax.plot(x, [100 * v for v in summary["val_worst"][i]], ":", color=c)
    ax.axhline(100 * clean, color="k", lw=0.8, ls="--", label="clean")
    low = min(min(row) for row in summary["val_worst"])
    ax.set_ylim(max(0.0, 100 * low - 5), min(100.0, 100 * clean + 3))
    ax.set_xscale("log")
    ax.set_xticks(x, [f"{e:g}" for e in epochs])
    ax.set_xlabel("FAP+T epochs (0 = FAP only)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title((title or "FAP+T recovery") + ": mean (band: 95 % CI), worst dotted",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return [heat, save_figure(fig, out / "resilience_curves.png")]


def _fixed(policies: dict) -> list[tuple[float, str, dict]]:
    return sorted((float(n.split(":")[1]), n, s) for n, s in policies.items()
                  if n.startswith("fixed:"))


def _cheapest_fixed(pol: dict, at_least: float) -> tuple[str, dict] | None:
    """The cheapest fixed amount (``none`` = 0 epochs) with yield >= ``at_least``."""
    fixed = ([(0.0, "none", pol["none"])] if "none" in pol else []) + _fixed(pol)
    return next(((n, s) for _, n, s in fixed if s["yield"] >= at_least - 1e-12), None)


def acceptance(summary: dict, target_yield: float = 0.95) -> dict:
    """Each Reduce variant against the fixed policies: its yield, and its epochs as a share
    of the cheapest fixed amount (``none`` = 0 epochs) that reaches at least the same yield.

    Returns:
        ``{"target_yield", "fixed_max": {...}, "reduce": {...}, "reduce-crit": {...}}``; a
        variant's entry holds ``yield``, ``epochs``, ``seconds``, ``fixed_same_yield``,
        ``epoch_ratio``, ``meets_yield`` and ``passed`` (yield >= target and ratio <= 1/2).
    """
    pol = summary["policies"]
    fixed = _fixed(pol)
    out: dict = {"target_yield": target_yield}
    if fixed:
        _, name, s = fixed[-1]
        out["fixed_max"] = {"policy": name, "yield": s["yield"], "epochs": s["total_epochs"]}
    for variant in ("reduce", "reduce-crit"):
        if variant not in pol:
            continue
        r = pol[variant]
        v = {"yield": r["yield"], "epochs": r["total_epochs"], "seconds": r["total_seconds"]}
        same = _cheapest_fixed(pol, r["yield"])
        if same is not None:
            n, s = same
            v["fixed_same_yield"] = {"policy": n, "yield": s["yield"],
                                     "epochs": s["total_epochs"]}
            v["epoch_ratio"] = r["total_epochs"] / s["total_epochs"] if s["total_epochs"] \
                else (0.0 if r["total_epochs"] == 0 else math.inf)
        v["meets_yield"] = r["yield"] >= target_yield - 1e-12
        v["passed"] = bool(v["meets_yield"] and v.get("epoch_ratio", math.inf) <= 0.5)
        out[variant] = v
    return out


def _cost_plot(summary: dict, path: Path, title: str, bound: dict | None = None) -> Path:
    pol = summary["policies"]
    fixed = _fixed(pol)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    for ax, key, scale, xlabel in ((axes[0], "total_epochs", 1.0, "total retraining epochs "
                                    "(all chips)"), (axes[1], "total_seconds", 1 / 60,
                                                     "total wall time (min, all chips)")):
        if fixed:
            xs = [s[key] * scale for _, _, s in fixed]
            ys = [100 * s["yield"] for _, _, s in fixed]
            ax.plot(xs, ys, "o-", color="tab:blue", label="fixed:E (every chip E epochs)")
            for (e, _, _), xv, yv in zip(fixed, xs, ys, strict=True):
                ax.annotate(f"E={e:g}", (xv, yv), textcoords="offset points", xytext=(3, -9),
                            fontsize=7, color="tab:blue")
        for name, (color, marker) in _STYLE.items():
            if name in pol:
                ax.plot([pol[name][key] * scale], [100 * pol[name]["yield"]], marker,
                        color=color, ms=14 if marker == "*" else 8, ls="none",
                        label=_LABEL[name])
        if bound is not None and key == "total_epochs":  # epochs only: it has no wall time
            ax.plot([bound["total_epochs"]], [100 * bound["yield"]], "o", mfc="none",
                    color="k", ms=10, ls="none",
                    label="hindsight (per-chip oracle on test images; not a policy)")
        ax.axhline(95, color="k", lw=0.7, ls="--")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"yield (% chips within {summary['max_drop']:g} pt of clean)")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def _hindsight(table: Path, summary: dict) -> dict | None:
    """The per-chip oracle of :func:`~hasched.study.retrain.hindsight_bound` from
    ``retrain.csv``, with its epochs as a share of the cheapest fixed amount of at least its
    yield (the most any Reduce variant could save on these chips)."""
    from hasched.study.retrain import hindsight_bound

    rows = [{"chip": r["chip"], "policy": r["policy"], "cost_epochs": float(r["cost_epochs"]),
             "meets": r["meets"] == "1"} for r in _read_csv(table)]
    bound = hindsight_bound(rows)
    if bound is None:
        return None
    out = {k: bound[k] for k in ("chips", "yield", "total_epochs")}
    same = _cheapest_fixed(summary["policies"], bound["yield"])
    if same is not None:
        out["fixed_same_yield"] = same[0]
        if same[1]["total_epochs"] > 0:
            out["epoch_ratio"] = bound["total_epochs"] / same[1]["total_epochs"]
    return out


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def write_reduce_report(resilience_dir: str | Path, retrain_dir: str | Path,
                        out: str | Path | None = None) -> dict:
    """``cost_vs_yield.png`` and ``reduce.md`` from finished runs (written to ``out``,
    default the retraining folder). Returns the paths and the acceptance verdict."""
    res_dir, ret_dir = Path(resilience_dir), Path(retrain_dir)
    for d, what, name in ((res_dir, "resilience", "resilience.json"),
                          (ret_dir, "retrain", "summary.json")):
        if not (d / name).is_file():
            raise HaschedError(f"{d} holds no finished {what} run ({name} is missing)")
    rmap = read_json(res_dir / "resilience.json", what="resilience map")
    summary = read_json(ret_dir / "summary.json", what="retrain summary")
    require(summary, "policies", dict, file=ret_dir / "summary.json")
    require(rmap, "rates", list, file=res_dir / "resilience.json")
    out = Path(out) if out is not None else ret_dir
    try:  # saved by hasched, but possibly edited or truncated by hand since
        study = summary.get("study", {})
        title = (f"{study.get('model', '?')} on {study.get('mapping', '?')}: "
                 f"{len(_read_csv(ret_dir / 'retrain.csv')) // max(len(summary['policies']), 1)}"
                 f" chips, constraint: test drop <= {summary['max_drop']:g} pt")
        verdict = acceptance(summary)
        bound = _hindsight(ret_dir / "retrain.csv", summary)
        if bound is not None:
            verdict["hindsight"] = bound
        md = _markdown(rmap, summary, verdict, title)
    except (KeyError, TypeError, ValueError, IndexError, FileNotFoundError) as exc:
        raise HaschedError(f"{ret_dir} and {res_dir} do not hold a complete Reduce run "
                           f"({type(exc).__name__}: {exc})") from None
    fig = _cost_plot(summary, out / "cost_vs_yield.png", title, verdict.get("hindsight"))
    atomic_write(out / "reduce.md", md)
    return {"figure": fig, "report": out / "reduce.md", "acceptance": verdict}


def _markdown(rmap: dict, summary: dict, verdict: dict, title: str) -> str:
    lines = [f"# Reduce: {title}", "",
             f"Clean accuracy: validation {100 * summary['clean']['val']:.2f} %, test "
             f"{100 * summary['clean']['test']:.2f} %.", "",
             "| policy | yield | yield per faulty-PE rate | total epochs | total wall (min) |"
             " total CPU (min) | mean drop (pt) | worst drop (pt) | step-ups |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, s in summary["policies"].items():
        per = ", ".join(f"{100 * float(k):.3g} %: {100 * v:.0f} %"
                        for k, v in sorted(s["yield_by_rate"].items(), key=lambda kv:
                                           float(kv[0])))
        lines.append(f"| {name} | {100 * s['yield']:.1f} % | {per} | {s['total_epochs']:.2f} | "
                     f"{s['total_seconds'] / 60:.2f} | {s['total_cpu_seconds'] / 60:.2f} | "
                     f"{s['mean_drop']:.2f} | "
                     f"{s['worst_drop']:.2f} | {s['step_ups']} |")
    lines += ["", "## Verdict", ""]
    for variant in ("reduce", "reduce-crit"):
        if variant not in verdict:
            continue
        r = verdict[variant]
        line = (f"- {variant}: yield {100 * r['yield']:.1f} % (target >= "
                f"{100 * verdict['target_yield']:.0f} %) with {r['epochs']:.2f} epochs")
        if "fixed_same_yield" in r:
            f = r["fixed_same_yield"]
            line += (f"; the cheapest fixed amount with at least that yield is {f['policy']} "
                     f"({100 * f['yield']:.1f} %, {f['epochs']:.2f} epochs): "
                     f"{100 * r['epoch_ratio']:.0f} % of its epochs")
        else:
            line += "; no fixed amount reaches that yield"
        lines.append(line + f". Acceptance (yield >= 95 %, <= half the epochs): "
                     f"{'met' if r['passed'] else 'NOT met'}.")
    if "fixed_max" in verdict:
        f = verdict["fixed_max"]
        lines.append(f"- {f['policy']} (every chip the maximum): yield {100 * f['yield']:.1f} "
                     f"%, {f['epochs']:.2f} epochs.")
    if "hindsight" in verdict:
        h = verdict["hindsight"]
        line = (f"- Hindsight bound (not a policy: each chip given the smallest amount of this "
                f"run that meets the constraint on the test images): yield "
                f"{100 * h['yield']:.1f} % with {h['total_epochs']:.2f} epochs")
        if "epoch_ratio" in h:
            line += (f", {100 * h['epoch_ratio']:.0f} % of {h['fixed_same_yield']}'s epochs. "
                     "No policy that chooses among these amounts reaches that yield with "
                     "fewer epochs")
        elif "fixed_same_yield" in h:  # FAP alone reaches it
            line += f"; {h['fixed_same_yield']} reaches that yield with 0 epochs"
        else:
            line += "; no fixed amount reaches that yield"
        lines.append(line + ".")
    lines += ["", "## Resilience map (validation accuracy %, worst / mean over chips)", "",
              "| faulty PEs | " + " | ".join(f"e={e:g}" for e in rmap["epochs"]) + " |",
              "|---|" + "---|" * len(rmap["epochs"])]
    for i, f in enumerate(rmap["rates"]):
        cells = [f"{100 * w:.1f} / {100 * m:.1f}" for w, m in zip(
            rmap["val_worst"][i], rmap["val_mean"][i], strict=True)]
        lines.append(f"| {100 * f:g} % | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
