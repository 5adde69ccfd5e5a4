"""Figures and the markdown report of sensitivity campaigns (paper Figures 4-6, section 5.1).

Reads only saved results (``results.csv`` rebuilt from the part files), so
``hasched report DIR`` can redraw everything after, or during, a campaign.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from hasched.errors import HaschedError  # noqa: E402
from hasched.io import atomic_write, check_out_dir, claim_out_dir  # noqa: E402
from hasched.report.search import save_figure  # noqa: E402
from hasched.study.campaign import (  # noqa: E402
    load_results,
    read_config,
    summarize_results,
    write_tables,
)

__all__ = ["check_report_dir", "plot_sensitivity", "sensitivity_findings", "write_report"]

THRESHOLD_PTS = 5.0


def plot_sensitivity(summary: pd.DataFrame, model: str, path: str | Path) -> Path:
    """Accuracy vs FR_max (log x), one panel per error type, one line per layer entry."""
    s = summary[summary["model"] == model]
    from hasched.sim.faults import PAPER_FR_MAX

    order = list(PAPER_FR_MAX)
    errors = sorted(dict.fromkeys(s["error"]),
                    key=lambda e: (order.index(e) if e in order else len(order), e))
    n = max(1, len(errors))
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.4), sharey=True, squeeze=False)
    for ax, err in zip(axes[0], errors, strict=False):
        d = s[s["error"] == err]
        for layer, g in d.groupby("layers", sort=False):
            g = g.sort_values("fr_max")
            ax.errorbar(g["fr_max"], 100 * g["accuracy_mean"], yerr=100 * g["accuracy_std"],
                        marker="o", ms=3, capsize=2, label=layer)
        ax.axhline(100 * d["clean_accuracy"].mean(), color="grey", ls=":", lw=1,
                   label="fault-free")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        rates = sorted(set(d["fr_max"]))
        if len(rates) <= 6:
            ax.set_xticks(rates, [f"{r:g}" for r in rates])
        ax.set_title(err)
        ax.set_xlabel("FR_max")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{model}: accuracy vs maximum fault rate (mean +- std)")
    fig.tight_layout()
    return save_figure(fig, path)


def sensitivity_findings(summary: pd.DataFrame) -> pd.DataFrame:
    """Per model x error: the most sensitive layer (largest mean degradation at the largest
    FR_max) and, per layer, the smallest FR_max whose mean degradation exceeds 5 points."""
    out = []
    for (model, err), d in summary.groupby(["model", "error"], sort=True):
        top = d[d["fr_max"] == d["fr_max"].max()].sort_values("degradation_mean_pts")
        worst = top.iloc[-1]
        over = d[(d["layers"] == worst["layers"]) & (d["degradation_mean_pts"] > THRESHOLD_PTS)]
        out.append({"model": model, "error": err, "most_sensitive": worst["layers"],
                    "at_fr_max": float(worst["fr_max"]),
                    "degradation_pts": float(worst["degradation_mean_pts"]),
                    "fr_max_over_5pts": float(over["fr_max"].min()) if len(over) else math.nan})
    return pd.DataFrame(out)


def _deg(s: pd.DataFrame, model: str, err: str, fr: float) -> pd.Series:
    d = s[(s["model"] == model) & (s["error"] == err) & (s["fr_max"].sub(fr).abs() < 1e-12)]
    return d.set_index("layers")["degradation_mean_pts"]


def _fmt(series: pd.Series) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in series.sort_values(ascending=False).items())


def _claims(s: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(claim, verdict, our numbers); verdict is holds / does not hold / not measured."""
    rows: list[tuple[str, str, str]] = []
    m = "mnist32-cnn"
    for err in ("flip-to-1", "bitflip"):
        deg = _deg(s, m, err, 5e-3)
        claim = f"(1) mnist32-cnn, {err}: c0 is the most sensitive layer, large degradation " \
                "at FR_max 5e-3"
        if deg.empty or "c0" not in deg:
            rows.append((claim, "not measured", "-"))
            continue
        ok = deg.idxmax() == "c0" and deg["c0"] > THRESHOLD_PTS
        rows.append((claim, "holds" if ok else "does not hold",
                     f"degradation (pts) at 5e-3: {_fmt(deg)}"))
    for model in sorted(set(s["model"])):
        d = s[(s["model"] == model) & (s["error"] == "flip-to-0")]
        claim = f"(2) {model}, flip-to-0: < 5 points degradation even at FR_max 0.5"
        if d.empty or d["fr_max"].max() < 0.5:
            rows.append((claim, "not measured", "-"))
            continue
        deg = _deg(s, model, "flip-to-0", 0.5)
        rows.append((claim, "holds" if deg.max() < THRESHOLD_PTS else "does not hold",
                     f"degradation (pts) at 0.5: {_fmt(deg)}"))
    for err in ("tf32", "bf16"):
        d = s[(s["model"] == m) & (s["error"] == err)]
        claim = f"(3) mnist32-cnn, {err}: mantissa truncation hurts op the most"
        if d.empty or "op" not in set(d["layers"]):
            rows.append((claim, "not measured", "-"))
            continue
        fr = float(d["fr_max"].max())
        deg = _deg(s, m, err, fr)
        rows.append((claim, "holds" if deg.idxmax() == "op" else "does not hold",
                     f"degradation (pts) at {fr:g}: {_fmt(deg)}"))
    f = "fashion-cnn"
    for err in ("flip-to-1", "bitflip"):
        claim = f"(4) fashion-cnn, {err}: tolerates ~100x higher FR_max than mnist32-cnn; " \
                "c0 and c1 the sensitive layers"
        fd = s[(s["model"] == f) & (s["error"] == err)]
        md = s[(s["model"] == m) & (s["error"] == err)]
        if fd.empty or md.empty:
            rows.append((claim, "not measured", "needs campaigns of both models"))
            continue

        def first_over(d: pd.DataFrame) -> float:
            worst = d.groupby("fr_max")["degradation_mean_pts"].max()
            over = worst[worst > THRESHOLD_PTS]
            return float(over.index.min()) if len(over) else math.nan

        fm, mm = first_over(fd), first_over(md)
        fr = float(fd["fr_max"].max())
        deg = _deg(s, f, err, fr)
        top2 = set(deg.sort_values(ascending=False).index[:2])
        ratio = fm / mm if not (math.isnan(fm) or math.isnan(mm)) else math.nan
        ok = (math.isnan(fm) or ratio >= 30) and bool(top2 & {"c0", "c1", "c0+c1"})
        rows.append((claim, "holds" if ok else "does not hold",
                     f"first FR_max > 5 pts: fashion {fm:g}, mnist32 {mm:g} (ratio "
                     f"{ratio:.3g}); degradation at {fr:g}: {_fmt(deg)}"))
    return rows


