"""Figures and markdown of a schedule search (paper Figures 7-10)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hasched.io import atomic_write  # noqa: E402

__all__ = ["plot_convergence", "plot_recovery", "plot_cases", "plot_searchers", "save_figure",
           "write_markdown"]

_COLORS = {"ga": "tab:blue", "random": "tab:orange", "criticality": "tab:green",
           "hybrid": "tab:purple", "cma": "tab:brown"}
_LABELS = {"ga": "HAS GA"}


def _label(alg: str) -> str:
    return _LABELS.get(alg, alg)


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Writes ``fig`` atomically (format from the suffix) and closes it, even on failure."""
    path = Path(path)
    try:
        return atomic_write(path, lambda fh: fig.savefig(fh, format=path.suffix.lstrip(".")
                                                         or "png", dpi=dpi))
    finally:
        plt.close(fig)


def plot_convergence(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Best (solid) and mean (dotted) search fitness against evaluations, per run (Fig. 10).

    Args:
        rows: history rows with ``algorithm, run, evaluations, best_fitness, mean_fitness``.
    """
    fig, ax = plt.subplots(figsize=(6, 4))
    for (alg, run) in sorted({(r["algorithm"], r["run"]) for r in rows}):
        # Probe steps (criticality, hybrid) have no schedule fitness yet.
        h = [r for r in rows if r["algorithm"] == alg and r["run"] == run
             and r["best_fitness"] not in (None, "")]
        x = [r["evaluations"] for r in h]
        c = _COLORS.get(alg, None)
        label = f"{_label(alg)} run {run}"
        ax.plot(x, [100 * r["best_fitness"] for r in h], color=c, alpha=0.9, marker="." if
                len(h) < 3 else None, label=label + " best")
        if alg in ("ga", "hybrid"):
            ax.plot(x, [100 * r["mean_fitness"] for r in h], color=c, ls=":", alpha=0.6,
                    label=label + " mean")
    ax.set_xlabel("fitness evaluations (schedules)")
    ax.set_ylabel("search-set accuracy (%)")
    ax.set_title(title or "search convergence", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return save_figure(fig, path)


def _bar(ax, labels, stats, colors) -> None:
    means = [100 * s["mean"] for s in stats]
    err = [[100 * (s["mean"] - s["ci95"][0]) for s in stats],
           [100 * (s["ci95"][1] - s["mean"]) for s in stats]]
    bars = ax.bar(labels, means, yerr=err, capsize=4, color=colors)
    for b, m in zip(bars, means, strict=True):
        ax.text(b.get_x() + b.get_width() / 2, m + 1, f"{m:.1f}", ha="center", fontsize=7)


def plot_recovery(summary: dict, path: str | Path) -> Path:
    """Held-out clean / degraded (identity) / recovered (HAS) / random bars with 95% CIs."""
    r = summary["results"]
    s = _flat(summary["settings"])
    fig, ax = plt.subplots(figsize=(5, 4))
    alg = _label(s.get("algorithm", "ga")).replace("HAS GA", "HAS")
    bars = [("clean", r["clean"], "tab:green"), ("degraded\n(identity)", r["identity"], "tab:red"),
            (f"recovered\n({alg})", r["has"], "tab:blue"),
            ("random\nsearch", r["random"], "tab:orange")]
    bars = [b for b in bars if b[1] is not None]  # no random baseline when it was not run
    _bar(ax, [b[0] for b in bars], [b[1] for b in bars], [b[2] for b in bars])
    ax.set_ylim(0, 105)
    ax.set_ylabel("held-out top-1 accuracy (%)")
    ax.set_title(f"{s['model']} seed {s['seed']} {'+'.join(summary['layers'])} {s['error']} "
                 f"FR_max {s['fr_max']:g} (profile {s['profile_seed']})", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_cases(cases: list[dict], path: str | Path) -> Path:
    """Grouped bars per reproduce case: clean / degraded / recovered / random (Figs 7-9).

    Args:
        cases: dicts with ``name`` and ``clean, identity, has, random`` each ``{mean, ci95}``.
    """
    import numpy as np

    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(cases) + 2), 4))
    x = np.arange(len(cases))
    keys = [("clean", "tab:green"), ("identity", "tab:red"), ("has", "tab:blue"),
            ("random", "tab:orange")]
    w = 0.2
    for j, (k, c) in enumerate(keys):
        m = [100 * cs[k]["mean"] for cs in cases]
        lo = [100 * (cs[k]["mean"] - cs[k]["ci95"][0]) for cs in cases]
        hi = [100 * (cs[k]["ci95"][1] - cs[k]["mean"]) for cs in cases]
        ax.bar(x + (j - 1.5) * w, m, w, yerr=[lo, hi], capsize=2, color=c,
               label={"identity": "degraded", "has": "HAS"}.get(k, k))
    ax.set_xticks(x, [cs["name"] for cs in cases], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("held-out top-1 accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def _flat(settings: dict) -> dict:
    """Search settings with the scenario's fields on top (``error`` = the fault model)."""
    scn = settings.get("scenario", {})
    return {**scn, "error": scn.get("fault"), **settings}


def _fmt(st: dict) -> str:
    return f"{100 * st['mean']:.2f} [{100 * st['ci95'][0]:.2f}, {100 * st['ci95'][1]:.2f}]"


def write_markdown(summary: dict, path: str | Path) -> Path:
    """A short markdown summary of one search folder."""
    s, r, se = _flat(summary["settings"]), summary["results"], summary["search"]
    frac = summary["recovered_fraction"]
    alg = _label(s["algorithm"])
    opts = ", ".join(f"{k}={v}" for k, v in s.get("options", {}).items())
    lines = [
        f"# Schedule search: {s['model']} seed {s['seed']}, layers "
        f"{'+'.join(summary['layers'])}",
        "",
        f"Error {s['error']}, FR_max {s['fr_max']:g}, profile seed {s['profile_seed']}; "
        f"{alg}{f' ({opts})' if opts else ''}, budget population {s['population']} x "
        f"{s['generations']} generations, "
        f"{s['runs']} run(s), fitness = mean of {s['repeats']} error instances on images "
        f"{s['search_images']}. Held-out: images {s['holdout_images']}, "
        f"{s['holdout_repeats']} fresh error instances.",
        "",
        "| schedule | held-out accuracy % (95% CI) |",
        "|---|---|",
        f"| clean | {_fmt(r['clean'])} |",
        f"| identity (degraded) | {_fmt(r['identity'])} |",
        f"| {alg} | {_fmt(r['has'])} |",
        f"| random search (same budget) | {_fmt(r['random']) if r['random'] else 'not run'} |",
        "",
        f"Degradation {100 * summary['degradation']:.2f} points, recovery "
        f"{100 * summary['recovery']:.2f} points"
        + (f" ({100 * frac:.0f}% of the loss)" if frac is not None else "")
        + (f"; {alg} - random {100 * summary['has_minus_random']:.2f} points."
           if summary["has_minus_random"] is not None else "."),
        f"Search: best fitness {se['best_fitness']:.4f}"
        + (f" (random {se['random_best_fitness']:.4f})"
           if se["random_best_fitness"] is not None else "")
        + f", evaluations per run {se['evaluations']}, {se['search_seconds']:.0f} s searching, "
        f"{summary['wall_seconds']:.0f} s wall.",
        "",
        "Files: schedule.json, schedule-random.json, history.csv, convergence.png, "
        "recovery.png, summary.json.",
        "",
    ]
    return atomic_write(path, "\n".join(lines))


def plot_searchers(curves: list[dict], path: str | Path, title: str = "") -> Path:
    """All searchers on one figure: search fitness against evaluations (log x), and each
    searcher's held-out accuracy (95% CI) at its total evaluation count.

    Args:
        curves: one dict per searcher: ``algorithm``, ``history`` (rows with
            ``evaluations`` and ``best_fitness``; ``None`` entries are skipped) and
            optionally ``holdout`` (``{mean, ci95}``) and ``evaluations``.
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in curves:
        alg = c["algorithm"]
        h = [r for r in c["history"] if r["best_fitness"] not in (None, "")]
        color = _COLORS.get(alg)
        ax.plot([float(r["evaluations"]) for r in h], [100 * float(r["best_fitness"]) for r in h],
                color=color, marker="o" if len(h) < 3 else None, ms=4,
                label=f"{_label(alg)} (search)")
        if c.get("holdout"):
            m, (lo, hi) = 100 * c["holdout"]["mean"], c["holdout"]["ci95"]
            ax.errorbar([c["evaluations"]], [m], yerr=[[m - 100 * lo], [100 * hi - m]],
                        color=color, marker="s", ms=6, capsize=3, ls="none",
                        label=f"{_label(alg)} held-out {m:.1f}")
    ax.set_xscale("log")
    ax.set_xlabel("fitness evaluations (schedules or probes, log scale)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title or "searchers against evaluations", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return save_figure(fig, path)
