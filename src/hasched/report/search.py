"""Figures and markdown of a schedule search (paper Figures 7-10)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hasched.io import atomic_write  # noqa: E402

__all__ = ["plot_convergence", "plot_recovery", "plot_cases", "save_figure", "write_markdown"]

_COLORS = {"ga": "tab:blue", "random": "tab:orange"}


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
        h = [r for r in rows if r["algorithm"] == alg and r["run"] == run]
        x = [r["evaluations"] for r in h]
        c = _COLORS.get(alg, None)
        label = f"{'HAS GA' if alg == 'ga' else alg} run {run}"
        ax.plot(x, [100 * r["best_fitness"] for r in h], color=c, alpha=0.9, label=label + " best")
        if alg == "ga":
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
    _bar(ax, ["clean", "degraded\n(identity)", "recovered\n(HAS)", "random\nsearch"],
         [r["clean"], r["identity"], r["has"], r["random"]],
         ["tab:green", "tab:red", "tab:blue", "tab:orange"])
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
    lines = [
        f"# HAS search: {s['model']} seed {s['seed']}, layers {'+'.join(summary['layers'])}",
        "",
        f"Error {s['error']}, FR_max {s['fr_max']:g}, profile seed {s['profile_seed']}; "
        f"{s['algorithm']} population {s['population']}, {s['generations']} generations, "
        f"{s['runs']} run(s), fitness = mean of {s['repeats']} error instances on images "
        f"{s['search_images']}. Held-out: images {s['holdout_images']}, "
        f"{s['holdout_repeats']} fresh error instances.",
        "",
        "| schedule | held-out accuracy % (95% CI) |",
        "|---|---|",
        f"| clean | {_fmt(r['clean'])} |",
        f"| identity (degraded) | {_fmt(r['identity'])} |",
        f"| HAS | {_fmt(r['has'])} |",
        f"| random search (same budget) | {_fmt(r['random'])} |",
        "",
        f"Degradation {100 * summary['degradation']:.2f} points, recovery "
        f"{100 * summary['recovery']:.2f} points"
        + (f" ({100 * frac:.0f}% of the loss)" if frac is not None else "")
        + f"; HAS - random {100 * summary['has_minus_random']:.2f} points.",
        f"Search: best fitness {se['best_fitness']:.4f} (random {se['random_best_fitness']:.4f}),"
        f" evaluations per run {se['evaluations']}, {se['search_seconds']:.0f} s searching, "
        f"{summary['wall_seconds']:.0f} s wall.",
        "",
        "Files: schedule.json, schedule-random.json, history.csv, convergence.png, "
        "recovery.png, summary.json.",
        "",
    ]
    return atomic_write(path, "\n".join(lines))