def write_report(dirs: str | Path | list[str | Path], out: str | Path | None = None) -> dict:
    """Rebuilds tables, draws one figure per model and writes ``report.md``.

    Args:
        dirs: One or more campaign folders (several: e.g. mnist32-cnn and fashion-cnn, so
            claim 4 can compare them).
        out: Where figures and ``report.md`` go [default: the first folder].

    Returns:
        ``{"report": path, "figures": [paths], "summary": DataFrame, "findings": DataFrame}``.
    """
    dirs = [Path(d) for d in (dirs if isinstance(dirs, list) else [dirs])]
    if not dirs:
        raise HaschedError("no campaign folder given")
    configs = [read_config(d) for d in dirs]
    if all(load_results(d).empty for d in dirs):
        raise HaschedError(f"no finished cells in {', '.join(map(str, dirs))} yet")
    out = Path(out) if out is not None else dirs[0]
    check_report_dir(out)  # before anything is written, the campaigns' tables included
    df = pd.concat([write_tables(d)[0] for d in dirs], ignore_index=True)
    with claim_out_dir(out, {"hasched": "report", "campaigns": [str(d) for d in dirs]},
                       lock=False):
        return _write(out, dirs, configs, df)


def check_report_dir(out: str | Path) -> bool:
    """The output-folder policy of ``report --out``: new, empty, a campaign or a report folder.

    Raises:
        HaschedError: ``out`` is a file, foreign, or holds another command's config.json.
    """
    def compatible(cfg: dict, path: Path) -> None:
        campaign = isinstance(cfg.get("config"), dict) and "format" in cfg
        if not campaign and cfg.get("hasched") != "report":
            raise HaschedError(f"{path} is neither a campaign's nor a report's config; use "
                               "another --out")

    return check_out_dir(out, what="report", compatible=compatible)


def _write(out: Path, dirs: list[Path], configs: list, df: pd.DataFrame) -> dict:
    """Figures, then report.md, into ``out`` (each written atomically)."""
    summary = summarize_results(df)
    figures = [plot_sensitivity(summary, model, out / f"sensitivity-{model}.png")
               for model in sorted(set(summary["model"]))]
    findings = sensitivity_findings(summary)
    lines = ["# Fault-sensitivity report", ""]
    for d, cfg in zip(dirs, configs, strict=True):
        n = int((df["model"] == cfg.model).sum())
        lines.append(f"- `{d}`: {cfg.model}, seeds {list(cfg.seeds)}, layers "
                     f"{list(cfg.layers)}, errors {list(cfg.errors)}, FR_max {cfg.fr_max}, "
                     f"profile seeds {list(cfg.profile_seeds)}, {cfg.repeats} repeats, "
                     f"images {cfg.images}, {cfg.device}; {n} evaluations")
    for model, clean in df.groupby("model")["clean_accuracy"].mean().items():
        if clean < 0.8:
            lines.append(f"- **warning**: {model} has a mean clean accuracy of "
                         f"{100 * clean:.1f}%; its checkpoints look undertrained, so the "
                         "verdicts below say little about the paper's claims")
    lines += ["", "Accuracy and degradation are mean +- sample std over model seeds x "
              "profile seeds x repeats; degradation = clean - faulty accuracy in "
              "percentage points.", "", "## Most sensitive layer per error type", "",
              "| model | error | most sensitive | at FR_max | degradation (pts) | "
              "first FR_max > 5 pts |", "|---|---|---|---|---|---|"]
    for r in findings.itertuples():
        over = "never" if math.isnan(r.fr_max_over_5pts) else f"{r.fr_max_over_5pts:g}"
        lines.append(f"| {r.model} | {r.error} | {r.most_sensitive} | {r.at_fr_max:g} | "
                     f"{r.degradation_pts:.1f} | {over} |")
    lines += ["", "## The paper's claims (section 5.1) against our numbers", "",
              "| claim | verdict | our numbers |", "|---|---|---|"]
    lines += [f"| {c} | **{v}** | {n} |" for c, v, n in _claims(summary)]
    lines += ["", "## Summary", "", "| model | error | FR_max | layers | n | clean (%) | "
              "accuracy (%) | degradation (pts) |", "|---|---|---|---|---|---|---|---|"]
    for r in summary.itertuples():
        lines.append(f"| {r.model} | {r.error} | {r.fr_max:g} | {r.layers} | {r.n} | "
                     f"{100 * r.clean_accuracy:.2f} | {100 * r.accuracy_mean:.2f} +- "
                     f"{100 * r.accuracy_std:.2f} | {r.degradation_mean_pts:.2f} +- "
                     f"{r.degradation_std_pts:.2f} |")
    lines += ["", "## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures] + [""]
    report = atomic_write(out / "report.md", "\n".join(lines))
    return {"report": report, "figures": figures, "summary": summary, "findings": findings}
